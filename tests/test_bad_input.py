"""Bad input, one table: every row ends within seconds with exit code 2 (usage or input) or 1
(runtime), a one-line message naming what is wrong, no traceback, and no earlier run touched.

Each row runs the CLI as a user would, in a directory that already holds an earlier run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_config
from tests.procs import leftovers, session_dirs

pytestmark = pytest.mark.ray  # every row runs the CLI in a subprocess

CONFIGS = {
    "malformed.yaml": "train: {lr: [1, 2",
    "list.yaml": "- a\n- b\n",
    "binary.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
    "unknown-key.yaml": "train: {learning_rate: 0.1}",
    "wrong-type.yaml": "train: {max_steps: ten}",
    "negative-lr.yaml": "train: {lr: -0.1}",
    "heads.yaml": "model: {dim: 100, n_heads: 3}",
    "duplicate-key.yaml": "train: {lr: 0.001, lr: 0.5}",
}


def _dataset(path: Path, tokens: np.ndarray, vocab: int, *, count: int | None = None, meta: str | None = None) -> None:
    path.mkdir()
    (path / "tokens.bin").write_bytes(tokens.astype(np.uint16).tobytes())
    header = {"format_version": 1, "tokenizer": {"kind": "tokenizers", "file": None, "eos_id": 0},
              "vocab_size": vocab, "dtype": "uint16", "num_tokens": len(tokens) if count is None else count}
    (path / "meta.json").write_text(meta if meta is not None else json.dumps(header))


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path):
    """Configs, broken datasets, a non-run directory and an earlier run, all in one place."""
    for name, content in CONFIGS.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    write_config(tmp_path / "long.yaml", {"train": {"seq_len": 10_000_000}})
    write_config(tmp_path / "small-vocab.yaml", {"model": {"vocab_size": 100}})
    write_config(tmp_path / "three-variants.yaml", {"variants": [{"name": n, "attention": "flash"} for n in "abc"]})
    write_config(tmp_path / "many-workers.yaml", {"scaling": {"num_workers": 64}})
    write_config(tmp_path / "gpus.yaml", {"scaling": {"use_gpu": True}})
    write_config(tmp_path / "layers.yaml", {"model": {"n_layers": 100000}})
    write_config(tmp_path / "micro-batch.yaml", {"train": {"micro_batch_size": 1000000}})
    ok = np.arange(4000) % 300
    _dataset(tmp_path / "empty-data", np.zeros(0), 300, count=0)
    _dataset(tmp_path / "truncated-data", ok[:1000], 300, count=4000)
    _dataset(tmp_path / "corrupt-header", ok, 300, meta="{\"vocab_size\": ")
    _dataset(tmp_path / "foreign-tokens", ok + 1000, 300)  # ids from another tokenizer
    (tmp_path / "no-tokens").mkdir()
    (tmp_path / "no-tokens" / "meta.json").write_text((tmp_path / "empty-data" / "meta.json").read_text())
    (tmp_path / "huge.yaml").write_text("train: {lr: 0.001}\n" + "# padding\n" * 120_000)  # 1.2 MB
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "loop-a").symlink_to("loop-b")
    (tmp_path / "loop-b").symlink_to("loop-a")
    write_config(tmp_path / "init-loop.yaml", {"model": {"init_from": "loop-a"}})
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    earlier = tmp_path / "runs" / "earlier"
    (earlier / "flash" / "checkpoints" / "checkpoint_00000003").mkdir(parents=True)
    (earlier / "flash" / "checkpoints" / "checkpoint_00000003" / "state.pt").write_bytes(b"weights")
    (earlier / "summary.json").write_text('{"run": {"status": "succeeded"}}')
    (earlier / "config.yaml").write_text("train: {max_steps: 3}\n")
    (earlier / "options.json").write_text("{}")
    return tmp_path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


T = ["train", "--output-dir", "runs"]
ROWS = [
    # (id, args, exit code, message on stderr, seconds allowed)
    ("malformed-yaml", T + ["--config-file", "malformed.yaml"], 2, "malformed.yaml: malformed YAML at line 1"),
    ("yaml-not-a-mapping", T + ["--config-file", "list.yaml"], 2, "list.yaml: expected a mapping of sections"),
    ("binary-garbage", T + ["--config-file", "binary.yaml"], 2, "binary.yaml: not a text file"),
    ("unknown-key", T + ["--config-file", "unknown-key.yaml"], 2, "unknown key 'train.learning_rate'; valid keys:"),
    ("wrong-type", T + ["--config-file", "wrong-type.yaml"], 2, "train.max_steps: Input should be a valid integer"),
    ("out-of-range", T + ["--config-file", "negative-lr.yaml"], 2, "train.lr: Input should be greater than 0 (got -0.1)"),
    ("impossible-shape", T + ["--config-file", "heads.yaml"], 2, "dim (100) must be divisible by n_heads (3)"),
    ("out-of-range-flag", T + ["--max-steps", "-3"], 2, "train.max_steps: Input should be greater than 0"),
    ("missing-config", T + ["--config-file", "missing.yaml"], 2, "missing.yaml: config file not found"),
    ("missing-data-dir", T + ["--preprocessed-data", "nodata"], 2, "nodata: data directory not found"),
    ("missing-token-file", T + ["--preprocessed-data", "no-tokens"], 2, "tokens.bin: missing"),
    ("empty-token-file", T + ["--preprocessed-data", "empty-data"], 2, "tokens.bin: empty dataset"),
    ("truncated-token-file", T + ["--preprocessed-data", "truncated-data"], 2,
     "tokens.bin: 2000 bytes, but the header promises 4000 uint16 tokens"),
    ("corrupt-header", T + ["--preprocessed-data", "corrupt-header"], 2, "meta.json: corrupt header"),
    ("tokens-from-another-tokenizer", T + ["--preprocessed-data", "foreign-tokens"], 2,
     "is outside the vocab of 300"),
    ("vocab-smaller-than-tokenizer", T + ["--config-file", "small-vocab.yaml"], 2,
     "model.vocab_size 100 is smaller than the tokenizer's vocab"),
    ("seq-len-longer-than-data", T + ["--config-file", "long.yaml"], 2, "train.seq_len 10000000 is longer than the data"),
    ("run-both-models-with-three-variants", T + ["--run-both-models", "--config-file", "three-variants.yaml"], 2,
     "--run-both-models runs the config's two variants, but 'variants' lists 3 (a, b, c)"),
    ("resume-with-config", ["train", "--resume", "runs/earlier", "--config-file", "long.yaml"], 2,
     "--resume contradicts --config-file"),
    ("seeds-zero", T + ["--seeds", "0"], 2, "--seeds 0: must be at least 1"),
    ("seeds-negative", T + ["--seeds", "-2"], 2, "--seeds -2: must be at least 1"),
    ("resume-with-seeds", ["train", "--resume", "runs/earlier", "--seeds", "3"], 2, "--resume contradicts --seeds"),
    ("resume-with-max-steps", ["train", "--resume", "runs/earlier", "--max-steps", "9"], 2,
     "--resume contradicts --max-steps"),
    ("resume-with-set", ["train", "--resume", "runs/earlier", "--set", "train.lr=0.1"], 2,
     "--resume contradicts --set"),
    ("set-unknown-key", T + ["--set", "train.learning_rate=0.1"], 2,
     "--set train.learning_rate=0.1: unknown key 'train.learning_rate'; valid keys:"),
    ("set-wrong-type", T + ["--set", "train.max_steps=ten"], 2,
     "--set train.max_steps=ten: train.max_steps: Input should be a valid integer"),
    ("worker-range-min-zero", T + ["--set", "scaling.num_workers=[0, 2]"], 2,
     "scaling.num_workers: [min, max] needs min at least 1 (got [0, 2])"),
    ("worker-range-min-above-max", T + ["--set", "scaling.num_workers=[3, 2]"], 2,
     "scaling.num_workers: [min, max] needs min at most max (got [3, 2])"),
    ("resume-missing-dir", ["train", "--resume", "runs/nope"], 2, "--resume runs/nope: run directory not found"),
    ("resume-not-a-run", ["train", "--resume", "not-a-run"], 2, "not-a-run/options.json: missing"),
    ("existing-run-name", T + ["--name", "earlier"], 2, "a run with this name exists"),
    ("duplicate-yaml-key", T + ["--config-file", "duplicate-key.yaml"], 2,
     "duplicate-key.yaml: duplicate key 'train.lr' at line 1, column 20"),
    ("config-is-a-device", T + ["--config-file", "/dev/zero"], 2,
     "/dev/zero: not a regular file (a character device); expected a YAML file"),
    ("config-is-a-fifo", T + ["--config-file", "fifo.yaml"], 2, "fifo.yaml: not a regular file (a FIFO)"),
    ("config-too-large", T + ["--config-file", "huge.yaml"], 2,
     "huge.yaml: larger than 1 MiB, the most a config file may hold"),
    ("name-too-long", T + ["--name", "n" * 300], 2, "--name: 300 bytes long; a directory name may have at most 255"),
    ("output-dir-is-a-file", ["train", "--output-dir", "a-file"], 2, "--output-dir a-file: is a file; expected a directory"),
    ("output-dir-under-a-file", ["train", "--output-dir", "a-file/runs"], 2,
     "--output-dir a-file/runs: is under a-file, which is a file"),
    ("preprocess-binary-txt", ["preprocess", "--raw-data", "image.txt", "--output-dir", "o"], 2,
     "image.txt: not a text file (NUL byte at offset 8)"),
    ("init-from-symlink-loop", T + ["--config-file", "init-loop.yaml"], 2, "model.init_from: loop-a: symlink loop"),
    ("unknown-flag", T + ["--bogus"], 2, "unrecognized arguments: --bogus"),
    ("unknown-command", ["nonsense"], 2, "invalid choice: 'nonsense'"),
    ("preprocess-missing-input", ["preprocess", "--raw-data", "none.txt", "--output-dir", "o"], 2,
     "none.txt: no such file or directory"),
    ("unreachable-address", T + ["--address", "127.0.0.1:{port}"], 2, "no Ray cluster answers at 127.0.0.1:{port}"),
    pytest.param("more-workers-than-cpus", T + ["--config-file", "many-workers.yaml"], 2,
                 "scaling.num_workers 64 x cpus_per_worker 1 needs 64 CPUs; the cluster has", marks=pytest.mark.ray,
                 id="more-workers-than-cpus"),
    pytest.param("elastic-min-beyond-the-cluster", T + ["--set", "scaling.num_workers=[64, 65]"], 2,
                 "scaling.num_workers [64, 65]: min 64 x cpus_per_worker 1 needs 64 CPUs; the cluster has",
                 marks=pytest.mark.ray, id="elastic-min-beyond-the-cluster"),
    pytest.param("more-gpus-than-the-cluster-has", T + ["--config-file", "gpus.yaml", "--address", "{cluster}"], 2,
                 "scaling.use_gpu true with num_workers 2 needs 2 GPUs; the cluster has 0", marks=pytest.mark.ray,
                 id="more-gpus-than-the-cluster-has"),
]
ROWS += [  # the plan's memory estimate refuses them before any worker allocates (issue 18)
    pytest.param(case, T + ["--config-file", f"{case}.yaml"], 2,
                 "does not fit in memory under any strategy: ddp needs", marks=pytest.mark.ray, id=case)
    for case in ("layers", "micro-batch")
]
ROWS = [r if hasattr(r, "marks") else pytest.param(*r, id=r[0]) for r in ROWS]


@pytest.mark.parametrize("case,args,exit_code,message", ROWS)
def test_bad_input_fails_fast_with_one_line_and_touches_no_earlier_run(request, workdir, cli_env, case, args,
                                                                       exit_code, message):
    fill = {"port": _unused_port()}
    if "{cluster}" in " ".join(args):  # join the session's Ray rather than start another
        ray = request.getfixturevalue("ray_session")
        fill["cluster"] = "127.0.0.1:" + ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
        # The session's Ray turned token auth on in this process's environment: pass it on.
        cli_env = {**cli_env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}
    args = [a.format(**fill) for a in args]
    message = message.format(**fill)
    before = _tree(workdir / "runs")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], env=cli_env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - started
    assert proc.returncode == exit_code, stdout + stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert "Traceback" not in stdout + stderr
    assert _tree(workdir / "runs") == before  # no new run directory, the earlier one byte-identical
    assert leftovers(proc.pid) == [] and session_dirs(proc.pid) == []  # a Ray it started is gone
    # "Within seconds": Python, torch and (for the last rows) a Ray start; generous for a busy CI box.
    assert elapsed < 90, f"took {elapsed:.0f} s"
