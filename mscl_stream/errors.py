"""Errors that the CLI prints as one line (exit code 2) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, unusable data, an impossible option."""
