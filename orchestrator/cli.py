"""``python -m orchestrator <command>``: a thin layer over the Python API.

Exit codes: docs/results.md, "Exit codes of `train`". Errors are one line on stderr, with a
traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

from bench import command as bench_command
from orchestrator import options
from orchestrator.errors import Interrupted, RunFailed, UsageError

log = logging.getLogger("orchestrator")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other usage error
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------- train

def disable_flash_attn_from_env(args: argparse.Namespace, environ=None) -> None:
    """``DISABLE_FLASH_ATTN=1`` in the driver's environment means ``--disable-flash-attn``, as it
    did in our users' single-machine scripts; a resumed run keeps the choice it started with."""
    from trainer.attention import guard

    if getattr(args, "resume", None) or args.disable_flash_attn or not guard.disabled_by_env(environ):
        return
    log.info("DISABLE_FLASH_ATTN=1 is set: flash attention disabled, as with --disable-flash-attn")
    args.disable_flash_attn = True


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.run import effective_options, process_started, train
    from trainer.attention import guard

    disable_flash_attn_from_env(args)
    opts = options.from_args(args)
    if effective_options(opts)[0].disable_flash_attn:  # under --resume, as the run started
        guard.install()  # no process of the run imports flash-attn, the driver included
    summary = train(opts, command_started=process_started())
    log.info("summary:")
    for line in summary.describe():
        log.info(line)
    code = summary.run.exit_code
    if code == RunFailed.exit_code:
        run_dir = summary.run.dir
        failed = [r for r in summary.variants.values() if r.status == "failed"]
        if all(r.failure_kind in ("out_of_memory", "config", "non_finite_loss") for r in failed):
            # A resumed run keeps its config, so --resume would fail the same way.
            raise RunFailed(f"a variant failed and was not retried: {failed[0].error}; see {run_dir}/summary.json. "
                            "A resumed run keeps its config: change the config and start a new run")
        raise RunFailed(f"a variant failed; see {run_dir}/summary.json. Once the cause is fixed, continue "
                        f"from its last checkpoint with: python -m orchestrator train --resume {run_dir}")
    return code


# ---------------------------------------------------------------- report


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds summary.json)")


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator import comparison, storage
    from trainer import location

    remote = location.is_uri(args.run_dir)  # the report is written into the run's mirror, then uploaded
    run_dir = storage.fetch_run(args.run_dir, "RUN_DIR") if remote else Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    for line in comparison.write(run_dir).describe():
        log.info(line)
    storage.publish(run_dir)
    return 0


# ---------------------------------------------------------------- preprocess


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-data", nargs="+", required=True, metavar="PATH", help=".txt, .jsonl or .parquet files or directories")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the token dataset goes (must be new or empty)")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json or SentencePiece .model (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocab of the trained BPE (default: 2048)")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from orchestrator import preprocess

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: output directory is not empty; choose a new one")
    if args.vocab_size < 257:
        raise UsageError(f"--vocab-size {args.vocab_size}: must be at least 257 (256 bytes + end-of-text)")
    try:
        meta = preprocess.preprocess(args.raw_data, out, Path(args.tokenizer) if args.tokenizer else None, args.vocab_size)
    except preprocess.DataError as e:
        raise UsageError(str(e)) from None
    log.info("wrote %d tokens (vocab %d, %s) to %s", meta["num_tokens"], meta["vocab_size"], meta["dtype"], out)
    return 0


# ---------------------------------------------------------------- preflight


def add_preflight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to probe (default: start a local Ray, shut it down after)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    p.add_argument("--output-dir", default=".", metavar="DIR", help="where preflight.json and "
                   "flash_attention_log.txt go (default: .)")
    p.add_argument("--config-file", metavar="PATH", help="YAML config whose head dim, GQA ratio and dtype are checked "
                   "(default: the built-in config)")
    p.add_argument("--set", dest="settings", action="append", metavar="SECTION.KEY=VALUE", help=options.SET_HELP)
    p.add_argument("--disable-flash-attn", action="store_true", help="never import flash-attn; report facts only")
    p.add_argument("--timeout", type=float, default=180.0, metavar="S", help="seconds per node probe (default: 180)")
    p.add_argument("--fresh-preflight", action="store_true", help=options.FRESH_PREFLIGHT_HELP)
    p.add_argument("--expect-gpus", type=int, metavar="N", help=options.EXPECT_GPUS_HELP)


def cmd_preflight(args: argparse.Namespace) -> int:
    from orchestrator import config as config_mod
    from orchestrator.preflight import run_preflight, settings_for
    from orchestrator.session import ray_session
    from trainer import strict_json

    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g}: must be positive")
    options.check_expect_gpus(args.expect_gpus)
    if args.json:  # stdout carries only the JSON report
        logs_to_stderr()
    disable_flash_attn_from_env(args)
    cfg = config_mod.load(args.config_file, args.settings)
    settings = settings_for(cfg, config_mod.variant_configs(cfg, False, args.disable_flash_attn,
                                                            args.config_file or "built-in config"),
                            args.disable_flash_attn, timeout_s=args.timeout)
    if args.disable_flash_attn:
        from trainer.attention import guard

        guard.install()
    with ray_session(args.address, log_to_driver=args.debug):
        report = run_preflight(settings, fresh=args.fresh_preflight, expect_gpus=args.expect_gpus)
    json_path, log_path = report.write(Path(args.output_dir))
    if args.json:
        print(strict_json.dumps(report.to_json(), indent=2, default=str))
        return 0
    for line in report.table():
        log.info(line)
    for line in report.outcome_lines():
        log.info(line)
    log.info("wrote %s and %s", json_path, log_path)
    return 0


