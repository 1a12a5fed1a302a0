"""The three vote metrics of FedCMD's layer selection (``selection_metric``) on values worked out by hand,
and ``gaussian_w2`` against POT's Gaussian (Bures-)Wasserstein distance on random activations.

The hand case: every sample's tensor is (0, v, 1), so its min-max-mean embedding is z = (1 + v) / 3, and a
one-hot label over 3 classes embeds to 1/3. With a batch of 4:

    x  : v = (0, 0, 1, 1)   z = (1/3, 1/3, 2/3, 2/3)    target = z(y) - z(x) = (0, 0, -1/3, -1/3)
    o0 : v = (0, 0, 0, 0)   z = 1/3                      shift0 = z(o0) - z(x)  = (0, 0, -1/3, -1/3)
    o1 : v = (1, 1, 1, 1)   z = 2/3                      shift1 = z(o1) - z(o0) = (1/3, 1/3, 1/3, 1/3)
    o2 : v = (1, 0, 0, 0)   z = (2/3, 1/3, 1/3, 1/3)     shift2 = z(o2) - z(o1) = (0, -1/3, -1/3, -1/3)
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from fedcmd_core.selection import embed, layer_distances

F32 = 1e-6  # the embedding is computed in float32


def _rows(v: list[float]) -> torch.Tensor:
    return torch.tensor([[0.0, a, 1.0] for a in v])


X = _rows([0, 0, 1, 1]).reshape(4, 1, 1, 3)
Y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
OUTS = [_rows([0, 0, 0, 0]), _rows([1, 1, 1, 1]), _rows([1, 0, 0, 0])]
TARGET = np.array([0, 0, -1 / 3, -1 / 3])
SHIFTS = [TARGET, np.full(4, 1 / 3), np.array([0, -1 / 3, -1 / 3, -1 / 3])]


def test_the_hand_case_embeds_as_written() -> None:
    np.testing.assert_allclose(embed(X).numpy(), [1 / 3, 1 / 3, 2 / 3, 2 / 3], rtol=F32)
    np.testing.assert_allclose(embed(Y).numpy(), np.full(4, 1 / 3), rtol=F32)
    prev = [X, *OUTS]
    for i, shift in enumerate(SHIFTS):
        np.testing.assert_allclose((embed(OUTS[i]) - embed(prev[i])).numpy(), shift, atol=F32)


def test_w1_by_hand() -> None:
    # shift0 is the target itself; shift1: mean |1/3 - t| = (1/3 + 1/3 + 2/3 + 2/3) / 4 = 1/2;
    # shift2 sorted (-1/3, -1/3, -1/3, 0) vs (-1/3, -1/3, 0, 0): one sample moved by 1/3 -> 1/12
    d = layer_distances(X, Y, OUTS, [0, 1, 2], "w1")
    np.testing.assert_allclose(d, [0.0, 0.5, 1 / 12], atol=F32)
    for i, shift in enumerate(SHIFTS):
        assert d[i] == pytest.approx(ot.wasserstein_1d(shift, TARGET, p=1), abs=F32)


def test_gaussian_w2_by_hand_and_against_pot() -> None:
    # target: mean -1/6, std 1/6. shift1: mean 1/3, std 0 -> sqrt((1/2)^2 + (1/6)^2) = sqrt(10) / 6.
    # shift2: mean -1/4, std sqrt(3/4 * 1/4) / 3 = 1 / sqrt(48) -> sqrt((1/12)^2 + (1/sqrt(48) - 1/6)^2)
    d = layer_distances(X, Y, OUTS, [0, 1, 2], "gaussian_w2")
    d2 = math.sqrt((1 / 12) ** 2 + (1 / math.sqrt(48) - 1 / 6) ** 2)
    np.testing.assert_allclose(d, [0.0, math.sqrt(10) / 6, d2], atol=F32)
    for i, shift in enumerate(SHIFTS):
        pot = ot.gaussian.bures_wasserstein_distance(
            np.array([shift.mean()]), np.array([TARGET.mean()]), np.array([[shift.var()]]), np.array([[TARGET.var()]])
        )
        assert d[i] == pytest.approx(float(pot), abs=F32)
    # the vote: o0 (its shift is the target's), then o2 before o1, as W1 and reference rank them too
    assert np.argsort(d).tolist() == [0, 2, 1]


def test_reference_by_hand() -> None:
    # the released code: |mm(o_l) - mm(o_{l-1}) - (mm(y) - mm(x))| on whole-batch min-max means:
    # mm(y) = 1/3, mm(x) = 1/2, mm(o0) = 1/3, mm(o1) = 2/3, mm(o2) = 5/12 (float64 throughout)
    d = layer_distances(X, Y, OUTS, [0, 1, 2], "reference")
    target = 1 / 3 - 1 / 2
    expected = [abs(1 / 3 - 1 / 2 - target), abs(2 / 3 - 1 / 3 - target), abs(5 / 12 - 2 / 3 - target)]
    np.testing.assert_allclose(d, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d, [0.0, 0.5, 1 / 12], rtol=1e-12, atol=1e-15)


def test_reference_uses_whole_batch_statistics_not_per_sample_ones() -> None:
    # scaling one sample's activations by 10 changes the whole-batch min-max (and so "reference"),
    # not the per-sample min-max embedding (and so not "w1")
    outs = [o.clone() for o in OUTS]
    outs[2][0] *= 10
    assert layer_distances(X, Y, outs, [2], "w1")[0] == pytest.approx(1 / 12, abs=F32)
    # whole batch of o2 now spans 0..10: values (0, 10, 10), (0, 0, 1) x 3 -> mean (20 + 3) / 120 = 23/120
    got = layer_distances(X, Y, outs, [2], "reference")[0]
    assert got == pytest.approx(abs(23 / 120 - 2 / 3 + 1 / 6), rel=1e-12)


def test_gaussian_w2_equals_pot_on_random_activations() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 6, 6, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (32,), generator=g), 4).float()
    outs = [torch.randn(32, 12, generator=g), torch.randn(32, 7, generator=g), torch.randn(32, 4, generator=g)]
    d = layer_distances(x, y, outs, [0, 1, 2], "gaussian_w2")
    z = [embed(x), *[embed(o) for o in outs]]
    target = (embed(y) - z[0]).numpy()
    for i in range(3):
        shift = (z[i + 1] - z[i]).numpy()
        pot = ot.gaussian.bures_wasserstein_distance(
            np.array([shift.mean()]), np.array([target.mean()]), np.array([[shift.var()]]), np.array([[target.var()]])
        )
        assert d[i] == pytest.approx(float(pot), rel=1e-9)
        assert d[i] > 0
