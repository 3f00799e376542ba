"""The two ways a Selfie script ends early in one line, which `runner.run` reports (with exit status 2, or the
stop's own) instead of a traceback. Any other exception is a bug, and keeps its traceback."""


class UserError(ValueError):
    """Bad input: a flag, file, column or value that the script cannot use. The message names it, in one line."""


class TrainingStopped(RuntimeError):
    """Training stopped before its end, its last checkpoint intact; the scripts exit with `exit_status`."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name where it has none: the reason to quote in a
    one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
