"""Runs in a bucket (issue 35), against a real S3 API on loopback: moto's server, started here.

Train to ``s3://``, lose a worker and restore from the bucket, ``--resume`` from the bucket on a
machine that has none of the run's files, export, generate and report from it; train from a
Hugging Face model and evaluate on held-out data in the bucket; and the three ways a bucket can
be wrong, each refused in one line before Ray starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import time
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.errors import UsageError
from tests.conftest import run_cli, write_config

BUCKET = "runs-bucket"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields its environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **CREDENTIALS}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def objects(prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def cli_env_for(base: dict, s3: dict, cache) -> dict:
    """The CLI's environment with the bucket's, and a user cache of its own: a machine that
    holds nothing of the run but what it fetches."""
    return {**base, **s3, "XDG_CACHE_HOME": str(cache)}


# ---------------------------------------------------------------- bad buckets, before anything starts


def test_a_bucket_that_does_not_exist_is_refused(s3):
    with pytest.raises(UsageError, match=r"^--output-dir s3://no-such-bucket/runs: bucket 'no-such-bucket' does not "
                                         r"exist$"):
        storage.check_bucket("s3://no-such-bucket/runs")


@contextlib.contextmanager
def wrong_credentials(s3):
    """moto checks signatures while this lasts; the test key was never issued."""
    import requests

    requests.post(f"{s3['AWS_ENDPOINT_URL']}/moto-api/reset-auth", data=b"0", timeout=5)
    try:
        yield
    finally:
        requests.post(f"{s3['AWS_ENDPOINT_URL']}/moto-api/reset-auth", data=b"inf", timeout=5)


def test_wrong_credentials_are_refused(s3):
    with wrong_credentials(s3), pytest.raises(UsageError, match=rf"^--output-dir s3://{BUCKET}/runs: access to bucket "
                                                                rf"'{BUCKET}' denied; check the credentials"):
        storage.check_bucket(f"s3://{BUCKET}/runs")


def test_an_endpoint_that_does_not_answer_is_refused_within_the_timeout(s3, monkeypatch):
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        t0 = time.monotonic()
        with pytest.raises(UsageError, match=rf"^--output-dir s3://{BUCKET}/runs: the object store at {endpoint} did "
                                             r"not answer \(.*\); check the endpoint and the network$"):
            storage.check_bucket(f"s3://{BUCKET}/runs")
        assert time.monotonic() - t0 < storage.BUCKET_TIMEOUT_S * 3


@pytest.mark.ray
def test_cli_refuses_a_missing_bucket_in_one_line_before_ray_starts(tmp_path, cli_env, s3):
    cfg = write_config(tmp_path / "c.yaml")
    env = cli_env_for(cli_env, s3, tmp_path / "cache")
    r = run_cli(["train", "--config-file", str(cfg), "--output-dir", "s3://no-such-bucket/runs"], env, tmp_path,
                timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == "error: --output-dir s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"
    assert not (tmp_path / "cache").exists() and objects("") == {}


# ---------------------------------------------------------------- checkpoints in the bucket, without Ray


def _bucket_checkpoints(tmp_path, prefix: str) -> str:
    """Checkpoints of steps 3, 6, 9 (two ranks each) uploaded under ``prefix``, registered with a
    snapshot as Ray writes it; returns their storage URI."""
    from tests.test_checkpoint import _save
    from trainer import checkpoint, location

    uri = f"s3://{BUCKET}/{prefix}"
    names = [f"checkpoint_{s:08d}" for s in (3, 6, 9)]
    for s, name in zip((3, 6, 9), names):
        location.upload(_save(tmp_path / "written", s), location.join(uri, name))
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    location.write_text(location.join(uri, checkpoint.SNAPSHOT_FILE), json.dumps({
        "checkpoint_results": results, "checkpoint_report_indices": [0, 1, 2],
        "latest_checkpoint_result": results[-1], "pending_training_results": []}))
    return uri


def test_an_upload_cut_short_in_the_bucket_is_skipped_for_the_previous_checkpoint(tmp_path, s3):
    import boto3

    from trainer import checkpoint

    uri = _bucket_checkpoints(tmp_path, "cut-short")
    boto3.client("s3").delete_object(Bucket=BUCKET, Key="cut-short/checkpoint_00000009/rng_rank1.pt")
    store = checkpoint.Store(uri, cache=tmp_path / "copies")
    skipped: list[str] = []
    found = checkpoint.newest_usable(store, Path("checkpoint_00000009"), skipped=skipped)
    assert found == tmp_path / "copies" / "checkpoint_00000006"
    assert skipped[0].startswith("checkpoint_00000009 (") and "rng_rank1.pt: missing" in skipped[0]


def test_a_corrupt_registered_checkpoint_in_the_bucket_leaves_rays_snapshot_and_the_bucket(tmp_path, s3):
    import boto3

    from trainer import checkpoint

    uri = _bucket_checkpoints(tmp_path, "corrupt")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="corrupt/checkpoint_00000009/state.pt", Body=b"flipped")
    store = checkpoint.Store(uri, cache=tmp_path / "copies")
    (line,) = checkpoint.drop_unusable(store)
    assert line.startswith("skipped and removed checkpoint checkpoint_00000009: ") and "checksum" in line
    assert store.names() == ["checkpoint_00000006", "checkpoint_00000003"]
    assert checkpoint.registered(store) == {"checkpoint_00000003", "checkpoint_00000006"}
    assert store.snapshot()["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_00000006"
    assert checkpoint.drop_unusable(store) == []


# ---------------------------------------------------------------- a dataset in the bucket


def test_a_dataset_in_a_bucket_is_fetched_once_per_node_and_again_when_it_changes(tmp_path, s3, monkeypatch):
    import boto3

    from orchestrator.options import TrainOptions
    from orchestrator.run import prepare
    from orchestrator import preprocess
    from trainer import location

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/datasets/pydoc"
    location.upload(preprocess.embedded_dataset(), uri)
    cfg = write_config(tmp_path / "c.yaml", {"data": {"path": uri}})
    prep = prepare(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs")))
    assert prep.data_source == uri and prep.data_path == location.staging(uri, location.READ).resolve()
    tokens = prep.data_path / "tokens.bin"
    fetched_at = tokens.stat().st_mtime_ns
    assert location.fetched(uri).resolve() == prep.data_path and tokens.stat().st_mtime_ns == fetched_at  # not again

    replaced = tokens.read_bytes()[:-2]
    boto3.client("s3").put_object(Bucket=BUCKET, Key="datasets/pydoc/tokens.bin", Body=replaced)
    location.fetched(uri)
    assert tokens.read_bytes() == replaced
    time.sleep(1.1)  # S3 keeps an object's time in whole seconds
    same_size = bytes(reversed(replaced))  # another upload of the same shapes: only its time tells
    boto3.client("s3").put_object(Bucket=BUCKET, Key="datasets/pydoc/tokens.bin", Body=same_size)
    location.fetched(uri)
    assert tokens.read_bytes() == same_size

    with pytest.raises(UsageError, match=rf"data.path s3://{BUCKET}/datasets/none: "):
        prepare(TrainOptions(config_file=str(write_config(tmp_path / "d.yaml", {"data": {"path": f"s3://{BUCKET}/datasets/none"}})),
                             output_dir=str(tmp_path / "runs")))


# ---------------------------------------------------------------- a model and held-out data in the bucket


def _uploaded_llama(tmp_path, name: str, broken: str | None = None) -> str:
    """A tiny transformers Llama (tests/test_init_from.py), broken as ``_break`` says, in the bucket."""
    from tests.test_init_from import _break, tiny_llama
    from trainer import location

    tiny_llama(tmp_path / name, seed=5)
    if broken:
        _break(tmp_path / name, broken)
    uri = f"s3://{BUCKET}/models/{name}"
    location.upload(tmp_path / name, uri)
    return uri


def test_init_from_in_a_bucket_gives_the_shapes_of_its_fetched_copy_and_keeps_the_uri(tmp_path, s3, monkeypatch):
    from orchestrator.options import TrainOptions
    from orchestrator.run import prepare
    from trainer import location

    pytest.importorskip("transformers")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri = _uploaded_llama(tmp_path, "llama")
    local = prepare(TrainOptions(config_file=str(write_config(tmp_path / "l.yaml", {
        "model": {"init_from": str(tmp_path / "llama")}})), output_dir=str(tmp_path / "runs")))
    remote = prepare(TrainOptions(config_file=str(write_config(tmp_path / "r.yaml", {"model": {"init_from": uri}})),
                                  output_dir=str(tmp_path / "runs")))
    assert remote.cfg.model == local.cfg.model.model_copy(update={"init_from": uri})  # the workers fetch the URI
    assert (location.staging(uri, location.READ) / "model.safetensors").read_bytes() == \
        (tmp_path / "llama" / "model.safetensors").read_bytes()


def test_a_hostile_init_from_in_a_bucket_is_refused_naming_its_uri(tmp_path, s3, monkeypatch):
    """The safetensors checks run on the fetched copy, unchanged; the message names the bucket's file."""
    from orchestrator.options import TrainOptions
    from orchestrator.run import prepare

    pytest.importorskip("transformers")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    uri = _uploaded_llama(tmp_path, "int8", broken="int8")
    cfg = write_config(tmp_path / "c.yaml", {"model": {"init_from": uri}})
    with pytest.raises(UsageError) as e:
        prepare(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs")))
    assert str(e.value) == (f"{cfg}: model.init_from: {uri}/model.safetensors: tensor model.layers.0.mlp.up_proj.weight "
                            "has dtype I8; expected floating point (F64, F32, BF16, F16)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["model.init_from", "data.val_path"])
@pytest.mark.parametrize("where, fault, problem", [
    ("s3://no-such-bucket/x", None, "bucket 'no-such-bucket' does not exist"),
    (f"s3://{BUCKET}/x", "credentials", f"access to bucket '{BUCKET}' denied; check the credentials"),
    (f"s3://{BUCKET}/nothing-here", None, "nothing there"),
])
def test_a_bad_bucket_for_init_from_or_val_path_is_one_line_naming_the_key_and_fetches_nothing(
        tmp_path, s3, monkeypatch, key, where, fault, problem):
    from orchestrator.options import TrainOptions
    from orchestrator.run import prepare
    from trainer import location

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    section, field = key.split(".")
    cfg = write_config(tmp_path / "c.yaml", {section: {field: where}})
    with pytest.raises(UsageError) as e:
        with wrong_credentials(s3) if fault else contextlib.nullcontext():
            prepare(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs")))
    assert str(e.value).startswith(f"{cfg}: {key} {where}: {problem}") and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() and not (location.user_cache.root() / location.READ).exists()


@pytest.mark.ray
@pytest.mark.parametrize("key, where, fault, line", [
    ("model.init_from", "s3://no-such-bucket/llama", None,
     "model.init_from s3://no-such-bucket/llama: bucket 'no-such-bucket' does not exist"),
    ("data.val_path", f"s3://{BUCKET}/val", "credentials",
     f"data.val_path s3://{BUCKET}/val: access to bucket '{BUCKET}' denied; check the credentials"),
])
def test_cli_refuses_a_bad_bucket_for_init_from_or_val_path_in_one_line_before_ray_starts(
        tmp_path, cli_env, s3, key, where, fault, line):
    section, field = key.split(".")
    cfg = write_config(tmp_path / "c.yaml", {section: {field: where}})
    with wrong_credentials(s3) if fault else contextlib.nullcontext():
        r = run_cli(["train", "--config-file", str(cfg), "--output-dir", str(tmp_path / "runs")],
                    cli_env_for(cli_env, s3, tmp_path / "cache"), tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {cfg}: {line}") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_training_from_a_model_and_on_held_out_data_in_the_bucket_resumes_on_another_machine(tmp_path, cli_env, s3):
    """The first loss is the Hugging Face model's own on the worker's first batches (which sample
    every window: val_path holds the held-out ones); --resume on a machine with an empty cache
    fetches both again. No credential reaches the run directory."""
    from orchestrator import preprocess
    from tests.test_hf_ray import first_step_loss
    from trainer import location

    transformers = pytest.importorskip("transformers")

    model_uri = _uploaded_llama(tmp_path, "llama")
    val_uri = f"s3://{BUCKET}/datasets/val"
    location.upload(preprocess.embedded_dataset(), val_uri)
    cfg = write_config(tmp_path / "c.yaml", {
        "model": {"init_from": model_uri}, "data": {"val_path": val_uri},
        "train": {"max_steps": 8, "checkpoint_every": 3, "eval_every": 4, "fault": {"rank": 1, "step": 5}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0}})
    run = tmp_path / "runs" / "from-bucket"
    first = run_cli(["train", "--config-file", str(cfg), "--output-dir", str(tmp_path / "runs"), "--name", run.name],
                    cli_env_for(cli_env, s3, tmp_path / "first"), tmp_path, timeout=600)
    assert first.returncode == 1, first.stderr[-3000:]
    (variant, rec), = json.loads((run / "summary.json").read_text())["variants"].items()
    first_loss = json.loads((run / variant / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert first_loss == pytest.approx(first_step_loss(hf, val_path=str(preprocess.embedded_dataset())), rel=1e-5)
    assert rec["final_val_loss"] is not None

    again = run_cli(["train", "--resume", str(run)], cli_env_for(cli_env, s3, tmp_path / "second"), tmp_path,
                    timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (rec,) = json.loads((run / "summary.json").read_text())["variants"].values()
    assert rec["status"] == "succeeded" and rec["start_step"] == 3 and rec["final_val_loss"] is not None
    for cache in ("first", "second"):  # each machine fetched its own copies
        root = location.user_cache.root({"XDG_CACHE_HOME": str(tmp_path / cache)})
        for uri in (model_uri, val_uri):
            assert (root / location.staging(uri, location.READ).relative_to(location.user_cache.root())).is_dir()
    saved = (run / "config.yaml").read_text()
    assert f"init_from: {model_uri}" in saved and f"val_path: {val_uri}" in saved
    secrets = (s3["AWS_SECRET_ACCESS_KEY"].encode(), s3["AWS_ACCESS_KEY_ID"].encode())
    assert not [p for p in run.rglob("*") if p.is_file() and any(k in p.read_bytes() for k in secrets)]


# ---------------------------------------------------------------- a run in the bucket


@pytest.mark.ray
def test_a_run_in_a_bucket_survives_a_killed_worker_from_the_bucket(tmp_path, cli_env, s3):
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 8, "checkpoint_every": 3,
                                                      "fault": {"rank": 1, "step": 5}}})
    env = cli_env_for(cli_env, s3, tmp_path / "cache")
    r = run_cli(["train", "--config-file", str(cfg), "--output-dir", f"s3://{BUCKET}/runs", "--name", "killed"],
                env, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = objects("runs/killed/")
    summary = json.loads(files["runs/killed/summary.json"])
    (variant, rec), = summary["variants"].items()
    assert summary["run"]["dir"] == f"s3://{BUCKET}/runs/killed"
    assert rec["status"] == "succeeded" and rec["restarts"] == 1 and rec["steps"] == 8
    assert rec["restored_from"].endswith("checkpoint_00000003")
    assert [c["step"] for c in rec["checkpoint_block_s"]] == [6, 8]  # the last attempt's saves, each timed
    assert all(c["block_s"] > 0 for c in rec["checkpoint_block_s"])
    steps = [json.loads(line)["step"] for line in files[f"runs/killed/{variant}/metrics.jsonl"].decode().splitlines()]
    assert steps == list(range(1, 9))
    assert any(k.startswith(f"runs/killed/{variant}/tb/") for k in files)
    assert {"config.yaml", "options.json", "plan.json", "report.md"} <= {k.split("/")[-1] for k in files}
    for name in ("checkpoint_00000006", "checkpoint_00000008"):
        ckpt = f"runs/killed/{variant}/checkpoints/{name}/"
        assert {f"{ckpt}state.pt", f"{ckpt}manifest_rank0.json", f"{ckpt}manifest_rank1.json"} <= files.keys()
    assert not any(s3["AWS_SECRET_ACCESS_KEY"].encode() in body or s3["AWS_ACCESS_KEY_ID"].encode() in body
                   for body in files.values())


@pytest.mark.ray
def test_resume_export_generate_and_report_from_the_bucket_on_machines_without_the_run(tmp_path, cli_env, s3):
    uri = f"s3://{BUCKET}/runs/stopped"
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 8, "checkpoint_every": 3,
                                                      "fault": {"rank": 1, "step": 5}},
                                             "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0}})
    first = run_cli(["train", "--config-file", str(cfg), "--output-dir", f"s3://{BUCKET}/runs", "--name", "stopped"],
                    cli_env_for(cli_env, s3, tmp_path / "first"), tmp_path, timeout=600)
    assert first.returncode == 1, first.stderr[-3000:]
    assert f"--resume {uri}" in first.stderr

    elsewhere = cli_env_for(cli_env, s3, tmp_path / "second")
    again = run_cli(["train", "--resume", uri], elsewhere, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(objects("runs/stopped/summary.json")["runs/stopped/summary.json"])
    (rec,) = summary["variants"].values()
    assert rec["status"] == "succeeded" and rec["start_step"] == 3 and rec["steps"] == 8
    assert summary["run"]["resumes"] == 1

    out = tmp_path / "hf"
    exported = run_cli(["export", uri, "--output-dir", str(out)], cli_env_for(cli_env, s3, tmp_path / "third"),
                       tmp_path, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "at step 8" in exported.stderr + exported.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    generated = run_cli(["generate", uri, "--prompt", "def", "--max-new-tokens", "4", "--device", "cpu"],
                        cli_env_for(cli_env, s3, tmp_path / "fourth"), tmp_path, timeout=300)
    assert generated.returncode == 0 and generated.stdout.splitlines()[-1].startswith("def"), generated.stderr[-3000:]

    import boto3

    boto3.client("s3").delete_object(Bucket=BUCKET, Key="runs/stopped/report.md")
    reported = run_cli(["report", uri], cli_env_for(cli_env, s3, tmp_path / "fifth"), tmp_path, timeout=300)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert "succeeded" in objects("runs/stopped/report.md")["runs/stopped/report.md"].decode()


# ---------------------------------------------------------------- the run lock across machines


def _lease(uri: str) -> dict | None:
    from orchestrator import runlock

    got = objects(uri.removeprefix(f"s3://{BUCKET}/") + "/" + runlock.LEASE_FILE)
    return json.loads(next(iter(got.values()))) if got else None


def _plant_lease(uri: str, **fields) -> None:
    from orchestrator import runlock
    from trainer import location

    lease = {"pid": 4242, "host": "other-machine", "since": "2026-12-07T10:00:00+0000", "token": "theirs",
             "renewed": time.time(), **fields}
    location.write_text(location.join(uri, runlock.LEASE_FILE), json.dumps(lease))


@pytest.fixture
def this_machine(tmp_path, s3, monkeypatch):
    """A machine of its own (its user cache, where a bucket run's mirror lives); returns the
    mirror of a bucket run as train and --resume make it."""
    from orchestrator import runlock
    from trainer import location

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(runlock, "LEASE_SETTLE_S", 0.05)

    def mirror(uri: str) -> Path:
        local = location.staging(uri)
        local.mkdir(parents=True, exist_ok=True)
        return local
    return mirror


def test_a_bucket_run_whose_driver_runs_on_another_machine_is_refused_until_its_lease_lapses(this_machine, s3,
                                                                                               caplog, monkeypatch):
    from types import SimpleNamespace

    from orchestrator import runlock

    now = time.time()  # the driver's clock, stopped: the ages it states are exact
    monkeypatch.setattr(runlock, "time", SimpleNamespace(time=lambda: now, strftime=time.strftime, sleep=time.sleep))
    uri = f"s3://{BUCKET}/lease/held"
    _plant_lease(uri, renewed=now)
    refusal = (f"{uri}: a live driver (pid 4242 on host other-machine, its lease renewed 0 s ago) is running "
               "this run; let it end (or stop it) before resuming")
    with runlock.scope(), pytest.raises(runlock.RunInUse) as e:
        runlock.acquire(this_machine(uri))
    assert str(e.value) == refusal
    with pytest.raises(runlock.RunInUse) as e:  # --resume s3://... says so before it fetches anything
        storage.fetch_run(uri, "--resume")
    assert str(e.value) == refusal
    assert _lease(uri)["token"] == "theirs"  # untouched

    _plant_lease(uri, renewed=now - runlock.LEASE_TTL_S - 5)  # that driver died two minutes ago
    with runlock.scope(), caplog.at_level("WARNING", logger="orchestrator.runlock"):
        runlock.acquire(this_machine(uri))
        mine = _lease(uri)
        assert (mine["pid"], mine["host"]) == (os.getpid(), platform.node())
    assert [r.getMessage() for r in caplog.records if r.name == "orchestrator.runlock"] == [
        "taking over the run from a driver (pid 4242 on host other-machine) whose lease lapsed 125 s ago"]
    assert _lease(uri) is None  # released with the command


def test_a_lease_of_a_dead_driver_on_this_machine_is_taken_at_once_and_renewed_while_the_run_lasts(
        this_machine, s3, monkeypatch):
    import subprocess
    import sys

    from orchestrator import runlock

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    uri = f"s3://{BUCKET}/lease/dead"
    _plant_lease(uri, pid=int(gone.stdout), host=platform.node())
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.1)
    with runlock.scope():
        runlock.acquire(this_machine(uri))
        first = _lease(uri)
        assert first["pid"] == os.getpid()
        deadline = time.monotonic() + 30
        while _lease(uri)["renewed"] == first["renewed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lease(uri)["renewed"] > first["renewed"]
    assert _lease(uri) is None


def test_of_two_drivers_taking_a_bucket_run_at_the_same_moment_one_is_refused(this_machine, s3, monkeypatch):
    from orchestrator import runlock

    uri = f"s3://{BUCKET}/lease/race"
    # The other machine read no lease either, and wrote its own just after this driver's.
    monkeypatch.setattr(runlock, "_settle", lambda: _plant_lease(uri, host="racing-machine", pid=77))
    with runlock.scope(), pytest.raises(runlock.RunInUse) as e:
        runlock.acquire(this_machine(uri))
    assert str(e.value) == (f"{uri}: another driver (pid 77 on host racing-machine) took this run at the same "
                            "moment; let it end (or stop it) before resuming")
    assert _lease(uri)["host"] == "racing-machine"  # theirs stays
