"""Phase lengths: "a fraction of the run (< 1) or a whole number of rounds", parsed and validated once.

FedCMD's selection rounds and the warm-up of pFedSim and FedAP are given this way (the released code's
``--selection_round 0.1``); the field type rejects 2.5 rounds, the function turns a value into rounds.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _fraction_or_whole(value: float) -> float:
    if value >= 1 and value != int(value):
        raise ValueError(f"{value} is neither a fraction < 1 of the run nor a whole number of rounds")
    return value


# A hyper-parameter holding a phase length (add ge/gt bounds with Field as usual).
PhaseLength = Annotated[float, AfterValidator(_fraction_or_whole)]


def phase_rounds(value: float, global_epoch: int, minimum: int = 0) -> int:
    """Rounds of a phase of ``value`` (fraction or count) in a run of ``global_epoch`` rounds, clamped to
    [minimum, global_epoch]: a fraction rounds down (0.1 of 25 rounds is 2)."""
    n = int(global_epoch * value) if value < 1 else int(value)
    return max(minimum, min(n, global_epoch))
