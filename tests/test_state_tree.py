from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedcmd_core.state_tree import StateError, load_state_file, save_state_file


def test_round_trip_keeps_types_keys_and_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rng.random(3)
    values = {
        "bodies": {0: np.arange(4, dtype=np.float32), 7: np.ones((2, 3))},
        "named": {"fc2.weight": np.zeros((2, 2), dtype=np.float16)},
        "votes": Counter({"fc2": 3, "fc1": 1}),
        "started": {1, 3, 2},
        "modes": ["fc2", None],
        "pair": (1, "a"),
        "scalar": np.array(3, dtype=np.int64),
        "rng": rng,
        "x": 1.5,
    }
    path = tmp_path / "s.safetensors"
    save_state_file(path, values, {"kind": "test"})
    out, meta = load_state_file(path)
    assert meta == {"kind": "test"}
    assert set(out["bodies"]) == {0, 7} and out["bodies"][7].dtype == np.float64
    np.testing.assert_array_equal(out["bodies"][0], values["bodies"][0])
    assert out["named"]["fc2.weight"].dtype == np.float16
    assert out["votes"] == Counter({"fc2": 3, "fc1": 1}) and isinstance(out["votes"], Counter)
    assert out["started"] == {1, 2, 3} and out["modes"] == ["fc2", None] and out["pair"] == (1, "a")
    assert out["scalar"].shape == () and int(out["scalar"]) == 3
    assert out["rng"].random() == rng.random()
    assert not list(tmp_path.glob(".*tmp*"))


def test_unsupported_values_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot checkpoint"):
        save_state_file(tmp_path / "a", {"f": object()})
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(StateError):
        load_state_file(bad)
