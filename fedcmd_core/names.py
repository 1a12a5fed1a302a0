"""The built-in algorithm and model names, without importing torch: ``fedcmd --help`` lists them in a few
milliseconds. tests/test_cli_help.py checks these equal the registries (fedcmd_core.strategies.BUILTIN,
fedcmd_core.models.MODELS)."""

from __future__ import annotations

ALGORITHM_NAMES: tuple[str, ...] = (
    "local", "fedavg", "fedper", "pfedsim", "fedcmd", "fedprox", "feddyn", "fedbn", "fedap", "fedbabu",
    "fedfomo", "fedrep", "lgfedavg", "fedcmd_noweight",
)
MODEL_NAMES: tuple[str, ...] = ("lenet5", "2nn", "avgcnn", "mobile", "res18")
ALGORITHM_ALIASES: dict[str, str] = {"local-only": "local", "localonly": "local", "local_only": "local"}
MODEL_ALIASES: dict[str, str] = {"modifiedlenet5": "lenet5", "mobilenetv2": "mobile", "resnet18": "res18"}


def unknown_name(kind: str, name: str, known: tuple[str, ...], aliases: dict[str, str]) -> str | None:
    """The one-line error for a name that is neither known nor an alias (None when it is fine): the same
    words the registries use, without importing them (and torch)."""
    from fedcmd_core.suggest import closest

    key = name.strip().lower()
    if key in known or key in aliases:
        return None
    close = closest(key, [*known, *aliases])
    hint = f"; did you mean {aliases.get(close, close)!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})"


ENTRY_POINT_GROUP = "fedcmd.algorithms"  # where installed packages register algorithms (their names count)
