"""Joining a Ray cluster, or starting a local one for the length of a command."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None, *, log_to_driver: bool = False, num_cpus: int | None = None) -> Iterator[str]:
    """Yield the address of the Ray cluster in use.

    Reuses a Ray already initialised in this process (tests, notebooks); joins ``address``
    (or the cluster this driver runs in under ``ray job submit``, which sets RAY_ADDRESS);
    otherwise starts a local Ray and shuts it down on exit, success or not.
    """
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    try:
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
        else:
            log.info("starting a local Ray (no --address given)")
            # address='local': never attach to another Ray that happens to run on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--address {address}: cannot connect to a Ray cluster ({first})") from None
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
