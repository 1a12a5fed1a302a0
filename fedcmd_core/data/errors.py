"""The one exception type the data layer raises for user mistakes."""

from __future__ import annotations


class DataError(ValueError):
    """A user mistake; ``str(e)`` is one line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Collapse to one line so CLIs can print it verbatim after "error: ".
        super().__init__(" ".join(message.split()))
