"""The two ways a command ends badly, mapped to exit codes by the CLI."""


class UsageError(Exception):
    """Bad flag, config or data: exit code 2, nothing started, no earlier run touched."""

    exit_code = 2


class InfeasibleRequest(UsageError):
    """A request this cluster can never satisfy (too many workers or GPUs, a label selector
    that matches no node): exit code 2, found by the planner before anything is launched."""


class RunFailed(Exception):
    """The run started and failed (a variant failed, a fault it could not survive): exit code 1."""

    exit_code = 1


# The run finished and nothing failed, but a requested variant was skipped (flash attention
# works on no node): the results are real but incomplete, which a script must be able to tell.
EXIT_VARIANT_SKIPPED = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver: exit code 128 + the signal number (130, 143).

    A KeyboardInterrupt because that is the one exception Ray lets a signal handler raise out
    of a blocking ``ray.get`` (it re-raises a plain KeyboardInterrupt, so catchers look up the
    signal with ``interrupt.as_interrupted()``); and no ``except Exception`` on the way up swallows it.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        self.run_dir = None  # set once the run directory holds an "interrupted" summary
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
