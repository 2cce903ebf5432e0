"""bench/corpus.py: a token dataset from local text files, for benchmarks that must not repeat data."""

import json

import pytest

from bench import corpus
from trainer import dataset


def test_local_text_files_become_a_token_dataset_that_data_path_takes(tmp_path, capsys):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    (root / "pkg" / "b.md").write_text("# Notes\nSome prose about attention kernels.\n" * 50)
    (root / "pkg" / "blob.txt").write_bytes(b"\xff\xfe\x00binary")  # not UTF-8: skipped
    (root / "pkg" / "c.so").write_bytes(b"\x7fELF")  # not a text suffix
    out = tmp_path / "out"
    assert corpus.main([str(out), "--roots", str(root), "--vocab-size", "300"]) == 0
    lines = (out / "raw" / "corpus.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"][:3] for line in lines] == ["def", "# N"]  # sorted, one document per file
    data = dataset.load_dataset(out / "data")
    assert data.vocab_size == 300 and len(data.tokens) > 100
    assert f"{len(data.tokens):,} tokens (vocab 300) from 2 files" in capsys.readouterr().err


def test_it_stops_at_max_mb_and_refuses_a_directory_in_use(tmp_path, capsys):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.txt").write_text(f"file {i} " * 100)
    docs, paths = corpus.collect([root], max_bytes=1400)
    assert len(docs) == 2 and paths[0].endswith("0.txt")  # 700 bytes each: the second reaches 1,400
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(SystemExit):
        corpus.main([str(tmp_path / "used"), "--roots", str(root)])
    assert "not empty" in capsys.readouterr().err
