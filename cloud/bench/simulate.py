"""``fedcmd bench simulate``: ours at ``--jobs 1`` and ``--jobs N`` against the bare loop, whole process.

Every row is a fresh process (``python -m cloud simulate ...`` or ``experiments/bare_fedavg_loop.py``), so
start-up, imports and data loading count, as a user waits for them. The rows run alternately, ``repeats``
times, so that a machine whose load changes shifts all rows alike; ratios are the medians of the
per-repeat ratios. Memory is sampled every 50 ms over the whole process tree: the peak of the summed PSS
(proportional set size: pages shared by forked workers and the libraries' code are counted once, split
among the processes that share them) and the sum of each process's own peak RSS (``VmHWM``, which counts
shared pages in every process: an upper bound). The bare loop samples the same clients and seeds the same
per-client streams as ours, so its accuracy is comparable. A one-round run of ours measures start-up.

Targets (issue 13): ``--jobs 2`` >= 1.7x faster than ``--jobs 1`` (FedAvg, 60 rounds), ours at most
0.55x the bare loop's wall, a one-round run under 1.5 s, the summed peak memory at ``--jobs N`` at most
1.5x one process's.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

SPEEDUP_TARGET = 1.7
BARE_RATIO_TARGET = 0.55
ONE_ROUND_TARGET_S = 1.5
MEMORY_RATIO_TARGET = 1.5
BARE_LOOP = Path(__file__).resolve().parents[2] / "experiments" / "bare_fedavg_loop.py"


@dataclass
class Sample:
    wall_s: float
    pss_peak_mb: float  # peak over time of the PSS summed over the tree
    hwm_sum_mb: float  # sum over processes of each one's peak RSS
    processes: int
    accuracy: float | None


@dataclass
class Row:
    name: str
    argv: list[str]
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure(argv: list[str], cwd: Path, every: float = 0.05) -> tuple[float, float, float, int, str]:
    """Run ``argv`` to its end: (wall s, peak summed PSS MB, summed per-process peak RSS MB, processes, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pss_peak = 0
    hwm: dict[int, int] = {}
    while proc.poll() is None:
        total = 0
        for pid in _tree(proc.pid):
            total += _kb(f"/proc/{pid}/smaps_rollup", "Pss:") or 0
            h = _kb(f"/proc/{pid}/status", "VmHWM:")
            if h is not None:
                hwm[pid] = max(hwm.get(pid, 0), h)
        pss_peak = max(pss_peak, total)
        time.sleep(every)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {' | '.join(tail)}")
    return wall, pss_peak / 1024, sum(hwm.values()) / 1024, len(hwm), out


def _ours(partition: Path, out: Path, rounds: int, jobs: int, join_ratio: float, seed: int) -> list[str]:
    return [sys.executable, "-m", "cloud", "simulate", "--algo", "fedavg", "-d", "mnist5k", "--partition",
            str(partition), "-jr", str(join_ratio), "-ge", str(rounds), "-tg", "0", "--seed", str(seed),
            "--jobs", str(jobs), "-q", "--force", "--out", str(out)]


def run_simulate_bench(rounds: int = 60, repeats: int = 3, jobs: int = 0, clients: int = 50, alpha: float = 0.5,
                       join_ratio: float = 0.2, seed: int = 42, progress: Any = None) -> dict[str, Any]:
    from cloud.sim.pool import free_cores
    from fedcmd_core.data import PartitionArgs, load_dataset, make_partition

    jobs = jobs or max(2, free_cores())
    with tempfile.TemporaryDirectory(prefix="fedcmd-bench-sim-") as tmp:
        work = Path(tmp)
        partition = work / "partition.npz"
        make_partition(load_dataset("mnist5k"), PartitionArgs(client_num=clients, alpha=alpha, seed=seed)).save(
            partition)
        rows = [
            Row("ours --jobs 1", _ours(partition, work / "j1", rounds, 1, join_ratio, seed)),
            Row(f"ours --jobs {jobs}", _ours(partition, work / "jn", rounds, jobs, join_ratio, seed)),
            Row("bare loop (1 process)", [sys.executable, str(BARE_LOOP), str(partition), str(rounds),
                                          str(join_ratio), str(seed)]),
            Row("ours, 1 round, --jobs 1", _ours(partition, work / "r1", 1, 1, join_ratio, seed)),
        ]
        task = progress.add_task("simulate bench", total=repeats * len(rows)) if progress is not None else None
        for _ in range(repeats):
            for row in rows:
                wall, pss, hwm, nproc, stdout = measure(row.argv, cwd=BARE_LOOP.parents[1])
                row.samples.append(Sample(wall, pss, hwm, nproc, _accuracy(row, stdout)))
                if task is not None:
                    progress.update(task, advance=1)
    one, many, bare, start = rows
    speedups = [a.wall_s / b.wall_s for a, b in zip(one.samples, many.samples)]
    vs_bare_n = [b.wall_s / c.wall_s for b, c in zip(many.samples, bare.samples)]
    vs_bare_1 = [a.wall_s / c.wall_s for a, c in zip(one.samples, bare.samples)]
    memory = many.median("pss_peak_mb") / one.median("pss_peak_mb")
    report: dict[str, Any] = {
        "setting": {"algo": "fedavg", "dataset": "mnist5k", "clients": clients, "alpha": alpha, "rounds": rounds,
                    "join_ratio": join_ratio, "seed": seed, "jobs": jobs, "repeats": repeats},
        "load_average": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)),
        "rows": [{"name": r.name, "wall_s": [s.wall_s for s in r.samples], "median_wall_s": r.median("wall_s"),
                  "pss_peak_mb": r.median("pss_peak_mb"), "hwm_sum_mb": r.median("hwm_sum_mb"),
                  "processes": max(s.processes for s in r.samples), "accuracy": r.samples[0].accuracy}
                 for r in rows],
        "speedup_jobs": statistics.median(speedups),
        "ours_jobs_n_over_bare": statistics.median(vs_bare_n),
        "ours_jobs_1_over_bare": statistics.median(vs_bare_1),
        "one_round_s": start.median("wall_s"),
        "memory_ratio": memory,
    }
    report["targets"] = {
        f"jobs {jobs} >= {SPEEDUP_TARGET}x jobs 1": report["speedup_jobs"] >= SPEEDUP_TARGET,
        f"ours <= {BARE_RATIO_TARGET}x bare loop": report["ours_jobs_n_over_bare"] <= BARE_RATIO_TARGET,
        f"1-round run < {ONE_ROUND_TARGET_S} s": report["one_round_s"] < ONE_ROUND_TARGET_S,
        f"summed peak PSS <= {MEMORY_RATIO_TARGET}x one process": memory <= MEMORY_RATIO_TARGET,
    }
    return report


