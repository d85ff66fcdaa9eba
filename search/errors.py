"""The one error type the command-line scripts turn into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input (arguments, data, space file, study name): nothing was written."""


def one_line(error: BaseException) -> str:
    """An exception's message as one line for an error message (its first line, at most 300 characters)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
