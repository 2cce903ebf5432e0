"""Startup: the phase breakdown in summary.json, the startup bench's goals, worker threads and
the persistent compile cache's settings (pure: no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import startup
from orchestrator.cli import build_parser
from orchestrator.launch import worker_threads_env
from orchestrator.results import VariantResult
from orchestrator.run import STARTUP_PARTS, TrainOptions, startup_phases
from tests.conftest import ROOT
from trainer import compile_cache


def test_startup_phases_add_up_and_name_their_parts():
    record = {"started_at": 110.0, "timeline": {"worker_start": 120.0, "data": 121.0, "attention": 123.5,
                                                "model": 124.0, "ready": 125.0, "first_step": 127.0}}
    phases = startup_phases(100.0, 105.0, 109.0, {"flash": VariantResult(status="succeeded", attention="flash", **record)},
                            t_ray_init=102.0, probe=(105.5, 108.5))
    assert phases == {"ray_start": 5.0, "preflight_and_plan": 4.0, "workers_up": 10.0, "setup": 5.0,
                      "first_step": 2.0, "total": 27.0, "ray_init": 3.0, "probe": 3.0, "data": 1.0,
                      "attention": 2.5, "model_init": 0.5}
    whole = ("ray_start", "preflight_and_plan", "workers_up", "setup", "first_step")
    assert sum(phases[p] for p in whole) == phases["total"] - (110.0 - 109.0)  # less the launch gap
    for part, phase in STARTUP_PARTS.items():
        assert phases.get(part, 0.0) <= phases[phase]


def test_a_probe_that_ran_while_ray_started_is_counted_once_in_each_phase_it_overlapped():
    record = {"started_at": 110.0, "timeline": {"worker_start": 120.0, "ready": 125.0, "first_step": 127.0}}
    # Ray from 102 to 105, the probe from 101 to 107, the plan done at 109.
    phases = startup_phases(100.0, 105.0, 109.0, {"flash": VariantResult(status="succeeded", attention="flash", **record)},
                            t_ray_init=102.0, probe=(101.0, 107.0), head_start_s=1.5)
    assert phases["probe_overlapped"] == 4.0 and phases["probe"] == 2.0  # 6 s of probe, split at Ray's start
    assert phases["ray_head_start"] == 1.5
    assert phases["probe_overlapped"] <= phases["ray_start"] and phases["probe"] <= phases["preflight_and_plan"]
    # A probe that finished before Ray was up leaves the plan nothing to wait for.
    early = startup_phases(100.0, 105.0, 109.0, {"f": VariantResult(status="succeeded", attention="flash", **record)},
                           probe=(101.0, 103.0))
    assert early["probe"] == 0.0 and early["probe_overlapped"] == 2.0


def test_workers_up_splits_at_the_worker_process_start_unless_ray_had_pooled_that_process():
    record = {"started_at": 110.0, "timeline": {"worker_process": 116.5, "worker_start": 120.0, "ready": 125.0,
                                                "first_step": 127.0}}
    phases = startup_phases(100.0, 105.0, 109.0, {"f": VariantResult(status="succeeded", attention="flash", **record)})
    assert (phases["worker_process"], phases["worker_init"], phases["workers_up"]) == (6.5, 3.5, 10.0)
    record["timeline"]["worker_process"] = 90.0  # a process started before this fit: no split to report
    pooled = startup_phases(100.0, 105.0, 109.0, {"f": VariantResult(status="succeeded", attention="flash", **record)})
    assert "worker_process" not in pooled and "worker_init" not in pooled


def test_startup_phases_of_an_older_worker_leave_its_parts_out():
    record = {"started_at": 1.0, "timeline": {"worker_start": 2.0, "ready": 3.0, "first_step": 4.0}}
    assert set(startup_phases(0.0, 0.5, 0.8, {"v": VariantResult(status="succeeded", attention="flash", **record)})) == {
        "ray_start", "preflight_and_plan", "workers_up", "setup", "first_step", "total"}


def test_startup_goals_compare_warm_and_kept_ray_with_cold_and_with_the_floor():
    cold = {"startup_s": {"preflight_and_plan": 15.0, "total": 60.0}}
    warm = {"startup_s": {"preflight_and_plan": 1.5, "total": 44.0}}
    kept = {"startup_s": {"preflight_and_plan": 0.5, "total": 40.0}}
    got = startup.goals(cold, warm, {"total": 38.0}, kept)
    assert got["warm_preflight_over_cold"] == {"value": 0.1, "goal": 0.4, "met": True}
    assert got["warm_total_over_floor"]["met"] is False and got["warm_total_over_floor"]["value"] == round(44 / 38, 3)
    assert got["kept_total_over_floor"] == {"value": round(40 / 38, 3), "goal": 1.1, "met": True}
    lines = startup.table({"cold": cold, "warm": warm, "kept_start": {"error": "x"}, "kept": kept,
                           "floor": {"total": 38.0}, "goals": got})
    assert lines[0] == ("| phase | cold (s) | warm (s) | kept Ray, starting it (s) | kept Ray, warm (s) | "
                        "bare Ray floor (s) |")
    assert "| total | 60.0 | 44.0 |  | 40.0 | 38.0 |" in lines
    assert any(l.startswith("goal warm_total_over_floor: 1.16 (goal <= 1.10): not met") for l in lines)
    assert "kept_total_over_floor" not in startup.goals(cold, warm, {"total": 38.0})  # no kept run: no claim
    # The cold probe ran while Ray started: its preflight is the phase plus that overlap, not the phase alone.
    overlapped = {"startup_s": {"preflight_and_plan": 0.01, "probe_overlapped": 9.99, "total": 50.0}}
    assert startup.goals(overlapped, warm, {"total": 38.0})["warm_preflight_over_cold"]["value"] == 0.15


def test_the_startup_ab_turns_each_mechanism_off_and_keeps_those_that_save_a_second(tmp_path, monkeypatch):
    from orchestrator.bytecode import BYTECODE_ENV
    from orchestrator.run import STARTUP_OFF_ENV

    # what each mechanism costs when off, in seconds of command-to-first-step over 20 s
    cost = {"preload": 0.4, "coordinator": 2.5, "overlap": 0.0, "bytecode": 3.0}
    runs = []

    def train_once(args, env, output_dir, name, cwd):
        off = [m for m in cost if m in env.get(STARTUP_OFF_ENV, "").split(",")] + \
            (["bytecode"] if env.get(BYTECODE_ENV) == "0" else [])
        fresh = "--fresh-preflight" in args
        runs.append((name, off, fresh))
        total = 20.0 + sum(cost[m] for m in off) + (10.0 + 6.0 * ("overlap" in off) if fresh else 0.0)
        return {"startup_s": {"total": total}}

    monkeypatch.setattr(startup, "train_once", train_once)
    got = startup.ab(["--max-steps", "2"], {BYTECODE_ENV: str(tmp_path)}, tmp_path, tmp_path, repeats=2)
    assert [r[1] for r in runs[:5]] == [[], ["bytecode"], ["overlap"], ["preload"], ["coordinator"]]  # one off at a time
    assert len(runs) == 14 and sum(fresh for *_, fresh in runs) == 4
    saved = {k: (v["saved_s"], v["keep"]) for k, v in got["saved"].items()}
    assert saved == {"bytecode (warm)": (3.0, True), "overlap (warm)": (0.0, False), "preload (warm)": (0.4, False),
                     "coordinator (warm)": (2.5, True), "overlap (probe afresh)": (6.0, True)}
    assert "preload (warm): 20.4 s off, 20.0 s on: saves 0.4 s (below the bar)" in startup.table(
        {"floor": {}, "goals": {}, "ab": got})


def test_the_bench_gives_its_runs_caches_of_their_own_that_start_empty_and_are_removed(tmp_path, monkeypatch):
    from orchestrator.bytecode import BYTECODE_ENV
    from orchestrator.kept_ray import STATE_DIR_ENV
    from trainer.attention.cache import CACHE_DIR_ENV
    from trainer.compile_cache import INDUCTOR_DIR_ENV

    seen = []

    def train_once(args, env, output_dir, name, cwd):
        dirs = {k: Path(env[k]) for k in (CACHE_DIR_ENV, INDUCTOR_DIR_ENV, STATE_DIR_ENV, BYTECODE_ENV)}
        seen.append((name, dirs, [p for d in dirs.values() if d.exists() for p in d.iterdir()]))
        for d in dirs.values():  # what a run leaves for the next one
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text("")
        return {"startup_s": {"preflight_and_plan": 1.0, "total": 30.0}}

    monkeypatch.setattr(startup, "train_once", train_once)
    monkeypatch.setattr(startup, "ray_down", lambda env, cwd: {"exit_code": 0})
    floor_envs = []
    monkeypatch.setattr(startup, "bare_floor", lambda env, n, cwd: floor_envs.append(env) or {"total": 40.0})
    monkeypatch.setenv(BYTECODE_ENV, str(tmp_path / "the users own"))
    # As on a machine whose torch has no bytecode and writes none: the floor reads what the runs kept.
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setattr(startup.bytecode, "has_bytecode", lambda package="torch": False)
    startup.run(["--max-steps", "2"], tmp_path)
    assert [name for name, _, _ in seen] == ["startup-cold", "startup-warm", "startup-kept_start", "startup-kept"]
    cold_dirs, cold_found = seen[0][1], seen[0][2]
    assert cold_found == []  # cold: every cache empty, the bytecode one too (not the user's)
    assert all(d.parent == cold_dirs[CACHE_DIR_ENV].parent for d in cold_dirs.values())
    assert all(dirs == cold_dirs for _, dirs, _ in seen)  # one set of caches, shared by the runs
    assert len(seen[1][2]) == 4  # warm: each cache holds what cold left
    assert floor_envs[0]["PYTHONPYCACHEPREFIX"] == str(cold_dirs[BYTECODE_ENV])
    assert floor_envs[0]["PYTHONDONTWRITEBYTECODE"] == ""
    assert not cold_dirs[BYTECODE_ENV].parent.exists()  # removed at the end


def test_each_worker_gets_one_thread_per_cpu_unless_the_user_chose():
    assert worker_threads_env(2.0, {}) == {"OMP_NUM_THREADS": "2"}
    assert worker_threads_env(0.5, {}) == {"OMP_NUM_THREADS": "1"}
    assert worker_threads_env(4.0, {"OMP_NUM_THREADS": "3"}) == {}


def test_fresh_preflight_is_a_flag_of_train_and_preflight():
    parser = build_parser()
    args = parser.parse_args(["train", "--fresh-preflight"])
    assert TrainOptions(**{k: getattr(args, k) for k in TrainOptions.__dataclass_fields__}).fresh_preflight is True
    assert parser.parse_args(["preflight", "--fresh-preflight"]).fresh_preflight is True
    assert parser.parse_args(["train"]).fresh_preflight is False


def test_the_compile_cache_persists_under_the_users_cache_unless_set(tmp_path):
    env: dict = {"XDG_CACHE_HOME": str(tmp_path)}  # the environment given is the one read (trainer/user_cache.py)
    assert compile_cache.enable(env) == tmp_path / "flash-orchestrator" / "inductor"
    assert env == {"XDG_CACHE_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "flash-orchestrator" / "inductor"),
                   "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    mine = {"TORCHINDUCTOR_CACHE_DIR": "/data/inductor", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    assert compile_cache.enable(mine) == Path("/data/inductor")
    assert mine["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "0"  # switched off on purpose: stays off


def test_the_compile_cache_is_the_users_after_torch_inductor_set_its_default(tmp_path):
    """Importing torch._inductor.config writes /tmp/torchinductor_<user> into TORCHINDUCTOR_CACHE_DIR:
    that is torch's default, not the user's choice, and the run's cache stays under the user's."""
    env = {k: x for k, x in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "import os, torch._inductor.config; from trainer import compile_cache; "
                          "print(os.environ['TORCHINDUCTOR_CACHE_DIR']); print(compile_cache.enable())"],
                         env=env, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out[0] != str(tmp_path / "flash-orchestrator" / "inductor")  # what torch's import set
    assert out[1] == str(tmp_path / "flash-orchestrator" / "inductor")


def test_a_bad_compile_cache_file_only_costs_a_full_compile(tmp_path, caplog):
    bad = tmp_path / "artifacts.bin"
    bad.write_bytes(b"not a cache")
    assert compile_cache.load_artifacts(bad) is False
    assert "not loaded" in caplog.text
    assert compile_cache.load_artifacts(tmp_path / "missing.bin") is False


def test_the_driver_checks_every_input_without_importing_torch(tmp_path):
    # torch (2.1-2.5 s to import on the 2-core CI machine, more with CUDA's libraries) and Ray
    # Train (4.4 s for ray.train.torch) load in a thread while Ray starts (run._preload): nothing
    # the driver does before Ray's start may import them, or it waits for them first.
    import subprocess
    import sys

    code = ("import sys; from orchestrator import cli, run, session, kept_ray, preflight\n"
            "from orchestrator.options import TrainOptions\n"
            f"opts = TrainOptions(output_dir={str(tmp_path)!r}, run_both_models=True, max_steps=3)\n"
            "prep = run.prepare(run.effective_options(opts)[0])\n"
            "preflight.settings_for(prep.cfg, prep.variants, False)\n"
            "run.workloads(prep)\n"
            "print(sorted(m for m in ('torch', 'ray.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