def _accuracy(row: Row, stdout: str) -> float | None:
    """The paper metric (last-10-round mean of test accuracy before training) from the run's output."""
    if "--out" in row.argv:
        summary = Path(row.argv[row.argv.index("--out") + 1]) / "summary.json"
        try:
            return float(json.loads(summary.read_text())["paper_metric"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    m = re.search(r"last-10 mean ([0-9.]+)%", stdout)
    return float(m.group(1)) if m else None


def render(rep: dict[str, Any], console: Console) -> None:
    s = rep["setting"]
    table = Table(title=f"FedAvg on mnist5k ({s['clients']} clients, alpha {s['alpha']:g}, {s['rounds']} rounds, "
                        f"{s['join_ratio']:g} per round), whole process, {s['repeats']} alternating runs")
    table.add_column("run", no_wrap=True)
    for col in ("wall s", "each run s", "PSS MB", "RSS MB", "procs", "acc %"):
        table.add_column(col, justify="right")
    for r in rep["rows"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        table.add_row(r["name"], f"{r['median_wall_s']:.2f}", " ".join(f"{w:.1f}" for w in r["wall_s"]),
                      f"{r['pss_peak_mb']:.0f}", f"{r['hwm_sum_mb']:.0f}", str(r["processes"]), acc)
    console.print(table)
    console.print("wall: median; PSS: peak of the sum over the process tree; RSS: sum of each process's peak; "
                  "acc: last-10-round mean test accuracy before training")
    load = " ".join(f"{x:.2f}" for x in rep["load_average"])
    console.print(f"jobs {s['jobs']} speed-up over jobs 1: {rep['speedup_jobs']:.2f}x; ours (jobs {s['jobs']}) / "
                  f"bare loop: {rep['ours_jobs_n_over_bare']:.2f}; ours (jobs 1) / bare loop: "
                  f"{rep['ours_jobs_1_over_bare']:.2f}; 1-round run {rep['one_round_s']:.2f} s; summed peak PSS "
                  f"jobs {s['jobs']} / jobs 1: {rep['memory_ratio']:.2f}")
    console.print(f"load average at the end: {load} on {rep['cores']} cores (a busy machine slows every row, "
                  "and the parallel row most)")
    for name, ok in rep["targets"].items():
        console.print(f"  {'met   ' if ok else 'MISSED'} {name}")


def simulate(
    rounds: int = typer.Option(60, "--rounds", min=1, help="Rounds of the timed runs."),
    repeats: int = typer.Option(3, "--repeats", "-r", min=1, help="Alternating runs of every row."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="The parallel row's --jobs (0: the free cores, >= 2)."),
    clients: int = typer.Option(50, "--clients", min=2, help="Clients of the mnist5k partition."),
    alpha: float = typer.Option(0.5, "--alpha", min=1e-6, help="Dirichlet alpha of the partition."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Whole-process wall and memory of fedcmd simulate at --jobs 1 and --jobs N against the bare loop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        try:
            rep = run_simulate_bench(rounds, repeats, jobs, clients, alpha, progress=progress)
        except RuntimeError as e:
            err.print(f"error: {e}", highlight=False)
            raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep, Console(highlight=False))
