"""``fedcmd bench fleet``: a fleet of real MQTT agents on this machine, measured per round.

For FedCMD and FedAvg, with fp32 and fp16 updates: wall time per round split into training (the
slowest device), aggregation (the cloud) and transfer (the rest: framing, broker, waiting), bytes up
and down per round, MQTT messages through the coordinator's connection, and the peak RSS of the
coordinator and of the largest agent worker process, each row against the FedAvg fp32 row (ratios).

Each row runs in processes of its own: a fresh process for the coordinator and fresh agent workers,
whose peaks are read from ``/proc/<pid>/status`` (``VmHWM``) before they exit. A process's peak RSS is
a lifetime high-water mark, so rows measured in one process (and ``RUSAGE_CHILDREN``, the largest child
ever waited for) all showed the first row's peak.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console

from cloud.term_tables import AdaptiveTable, Column

console = Console()
progress = Console(stderr=True)  # the "measuring ..." lines: --json output stays clean
BASELINE = ("fedavg", "none")  # the row every other row is divided by
WINDOW = 10  # samples per agent in the windowed benchmark partition (8 train, 2 test)
SCALING = (500, 2000, 10000)  # fleet sizes of the scaling table (those up to --agents)
RATIO_KEYS = ("round_s", "train_s", "bytes_down", "bytes_up", "messages", "coordinator_rss_mb", "worker_rss_mb")


def _partition(out: Path, agents: int, seed: int) -> Path:
    """IID clients of mnist5k; past 500 agents (too few images for disjoint clients of 10 samples) each
    agent gets a window of 8 train and 2 test images of one seeded permutation, windows overlapping:
    a benchmark of the fleet's machinery, not of accuracy."""
    import numpy as np

    from fedcmd_core.data import Partition, PartitionArgs, load_dataset, make_partition

    path = out / f"mnist5k-bench-{agents}.npz"
    if path.is_file():
        return path
    data = load_dataset("mnist5k")
    if agents * WINDOW <= len(data):
        least = max(2, len(data) // agents // 2)
        make_partition(data, PartitionArgs(client_num=agents, iid=True, least_samples=least, seed=seed)).save(path)
        return path
    order = np.random.default_rng(seed).permutation(len(data))
    step = len(data) / agents
    windows = [order[(int(c * step) + np.arange(WINDOW)) % len(data)] for c in range(agents)]
    meta = {"dataset": "mnist5k", "dataset_size": len(data), "scheme": f"bench windows of {WINDOW}"}
    Partition([w[:8] for w in windows], [w[8:] for w in windows], meta=meta).save(path)
    return path


def measure(
    algo: str, codec: str, partition: Path, agents: int, per_round: int, rounds: int, workers: int, broker: str
) -> dict[str, Any]:
    from cloud.config import resolve
    from cloud.sim import fleet as fleet_sim
    from cloud.sim.simulate import prepare

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
    began = time.perf_counter()
    marks: dict[str, float] = {}
    rss_rounds: list[float] = []

    def on_start(_: int) -> None:
        marks["online"] = time.perf_counter() - began  # workers spawned, every agent connected and started

    def on_round(_: Any) -> None:
        rss_rounds.append(fleet_sim.rss_mb() or 0.0)

    result = fleet_sim.run_mqtt_simulation(prepare(cfg), on_round=on_round, on_start=on_start, stats_out=stats)
    ready = stats.get("worker_ready") or []
    idle = [(r["ready_rss_mb"] - r["base_rss_mb"]) / max(1, r["agents"]) for r in ready
            if r.get("ready_rss_mb") and r.get("base_rss_mb")]
    worker_peaks = stats.get("worker_peak_rss_mb") or []  # empty without /proc: the column says n/a
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
        # Peaks of this process and of this run's workers: call measure in a fresh process (measure_fresh).
        "coordinator_rss_mb": fleet_sim.peak_rss_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": max(worker_peaks) if worker_peaks else np.nan,
        "agents_per_worker": agents / max(1, stats.get("workers", 1)),
        "online_s": marks.get("online", np.nan),
        "idle_mb_per_agent": max(idle) if idle else np.nan,  # worker RSS growth from connecting, per agent
        "coordinator_rounds_rss_mb": max(rss_rounds) if rss_rounds else np.nan,  # before the final evaluation
        "worker_base_rss_mb": max((r["base_rss_mb"] for r in ready if r.get("base_rss_mb")), default=np.nan),
    }


