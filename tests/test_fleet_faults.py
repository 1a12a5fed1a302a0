"""Fault tolerance over a real broker with real processes: the coordinator killed with SIGKILL in the
middle of a round resumes from its checkpoint; an agent killed mid-round leaves the round to close at its
deadline with quorum, and rejoins when restarted."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.run_output import WALL_CLOCK_FIELDS

pytest.importorskip("paho.mqtt")

BIN = Path(sys.executable).parent


def _serve_config(
    tmp: Path, url: str, rounds: int, local_epoch: int = 1, selection_rounds: int = 2, **extra: object
) -> Path:
    cfg = {
        "fleet": "faults",
        "broker": url,
        "checkpoint": str(tmp / "ckpt.safetensors"),
        "out": str(tmp / "out"),
        "join_ratio": 0.06,
        "min_clients": 2,
        "round_deadline": 8.0,
        "wait_clients": 3,
        "registration_timeout": 120.0,
    }
    cfg.update(extra)
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]  # TOML accepts these JSON scalars
    lines += [
        "[run]",
        'algo = "fedcmd"',
        "input_shape = [1, 28, 28]",
        "num_classes = 10",
        "num_clients = 50",
        f"global_epoch = {rounds}",
        f"local_epoch = {local_epoch}",
        "seed = 4",
        "[run.hp]",
        f"selection_rounds = {selection_rounds}",
    ]
    path = tmp / "cloud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _agent(url: str, cid: int, partition: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"agent-{cid}.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [
            str(BIN / "fedcmd-edge"),
            "run",
            "--broker",
            url,
            "--client-id",
            str(cid),
            "--data",
            str(partition),
            "-d",
            "mnist5k",
            "--state-dir",
            str(tmp / f"state-{cid}"),
            "--fleet",
            "faults",
            "--wait",
            "120",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _serve(config: Path, tmp: Path) -> subprocess.Popen:
    log = open(tmp / "serve.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "fedcmd"), "cloud", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )


def _status(url: str) -> dict:
    from protocols.mqtt import MqttTransport
    from protocols.topics import status_topic

    t = MqttTransport(url, f"probe-{time.monotonic_ns()}")
    got: dict = {}
    t.subscribe(status_topic("faults"), lambda topic, p: got.update(json.loads(p)))
    t.run_until(lambda: bool(got), 5)
    t.close()
    return got


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(tmp: Path) -> list[dict]:
    return list(csv.DictReader((tmp / "out" / "metrics.csv").open()))


# ------------------------------------------------------------------- the coordinator SIGKILLed inside rounds
KILL_ROUNDS = 4  # round 1 votes for the personal layer; the kills land in rounds 2 and 3 (phase 2)
TIMING_FACTS = ("aggregate_seconds", "fit_seconds_max", "fit_seconds_sum")  # wall-clock: the only exclusions


class Traffic:
    """The test's own MQTT client on the killed run's broker, on its own thread: counts every fit task and
    update per (client, round) and runs ``on_update[(client, round, n)]`` the moment the n-th such update is
    on the broker (before the count moves), so a device can be paused right after it answered."""

    def __init__(self, url: str, fleet: str, clients: range) -> None:
        from protocols.mqtt import MqttTransport
        from protocols.topics import task_topic, updates_filter

        self.tasks: Counter[tuple[int, int]] = Counter()
        self.updates: Counter[tuple[int, int]] = Counter()
        self.on_update: dict[tuple[int, int, int], Callable[[], None]] = {}
        self.transport = MqttTransport(url, f"probe-traffic-{os.getpid()}")
        for cid in clients:
            self.transport.subscribe(task_topic(fleet, cid), self._task)
        self.transport.subscribe(updates_filter(fleet), self._update)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.transport.run_until, args=(self._stop.is_set, None), daemon=True)
        self._thread.start()

    def _task(self, topic: str, payload: bytes) -> None:
        from protocols.codec import decode

        header = decode(payload)[0]
        if header.kind == "fit":
            self.tasks[header.client, header.round] += 1

    def _update(self, topic: str, payload: bytes) -> None:
        from protocols.codec import decode

        header = decode(payload)[0]
        key = (header.client, header.round)
        action = self.on_update.pop((*key, self.updates[key] + 1), None)
        if action is not None:
            action()
        self.updates[key] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.transport.close()


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _next_round(checkpoint: Path) -> int:
    from fedcmd_core.state_tree import load_state_file

    return int(load_state_file(checkpoint)[0]["next_round"])


def _read_fifo(path: Path, n: int, timeout: float) -> bytes:
    """Open ``path`` (a FIFO) for reading and return its first ``n`` bytes: this returns only once a writer
    opened it and wrote, and leaves that writer blocked on the full pipe."""
    got: list[bytes] = []
    fds: list[int] = []

    def read() -> None:
        fds.append(os.open(path, os.O_RDONLY))  # blocks until the coordinator opens it to write
        data = b""
        while len(data) < n:
            chunk = os.read(fds[0], n - len(data))
            if not chunk:
                break
            data += chunk
        got.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():  # unblock the reader before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        raise AssertionError(f"nobody wrote {path} within {timeout} s")
    _FIFO_READERS.extend(fds)  # closed by the test after the kill: closing earlier would fail the write
    return got[0]


_FIFO_READERS: list[int] = []


def _same(a: Any, b: Any, where: str) -> None:
    """Bit-for-bit equality of two checkpoint value trees (NaN equal to NaN: never-compared similarities)."""
    if isinstance(a, np.random.Generator):  # the coordinator's sampling generator: its whole state
        assert isinstance(b, np.random.Generator), where
        _same(a.bit_generator.state, b.bit_generator.state, where)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (where, a, b)


def _without_timings(values: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's values without its run id and the wall-clock fields of its round records."""
    out = {k: v for k, v in values.items() if k != "run_id"}
    out["records"] = [
        {
            **{k: v for k, v in r.items() if k != "seconds"},
            "facts": {k: v for k, v in r["facts"].items() if k not in TIMING_FACTS},
        }
        for r in values["records"]
    ]
    return out


