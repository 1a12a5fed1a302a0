"""A coordinator that dies after a round resumes from its checkpoint; agents keep their state on disk.
The resumed run must give exactly the rounds of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.config import resolve
from cloud.sim.simulate import build_and_run


class Crash(Exception):
    pass


@pytest.mark.parametrize("hp", [{"selection_rounds": 2}, {"selection_rounds": 2, "body_mode": "relay"}])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tmp_path: Path, shared_partition: Path, hp: dict
) -> None:
    values = {
        "algo": "fedcmd", "dataset": "mnist5k", "partition": shared_partition, "join_ratio": 0.1,
        "global_epoch": 5, "local_epoch": 1, "seed": 11, "test_gap": 0, "hp": hp,
    }
    whole = build_and_run(resolve({}, {**values, "state_dir": tmp_path / "a"}))

    ckpt, state = tmp_path / "ckpt.safetensors", tmp_path / "b"

    def crash_after_third(record) -> None:
        if record.round == 2:
            raise Crash

    with pytest.raises(Crash):
        build_and_run(resolve({}, {**values, "checkpoint": ckpt, "state_dir": state}), on_round=crash_after_third)
    assert ckpt.is_file()
    resumed_rounds: list[int] = []
    resumed = build_and_run(
        resolve({}, {**values, "checkpoint": ckpt, "state_dir": state}),
        on_round=lambda r: resumed_rounds.append(r.round),
    )
    assert resumed_rounds == [3, 4]  # rounds 1-3 came from the checkpoint
    assert [r.clients for r in resumed.records] == [r.clients for r in whole.records]
    for a, b in zip(whole.records, resumed.records):
        assert a.metrics.keys() == b.metrics.keys()
        for k in a.metrics:
            assert b.metrics[k] == pytest.approx(a.metrics[k], rel=1e-9), (a.round, k)
    assert resumed.final["test_before_acc"] == whole.final["test_before_acc"]
    assert resumed.strategy_summary["chosen_layer"] == whole.strategy_summary["chosen_layer"]


def test_checkpoint_of_another_algorithm_is_refused(tmp_path: Path, shared_partition: Path) -> None:
    from cloud.config import ConfigError

    base = {"dataset": "mnist5k", "partition": shared_partition, "join_ratio": 0.1, "global_epoch": 1,
            "local_epoch": 1, "test_gap": 0, "checkpoint": tmp_path / "c.safetensors"}
    build_and_run(resolve({}, {**base, "algo": "fedavg"}))
    with pytest.raises(ConfigError, match="fedavg"):
        build_and_run(resolve({}, {**base, "algo": "fedper"}))
