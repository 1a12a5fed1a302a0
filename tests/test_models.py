from __future__ import annotations

import pytest
import torch

from fedcmd_core.models import build_model, layer_of, model_name


def test_lenet5_layers_and_all_outputs() -> None:
    m = build_model("lenet5", (1, 28, 28), 10, seed=0)
    assert m.layer_names == ["conv1", "conv2", "fc1", "fc2", "classifier"]
    outs = m(torch.zeros(4, 1, 28, 28), return_all=True)
    assert [tuple(o.shape) for o in outs] == [(4, 6, 12, 12), (4, 16, 4, 4), (4, 120), (4, 84), (4, 10)]
    assert m.fc1[1].in_features == 256  # F = 256 for 1x28x28 (REFERENCE.md §1)
    assert build_model("lenet5", (3, 32, 32), 10).fc1[1].in_features == 400
    assert torch.equal(outs[-1], m(torch.zeros(4, 1, 28, 28)))
    assert {layer_of(k) for k in m.state_dict()} == set(m.layer_names)


def test_seeded_build_is_identical_and_does_not_touch_global_rng() -> None:
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    a = build_model("lenet5", (1, 28, 28), 10, seed=7)
    after = torch.rand(1)
    b = build_model("lenet5", (1, 28, 28), 10, seed=7)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("2nn", (60,)), ("avgcnn", (1, 28, 28)), ("lenet5", (1, 8, 8)), ("mobile", (3, 32, 32)), ("res18", (1, 28, 28))],
)
def test_every_model_runs_and_ends_in_classifier(name: str, shape: tuple[int, ...]) -> None:
    m = build_model(name, shape, 7, seed=0)
    m.eval()
    outs = m(torch.zeros(2, *shape), return_all=True)
    assert m.layer_names[-1] == "classifier"
    assert len(outs) == len(m.layer_names)
    assert tuple(outs[-1].shape) == (2, 7)


def test_unknown_model_names_the_known_ones() -> None:
    assert model_name("ModifiedLeNet5") == "lenet5"
    with pytest.raises(ValueError, match="known models: lenet5"):
        model_name("vgg")
