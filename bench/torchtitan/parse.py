"""torchtitan's log -> its step records and the steady tokens/s, by our rule.

torchtitan prints one metrics line per logged step (``metrics.log_freq``), e.g.
``step: 20  loss:  7.12345  grad_norm:  1.2345  memory: 61.20GiB(77.31%)  tps: 2,345  tflops:
113.58  mfu: 11.48%``, where ``tps`` is tokens per second per GPU over the steps since the last
line and ``memory`` the peak *reserved* memory since then. The steady value is computed exactly as
ours (``trainer.result.StepTimes.steady_median``): each line's step time stands for every step
since the previous line, the first tenth of the steps (at least one) is left out as warm-up, and
the median step time gives tokens/s.
"""

from __future__ import annotations

import re

from trainer.result import StepTimes

ANSI = re.compile(r"\x1b\[[0-9;]*m")
NUM = r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
STEP_LINE = re.compile(
    rf"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>{NUM})\s+grad_norm:\s*(?P<grad_norm>{NUM})\s+"
    rf"memory:\s*(?P<mem>{NUM})GiB\((?P<mem_pct>{NUM})%\)\s+tps:\s*(?P<tps>{NUM})\s+"
    rf"tflops:\s*(?P<tflops>{NUM})\s+mfu:\s*(?P<mfu>{NUM})%")
PARAMS_LINE = re.compile(r"size:\s*([\d,]+) total parameters")
VERSION_LINE = re.compile(r"torchtitan version:\s*(\S+)")


def _num(s: str) -> float:
    return float(s.replace(",", ""))


def step_records(text: str) -> list[dict]:
    """One record per metrics line, in step order (a step printed twice counts once)."""
    by_step = {}
    for line in ANSI.sub("", text).splitlines():
        m = STEP_LINE.search(line)
        if m:
            by_step[int(m["step"])] = {
                "step": int(m["step"]), "loss": _num(m["loss"]), "grad_norm": _num(m["grad_norm"]),
                "memory_reserved_gib": _num(m["mem"]), "tokens_per_s_per_gpu": _num(m["tps"]),
                "tflops": _num(m["tflops"]), "mfu_pct": _num(m["mfu"])}
    return [by_step[s] for s in sorted(by_step)]


def first_match(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(ANSI.sub("", text))
    return m.group(1) if m else None


def per_step_times(records: list[dict], tokens_per_step_per_gpu: int) -> list[float]:
    """Seconds per step for every step 1..last, each logged interval's mean for all its steps."""
    times, prev = [], 0
    for r in records:
        if r["tokens_per_s_per_gpu"] > 0:
            times += [tokens_per_step_per_gpu / r["tokens_per_s_per_gpu"]] * (r["step"] - prev)
        prev = r["step"]
    return times


def steady(records: list[dict], tokens_per_step_per_gpu: int) -> dict:
    """Median step time after warm-up and the tokens/s per GPU it gives (None without lines)."""
    st = StepTimes()
    st.times = per_step_times(records, tokens_per_step_per_gpu)
    median = st.steady_median()
    return {"step_time_s": median,
            "tokens_per_s_per_gpu": tokens_per_step_per_gpu / median if median else None,
            "steps_timed": len(st.times)}
