"""The built-in algorithm and model names, without importing torch: ``fedcmd --help`` lists them in a few
milliseconds. tests/test_cli_help.py checks these equal the registries (fedcmd_core.strategies.BUILTIN,
fedcmd_core.models.MODELS)."""

from __future__ import annotations

ALGORITHM_NAMES: tuple[str, ...] = (
    "local", "fedavg", "fedper", "pfedsim", "fedcmd", "fedprox", "feddyn", "fedbn", "fedap", "fedbabu",
    "fedfomo", "fedrep", "lgfedavg", "fedcmd_noweight",
)
MODEL_NAMES: tuple[str, ...] = ("lenet5", "2nn", "avgcnn", "mobile", "res18")
