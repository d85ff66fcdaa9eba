"""The one error type the command-line scripts turn into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input (arguments, data, space file, study name): nothing was written."""
