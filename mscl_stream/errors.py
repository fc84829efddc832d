"""Errors that the CLI prints as one line (exit code 2) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, unusable data, an impossible option."""


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after writing a checkpoint; the CLI exits with ``exit_code``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
