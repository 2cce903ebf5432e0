"""The cluster/ files, offline: every launcher YAML passes Ray's own validator, and node labels
are what ``ray start --labels`` accepts. No cloud call, no Ray started."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))


def _node_labels_module():
    spec = importlib.util.spec_from_file_location("node_labels", CLUSTER / "node_labels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nl = _node_labels_module()


def prepared(path: Path) -> dict:
    """The config as `ray up` sees it before any provider call: defaults merged, node types filled."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))


def test_cluster_dir_has_a_cloud_and_an_onprem_yaml():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in YAMLS}
    assert "local" in providers and providers & {"aws", "gcp"}, providers


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_validator(path):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(path))  # raises jsonschema.ValidationError naming the bad field


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_commands_are_valid_shell_and_label_every_node(path):
    cfg = prepared(path)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{path.name} {key}: {cmd!r}: {r.stderr}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("cluster/node_labels.py" in c and "--labels=" in c for c in starts), key
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job API stays on loopback
    setup = " ".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "torch" in setup and "pip install -q -e ~/flash-orchestrator" in setup
    assert cfg["file_mounts"]["~/flash-orchestrator"] == "./" and (ROOT / "cluster" / path.name).is_file()


def test_cloud_yaml_has_an_ampere_or_newer_gpu_worker_type():
    cfg = prepared(CLUSTER / "aws-gpu.yaml")
    gpu_types = {n: t["node_config"]["InstanceType"] for n, t in cfg["available_node_types"].items()
                 if t.get("resources", {}).get("GPU", 0) >= 1}
    assert set(gpu_types.values()) & {"g5.xlarge", "p4d.24xlarge", "p5.48xlarge", "g6.xlarge"}, gpu_types
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_a_broken_yaml_is_rejected_by_the_validator(tmp_path):
    """The validation test can fail: an unquoted ': ' turns a command into a mapping."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = tmp_path / "bad.yaml"
    text = (CLUSTER / "onprem.yaml").read_text().replace(
        "  - python3 -m pip install -q -U pip", "  - echo warning: oops")
    bad.write_text(text)
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        validate_config(prepared(bad))


# ---------------------------------------------------------------- node labels


def test_node_labels_for_a_gpu_node_parse_with_rays_own_label_parser():
    from ray._private.label_utils import parse_node_labels_string

    labels = nl.node_labels([("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA A100-SXM4-80GB", "8.0")], "2.35", "ok")
    parsed = parse_node_labels_string(nl.format_labels(labels))
    assert parsed == {"fo-accelerator": "NVIDIA-A100-SXM4-80GB", "fo-gpu-count": "2", "fo-cuda-cc": "8.0",
                      "fo-glibc": "2.35", "fo-flash-attn": "ok"}


def test_node_labels_for_a_cpu_node_say_cpu_and_no_compute_capability():
    from ray._private.label_utils import parse_node_labels_string

    parsed = parse_node_labels_string(nl.format_labels(nl.node_labels([], "none", "missing")))
    assert parsed["fo-accelerator"] == "cpu" and parsed["fo-gpu-count"] == "0" and parsed["fo-cuda-cc"] == "none"


@pytest.mark.parametrize("text,value", [
    ("NVIDIA GeForce RTX 4090", "NVIDIA-GeForce-RTX-4090"),
    ("  (weird) name!  ", "weird-name"),
    ("x" * 100, "x" * 63),
    ("", "unknown"),
    ("!!!", "unknown"),
])
def test_label_values_are_made_valid_for_ray(text, value):
    from ray._private.label_utils import validate_label_value

    assert nl.label_value(text) == value
    validate_label_value(nl.label_value(text))


def test_gpu_facts_come_from_nvidia_smi_output():
    class Out:
        returncode, stdout = 0, "NVIDIA A10G, 8.6\nNVIDIA A10G, 8.6\n"

    import shutil as _shutil

    real_which = _shutil.which
    try:
        nl.shutil.which = lambda name: "/usr/bin/nvidia-smi"
        assert nl.gpus_from_nvidia_smi(run=lambda *a, **k: Out()) == [("NVIDIA A10G", "8.6")] * 2
    finally:
        nl.shutil.which = real_which


@pytest.mark.parametrize("code,status", [(0, "ok"), (3, "missing"), (4, "import-only"), (1, "broken"), (-11, "broken")])
def test_flash_attn_status_maps_the_check_outcome(code, status):
    class Out:
        returncode = code

    assert nl.flash_attn_status(run=lambda *a, **k: Out()) == status


def test_flash_attn_status_on_this_machine_runs_the_real_check():
    """Here flash-attn is not installed (CPU CI): the check in a fresh interpreter says so."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    assert nl.flash_attn_status() == "missing"


def test_node_labels_script_prints_labels_ray_start_accepts():
    from ray._private.label_utils import parse_node_labels_string

    out = subprocess.run([sys.executable, str(CLUSTER / "node_labels.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parsed = parse_node_labels_string(out.stdout.strip())
    assert set(parsed) == {"fo-accelerator", "fo-gpu-count", "fo-cuda-cc", "fo-glibc", "fo-flash-attn"}


# ---------------------------------------------------------------- ray-node.sh, without starting Ray


def ray_node(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FO_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([str(CLUSTER / "ray-node.sh"), *args], env=env, capture_output=True, text=True, timeout=60)


def test_ray_node_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(CLUSTER / "ray-node.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ray_node_without_a_command_prints_usage_and_exits_2(tmp_path):
    r = ray_node([], tmp_path)
    assert r.returncode == 2 and "ray-node.sh head" in r.stderr and "ray-node.sh stop" in r.stderr


def test_ray_node_join_without_an_address_is_a_usage_error(tmp_path):
    r = ray_node(["join", "--num-cpus=1"], tmp_path)
    assert r.returncode == 2 and "join needs the head's address" in r.stderr


def test_ray_node_status_and_stop_when_nothing_was_started(tmp_path):
    r = ray_node(["status"], tmp_path)
    assert r.returncode == 3 and r.stdout.strip() == "not running"
    r = ray_node(["stop"], tmp_path)
    assert r.returncode == 0 and "no node started from" in r.stdout


def test_ray_node_stop_ignores_a_stale_pid_file(tmp_path):
    """A pid file whose process is gone (or was reused by an unrelated process) kills nothing."""
    state = tmp_path / "state"
    state.mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])  # a live process that is not a node of ours
    try:
        (state / "pid").write_text(f"{sleeper.pid}\n")
        r = ray_node(["status"], tmp_path)
        assert r.returncode == 3  # not a `ray start` process: not ours
        r = ray_node(["stop"], tmp_path)
        # sleep runs in this test's process group, not a group of its own: stop must not touch it
        assert sleeper.poll() is None, r.stdout + r.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
