"""FedCMD's phase-2 body mixing (``FedCMDServer._weighted_bodies``) on a case small enough to do by hand.

Three clients, a two-number body, a one-number personal layer. The server's state is set directly: each
client's last body theta_j, the body start_j it trained from, the round it comes from and the similarities
s_ij. tau = 1 / ln 2 makes Phi_ij = exp(s_ij / tau) = 2 ** s_ij, so with s in {0, 1} every weight is a small
fraction and every expected body below is worked out in the comment beside it.

    theta_0 = (1, 0)  start_0 = (0, 0)  update (1, 0)  round 3   n = 10
    theta_1 = (0, 1)  start_1 = (0, 0)  update (0, 1)  round 3   n = 30
    theta_2 = (2, 2)  start_2 = (1, 1)  update (1, 1)  round 2   n = 20   (stale by one round in round 4)

    s = [[1, 0, 1],      Phi = 2 ** s (s never compared -> unknown_similarity, default 0)
         [0, 1, nan],
         [1, nan, 1]]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedcmd_core.strategies import ModelSpec, ServerContext, parse_params
from fedcmd_core.strategies.fedcmd import FedCMDServer

TAU = 1.0 / math.log(2.0)
RND = 4  # the round being mixed for
F32 = {"rtol": 1e-6, "atol": 1e-7}  # bodies are float32 buffers, as the server stores them


def _server(**hp: Any) -> FedCMDServer:
    spec = ModelSpec(
        initial={"fc1.weight": np.zeros((1, 2), np.float32), "classifier.weight": np.zeros((1, 1), np.float32)},
        layer_names=["fc1", "classifier"],
    )
    params = parse_params("fedcmd", {"selection_rounds": 1, "tau": TAU, **hp})
    server = FedCMDServer(params, ServerContext(spec, num_clients=3, global_epoch=10, seed=0))
    server.vote.chosen, server.personal_keys, server.body_keys = "classifier", ["classifier.weight"], ["fc1.weight"]
    server.bodies = {0: np.float32([1, 0]), 1: np.float32([0, 1]), 2: np.float32([2, 2])}
    server.sent = {0: np.float32([0, 0]), 1: np.float32([0, 0]), 2: np.float32([1, 1])}
    server.body_round = {0: 3, 1: 3, 2: 2}
    server.sizes = {0: 10, 1: 30, 2: 20}
    server.sim = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, np.nan], [1.0, np.nan, 1.0]])
    return server


DESCRIBED = {"variant": "described"}  # max_staleness 0 (every stored body), server_lr 1 (plain mixing)

CASES = [
    # client 0: Phi = (2, 1, 2) / 5 -> 0.4 (1,0) + 0.2 (0,1) + 0.4 (2,2) = (1.2, 1.0)
    # client 1: s = (0, 1, unknown 0), Phi = (1, 2, 1) / 4 -> (0.25 + 0.5, 0.5 + 0.5) = (0.75, 1.0)
    ("described", DESCRIBED, [[1.2, 1.0], [0.75, 1.0]]),
    # pairs never compared count as s = 1: client 1 Phi = (1, 2, 2) / 5 -> (0.2 + 0.8, 0.4 + 0.8)
    ("unknown_similarity", {**DESCRIBED, "unknown_similarity": 1.0}, [[1.2, 1.0], [1.0, 1.2]]),
    # the default: only round-3 bodies (theta_2 is stale), then 7 more steps along the mixed update
    # client 0: w = (2, 1) / 3, mixed = (2/3, 1/3), step = w . update = (2/3, 1/3): mixed + 7 step = (16/3, 8/3)
    # client 1: w = (1, 2) / 3: 8 x (1/3, 2/3) = (8/3, 16/3)
    ("default", {}, [[16 / 3, 8 / 3], [8 / 3, 16 / 3]]),
    # server_lr alone, every body: client 0 mixed (1.2, 1.0), step 0.4 (1,0) + 0.2 (0,1) + 0.4 (1,1) = (0.8, 0.6)
    # -> (1.2, 1.0) + 2 (0.8, 0.6) = (2.8, 2.2); client 1 mixed (0.75, 1.0), step (0.5, 0.75) -> (1.75, 2.5)
    ("server_lr_3_all_bodies", {"max_staleness": 0, "server_lr": 3.0}, [[2.8, 2.2], [1.75, 2.5]]),
    # top_k 2: client 0 keeps Phi >= the 2nd largest (2): (2, 0, 2) -> (1.5, 1.0); client 1's 2nd largest is 1,
    # a tie with the third: ties at the cut are kept, nothing changes
    ("top_k_2", {**DESCRIBED, "top_k": 2}, [[1.5, 1.0], [0.75, 1.0]]),
    # top_k 1: client 1 keeps only its own body (Phi 2); client 0's two 2s tie: both kept
    ("top_k_1", {**DESCRIBED, "top_k": 1}, [[1.5, 1.0], [0.0, 1.0]]),
    # self_weight 1: one's own Phi gets + 1 x sum(Phi). client 0: (2 + 5, 1, 2) / 10 -> (0.7 + 0.4, 0.1 + 0.4);
    # client 1: (1, 2 + 4, 1) / 8 -> (0.125 + 0.25, 0.75 + 0.25)
    ("self_weight", {**DESCRIBED, "self_weight": 1.0}, [[1.1, 0.5], [0.375, 1.0]]),
    # size_weighting: Phi_ij x n_j. client 0: (20, 30, 40) / 90 -> ((20 + 80) / 90, (30 + 80) / 90);
    # client 1: (10, 60, 20) / 90 -> ((10 + 40) / 90, (60 + 40) / 90)
    ("size_weighting", {**DESCRIBED, "size_weighting": True}, [[10 / 9, 11 / 9], [5 / 9, 10 / 9]]),
    # all three, in the code's order (size, then top-k, then self weight on what is left):
    # client 0: (20, 30, 40) -> top 1 (0, 0, 40) -> own + 40: (40, 0, 40) / 80 -> (1.5, 1.0)
    # client 1: (10, 60, 20) -> (0, 60, 0) -> (0, 120, 0): theta_1
    ("size_top1_self", {**DESCRIBED, "size_weighting": True, "top_k": 1, "self_weight": 1.0}, [[1.5, 1.0], [0.0, 1.0]]),
    # the default with size weighting: client 0 w = (20, 30) / 50, 8 x (0.4, 0.6) = (3.2, 4.8);
    # client 1 w = (10, 60) / 70 -> 8 x (1/7, 6/7)
    ("default_size", {"size_weighting": True}, [[3.2, 4.8], [8 / 7, 48 / 7]]),
]


@pytest.mark.parametrize(("hp", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mixed_bodies_equal_the_hand_computed_values(hp: dict[str, Any], expected: list[list[float]]) -> None:
    server = _server(**hp)
    got = server._weighted_bodies([0, 1], None, RND)
    assert got.shape == (2, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, **F32)


def test_a_stale_device_gets_the_fresh_bodies_and_self_weight_skips_a_body_not_mixed() -> None:
    # default form for client 2 (its own body is stale, not mixed): s over (0, 1) = (1, unknown 0), w = (2, 1) / 3
    # -> (16/3, 8/3) as for client 0; self_weight has no own body to weigh, so the same
    for hp in ({}, {"self_weight": 5.0}):
        np.testing.assert_allclose(_server(**hp)._weighted_bodies([2])[0], [16 / 3, 8 / 3], **F32)


def test_max_staleness_2_takes_bodies_from_the_last_two_rounds() -> None:
    # newest round 3: rounds 2 and 3 are within 2, so theta_2 is back in: the described weights, plain mixing
    np.testing.assert_allclose(
        _server(max_staleness=2, server_lr=1.0)._weighted_bodies([0, 1]), [[1.2, 1.0], [0.75, 1.0]], **F32
    )


def test_server_momentum_adds_its_push_to_every_body() -> None:
    server = _server(server_momentum=0.5)
    server.push = np.float32([0.25, -0.5])  # lr * beta * v_(t-1), set by the previous round's end
    np.testing.assert_allclose(
        server._weighted_bodies([0, 1]), [[16 / 3 + 0.25, 8 / 3 - 0.5], [8 / 3 + 0.25, 16 / 3 - 0.5]], **F32
    )


def test_the_round_sends_the_mixed_bodies_and_reports_its_mixing_diagnostics() -> None:
    """Through the round's own path: begin_round mixes for the sampled devices, the fit task carries the
    body (never the personal layer), aggregate returns the diagnostics, each computed by hand."""
    server = _server(**DESCRIBED)
    server.begin_round(RND, [0, 1])
    task = server.configure_fit(RND, 0)
    assert sorted(task.arrays) == ["fc1.weight"] and task.config["personal"] == ["classifier.weight"]
    np.testing.assert_allclose(task.arrays["fc1.weight"], [[1.2, 1.0]], **F32)
    np.testing.assert_allclose(server.configure_fit(RND, 1).arrays["fc1.weight"], [[0.75, 1.0]], **F32)
    np.testing.assert_array_equal(server.sent[0], np.float32([1.2, 1.0]))  # what server_lr steps from next
    facts = server.aggregate(RND, {})
    assert facts["mixed_bodies"] == 3.0
    # ages (1, 1, 2): client 0 0.4 + 0.2 + 0.8 = 1.4, client 1 0.25 + 0.5 + 0.5 = 1.25
    assert facts["staleness"] == pytest.approx((1.4 + 1.25) / 2, rel=1e-12)
    # 1 / sum w^2: 1 / 0.36 = 25/9 and 1 / 0.375 = 8/3
    assert facts["effective_bodies"] == pytest.approx((25 / 9 + 8 / 3) / 2, rel=1e-12)
    # std of (1, 0, 1) and of (0, 1, 0): sqrt(2) / 3 each
    assert facts["similarity_std"] == pytest.approx(math.sqrt(2) / 3, rel=1e-12)


def test_the_default_round_reports_only_fresh_bodies() -> None:
    server = _server()
    server.begin_round(RND, [0, 1])
    facts = server.aggregate(RND, {})
    # two bodies of round 3, mixed in round 4: age 1; w = (2/3, 1/3) and (1/3, 2/3): 1 / (5/9) = 9/5 each
    assert (facts["mixed_bodies"], facts["staleness"]) == (2.0, pytest.approx(1.0))
    assert facts["effective_bodies"] == pytest.approx(9 / 5, rel=1e-12)