def measure_fresh(
    algo: str, codec: str, partition: Path, agents: int, per_round: int, rounds: int, workers: int, broker: str
) -> dict[str, Any]:
    """:func:`measure` in a new process, so its coordinator peak RSS is this row's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, algo, codec, partition, agents, per_round, rounds, workers, broker).result()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_fedavg_fp32``: each of :data:`RATIO_KEYS` of a row divided by the FedAvg fp32 row's (None
    without that row, or where its value is 0 or unknown)."""
    base = next((r for r in rows if (r["algo"], r["codec"]) == BASELINE), None)

    def ratio(r: dict[str, Any], k: str) -> float | None:
        if base is None or not base[k] or not np.isfinite(base[k]) or not np.isfinite(r[k]):
            return None
        return float(r[k] / base[k])

    for r in rows:
        r["vs_fedavg_fp32"] = {k: ratio(r, k) for k in RATIO_KEYS}


def _with_ratio(r: dict[str, Any], key: str, text: str) -> str:
    ratio = r["vs_fedavg_fp32"][key]
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def fleet(
    agents: int = typer.Option(100, "--agents", min=2, help="MQTT agents (each its own client and connection)"),
    per_round: int = typer.Option(10, "--per-round", min=1, help="clients sampled per round"),
    rounds: int = typer.Option(3, "--rounds", min=1, help="rounds per row"),
    workers: int = typer.Option(0, "--workers", min=0, help="agent worker processes (0: one per core)"),
    broker: str = typer.Option("auto", "--broker", help="auto (private local broker) or mqtt://host:port"),
    out: Path = typer.Option(Path("runs/bench-fleet"), "--out", help="where the benchmark partition is kept"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    scaling: bool = typer.Option(
        True, "--scaling/--no-scaling", help="also FedCMD fp32 at 500 / 2,000 / 10,000 agents (those below --agents)"
    ),
) -> None:
    """Per-round cost of a real MQTT fleet simulated on this machine: FedCMD vs FedAvg, fp32 vs fp16, and
    how FedCMD scales with the fleet (start-up until every agent is online, round wall time, memory)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    partition = _partition(out, agents, seed=1)
    for algo in ("fedcmd", "fedavg"):
        for codec in ("none", "fp16"):
            progress.print(f"[cyan]measuring {algo} ({codec}) with {agents} agents ...", highlight=False)
            started = time.perf_counter()
            rows.append(measure_fresh(algo, codec, partition, agents, per_round, rounds, workers, broker))
            rows[-1]["total_s"] = time.perf_counter() - started
    add_ratios(rows)
    scale_rows = []
    for size in (n for n in SCALING if n < agents) if scaling else ():
        progress.print(f"[cyan]measuring fedcmd (fp32) with {size} agents (scaling) ...", highlight=False)
        scale_rows.append(measure_fresh("fedcmd", "none", _partition(out, size, seed=1), size, per_round, rounds,
                                        workers, broker))
    if as_json:  # the breakdown rows, then the scaling table's other fleet sizes ("table": "scaling")
        print(json.dumps(rows + [{**r, "table": "scaling"} for r in scale_rows], indent=2, default=float))
        return
    if scaling:
        scale_rows.append(rows[0])  # FedCMD fp32 at --agents
    console.print(render(rows, agents, per_round, rounds))
    if scale_rows:
        console.print(render_scaling(scale_rows, per_round, rounds))


SCALING_COLUMNS = (
    Column("agents"), Column("workers"), Column("online s", "online"), Column("round s", "round"),
    Column("train s", "train"), Column("aggregate s", "agg", "aggregate s"),
    Column("idle MB / agent", "idle MB", "idle MB / agent"), Column("worker base MB", "base MB", "worker base MB"),
    Column("worker peak MB", "peak MB", "worker peak MB"),
    Column("coordinator RSS MB", "coord MB", "coordinator RSS MB"),
)


def render_scaling(rows: list[dict[str, Any]], per_round: int, rounds: int) -> AdaptiveTable:
    """FedCMD fp32 at each fleet size: start-up, round wall, memory per idle agent, coordinator RSS."""
    cells = [
        [
            f"{r['agents']}", f"{r['agents'] / r['agents_per_worker']:.0f}", f"{r['online_s']:.1f}",
            f"{r['round_s']:.2f}", f"{r['train_s']:.2f}", f"{r['aggregate_s']:.3f}", f"{r['idle_mb_per_agent']:.3f}",
            f"{r['worker_base_rss_mb']:.0f}", f"{r['worker_rss_mb']:.0f}",
            f"{r['coordinator_rounds_rss_mb']:.0f} / {r['coordinator_rss_mb']:.0f}",
        ]
        for r in rows
    ]
    return AdaptiveTable(
        SCALING_COLUMNS, cells,
        title=f"FedCMD fp32, {per_round} agents per round: scaling with the fleet (rounds 2..{rounds})",
        caption="online s: from start until every agent is connected and started; idle MB / agent: a worker's "
        "RSS growth from connecting its agents, per agent; coordinator RSS: peak during the rounds / "
        "whole run (with the final evaluation of every agent)",
    )


# (name, short name, legend): the table fits the terminal (short names and a legend, or one block per row)
FLEET_COLUMNS = (
    Column("algo", left=True), Column("updates", "upd"), Column("round s", "round"), Column("train s", "train"),
    Column("aggregate s", "agg", "aggregate s"), Column("transfer s", "xfer", "transfer s"),
    Column("KiB down", "down"), Column("KiB up", "up"), Column("messages", "msgs"),
    Column("coordinator RSS MB", "coord MB", "coordinator RSS MB"), Column("worker RSS MB", "worker MB"),
    Column("agents / worker", "per worker", "agents / worker"),
)


def render(rows: list[dict[str, Any]], agents: int, per_round: int, rounds: int) -> AdaptiveTable:
    """The table ``fedcmd bench fleet`` prints (rows with :func:`add_ratios` applied)."""
    cells = [
        [
            r["algo"],
            "fp32" if r["codec"] == "none" else r["codec"],
            _with_ratio(r, "round_s", f"{r['round_s']:.2f}"),
            _with_ratio(r, "train_s", f"{r['train_s']:.2f}"),
            f"{r['aggregate_s']:.3f}",
            f"{r['transfer_s']:.2f}",
            _with_ratio(r, "bytes_down", f"{r['bytes_down'] / 1024:.0f}"),
            _with_ratio(r, "bytes_up", f"{r['bytes_up'] / 1024:.0f}"),
            f"{r['messages']:.0f}",
            _with_ratio(r, "coordinator_rss_mb", f"{r['coordinator_rss_mb']:.1f}"),
            _with_ratio(r, "worker_rss_mb", f"{r['worker_rss_mb']:.1f}"),
            f"{r['agents_per_worker']:.0f}",
        ]
        for r in rows
    ]
    return AdaptiveTable(
        FLEET_COLUMNS, cells,
        title=f"fleet of {agents} MQTT agents, {per_round} per round (means over rounds 2..{rounds})",
        caption="(N.NNx): this row / the FedAvg fp32 row; RSS: peak of this row's own processes",
    )