@pytest.mark.timeout(600)
def test_coordinator_sigkilled_inside_rounds_resumes_to_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, shared_partition: Path, mosquitto_factory
) -> None:
    """One `fedcmd cloud serve` run SIGKILLed three times, each time with rounds left, at points reached
    deterministically from outside (devices paused with SIGSTOP, MQTT traffic and the checkpoint folder
    watched). Round 1 votes for the personal layer; round 2 is phase 2's first (each resumed coordinator
    finishes the selection itself). (A) round 2's tasks sent, no answer yet; (B) round 2 again, one of its
    two answers on the broker; (C) round 3 aggregated, its checkpoint half written (the write blocks on a
    FIFO planted at the temporary file's name). Every resume must end where an uninterrupted run of the same fleet ends:
    every round record, the strategy's whole state, metrics.csv and summary.json, bit for bit; only the
    wall-clock columns (`seconds`, and the round facts aggregate/fit seconds) and the run id differ."""
    from fswatch import IN_CREATE, IN_MOVED_FROM, FolderWatch

    from fedcmd_core.state_tree import load_state_file

    clients = range(2)  # join_ratio 0.04 of 50: both devices every round
    procs: list[subprocess.Popen] = []

    def fleet(name: str) -> tuple[Path, Path, str]:
        folder = tmp_path / name
        (folder / "ckpt").mkdir(parents=True)
        url = mosquitto_factory().url  # one broker per run: the same fleet name, the same config
        config = _serve_config(
            folder,
            url,
            rounds=KILL_ROUNDS,
            local_epoch=3,
            selection_rounds=1,
            join_ratio=0.04,
            min_clients=2,
            wait_clients=2,
            round_deadline=120.0,
            checkpoint=str(folder / "ckpt" / "c.safetensors"),
        )
        return folder, config, url

    whole_dir, whole_cfg, whole_url = fleet("whole")
    killed_dir, killed_cfg, killed_url = fleet("killed")
    ckpt = killed_dir / "ckpt" / "c.safetensors"
    traffic = Traffic(killed_url, "faults", clients)
    watch = FolderWatch(ckpt.parent)

    def signal_to(p: subprocess.Popen, sig: int) -> Callable[[], None]:
        return lambda: os.kill(p.pid, sig)

    try:
        procs += [_agent(whole_url, c, shared_partition, whole_dir, "--no-onnx") for c in clients]
        whole_serve = _serve(whole_cfg, whole_dir)
        procs.append(whole_serve)
        agents = [_agent(killed_url, c, shared_partition, killed_dir, "--no-onnx") for c in clients]
        procs += agents
        for c in clients:  # each device is paused the moment its round-1 answer is out
            traffic.on_update[c, 0, 1] = signal_to(agents[c], signal.SIGSTOP)

        # (A) after round 2's tasks went out: the paused devices cannot have answered
        serve = _serve(killed_cfg, killed_dir)
        procs.append(serve)
        _until(lambda: all(traffic.tasks[c, 1] == 1 for c in clients), 300, "round 2's tasks")
        serve.kill()
        serve.wait(10)
        assert [traffic.updates[c, 1] for c in clients] == [0, 0]
        assert _next_round(ckpt) == 1  # round 1 committed: rounds 2-4 were left

        # (B) while round 2's answers arrive: device 0 answers, device 1 stays paused
        serve = _serve(killed_cfg, killed_dir)
        procs.append(serve)
        _until(lambda: all(traffic.tasks[c, 1] == 2 for c in clients), 300, "round 2's tasks again")
        os.kill(agents[0].pid, signal.SIGCONT)
        _until(lambda: traffic.updates[0, 1] >= 1, 120, "device 0's answer to round 2")
        serve.kill()
        serve.wait(10)
        assert traffic.updates[1, 1] == 0
        assert _next_round(ckpt) == 1
        os.kill(agents[1].pid, signal.SIGCONT)
        # each device answers both tasks it holds (trains once, resends its stored answer), before the restart
        _until(lambda: all(traffic.updates[c, 1] == 2 for c in clients), 120, "the answers to the old tasks")

        # (C) inside round 3's checkpoint write. The third coordinator answers round 2 from the devices'
        # stored answers; each device is paused once that answer is out, so round 3 cannot end before the
        # FIFO is in place at the name the coordinator's round-2 write showed (pid and thread of the writer).
        for c in clients:
            traffic.on_update[c, 1, 3] = signal_to(agents[c], signal.SIGSTOP)
        serve = _serve(killed_cfg, killed_dir)
        procs.append(serve)
        temp = watch.wait_for(IN_CREATE, f".{ckpt.name}.tmp-{serve.pid}-", 300)
        watch.wait_for(IN_MOVED_FROM, temp.name, 60)
        assert _next_round(ckpt) == 2
        _until(lambda: all(traffic.updates[c, 1] == 3 for c in clients), 60, "round 2's repeated answers")
        assert [traffic.updates[c, 2] for c in clients] == [0, 0]
        os.mkfifo(ckpt.parent / temp.name)
        for a in agents:
            os.kill(a.pid, signal.SIGCONT)
        head = _read_fifo(ckpt.parent / temp.name, 4096, 120)
        serve.kill()
        serve.wait(10)
        for fd in _FIFO_READERS:
            os.close(fd)
        _FIFO_READERS.clear()
        header_len = int.from_bytes(head[:8], "little")  # a safetensors file: u64 header length, JSON header
        assert len(head) == 4096 and header_len > 0 and head[8:9] == b"{", head[:64]
        assert [traffic.updates[c, 2] for c in clients] == [1, 1]  # round 3 was answered in full
        assert _next_round(ckpt) == 2  # ... and aggregated, but never committed: rounds 3-4 left
        (ckpt.parent / temp.name).unlink()

        serve = _serve(killed_cfg, killed_dir)
        procs.append(serve)
        assert serve.wait(300) == 0, (killed_dir / "serve.log").read_text()[-3000:]
        assert whole_serve.wait(300) == 0, (whole_dir / "serve.log").read_text()[-3000:]
    finally:
        traffic.close()
        watch.close()
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
    assert (killed_dir / "serve.log").read_text().count("resumed from") == 3
    assert "resumed from" not in (whole_dir / "serve.log").read_text()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]  # no temporary file left

    whole, _ = load_state_file(whole_dir / "ckpt" / "c.safetensors")
    killed, _ = load_state_file(ckpt)
    assert [r["round"] for r in killed["records"]] == list(range(KILL_ROUNDS))
    assert all(sorted(r["answered"]) == sorted(r["clients"]) == [0, 1] for r in killed["records"])
    assert killed["rejected"] == {} and whole["rejected"] == {}
    _same(_without_timings(whole), _without_timings(killed), "checkpoint")

    def table(folder: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in _rows(folder)]

    assert [r["round"] for r in table(killed_dir)] == [str(r + 1) for r in range(KILL_ROUNDS)]
    assert table(killed_dir) == table(whole_dir)
    summaries = [json.loads((d / "out" / "summary.json").read_text()) for d in (whole_dir, killed_dir)]
    for s in summaries:
        # the documented wall-clock fields (cloud/run_output.py) and where the process came from (its own
        # --config path) differ; every result is the same
        assert all(isinstance(s.pop(k), float) for k in WALL_CLOCK_FIELDS)
        assert s.pop("provenance")["command"][:3] == ["fedcmd", "cloud", "serve"]
    assert summaries[0] == summaries[1]
    assert summaries[1]["rounds"] == KILL_ROUNDS and summaries[1]["final_personalized_acc"] > 50


