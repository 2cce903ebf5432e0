"""Train torchtitan with the model and settings of one of our YAML configs; write its tokens/s.

    python3 -m bench.torchtitan.run --config-file configs/llama3-8b.yaml --steps 30 --out DIR

runs ``torchrun --standalone --nproc_per_node N -m torchtitan.train`` with ``llama3_8b.toml``
beside this file plus what our YAML decides (shape via flavor.py, seq_len, batch, lr, warm-up,
compile, activation checkpointing), a local tokenizer and dataset (assets.py) and no hub access,
then writes ``DIR/titan.json``: the steady tokens/s per GPU and over all GPUs (parse.py), the
peak reserved memory, every metrics line, and on failure the error torchtitan printed. Exit code
0 when it trained and reported a steady figure, 1 otherwise. ``--cpu`` runs the same path on CPU
processes over gloo (cpu_entry.py), for a tiny config: the smoke test before a GPU lease.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.torchtitan import assets, parse, shape
from trainer import strict_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOML = HERE / "llama3_8b.toml"
OUTPUT_NAME = "titan.json"


# trainer/config.py TrainConfig's defaults for what a YAML may leave out (a test keeps them equal);
# read here without pydantic, which torchtitan's processes need not have.
TRAIN_DEFAULTS = {"seq_len": 128, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 10, "log_every": 1, "dtype": "auto", "compile": "auto",
                  "activation_checkpointing": False, "float8": False}


def train_settings(cfg: dict) -> dict:
    return {**TRAIN_DEFAULTS, **(cfg.get("train") or {})}


def titan_activation_checkpoint(setting) -> list[str]:
    """torchtitan's flags for our ``train.activation_checkpointing``: false none, true (or 1) full,
    N selective every Nth layer: as many as ours when N divides the depth, torchtitan's from the
    other end (trainer/model.py checkpointed)."""
    if isinstance(setting, bool):
        return ["--activation_checkpoint.mode", "full" if setting else "none"]
    if type(setting) is int and setting == 1:
        return ["--activation_checkpoint.mode", "full"]
    if type(setting) is int and setting > 1:
        return ["--activation_checkpoint.mode", "selective",
                "--activation_checkpoint.selective_ac_option", str(setting)]
    raise ValueError(f"train.activation_checkpointing {setting!r}: expected false, true or a whole number N >= 1")


def titan_overrides(cfg: dict, *, steps: int, nproc: int, cpu: bool = False) -> list[str]:
    """torchtitan CLI overrides that give it our YAML's training settings. On CPU the parameters
    stay fp32, as ours do there: gloo lacks the PREMUL_SUM that FSDP2's bf16 reduction uses."""
    t = train_settings(cfg)
    micro, accum = int(t["micro_batch_size"]), int(t["grad_accum_steps"])
    if t["dtype"] not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.dtype {t['dtype']!r}: expected auto, bf16 or fp32")
    if t["float8"]:
        raise ValueError("train.float8: the comparison runs torchtitan without float8")
    bf16 = t["dtype"] == "bf16" or (t["dtype"] == "auto" and not cpu)
    compile_on = (not cpu) if t["compile"] == "auto" else bool(t["compile"])
    return [
        "--training.steps", str(steps),
        "--training.seq_len", str(int(t["seq_len"])),
        "--training.local_batch_size", str(micro),
        "--training.global_batch_size", str(micro * accum * nproc),
        "--training.mixed_precision_param", "bfloat16" if bf16 and not cpu else "float32",
        "--optimizer.lr", str(float(t["lr"])),
        "--lr_scheduler.warmup_steps", str(int(t["warmup_steps"])),
        "--lr_scheduler.min_lr_factor", str(float(t["min_lr"]) / float(t["lr"])),
        "--metrics.log_freq", str(int(t["log_every"])),
        *titan_activation_checkpoint(t["activation_checkpointing"]),
        "--compile.enable" if compile_on else "--compile.no-enable",
    ]


def command(*, config_file: Path, out: Path, tokenizer: Path, data: Path, steps: int, nproc: int,
            cpu: bool, extra: list[str]) -> list[str]:
    entry = "bench.torchtitan.cpu_entry" if cpu else "torchtitan.train"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--local-ranks-filter", "0", "--role", "rank", "--tee", "3",
            "-m", entry,
            "--job.config_file", str(TOML),
            "--job.dump_folder", str(out / "outputs"),
            "--experimental.custom_import", "bench.torchtitan.flavor",
            "--model.flavor", "orchestrator",
            "--model.hf_assets_path", str(tokenizer),
            "--training.dataset", "c4_test",
            "--training.dataset_path", str(data),
            *titan_overrides(shape.load(config_file), steps=steps, nproc=nproc, cpu=cpu),
            *extra]