# ---------------------------------------------------------------- export and generate


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by 'train'")
    p.add_argument("--variant", help="which variant's model (default: the run's first)")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest usable one)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p)
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the Hugging Face model goes (new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DIR, replacing an earlier export")


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.export import export
    from orchestrator.storage import run_to_read

    out = export(run_to_read(args.run_dir), Path(args.output_dir), variant=args.variant, step=args.step, force=args.force)
    log.info("exported variant %s at step %d (%s, %.2fM parameters) to %s", out.variant, out.step,
             out.checkpoint, out.params / 1e6, out.output_dir)
    log.info("  %s", ", ".join(out.files))
    return 0


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_source_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default); above 0: sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if there is one")


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.generate import generate
    from orchestrator.storage import run_to_read

    logs_to_stderr()  # stdout carries only the text, for pipes
    text = generate(run_to_read(args.run_dir), args.prompt, variant=args.variant, step=args.step,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    device=args.device)
    print(text)
    return 0


# ---------------------------------------------------------------- ray-down


def cmd_ray_down(args: argparse.Namespace) -> int:
    from orchestrator import kept_ray

    head = kept_ray.down()
    if head is None:
        log.info("no local Ray kept by train --keep-ray is running")
    else:
        log.info("stopped the local Ray kept by train --keep-ray (%s)", head.describe())
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train one or more variants on Ray Train", options.add_train_args, cmd_train),
    "preprocess": ("tokenize raw text into a token dataset", add_preprocess_args, cmd_preprocess),
    "report": ("write the comparison report (report.md and charts) of a run directory", add_report_args, cmd_report),
    "bench": ("benchmark attention kernels and training steps", bench_command.add_args, bench_command.cmd_bench),
    "preflight": ("probe every node's GPU, driver, CUDA, GLIBC and flash-attn", add_preflight_args, cmd_preflight),
    "export": ("write a run's model as a Hugging Face Llama directory", add_export_args, cmd_export),
    "generate": ("continue a prompt with a run's model", add_generate_args, cmd_generate),
    "ray-down": ("stop the local Ray that train --keep-ray keeps running", lambda p: None, cmd_ray_down),
}


def build_parser() -> Parser:
    parser = Parser(prog="orchestrator", description="Train Llama-style models on Ray, with flash attention where it works.")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors and worker logs on the console")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_args(p)
    return parser


LOGGERS = ("orchestrator", "trainer", "bench")  # the packages whose log lines are the commands' output


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.DEBUG if debug else logging.INFO)
        lg.propagate = False


def logs_to_stderr() -> None:
    """For a command whose stdout is its product (preflight --json, generate)."""
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setStream(sys.stderr)


def check_cache_home() -> None:
    """Refuse an XDG_CACHE_HOME that can never be a directory before a command starts: the embedded
    dataset and the compile and preflight caches live under it, and each would fail its own way."""
    from orchestrator import rundir

    if os.environ.get("XDG_CACHE_HOME"):
        rundir.check_directory("XDG_CACHE_HOME", Path(os.environ["XDG_CACHE_HOME"]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    setup_logging(debug)
    try:
        args = build_parser().parse_args(argv)
        from orchestrator.session import remove_dead_sessions

        remove_dead_sessions()  # what a driver killed with SIGKILL left in /tmp/ray
        check_cache_home()
        return COMMANDS[args.command][2](args)
    except (UsageError, RunFailed) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        run_dir = getattr(e, "run_dir", None)
        hint = f"; continue it with: python -m orchestrator train --resume {run_dir}" if run_dir else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return Interrupted(signal.SIGINT).exit_code
    except Exception as e:  # an unexpected failure is a failed run, still one line
        if debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