@pytest.mark.timeout(600)
def test_agent_killed_mid_round_round_closes_once_its_will_arrives_and_agent_rejoins(
    tmp_path: Path, shared_partition: Path, mosquitto_broker
) -> None:
    url = mosquitto_broker.url
    deadline = 10.0
    # enough rounds (~0.15 s each) for the restarted agent to come back (it imports torch) before the end
    config = _serve_config(tmp_path, url, rounds=200, round_deadline=deadline)
    agents = [_agent(url, c, shared_partition, tmp_path, "--no-onnx") for c in range(3)]
    serve = _serve(config, tmp_path)
    traffic = Traffic(url, "faults", range(3))
    try:
        _wait(lambda: _status(url).get("next_round", 0) >= 2, 300, "two finished rounds")
        # agent 2 is paused the moment its next answer is out, then killed once its next task is sent: it dies
        # holding a task it never answered (deterministic, whatever the training time)
        paused: list[int] = []
        first = max((r for (c, r) in traffic.updates if c == 2), default=-1) + 1
        for r in range(first, first + 5):  # the first of these answers still to come pauses it

            def pause(r: int = r) -> None:
                if not paused:
                    os.kill(agents[2].pid, signal.SIGSTOP)
                    paused.append(r)

            traffic.on_update[2, r, 1] = pause
        _until(lambda: bool(paused), 120, "agent 2's next answer")
        killed_round = paused[0] + 1  # all three devices are sampled every round
        _until(lambda: traffic.tasks[2, killed_round] > 0, 120, "agent 2's next task")
        os.kill(agents[2].pid, signal.SIGKILL)
        agents[2].wait(10)
        assert traffic.updates[2, killed_round] == 0
        _wait(lambda: _status(url).get("next_round", 0) >= killed_round + 3, 120, "rounds without agent 2")
        agents[2] = _agent(url, 2, shared_partition, tmp_path, "--no-onnx")  # same state dir: it rejoins
        _wait(lambda: _status(url).get("online", 0) >= 3, 120, "agent 2 back online")
        assert serve.wait(300) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        rows = _rows(tmp_path)
        assert len(rows) == 200
        row = rows[killed_round]
        assert "2" in row["sampled"].split() and "2" not in row["answered"].split()
        assert len(row["answered"].split()) >= 2  # quorum held: the round was aggregated
        # its last will said offline: the round closed after the offline grace (5 s), not at the 10 s deadline
        assert 5.0 <= float(row["seconds"]) < deadline
        later = [set(r["answered"].split()) for r in rows[killed_round + 1 :]]
        assert any("2" in a for a in later), "the restarted agent did not rejoin"
        assert (tmp_path / "state-2" / "client-2.state.safetensors").is_file()
    finally:
        traffic.close()
        for p in [serve, *agents]:
            if p.poll() is None:
                p.kill()
