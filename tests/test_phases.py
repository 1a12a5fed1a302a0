"""Phase lengths ("a fraction of the run or a whole number of rounds") are parsed and validated in one place
for FedCMD's selection, pFedSim's and FedAP's warm-up; the FedCMD ablation is FedCMD's vote component plus
FedAvg, and checkpoints exactly that."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from fedcmd_core.strategies import ModelSpec, ServerContext, Update, parse_params
from fedcmd_core.strategies.fedcmd import FedCMDServer
from fedcmd_core.strategies.fedcmd_noweight import FedCMDNoWeightServer
from fedcmd_core.strategies.phases import phase_rounds


@pytest.mark.parametrize(
    ("value", "rounds", "minimum", "expected"),
    [(0.1, 25, 0, 2), (0.5, 25, 0, 12), (3, 25, 0, 3), (30, 25, 0, 25), (0.01, 25, 0, 0), (0.01, 25, 1, 1),
     (0, 10, 0, 0)],
)
def test_phase_rounds_rounds_a_fraction_down_and_clamps_to_the_run(
    value: float, rounds: int, minimum: int, expected: int
) -> None:
    assert phase_rounds(value, rounds, minimum) == expected


@pytest.mark.parametrize(("algo", "key"), [("fedcmd", "selection_rounds"), ("fedcmd_noweight", "selection_rounds"),
                                           ("pfedsim", "warmup_round"), ("fedap", "warmup_round")])
def test_a_fractional_number_of_rounds_is_refused_by_every_algorithm(algo: str, key: str) -> None:
    assert getattr(parse_params(algo, {key: 0.25}), key) == 0.25
    assert getattr(parse_params(algo, {key: 4}), key) == 4
    with pytest.raises(ValidationError, match=r"2\.5 is neither a fraction < 1 of the run nor a whole number"):
        parse_params(algo, {key: 2.5})


def _spec() -> ModelSpec:
    initial = {"fc1.weight": np.zeros((2, 2), np.float32), "fc2.weight": np.zeros((2, 2), np.float32)}
    return ModelSpec(initial=initial, layer_names=["fc1", "fc2"])


def _update(value: float, votes: dict[str, int]) -> Update:
    arrays = {"fc1.weight": np.full((2, 2), value, np.float32), "fc2.weight": np.full((2, 2), value, np.float32)}
    return Update(0, arrays=arrays, num_samples=1, info={"votes": votes})


def test_the_ablation_votes_as_fedcmd_then_averages_the_body_and_checkpoints_only_that() -> None:
    ctx = ServerContext(_spec(), num_clients=2, global_epoch=4, seed=0)
    ablation = FedCMDNoWeightServer(parse_params("fedcmd_noweight", {"selection_rounds": 1}), ctx)
    fedcmd = FedCMDServer(parse_params("fedcmd", {"selection_rounds": 1}), ctx)
    votes = {0: _update(1.0, {"fc1": 3, "fc2": 1}), 1: _update(3.0, {"fc1": 2})}
    for server in (ablation, fedcmd):
        server.begin_round(0, [0, 1])
        assert server.configure_fit(0, 0).config == {"upload": ["fc1.weight", "fc2.weight"], "vote": ["fc1", "fc2"]}
        assert server.aggregate(0, votes)["round_layer"] == "fc1"
        server.begin_round(1, [0, 1])
    assert ablation.vote.chosen == fedcmd.vote.chosen == "fc1"
    assert ablation.personal_keys == ["fc1.weight"] and ablation.body_keys == ["fc2.weight"]
    task = ablation.configure_fit(1, 0)
    assert task.config == {"upload": ["fc2.weight"]} and list(task.arrays) == ["fc2.weight"]
    np.testing.assert_array_equal(task.arrays["fc2.weight"], np.full((2, 2), 2.0, np.float32))  # FedAvg of 1 and 3
    assert ablation.aggregate(1, {0: Update(1, {"fc2.weight": np.full((2, 2), 5.0, np.float32)}, 3),
                                  1: Update(1, {"fc2.weight": np.full((2, 2), 1.0, np.float32)}, 1)}) == {}
    np.testing.assert_array_equal(ablation.global_arrays["fc2.weight"], np.full((2, 2), 4.0, np.float32))
    state = ablation.state_dict()
    assert state["version"] == 2
    assert sorted(state["fields"]) == ["body_keys", "global_arrays", "personal_keys", "started", "vote"]
    assert state["fields"]["vote"]["vote_totals"] == {"fc1": 5, "fc2": 1}
    assert ablation.summary() == {"chosen_layer": "fc1", "selection_rounds": 1, "round_layers": ["fc1"],
                                  "vote_counts": {"fc1": 5, "fc2": 1}}
