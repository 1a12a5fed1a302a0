"""A strategy checkpoints exactly the fields it declares, under a state version: a checkpoint of another
version or with other fields is refused with one line (exit code 2 from the CLI), never loaded half-way,
and what a strategy derives from its settings at start is never overwritten by a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedcmd_core.models import build_model
from fedcmd_core.state_tree import load_state_file, save_state_file
from fedcmd_core.strategies import ALGORITHMS, ModelSpec, ServerContext, Update, algorithm, parse_params
from fedcmd_core.strategies.base import StateVersionError


def _server(algo: str, rounds: int = 10, **hp: object):
    spec = ModelSpec.from_model(build_model("lenet5", (1, 28, 28), 10, seed=0))
    server_cls, _ = algorithm(algo)
    return server_cls(parse_params(algo, hp), ServerContext(spec, 4, rounds, 0)), spec


def _one_round(server, spec: ModelSpec, rnd: int) -> None:
    rng = np.random.default_rng(rnd)
    server.begin_round(rnd, [0, 1])
    updates = {}
    for c in (0, 1):
        task = server.task_for(rnd, c)
        keys = server.expected_upload(task)
        arrays = {k: (spec.initial[k.split("::")[-1]] + rng.normal(size=spec.initial[k.split("::")[-1]].shape))
                  .astype(np.float32) for k in keys}
        updates[c] = Update(rnd, arrays, 10, {}, {"votes": {"fc2": 3}})
        server.on_update(rnd, c, updates[c])
    server.aggregate(rnd, updates)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_declares_fields_that_exist_and_round_trip(algo: str) -> None:
    server, _ = _server(algo)
    fields = server.checkpointed_fields()
    assert fields[:2] == ["global_arrays", "started"]
    for name in fields:
        assert hasattr(server, name), f"{algo} declares {name!r} but has no such attribute"
    state = server.state_dict()
    assert state["version"] == server.state_version and list(state["fields"]) == fields
    assert "params" not in state["fields"] and "ctx" not in state["fields"]


def test_fedcmd_state_survives_a_round_trip_and_settings_derived_at_start_are_kept(tmp_path: Path) -> None:
    server, spec = _server("fedcmd", selection_rounds=1)
    for rnd in range(3):
        _one_round(server, spec, rnd)
    assert server.vote.chosen == "fc2" and len(server.bodies) == 2
    path = tmp_path / "s.safetensors"
    save_state_file(path, {"strategy": server.state_dict()})
    values, _ = load_state_file(path)
    # a new run with other selection settings: phase1 and candidates come from its own settings
    other, _ = _server("fedcmd", rounds=20, selection_rounds=4)
    other.load_state_dict(values["strategy"])
    assert other.vote.rounds == 4 and other.vote.candidates == server.vote.candidates
    assert other.vote.chosen == server.vote.chosen and other.body_keys == server.body_keys
    assert sorted(other.bodies) == sorted(server.bodies)
    for c in server.bodies:
        np.testing.assert_array_equal(other.bodies[c], server.bodies[c])
    np.testing.assert_array_equal(other.sim, server.sim)
    assert other.vote.vote_totals == server.vote.vote_totals and other.body_round == server.body_round


def test_other_version_or_other_fields_are_refused_before_anything_is_loaded() -> None:
    server, spec = _server("fedcmd", selection_rounds=1)
    _one_round(server, spec, 0)
    state = server.state_dict()
    fresh, _ = _server("fedcmd", selection_rounds=1)
    before = {k: v.copy() for k, v in fresh.global_arrays.items()}
    with pytest.raises(StateVersionError, match="version 0, this fedcmd reads version 3"):
        fresh.load_state_dict({**state, "version": 0})
    renamed = dict(state["fields"])
    renamed["stored_bodies"] = renamed.pop("bodies")
    with pytest.raises(StateVersionError, match=r"missing \['bodies'\], unexpected \['stored_bodies'\]"):
        fresh.load_state_dict({"version": server.state_version, "fields": renamed})
    with pytest.raises(StateVersionError, match="version None"):
        fresh.load_state_dict({k: v for k, v in state["fields"].items()})  # the pre-version layout
    for k, v in before.items():  # nothing was loaded half-way
        np.testing.assert_array_equal(fresh.global_arrays[k], v)
    assert fresh.bodies == {} and fresh.vote.round_modes == []


def test_cli_refuses_a_checkpoint_of_another_state_version_with_one_line_and_exit_2(
    tmp_path: Path, shared_partition: Path
) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    cmd = [sys.executable, "-m", "cloud", "simulate", "--algo", "fedavg", "-d", "mnist5k", "-p", str(shared_partition),
           "-jr", "0.1", "-le", "1", "-tg", "0", "--checkpoint", str(ckpt), "--state-dir", str(tmp_path / "state")]
    first = subprocess.run([*cmd, "-ge", "1", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    values, meta = load_state_file(ckpt)
    assert values["strategy"]["version"] == 1
    values["strategy"]["version"] = 99
    save_state_file(ckpt, values, meta)
    again = subprocess.run([*cmd, "-ge", "2", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert again.returncode == 2, again.stderr[-2000:]
    errors = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "version 99, this fedcmd reads version 1" in errors[0], again.stderr
    assert str(ckpt) in errors[0] and "Traceback" not in again.stderr
