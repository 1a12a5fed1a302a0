"""The edge agent answers a task exactly once (a repeated task gets the stored answer, also after a restart),
keeps answering when its state cannot be written (and says so in its presence), starts fresh from a corrupt
state file, and refuses a run it cannot build with one line, exit 2 and an ``incompatible`` presence."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.agent import Agent
from edge_agent.compat import Incompatible, check_run
from fedcmd_core.runspec import RunSpec, build_client
from fedcmd_core.strategies import ClientData, ClientStrategy
from protocols.codec import Header, decode, encode
from protocols.memory import MemoryTransport
from protocols.topics import presence_topic, status_topic, task_topic, update_topic

FLEET = "health"
BIN = Path(sys.executable).parent
SPEC = RunSpec(algo="fedper", model="2nn", input_shape=(1, 8, 8), num_classes=10, num_clients=4, global_epoch=5,
               local_epoch=1, batch_size=8)


class BirthTransport(MemoryTransport):
    """The in-process transport plus MQTT's birth message, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.births: list[dict] = []

    def set_birth(self, birth: tuple[str, bytes, bool] | None) -> None:
        assert birth is not None and birth[2]  # retained
        self.births.append(json.loads(birth[1]))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_client(cid: int = 1) -> ClientStrategy:
    """A real FedPer client whose class counts fit/evaluate calls (class attributes: not device state)."""
    g = torch.Generator().manual_seed(cid)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    client = build_client(SPEC, cid, ClientData(x[:16], y[:16], x[16:], y[16:]))
    base = type(client)

    class Counting(base):  # type: ignore[valid-type,misc]
        fits = 0
        evaluations = 0

        def fit(self, task):  # type: ignore[no-untyped-def]
            type(self).fits += 1
            return super().fit(task)

        def evaluate(self, task):  # type: ignore[no-untyped-def]
            type(self).evaluations += 1
            return super().evaluate(task)

    client.__class__ = Counting
    return client


class Device:
    """An agent on a memory transport with everything it publishes collected."""

    def __init__(self, state_dir: Path | None, cid: int = 1, clock: Clock | None = None) -> None:
        self.transport = BirthTransport()
        self.client = counting_client(cid)
        self.cid = cid
        self.agent = Agent(self.transport, FLEET, cid, self.client, state_dir=state_dir, clock=clock or Clock())
        self.updates: list[bytes] = []
        self.presence: list[dict] = []
        self.transport.subscribe(update_topic(FLEET, cid), lambda t, p: self.updates.append(p))
        self.transport.subscribe(presence_topic(FLEET, cid), lambda t, p: self.presence.append(json.loads(p)))
        self.agent.announce("online")
        self.transport.run_until(lambda: False)

    def task(self, rnd: int, kind: str = "fit", run: str = "run-a") -> bytes:
        """Send one task as the coordinator does and return the answer's frame."""
        from fedcmd_core.runspec import build_server

        server = build_server(SPEC)
        task = server.task_for(rnd, self.cid, kind)  # type: ignore[arg-type]
        header = Header(type="task", fleet=FLEET, round=rnd, client=self.cid, kind=kind, run=run,
                        payload=task.config)
        before = len(self.updates)
        self.transport.publish(task_topic(FLEET, self.cid), encode(header, task.arrays))
        assert self.transport.run_until(lambda: len(self.updates) > before)
        self.transport.run_until(lambda: False)  # and whatever presence followed it
        return self.updates[-1]


def state_arrays(client: ClientStrategy) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in client.state.items()}


