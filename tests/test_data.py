"""Token datasets: preprocess round trip, the embedded default, batches, and bad data."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import preprocess
from trainer import dataset


def _raw(tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} says hello world"}) for i in range(30)))
    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"] * 10}), tmp_path / "c.parquet")
    return [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"]


def test_preprocess_round_trip_decodes_back_to_the_input_text(tmp_path):
    files = _raw(tmp_path)
    meta = preprocess.preprocess(files, tmp_path / "out", vocab_size=300)
    ds = dataset.load_dataset(tmp_path / "out")
    assert meta["num_tokens"] == len(ds.tokens) and ds.vocab_size == meta["vocab_size"] <= 300
    tok = preprocess.Tokenizer.of_dataset(ds)
    ids = [int(t) for t in ds.tokens]
    # Split on EOS and decode each document: the three formats come back in order.
    pieces, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert pieces[0] == files[0].read_text()
    assert pieces[1] == "record 0 says hello world"
    assert pieces[-1] == "parquet row two"
    assert len(pieces) == 1 + 30 + 20


def test_a_users_tokenizer_json_is_used_as_is(tmp_path):
    files = _raw(tmp_path)
    preprocess.preprocess(files, tmp_path / "first", vocab_size=280)
    preprocess.preprocess(files, tmp_path / "second", tokenizer_path=tmp_path / "first" / "tokenizer.json")
    a, b = dataset.load_dataset(tmp_path / "first"), dataset.load_dataset(tmp_path / "second")
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_a_users_sentencepiece_model_is_used_and_kept_with_the_data(tmp_path):
    import sentencepiece as spm

    files = _raw(tmp_path)
    spm.SentencePieceTrainer.train(input=str(files[0]), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    meta = preprocess.preprocess(files, tmp_path / "out", tokenizer_path=tmp_path / "sp.model")
    (tmp_path / "sp.model").unlink()  # the dataset carries its own copy
    ds = dataset.load_dataset(tmp_path / "out")
    tok = preprocess.Tokenizer.of_dataset(ds)
    assert meta["tokenizer"]["kind"] == "sentencepiece" and ds.vocab_size == 40 and tok.eos_id == 2
    ids = [int(t) for t in ds.tokens]
    first_doc = ids[:ids.index(tok.eos_id)]
    assert tok.decode(first_doc) == files[0].read_text().strip()


def test_embedded_dataset_is_built_once_and_cached(tmp_path):
    path = preprocess.embedded_dataset(tmp_path)
    stamp = (path / "tokens.bin").stat().st_mtime_ns
    assert preprocess.embedded_dataset(tmp_path) == path
    assert (path / "tokens.bin").stat().st_mtime_ns == stamp
    ds = dataset.load_dataset(path)
    assert ds.vocab_size == preprocess.EMBEDDED_VOCAB and len(ds.tokens) > 100_000
    assert ds.meta["sources"] == ["pydoc_data.topics"]


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_window_once_per_epoch():
    kw = dict(seed=3, n_windows=50, micro_batch=2, grad_accum=1, world_size=2)
    a, b = dataset.BatchSampler(**kw), dataset.BatchSampler(**kw)
    assert np.array_equal(a.indices(7, 0, 1), b.indices(7, 0, 1))
    seen = np.concatenate([a.indices(s, 0, r) for s in range(12) for r in range(2)] + [a.indices(12, 0, 0)])
    assert sorted(seen[:50]) == list(range(50))
    assert not np.array_equal(dataset.BatchSampler(**{**kw, "seed": 4}).indices(0, 0, 0), a.indices(0, 0, 0))


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = dataset.get_batch(tokens, np.array([0, 3]), 8)
    assert x[1].tolist() == list(range(24, 32)) and y[1].tolist() == list(range(25, 33))


@pytest.mark.parametrize("breakage,message", [
    ("missing_dir", "data directory not found"),
    ("no_meta", "meta.json: missing"),
    ("corrupt_meta", "corrupt header"),
    ("empty_tokens", "empty dataset"),
    ("truncated_tokens", "but the header promises"),
    ("id_outside_vocab", "outside the vocab"),
])
def test_bad_datasets_are_refused_with_the_file_named(tmp_path, breakage, message):
    preprocess.preprocess(_raw(tmp_path), tmp_path / "ds", vocab_size=280)
    ds = tmp_path / "ds"
    if breakage == "missing_dir":
        ds = tmp_path / "nope"
    elif breakage == "no_meta":
        (ds / "meta.json").unlink()
    elif breakage == "corrupt_meta":
        (ds / "meta.json").write_text("{not json")
    elif breakage == "empty_tokens":
        (ds / "tokens.bin").write_bytes(b"")
    elif breakage == "truncated_tokens":
        with open(ds / "tokens.bin", "r+b") as f:
            f.truncate(101)
    elif breakage == "id_outside_vocab":
        meta = json.loads((ds / "meta.json").read_text())
        meta["vocab_size"] = 5
        (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(dataset.DataError, match=message):
        dataset.load_dataset(ds)


def test_raw_inputs_errors_name_the_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(dataset.DataError, match=r"x.csv: unsupported file type"):
        preprocess.preprocess([tmp_path / "x.csv"], tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(dataset.DataError, match=r"bad.jsonl:2: not valid JSON"):
        preprocess.preprocess([tmp_path / "bad.jsonl"], tmp_path / "o")
    with pytest.raises(dataset.DataError, match="no such file"):
        preprocess.preprocess([tmp_path / "missing.txt"], tmp_path / "o")


@pytest.mark.parametrize("column,message", [
    ({"body": ["a document"]}, "bad.parquet: no 'text' column (its columns: body)"),
    ({"text": [1, 2]}, "bad.parquet: the 'text' column holds int64, expected strings"),
])
def test_parquet_without_a_text_column_of_strings_is_refused_in_one_line(tmp_path, column, message):
    """Were a 6-line pyarrow dump, and for integers an AttributeError (exit 1), issue 32."""
    pq.write_table(pa.table(column), tmp_path / "bad.parquet")
    with pytest.raises(dataset.DataError) as e:
        preprocess.preprocess([tmp_path / "bad.parquet"], tmp_path / "out")
    assert str(e.value) == f"{tmp_path / message}"


@pytest.mark.parametrize("fault,message", [(KeyboardInterrupt, None),
                                           (OSError(28, "No space left on device"), "No space left on device")])
def test_preprocess_cut_short_leaves_no_partial_dataset_and_a_rerun_succeeds(tmp_path, monkeypatch, fault, message):
    """A Ctrl-C or a full disk mid-write left a partial tokens.bin that refused the rerun; a full
    disk was a raw OSError (issue 32)."""
    files = _raw(tmp_path)
    encode, calls = preprocess.Tokenizer.encode, []

    def failing(self, text):
        calls.append(text)
        if len(calls) == 5:
            raise fault
        return encode(self, text)

    monkeypatch.setattr(preprocess.Tokenizer, "encode", failing)
    with pytest.raises(dataset.DataError if message else KeyboardInterrupt) as e:
        preprocess.preprocess(files, tmp_path / "out", vocab_size=300)
    if message:
        assert str(e.value) == f"{tmp_path / 'out'}: cannot write the dataset ({message})"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".build-*"))
    monkeypatch.setattr(preprocess.Tokenizer, "encode", encode)
    preprocess.preprocess(files, tmp_path / "out", vocab_size=300)
    assert dataset.load_dataset(tmp_path / "out").vocab_size <= 300
