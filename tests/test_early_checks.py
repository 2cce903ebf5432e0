"""Checks that need no cluster, as pure functions: duplicate YAML keys, run names, output
directories, text files. (The CLI rows are in test_bad_input.py.)"""

from __future__ import annotations

import pytest

from orchestrator import rundir, yamlload
from orchestrator.errors import UsageError
from trainer.dataset import DataError
from orchestrator.preprocess import read_text_file


@pytest.mark.parametrize("text,key,line", [
    ("train: {lr: 0.001, lr: 0.5}", "train.lr", 1),
    ("model:\n  dim: 64\ntrain:\n  seq_len: 32\n  seq_len: 64\n", "train.seq_len", 5),
    ("variants:\n  - {name: a, attention: flash}\n  - {name: b, name: c}\n", "variants[1].name", 3),
    ("train: {}\ntrain: {}\n", "train", 2),
])
def test_a_duplicate_yaml_key_is_an_error_naming_its_path_and_line(text, key, line):
    with pytest.raises(yamlload.DuplicateKeyError) as e:
        yamlload.load(text)
    assert e.value.key_path == key and e.value.problem_mark.line + 1 == line


def test_aliases_merge_keys_and_equal_keys_in_different_mappings_are_fine():
    text = "base: &b {lr: 0.1}\ntrain: {<<: *b, seq_len: 32}\nother: *b\n"
    assert yamlload.load(text) == {"base": {"lr": 0.1}, "train": {"lr": 0.1, "seq_len": 32}, "other": {"lr": 0.1}}
    assert yamlload.load("1: a\n'1': b\n") == {1: "a", "1": "b"}  # an int and a string key differ


def test_a_yaml_alias_bomb_is_checked_in_linear_time():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    assert len(yamlload.load("\n".join(lines))) == 9  # 10^9 leaves if walked naively


def test_a_name_longer_than_a_directory_name_may_be_is_refused_before_anything(tmp_path):
    with pytest.raises(UsageError, match="300 bytes long"):
        rundir.check_new(tmp_path, "n" * 300)
    rundir.check_new(tmp_path, "n" * 255)
    with pytest.raises(UsageError, match="510 bytes long"):  # bytes, not characters
        rundir.check_new(tmp_path, "é" * 255)


def test_an_output_dir_that_is_or_lies_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file; expected a directory"):
        rundir.check_new(tmp_path / "f", None)
    with pytest.raises(UsageError, match="is under .*/f, which is a file"):
        rundir.check_new(tmp_path / "f" / "a" / "b", None)
    rundir.check_new(tmp_path / "new" / "runs", None)  # not there yet: created later


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file (NUL byte at offset 8)"),
    (b"caf\xe9 au lait", "not a UTF-8 text file (invalid byte 0xe9 at offset 3)"),
])
def test_preprocess_refuses_a_txt_that_is_not_text_naming_the_file(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_text_file(path)
    assert str(e.value) == f"{path}: {message}"
    path.write_text("plain text, ünïcode too\n")
    assert read_text_file(path) == "plain text, ünïcode too\n"


def test_a_warmup_longer_than_the_run_is_said_before_it_starts(tmp_path, caplog):
    """It was silent (issue 32): the learning rate never reaches train.lr and never decays."""
    import logging

    from orchestrator.run import TrainOptions, prepare
    from tests.conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", {"train": {"warmup_steps": 10, "max_steps": 4}})
    with caplog.at_level(logging.WARNING, logger="orchestrator.run"):
        prepare(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs")))
    assert (f"{cfg}: variant flash: train.warmup_steps 10 exceeds train.max_steps 4: the learning rate peaks at "
            "0.0012 (of train.lr 0.003) and never decays") in caplog.text
