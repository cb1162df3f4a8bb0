"""Errors a user should see as one clear line, not a traceback."""


class StageError(RuntimeError):
    """A stage refuses to continue; the message names the problem. The CLI exits with code 1."""
