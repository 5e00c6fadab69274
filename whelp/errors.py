"""The one exception type the CLI turns into a single clear line (no traceback)."""


class WhelpError(Exception):
    """A user-facing failure: the message names the problem and the fix."""
