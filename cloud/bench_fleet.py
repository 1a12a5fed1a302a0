"""``fedcmd bench fleet``: a fleet of real MQTT agents on this machine, measured per round.

For FedCMD and FedAvg, with fp32 and fp16 updates: wall time per round split into training (the
slowest device), aggregation (the cloud) and transfer (the rest: framing, broker, waiting), bytes up
and down per round, MQTT messages through the coordinator's connection, and peak RSS of the
coordinator and of an agent worker process.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cloud.cli_bench import bench_app

console = Console()


def _partition(out: Path, agents: int, seed: int) -> Path:
    from fedcmd_core.data import PartitionArgs, load_dataset, make_partition

    path = out / f"mnist5k-iid-{agents}.npz"
    if not path.is_file():
        data = load_dataset("mnist5k")
        least = max(2, len(data) // agents // 2)
        make_partition(data, PartitionArgs(client_num=agents, iid=True, least_samples=least, seed=seed)).save(path)
    return path


def measure(
    algo: str, codec: str, partition: Path, agents: int, per_round: int, rounds: int, workers: int, broker: str
) -> dict[str, Any]:
    from cloud import fleet_sim
    from cloud.config import resolve
    from cloud.simulate import prepare

    hp = {"selection_rounds": 1} if algo == "fedcmd" else {}
    cfg = resolve(
        {},
        {
            "algo": algo,
            "dataset": "mnist5k",
            "partition": partition,
            "join_ratio": per_round / agents,
            "global_epoch": rounds,
            "local_epoch": 1,
            "seed": 1,
            "test_gap": 0,
            "hp": hp,
            "transport": "mqtt",
            "broker": broker,
            "workers": workers,
            "update_codec": codec,
            "threads": 1,
        },
    )
    stats: dict[str, Any] = {}
    result = fleet_sim.run_mqtt_simulation(prepare(cfg), stats_out=stats)
    recs = result.records[1:] if len(result.records) > 1 else result.records  # round 1 includes warm-up
    wall = np.mean([r.seconds for r in recs])
    train = np.mean([r.facts.get("fit_seconds_max", 0.0) for r in recs])
    agg = np.mean([r.facts.get("aggregate_seconds", 0.0) for r in recs])
    return {
        "algo": algo,
        "codec": codec,
        "agents": agents,
        "per_round": per_round,
        "rounds": rounds,
        "round_s": wall,
        "train_s": train,
        "aggregate_s": agg,
        "transfer_s": max(0.0, wall - train - agg),
        "bytes_down": np.mean([r.bytes_down for r in recs]),
        "bytes_up": np.mean([r.bytes_up for r in recs]),
        "messages": stats.get("messages_per_round", 0.0),
        "chunks": stats.get("chunks_per_round", 0.0),
        "coordinator_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "agents_per_worker": agents / max(1, stats.get("workers", 1)),
    }


@bench_app.command("fleet")
def fleet(
    agents: int = typer.Option(100, "--agents", min=2, help="MQTT agents (each its own client and connection)"),
    per_round: int = typer.Option(10, "--per-round", min=1, help="clients sampled per round"),
    rounds: int = typer.Option(3, "--rounds", min=1),
    workers: int = typer.Option(0, "--workers", min=0, help="agent worker processes (0: one per core)"),
    broker: str = typer.Option("auto", "--broker", help="auto (private local broker) or mqtt://host:port"),
    out: Path = typer.Option(Path("runs/bench-fleet"), "--out", help="where the benchmark partition is kept"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Per-round cost of a real MQTT fleet simulated on this machine: FedCMD vs FedAvg, fp32 vs fp16."""
    out.mkdir(parents=True, exist_ok=True)
    partition = _partition(out, agents, seed=1)
    rows = []
    for algo in ("fedcmd", "fedavg"):
        for codec in ("none", "fp16"):
            console.print(f"[cyan]measuring {algo} ({codec}) with {agents} agents ...", highlight=False)
            started = time.perf_counter()
            rows.append(measure(algo, codec, partition, agents, per_round, rounds, workers, broker))
            rows[-1]["total_s"] = time.perf_counter() - started
    if as_json:
        print(json.dumps(rows, indent=2, default=float))
        return
    table = Table(title=f"fleet of {agents} MQTT agents, {per_round} per round (means over rounds 2..{rounds})")
    cols = (
        "algo",
        "updates",
        "round s",
        "train s",
        "aggregate s",
        "transfer s",
        "KiB down",
        "KiB up",
        "messages",
        "coordinator RSS MB",
        "worker RSS MB (agents)",
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            r["algo"],
            "fp32" if r["codec"] == "none" else r["codec"],
            f"{r['round_s']:.2f}",
            f"{r['train_s']:.2f}",
            f"{r['aggregate_s']:.3f}",
            f"{r['transfer_s']:.2f}",
            f"{r['bytes_down'] / 1024:.0f}",
            f"{r['bytes_up'] / 1024:.0f}",
            f"{r['messages']:.0f}",
            f"{r['coordinator_rss_mb']:.0f}",
            f"{r['worker_rss_mb']:.0f} ({r['agents_per_worker']:.0f})",
        )
    console.print(table)
