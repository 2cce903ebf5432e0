"""The two ways a command ends badly, mapped to exit codes by the CLI."""


class UsageError(Exception):
    """Bad flag, config or data: exit code 2, nothing started, no earlier run touched."""

    exit_code = 2


class RunFailed(Exception):
    """The run started and failed (a variant failed, a fault it could not survive): exit code 1."""

    exit_code = 1
