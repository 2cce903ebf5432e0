"""``train.micro_batch_size: auto``: the largest micro-batch whose estimated peak fits the worker.

Pure, like ``strategy.py``, whose fit test it asks (docs/performance.md, "Settings left at
`auto`"). The strategy is chosen at micro-batch 1: what decides it, the model state, does not
grow with the micro-batch.
"""

from __future__ import annotations

import bisect
from typing import Optional

from orchestrator import memory, strategy
from orchestrator.errors import InfeasibleRequest
from orchestrator.strategy import Budget, Workload

# Tokens per micro-step beyond which no larger micro-batch is tried: past 12 x 4096 the ~0.95B
# config's step ran slower (docs/BENCHMARKS.md, "One GPU").
MAX_TOKENS = 12 * 4096
# With no device memory measured there is nothing to fit against: the default of an unset key.
UNMEASURED = 8


def resolve(name: str, requested_strategy: str, work: Workload, *, num_workers: int, attention: str, use_gpu: bool,
            limit: Optional[Budget], headroom: float) -> tuple[int, str]:
    """(micro-batch, why) for a variant whose config says auto, or InfeasibleRequest (exit 2)
    naming train.micro_batch_size when not even micro-batch 1 fits."""
    most = max(1, MAX_TOKENS // work.train.seq_len)
    if limit is None:
        size = min(UNMEASURED, most)
        return size, f"auto: device memory unknown, so {size}"

    def at(size: int) -> Workload:
        return Workload(work.model, work.train.model_copy(update={"micro_batch_size": size}))

    try:
        chosen = strategy.resolve(name, requested_strategy, at(1), num_workers=num_workers, attention=attention,
                                  use_gpu=use_gpu, limit=limit, headroom=headroom).strategy
    except InfeasibleRequest as e:
        raise InfeasibleRequest(f"variant {name}: train.micro_batch_size auto: not even micro-batch 1 fits: "
                                + str(e).removeprefix(f"variant {name}: ")) from None

    def peak(size: int) -> int:
        return memory.estimate(work.model, at(size).train, strategy=chosen, world_size=num_workers,
                               attention=attention, device="cuda" if use_gpu else "cpu").total

    # The estimate grows with the micro-batch: the sizes that fit are 1..size.
    size = bisect.bisect_right(range(1, most + 1), limit.bytes, key=peak)
    cap = f", at most {MAX_TOKENS} tokens per micro-step" if size == most else ""
    return size, (f"auto: largest that fits {limit.describe(headroom)}: {memory.gib(peak(size))} estimated "
                  f"under {chosen}{cap}")