def environment(config_file: Path, work: Path, cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({
        "PYTHONPATH": os.pathsep.join(paths + [str(REPO)] if str(REPO) not in paths else paths),
        "TITAN_MODEL_CONFIG": str(config_file.resolve()),
        # Local files only: a hub lookup would hang or fail on a machine with no network.
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"),
        "NCCL_NVLS_ENABLE": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if not ("PYTORCH_ALLOC_CONF" in env or "PYTORCH_CUDA_ALLOC_CONF" in env):
        # As torchtitan's own launcher (run_train.sh) runs it: how its users meet it.
        env["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: float | None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, echoing and saving its output; stop it on timeout."""
    lines, expired = [], threading.Event()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)

        def stop(sig=signal.SIGTERM):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

        def on_timeout():
            expired.set()
            stop()
            kill = threading.Timer(30, stop, (signal.SIGKILL,))
            kill.daemon = True
            kill.start()

        timer = threading.Timer(timeout, on_timeout) if timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                lines.append(line)
            rc = proc.wait()
        except KeyboardInterrupt:
            stop()
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
        if expired.is_set():
            msg = f"[run.py] timed out after {timeout:.0f} s\n"
            log.write(msg)
            lines.append(msg)
            rc = 124
    return rc, "".join(lines)


def error_of(text: str) -> str | None:
    """The line that says what failed: the last exception line of a traceback, else the last line."""
    lines = [parse.ANSI.sub("", ln).strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        body = ln.split("]:", 1)[-1].strip() if ln.startswith("[rank") else ln
        head = body.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit")) or head in ("AssertionError", "KeyboardInterrupt"):
            return body
    return lines[-1] if lines else None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchtitan", "torchdata", "datasets", "tyro", "fsspec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.torchtitan.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", type=Path, default=REPO / "configs" / "llama3-8b.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs); default: every visible GPU")
    p.add_argument("--out", type=Path, default=Path("runs") / "torchtitan")
    p.add_argument("--timeout", type=float, default=None, help="seconds before torchrun is stopped")
    p.add_argument("--cpu", action="store_true", help="CPU processes over gloo (smoke test, tiny configs)")
    p.add_argument("extra", nargs="*", help="more torchtitan overrides, after --")
    a = p.parse_args(argv)

    import torch

    nproc = a.nproc or (torch.cuda.device_count() if not a.cpu else 2) or 1
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = shape.load(a.config_file)
    model = shape.model_section(a.config_file)
    train = train_settings(cfg)
    tokenizer, data = assets.build(out / "assets")
    cmd = command(config_file=a.config_file, out=out, tokenizer=tokenizer, data=data, steps=a.steps,
                  nproc=nproc, cpu=a.cpu, extra=a.extra)
    print("+", " ".join(cmd), flush=True)
    started = time.time()
    rc, text = run_logged(cmd, environment(a.config_file, out, a.cpu), out / "torchtitan.log", a.timeout)

    tokens_per_step_per_gpu = int(train["seq_len"]) * int(train["micro_batch_size"]) * int(train["grad_accum_steps"])
    records = parse.step_records(text)
    st = parse.steady(records, tokens_per_step_per_gpu)
    per_gpu = st["tokens_per_s_per_gpu"]
    ok = rc == 0 and per_gpu is not None and records[-1]["step"] == a.steps
    result = {
        "stack": "torchtitan",
        "status": "succeeded" if ok else "failed",
        "exit_code": rc,
        "error": None if ok else (error_of(text) or f"exit code {rc}, no metrics line"),
        "versions": {**versions(), "torchtitan_reported": parse.first_match(parse.VERSION_LINE, text)},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.cpu else "cpu",
        "gpus": nproc,
        "config_file": str(a.config_file),
        "model": model,
        "params": int(x.replace(",", "")) if (x := parse.first_match(parse.PARAMS_LINE, text)) else None,
        "seq_len": int(train["seq_len"]),
        "tokens_per_step_per_gpu": tokens_per_step_per_gpu,
        "steps": records[-1]["step"] if records else 0,
        "steps_timed": st["steps_timed"],
        "step_time_s": st["step_time_s"],
        "tokens_per_s_per_gpu": per_gpu,
        "tokens_per_s": per_gpu * nproc if per_gpu else None,
        "peak_memory_reserved_gib": max((r["memory_reserved_gib"] for r in records), default=None),
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "metrics": records,
        "wall_time_s": round(time.time() - started, 1),
        "command": cmd,
        "log": str(out / "torchtitan.log"),
    }
    (out / OUTPUT_NAME).write_text(strict_json.dumps(result, indent=2) + "\n")
    if ok:
        print(f"torchtitan: {per_gpu:,.0f} tok/s per GPU, {per_gpu * nproc:,.0f} tok/s over {nproc}, "
              f"median step {st['step_time_s']:.3f} s, peak reserved {result['peak_memory_reserved_gib']} GiB, "
              f"loss {result['first_loss']} -> {result['final_loss']}")
    else:
        print(f"torchtitan failed (exit {rc}): {result['error']}", file=sys.stderr)
    print(f"wrote {out / OUTPUT_NAME}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