def test_a_repeated_task_is_answered_from_the_cache_without_training(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    first = dev.task(0)
    assert decode(first)[0].run == "run-a"  # the update echoes the task's run id
    after_fit = state_arrays(dev.client)
    again = dev.task(0)
    assert again == first  # the same bytes, not a second training
    assert type(dev.client).fits == 1 and dev.agent.resent == 1
    assert all(np.array_equal(after_fit[k], v) for k, v in dev.client.state.items())
    # per kind: an evaluation of the same round is a different task, and is itself answered once
    ev = dev.task(0, "evaluate")
    assert dev.task(0, "evaluate") == ev and type(dev.client).evaluations == 1
    assert dev.task(0) == first and type(dev.client).fits == 1  # the fit answer is still kept
    # another run, or the next round, is new work
    assert decode(dev.task(0, run="run-b"))[0].run == "run-b"
    assert type(dev.client).fits == 2
    dev.task(1, run="run-b")
    assert type(dev.client).fits == 3


def test_an_empty_run_id_is_never_answered_from_the_cache(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    dev.task(0, run="")
    dev.task(0, run="")
    assert type(dev.client).fits == 2  # without a run id two runs cannot be told apart


def test_the_cached_answer_and_state_survive_an_agent_restart(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    dev.task(0)
    first = dev.task(1)
    saved = state_arrays(dev.client)
    restarted = Device(tmp_path)  # a new process: fresh strategy, same state dir
    assert restarted.task(1) == first
    assert type(restarted.client).fits == 0
    assert saved.keys() == restarted.client.state.keys()
    assert all(np.array_equal(saved[k], restarted.client.state[k]) for k in saved)
    # state and answer came from one file: no side file holds the answers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-1.state.safetensors"]


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """ENOSPC from fsync of the state writer's temporary file (where a full disk reports it); counts hits."""
    hits = {"n": 0, "on": 1}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if hits["on"] and ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            hits["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def test_a_failed_state_write_still_answers_reports_unhealthy_and_recovers(
    tmp_path: Path, disk_full: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    disk_full["on"] = 0
    clock = Clock()
    dev = Device(tmp_path, clock=clock)
    dev.task(0)
    state_file = tmp_path / "client-1.state.safetensors"
    on_disk = state_file.read_bytes()
    disk_full["on"] = 1
    with caplog.at_level(logging.WARNING, "fedcmd.agent"):
        answer = dev.task(1)
    assert disk_full["n"] == 1  # the fault landed in the state write
    assert decode(answer)[0].round == 1  # the round still got its update
    assert dev.presence[-1]["state"] == "unhealthy"
    assert "No space left on device" in dev.presence[-1]["reason"]
    assert dev.transport.births[-1] == dev.presence[-1]  # a reconnect would announce the same
    assert [r.getMessage() for r in caplog.records if "unhealthy" in r.getMessage()].__len__() == 1
    assert state_file.read_bytes() == on_disk  # the previous state is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [state_file.name]  # no temporary file left
    # not yet due: nothing retried
    clock.now += 10
    dev.agent.tick()
    assert disk_full["n"] == 1
    # still full at the retry: still unhealthy, no second presence
    clock.now += 25
    dev.agent.tick()
    dev.transport.run_until(lambda: False)
    assert disk_full["n"] == 2 and dev.presence[-1]["state"] == "unhealthy"
    assert sum(p["state"] == "unhealthy" for p in dev.presence) == 1
    # space again: the next retry writes the state and the device is online again
    disk_full["on"] = 0
    clock.now += 31
    dev.agent.tick()
    dev.transport.run_until(lambda: False)
    assert dev.presence[-1] == {"state": "online", "client": 1}
    assert dev.transport.births[-1] == dev.presence[-1]
    assert state_file.read_bytes() != on_disk
    restarted = Device(tmp_path)
    assert restarted.task(1) == answer and type(restarted.client).fits == 0  # round 1 was saved


def test_a_state_dir_replaced_by_a_file_makes_the_device_unhealthy(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    dev = Device(state_dir)
    state_dir.rmdir()
    state_dir.write_text("not a folder")
    answer = dev.task(0)
    assert decode(answer)[0].round == 0
    assert dev.presence[-1]["state"] == "unhealthy" and "Not a directory" in dev.presence[-1]["reason"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_state_file_is_moved_aside_and_the_device_starts_fresh(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    dev = Device(tmp_path)
    dev.task(0)
    state_file = tmp_path / "client-1.state.safetensors"
    blob = state_file.read_bytes()
    state_file.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, "fedcmd.agent"):
        fresh = Device(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "starting fresh" in warnings[0], warnings
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("client-1.state.safetensors.corrupt-")]
    assert len(aside) == 1 and not state_file.exists()
    assert fresh.client.state == {}  # the cloud's model, not a half-read state
    fresh.task(0)
    assert type(fresh.client).fits == 1 and state_file.is_file()  # it trained and saved again


def test_a_run_too_large_for_the_device_is_refused_without_allocating() -> None:
    big = SPEC.model_dump() | {"model": "lenet5", "input_shape": [1, 28, 28], "batch_size": 10**9}
    with pytest.raises(Incompatible, match="more than this machine's"):
        check_run(big, (1, 28, 28), 0, None)
    from edge_agent.profiles import get_profile

    with pytest.raises(Incompatible, match="rpi4 has a 1536 MB memory budget"):
        check_run(big | {"batch_size": 4096, "num_classes": 100_000}, (1, 28, 28), 0, get_profile("rpi4"))
    # built on the meta device: no gigabytes were touched. A child process makes the same refusal and
    # measures its own peak memory (a wall-clock bound would fail on a busy machine, not on a real allocation)
    probe = (
        "import json, resource, sys\n"
        "from edge_agent.compat import Incompatible, check_run\n"
        "try:\n    check_run(json.loads(sys.argv[1]), (1, 28, 28), 0, None)\n"
        "except Incompatible:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    huge = json.dumps(big | {"num_classes": 100_000})  # batch 10**9 and 100,000 classes: terabytes
    child = subprocess.run([sys.executable, "-c", probe, huge], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip(), child.stderr[-2000:]
    assert int(child.stdout) < 1500 * 1024, f"peak {int(child.stdout) // 1024} MB"  # torch alone is ~600 MB


def _agent_proc(url: str, cid: int, partition: Path, state_dir: Path, fleet: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fedcmd-edge"), "run", "--broker", url, "--client-id", str(cid), "--data", str(partition),
         "-d", "mnist5k", "--state-dir", str(state_dir), "--fleet", fleet, "--wait", "60", "--no-onnx"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


GOOD_RUN = {"algo": "fedavg", "model": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10, "num_clients": 20,
            "global_epoch": 3}
BAD_RUNS = {
    "types": ({"num_classes": "ten"}, "num_classes"),
    "model": ({"model": "resnet999"}, "unknown model"),
    "classes": ({"num_classes": 1e9}, "num_classes"),
    "shape": ({"input_shape": [3, 32, 32]}, "(3, 32, 32)"),
}


@pytest.mark.timeout(120)
def test_a_run_the_device_cannot_build_is_refused_with_one_line_exit_2_and_presence(
    tmp_path: Path, shared_partition: Path, mosquitto_broker
) -> None:
    from protocols.mqtt import MqttTransport
    from protocols.topics import presence_filter

    url = mosquitto_broker.url
    coordinator = MqttTransport(url, "fake-coordinator")
    try:
        for name, (change, _) in BAD_RUNS.items():
            status = {"state": "running", "fleet": name, "run": {**GOOD_RUN, **change}}
            coordinator.publish(status_topic(name), json.dumps(status).encode(), retain=True)
        procs = {name: _agent_proc(url, i, shared_partition, tmp_path / name, name)
                 for i, name in enumerate(BAD_RUNS)}
        outs = {name: p.communicate(timeout=100) for name, p in procs.items()}
        presence: dict[str, dict] = {}
        for name in BAD_RUNS:
            coordinator.subscribe(presence_filter(name), lambda t, p, n=name: presence.update({n: json.loads(p)}))
        coordinator.run_until(lambda: len(presence) == len(BAD_RUNS), 10)
    finally:
        coordinator.close()
    for i, (name, (_, expected)) in enumerate(BAD_RUNS.items()):
        _, err = outs[name]
        lines = [line for line in err.splitlines() if line.strip()]
        assert procs[name].returncode == 2, (name, err)
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert lines[0].startswith("error: client") and "incompatible run" in lines[0], lines
        assert expected in lines[0], (name, lines[0])
        assert presence[name]["state"] == "incompatible" and presence[name]["client"] == i, presence
        assert expected in presence[name]["reason"], presence[name]


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_state_dir_that_cannot_hold_files_is_one_line(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    state_dir = blocker if where == "file" else blocker / "state"
    proc = subprocess.run(
        [str(BIN / "fedcmd-edge"), "run", "--broker", "mqtt://127.0.0.1:1", "--client-id", "0", "--data",
         str(tmp_path / "p.npz"), "-d", "mnist5k", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 4, proc.stderr  # fedcmd_core/cli_exit.py: 4 = a file could not be written
    assert len(lines) == 1 and "--state-dir" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_a_task_the_device_cannot_carry_out_is_not_answered_and_does_not_stop_it(tmp_path: Path) -> None:
    """A body of NaN makes training raise (here: FedPer's forward produces NaN and the loss check, or any
    strategy error): the device logs one line, keeps its previous state and answers the next task."""
    dev = Device(tmp_path)
    dev.task(0)
    kept = state_arrays(dev.client)
    from fedcmd_core.runspec import build_server

    task = build_server(SPEC).task_for(1, dev.cid, "fit")
    broken = {k: np.full_like(v, np.nan) if v.dtype == np.float32 else v for k, v in task.arrays.items()}
    header = Header(type="task", fleet=FLEET, round=1, client=dev.cid, kind="fit", run="run-a", payload=task.config)
    original_fit = dev.client.fit

    def raising_fit(t):  # type: ignore[no-untyped-def]
        original_fit(t)  # trains on NaN (changing the state), then fails as a strategy can
        raise ValueError("non-finite values in the vote")

    dev.client.fit = raising_fit  # type: ignore[method-assign]
    sent = len(dev.updates)
    dev.transport.publish(task_topic(FLEET, dev.cid), encode(header, broken))
    dev.transport.run_until(lambda: False)
    assert len(dev.updates) == sent and dev.agent.failed == 1  # no answer, no crash
    assert all(np.array_equal(kept[k], v, equal_nan=True) for k, v in dev.client.state.items())  # rolled back
    del dev.client.fit
    assert decode(dev.task(2))[0].round == 2  # and it answers the next task
