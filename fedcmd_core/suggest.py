"""Did-you-mean hints for names a user types: algorithms, hyper-parameters, config keys, datasets."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``word`` (case-insensitive), or None when none is close."""
    names = list(known)
    close = difflib.get_close_matches(word.lower(), [k.lower() for k in names], n=1, cutoff=0.6)
    return {k.lower(): k for k in names}[close[0]] if close else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""`` when none is close."""
    match = closest(word, known)
    return f"; did you mean {match!r}?" if match else ""


def unknown_key(word: str, known: Iterable[str], what: str) -> str:
    """``"word: unknown <what>; did you mean 'x'? (valid: ...)"``: the suggestion, then every valid key."""
    names = sorted(known)
    return f"{word}: unknown {what}{did_you_mean(word, names)} (valid: {', '.join(names)})"
