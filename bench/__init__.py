"""Benchmarks, beside the driver: they use it, it never imports them. The ``bench`` command
(``command.py``: attention kernels, training steps, worker counts, startup) and studies run as
scripts (``ddp/``, ``torchtitan/``, ``kernel_timers.py``, ``corpus.py``)."""
