"""Update norms do not depend on the order of a frame's arrays: safetensors decodes a frame into a dict in
the order of its (Rust) hash map, which differs from process to process, so two coordinators measuring the
same update must not sum its entries in that order (found by the SIGKILL-resume test: norms differed in the
last bit between a resumed and an uninterrupted coordinator)."""

from __future__ import annotations

import itertools

import numpy as np

from fedcmd_core.robust import update_norm, update_norms


def test_update_norms_are_the_same_for_every_order_of_the_entries() -> None:
    # squares 1 and four times 1e-16: adding each small one to 1 loses it (below half an ulp), adding them
    # first does not, and the difference survives the square root (1 + 2.2e-16)
    keys = ("a", "b", "c", "d", "e")
    sent = {k: np.zeros(1) for k in keys}
    trained = {k: np.array([1.0 if k == "a" else 1e-8]) for k in keys}
    assert np.sqrt(1.0 + 1e-16 + 1e-16 + 1e-16 + 1e-16) != np.sqrt(1e-16 + 1e-16 + 1e-16 + 1e-16 + 1.0)
    results = set()
    for order in itertools.permutations(trained):
        norms = update_norms({k: trained[k] for k in order}, sent)
        results.add((norms["weights"], update_norm({k: trained[k] for k in order}, sent)))
    assert len(results) == 1
    # name order: a first, every small square lost: exactly 1
    assert results == {(1.0, 1.0)}
