"""``fedcmd bench kernels``: native kernels against the NumPy fallback and the named baselines.

Every number of one report is measured in the same process: the native kernel
(``fedcmd_core._native``), the NumPy fallback (``fedcmd_core.kernels.fallback``) and the baseline the
issue names (POT, SciPy, NumPy, torch), each the best of ``--repeat`` runs (best-of, because this
machine is shared and the minimum is the least disturbed run). The contenders of one row are timed
round-robin (``compare_ms``), so a burst of load from other processes hits them alike; only the
per-pair POT/SciPy loops, seconds each, are timed on their own. Both backends are called at the
backend-contract level on the same validated arrays, so validation is not part of either time.
Throughput is the minimal traffic (inputs read once, outputs written once) per second, next to the
copy bandwidth of this machine measured with ``np.copyto`` in the same run.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedcmd_core import kernels
from fedcmd_core.kernels import fallback


@dataclass
class Row:
    """One line of the table: a kernel on one case, against one baseline (times in milliseconds)."""

    kernel: str
    case: str
    native_ms: float | None
    fallback_ms: float | None
    baseline: str
    baseline_ms: float | None
    bytes: float = 0.0  # minimal traffic of one call: inputs read once, outputs written once
    note: str = ""
    fmas: float = 0.0  # multiply-adds of one call (0: not a multiply-add kernel; its roofline is the bandwidth)

    @property
    def vs_fallback(self) -> float | None:
        return _ratio(self.fallback_ms, self.native_ms)

    @property
    def vs_baseline(self) -> float | None:
        return _ratio(self.baseline_ms, self.native_ms)

    def gbps(self) -> float | None:
        return self.bytes / (self.native_ms * 1e6) if self.native_ms and self.bytes else None

    def roofline_ms(self, fma_gflops: float | None, read_gbps: float) -> float | None:
        """The fastest this call can be on this machine: its multiply-adds at the measured FMA peak or its
        bytes at the measured read bandwidth, whichever takes longer (the roofline at its intensity)."""
        if not read_gbps or not self.bytes:
            return None
        memory_ms = self.bytes / (read_gbps * 1e6)
        if not self.fmas or not fma_gflops:
            return memory_ms
        return max(memory_ms, self.fmas / (fma_gflops * 1e6))

    def roofline_share(self, fma_gflops: float | None, read_gbps: float) -> float | None:
        floor = self.roofline_ms(fma_gflops, read_gbps)
        return floor / self.native_ms if floor and self.native_ms else None

    def as_json(self, copy_gbps: float, fma_gflops: float | None = None, read_gbps: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        d.update(vs_fallback=self.vs_fallback, vs_baseline=self.vs_baseline, native_gbps=self.gbps())
        g = self.gbps()
        d["native_pct_of_copy_bw"] = 100 * g / copy_gbps if g and copy_gbps else None
        d["roofline_ms"] = self.roofline_ms(fma_gflops, read_gbps)
        share = self.roofline_share(fma_gflops, read_gbps)
        d["pct_of_roofline"] = None if share is None else 100 * share
        return d


@dataclass
class Target:
    name: str
    value: float | None
    goal: str
    met: bool | None
    note: str = ""


@dataclass
class Report:
    backend: str
    quick: bool
    repeat: int
    threads: int
    load_average: list[float]
    cpu: str
    copy_gbps: float = 0.0
    fma_gflops: float | None = None  # measured float32 multiply-add ceiling of the kernel threads (native only)
    read_gbps: float = 0.0  # measured read bandwidth of the kernel threads (native read_sum; NumPy sum without it)
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    vote: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "quick": self.quick,
            "repeat": self.repeat,
            "threads": self.threads,
            "load_average": self.load_average,
            "cpu": self.cpu,
            "copy_gbps": self.copy_gbps,
            "fma_gflops": self.fma_gflops,
            "read_gbps": self.read_gbps,
            "rows": [r.as_json(self.copy_gbps, self.fma_gflops, self.read_gbps) for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "vote": self.vote,
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def best_ms(fn: Callable[[], Any], repeat: int, min_seconds: float = 0.01) -> float:
    """Best-of-``repeat`` milliseconds per call; calls shorter than ``min_seconds`` are looped so the
    clock resolution and call overhead do not dominate. One untimed warm-up call first."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    inner = max(1, int(min_seconds / max(first, 1e-9)))
    best = math.inf
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best * 1e3


def compare_ms(
    fns: dict[str, Callable[[], Any] | None], repeat: int, min_seconds: float = 0.01, settle: float = 0.0
) -> dict[str, float | None]:
    """Best-of-``repeat`` milliseconds per call for several functions measured round-robin: each round
    times every function once, so a burst of load from other processes hits all contenders alike and
    their ratios stay meaningful on a shared machine. ``None`` entries (no native module) give None.
    ``settle``: seconds of sleep before each timing, so the thread pool of the previous contender has gone
    idle (OpenBLAS workers spin for a while after a matmul and took 20-45 % of the cores from the next
    native call, measured)."""
    live = {k: f for k, f in fns.items() if f is not None}
    inner: dict[str, int] = {}
    for k, f in live.items():  # warm-up, and loop counts for calls shorter than min_seconds
        start = time.perf_counter()
        f()
        inner[k] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    best = dict.fromkeys(live, math.inf)
    for _ in range(max(1, repeat)):
        for k, f in live.items():
            if settle:
                time.sleep(settle)
            start = time.perf_counter()
            for _ in range(inner[k]):
                f()
            best[k] = min(best[k], (time.perf_counter() - start) / inner[k])
    return {k: (best[k] * 1e3 if k in best else None) for k in fns}


class _Steps:
    """Progress bar over the measurement steps (stderr, so --json output stays clean)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("benchmark", total=total) if progress else None

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=what)
        yield
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:  # seconds in total: for tests and a smoke check
        return dict(
            copy=1 << 21,
            pw=(24, 64),
            pot_pairs=40,
            w1d=(40, 32, 20),
            sliced=(200, 150, 8, 20),
            agg=(4, 10, 50_000),
            cos=(8, 2048),
            rowwise=(8, 12, 40),
            vote_batches=6,
            fma=1 << 20,
        )
    return dict(
        copy=1 << 26,
        pw=(256, 1024),
        pot_pairs=600,
        w1d=(2000, 256, 200),
        sliced=(4000, 3000, 64, 200),
        agg=(10, 100, 1 << 20),
        cos=(64, 1 << 18),
        rowwise=(100, 120, 400),
        vote_batches=64,
        fma=1 << 28,
    )


def run_kernel_bench(quick: bool = False, repeat: int = 5, progress: Progress | None = None) -> Report:
    """Measure everything; ``fedcmd bench kernels`` renders the result."""
    native = kernels._native
    size = _sizes(quick)
    slow_repeat = max(1, min(repeat, 3))  # the per-pair POT/SciPy loops take seconds each
    rep = Report(
        backend=kernels.backend(),
        quick=quick,
        repeat=repeat,
        threads=int(native.max_threads()) if native is not None else 1,
        load_average=[round(x, 2) for x in os.getloadavg()],
        cpu=f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {native.build_info['isa']}" if native is not None else ""),
    )
    steps = _Steps(progress, total=9)
    rng = np.random.default_rng(0)

    def nat(name: str, *args: Any) -> Callable[[], Any] | None:
        """The native kernel bound to its arguments, or None without the native module."""
        if native is None:
            return None
        fn = getattr(native, name)
        return lambda: fn(*args)

    with steps.step("copy and read bandwidth, multiply-add peak"):
        rep.copy_gbps = copy_bandwidth(size["copy"], repeat)
        rep.read_gbps = read_bandwidth(size["copy"], repeat, native)
        if native is not None:  # best of a few ~0.1 s probes (the least disturbed by other processes)
            rep.fma_gflops = max(native.fma_peak_gflops(size["fma"]) for _ in range(min(repeat, 3)))

    _bench_pairwise(rep, size, repeat, slow_repeat, rng, nat, steps)
    _bench_w1d_sliced(rep, size, repeat, rng, nat, steps)
    _bench_aggregate(rep, size, repeat, rng, nat, steps)
    _bench_similarity(rep, size, repeat, rng, nat, steps)
    with steps.step("FedCMD vote vs local training (LeNet-5, batch 32)"):
        rep.vote = vote_overhead(size["vote_batches"], repeat)
    rep.targets.append(
        Target("vote cost / local training time", rep.vote["overhead_pct"], "<= 5 %", rep.vote["overhead_pct"] <= 5)
    )
    return rep


def read_bandwidth(elements: int, repeat: int, native: Any = None) -> float:
    """GB/s of reading a float32 array once (the roofline's memory side), on the kernels' threads when the
    native module has the probe (older builds: NumPy's single-threaded sum)."""
    x = np.ones(elements, np.float32)
    probe = getattr(native, "read_sum", None)
    ms = best_ms((lambda: probe(x)) if probe is not None else (lambda: np.add.reduce(x)), repeat)
    return x.nbytes / (ms * 1e6)


def copy_bandwidth(elements: int, repeat: int) -> float:
    """GB/s of np.copyto between two float32 arrays, counting the read and the write."""
    src = np.ones(elements, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / (best_ms(lambda: np.copyto(dst, src), repeat) * 1e6)


def _bench_pairwise(
    rep: Report,
    size: dict[str, Any],
    repeat: int,
    slow_repeat: int,
    rng: np.random.Generator,
    nat: Callable[..., Callable[[], Any] | None],
    steps: _Steps,
) -> None:
    import ot
    import scipy.stats

    N, n = size["pw"]
    S = rng.normal(size=(N, n)) * rng.uniform(0.5, 2.0, size=(N, 1))
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    sample = [pairs[k] for k in rng.choice(len(pairs), size=min(len(pairs), size["pot_pairs"]), replace=False)]
    scale = len(pairs) / len(sample)  # per-pair baselines: time a sample of pairs, scale to all pairs
    case = f"N={N}, n={n}"
    with steps.step(f"wasserstein_pairwise {case}"):
        t = compare_ms(
            {
                "native": nat("wasserstein_pairwise", S, 1.0),
                "fallback": lambda: fallback.wasserstein_pairwise(S, 1.0),
                "sort_once": lambda: numpy_sort_once_pairwise(S),
            },
            repeat,
        )
        native_ms, fallback_ms, sort_once_ms = t["native"], t["fallback"], t["sort_once"]
        traffic = S.nbytes + N * N * 8
        # seconds per run: timed on their own (a ratio of several hundred is not load-sensitive)
        pot_ms = scale * best_ms(lambda: [ot.wasserstein_1d(S[i], S[j], p=1) for i, j in sample], slow_repeat)
        sp_ms = scale * best_ms(lambda: [scipy.stats.wasserstein_distance(S[i], S[j]) for i, j in sample], slow_repeat)
    note = f"per-pair time of {len(sample)} pairs x {len(pairs)} pairs"
    rep.rows += [
        Row(
            "wasserstein_pairwise",
            case,
            native_ms,
            fallback_ms,
            "POT ot.wasserstein_1d per pair",
            pot_ms,
            traffic,
            note,
        ),
        Row(
            "wasserstein_pairwise",
            case,
            native_ms,
            fallback_ms,
            "scipy wasserstein_distance per pair",
            sp_ms,
            traffic,
            note,
        ),
        Row(
            "wasserstein_pairwise",
            case,
            native_ms,
            fallback_ms,
            "NumPy sort-once + vectorised diff",
            sort_once_ms,
            traffic,
        ),
    ]
    x_pot = _ratio(pot_ms, native_ms)
    x_np = _ratio(sort_once_ms, native_ms)
    rep.targets += [
        Target("pairwise W1: POT per pair / native", x_pot, ">= 200x", None if x_pot is None else x_pot >= 200),
        Target("pairwise W1: NumPy sort-once / native", x_np, "> 1x", None if x_np is None else x_np > 1),
    ]


def numpy_sort_once_pairwise(S: np.ndarray, block: int = 8) -> np.ndarray:
    """The plain NumPy baseline: sort every row once, then mean |s_i - s_j| over row blocks."""
    s = np.sort(S, axis=1)
    out = np.empty((S.shape[0], S.shape[0]))
    for i0 in range(0, S.shape[0], block):
        out[i0 : i0 + block] = np.abs(s[i0 : i0 + block, None, :] - s[None, :, :]).mean(axis=-1)
    return out


def _bench_w1d_sliced(
    rep: Report,
    size: dict[str, Any],
    repeat: int,
    rng: np.random.Generator,
    nat: Callable[..., Callable[[], Any] | None],
    steps: _Steps,
) -> None:
    import ot

    B, n, m = size["w1d"]
    u, v = rng.normal(size=(B, n)), rng.normal(size=(B, m)) + 0.3
    uw, vw = rng.random((B, n)), rng.random((B, m))
    case = f"B={B}, n={n}, m={m}, weighted"
    with steps.step(f"wasserstein_1d {case}"):
        # POT is batched along its second axis and wants normalised weights
        ut, vt = np.ascontiguousarray(u.T), np.ascontiguousarray(v.T)
        uwt, vwt = (
            np.ascontiguousarray((uw / uw.sum(1, keepdims=True)).T),
            np.ascontiguousarray((vw / vw.sum(1, keepdims=True)).T),
        )
        t = compare_ms(
            {
                "native": nat("wasserstein_1d", u, v, 1.0, uw, vw),
                "fallback": lambda: fallback.wasserstein_1d(u, v, 1.0, uw, vw),
                "pot": lambda: ot.wasserstein_1d(ut, vt, uwt, vwt, p=1),
            },
            repeat,
        )
        native_ms, fallback_ms, pot_ms = t["native"], t["fallback"], t["pot"]
    rep.rows.append(
        Row(
            "wasserstein_1d",
            case,
            native_ms,
            fallback_ms,
            "POT ot.wasserstein_1d (batched)",
            pot_ms,
            2 * (u.nbytes + v.nbytes) + B * 8,
        )
    )

    n, m, d, L = size["sliced"]
    X, Y = rng.normal(size=(n, d)), rng.normal(size=(m, d)) * 1.5
    theta = kernels.projections(d, L, 0)
    case = f"n={n}, m={m}, d={d}, L={L}"
    with steps.step(f"sliced_wasserstein {case}"):
        t = compare_ms(
            {
                "native": nat("sliced_wasserstein", X, Y, theta, 2.0, None, None),
                "fallback": lambda: fallback.sliced_wasserstein(X, Y, theta, 2.0),
                "pot": lambda: ot.sliced_wasserstein_distance(X, Y, n_projections=L, p=2, seed=0),
            },
            repeat,
        )
        native_ms, fallback_ms, pot_ms = t["native"], t["fallback"], t["pot"]
    rep.rows.append(
        Row(
            "sliced_wasserstein",
            case,
            native_ms,
            fallback_ms,
            "POT ot.sliced_wasserstein_distance",
            pot_ms,
            X.nbytes + Y.nbytes + theta.nbytes,
        )
    )


# > OpenBLAS's spin-wait after a call (2^28 cycles, ~0.1 s): rounds that mix BLAS or torch with native calls
POOL_SETTLE = 0.15


def _bench_aggregate(
    rep: Report,
    size: dict[str, Any],
    repeat: int,
    rng: np.random.Generator,
    nat: Callable[..., Callable[[], Any] | None],
    steps: _Steps,
) -> None:
    import torch

    K, N, P = size["agg"]
    W = rng.random((K, N))
    W32 = W.astype(np.float32)
    # N separately allocated buffers, as a server holds them (one per client)
    bufs = [rng.standard_normal(P, dtype=np.float32) for _ in range(N)]
    case = f"K={K}, N={N} x {P:,}"
    out_bytes = K * P * 4
    with steps.step(f"weighted_aggregate float32 / float16 {case}"):
        X = np.stack(bufs)  # the pre-stacked baseline's input (stacking it is not part of its time)
        h = [b.astype(np.float16) for b in bufs]
        W1 = W[:1]  # K = 1 (FedAvg): 1 multiply-add per element read, memory-bound, where storage width shows
        t = compare_ms(
            {
                "native32": nat("weighted_aggregate", W, bufs, np.float32),
                "native16": nat("weighted_aggregate", W, h, np.float32),
                "pre": lambda: W32 @ X,
                "stack": lambda: W32 @ np.stack(bufs),
                "fallback32": lambda: fallback.weighted_aggregate(W, bufs, np.float32),
                "fallback16": lambda: fallback.weighted_aggregate(W, h, np.float32),
                "native32_k1": nat("weighted_aggregate", W1, bufs, np.float32),
                "native16_k1": nat("weighted_aggregate", W1, h, np.float32),
                "fallback32_k1": lambda: fallback.weighted_aggregate(W1, bufs, np.float32),
                "fallback16_k1": lambda: fallback.weighted_aggregate(W1, h, np.float32),
            },
            repeat,
            settle=POOL_SETTLE,
        )
    native32, native16, pre_ms, stack_ms = t["native32"], t["native16"], t["pre"], t["stack"]
    fallback32, fallback16 = t["fallback32"], t["fallback16"]
    native32_k1, native16_k1 = t["native32_k1"], t["native16_k1"]
    fallback32_k1, fallback16_k1 = t["fallback32_k1"], t["fallback16_k1"]
    traffic32 = N * P * 4 + out_bytes
    rep.rows += [
        Row(
            "weighted_aggregate", case + " f32", native32, fallback32, "NumPy w @ X (X pre-stacked)", pre_ms, traffic32,
            fmas=K * N * P,
        ),
        Row("weighted_aggregate", case + " f32", native32, fallback32, "NumPy np.stack + matmul", stack_ms, traffic32,
            fmas=K * N * P),
    ]
    with steps.step(f"weighted_aggregate bfloat16 {case}"):
        tb = [torch.from_numpy(b).to(torch.bfloat16) for b in bufs]
        bits = [x.view(torch.float16).numpy() for x in tb]
        t = compare_ms(
            {
                "native": nat("weighted_aggregate", W, bits, np.float32, [True] * N),
                "native32": nat("weighted_aggregate", W, bufs, np.float32),
                # the NumPy path cannot read bfloat16: the face upcasts each tensor to float32 first
                "fallback": lambda: fallback.weighted_aggregate(W, [x.float().numpy() for x in tb], np.float32),
                "torch": lambda: torch.from_numpy(W32).to(torch.bfloat16) @ torch.stack(tb),
            },
            repeat,
            settle=POOL_SETTLE,
        )
    native_bf, fallback_bf, torch_bf = t["native"], t["fallback"], t["torch"]
    native32_bfrun = t["native32"]
    traffic16 = N * P * 2 + out_bytes
    case1 = f"K=1 (FedAvg), N={N} x {P:,}"
    rep.rows += [
        Row(
            "weighted_aggregate",
            case1 + " f16",
            native16_k1,
            fallback16_k1,
            "float32 buffers, same backend",
            native32_k1 if native32_k1 is not None else fallback32_k1,
            N * P * 2 + P * 4,
            fmas=N * P,
        ),
        Row(
            "weighted_aggregate",
            case + " f16",
            native16,
            fallback16,
            "float32 buffers, same backend",
            native32 if native32 is not None else fallback32,
            traffic16,
            fmas=K * N * P,
        ),
        Row(
            "weighted_aggregate",
            case + " bf16",
            native_bf,
            fallback_bf,
            "torch bf16 stack + matmul",
            torch_bf,
            traffic16,
            fmas=K * N * P,
        ),
    ]
    near = _ratio(native32, pre_ms)
    x_stack = _ratio(stack_ms, native32)
    x16 = _ratio(native32, native16)
    xbf = _ratio(native32_bfrun, native_bf)  # against float32 timed in the same rounds
    x16_k1 = _ratio(native32_k1, native16_k1)
    # K * N * P multiply-adds at the measured peak: no storage type can go below this floor. When float32
    # is already within 1.6x of it, float16 cannot be 1.6x faster, however few bytes it reads.
    floor_ms = K * N * P / (rep.fma_gflops * 1e6) if rep.fma_gflops else None
    bound = ""
    if floor_ms is not None and native32 is not None and native16 is not None:
        bound = (
            f"multiply-add floor {floor_ms:.1f} ms at the measured {rep.fma_gflops:.1f} G/s: f32 is at "
            f"{floor_ms / native32:.0%} of peak, f16 at {floor_ms / native16:.0%}; the best f16 can reach "
            f"is {native32 / floor_ms:.2f}x"
        )
    rep.targets += [
        Target("aggregate f32: native / (w @ X pre-stacked)", near, "<= 1.10", None if near is None else near <= 1.10),
        Target(
            "aggregate f32: (np.stack + matmul) / native", x_stack, ">= 5x", None if x_stack is None else x_stack >= 5
        ),
        Target("aggregate: f32 native / f16 native", x16, ">= 1.6x", None if x16 is None else x16 >= 1.6, bound),
        Target("aggregate: f32 native / bf16 native", xbf, ">= 1.6x", None if xbf is None else xbf >= 1.6),
        Target(
            "aggregate K=1 (memory-bound): f32 native / f16 native",
            x16_k1,
            ">= 1.6x",
            None if x16_k1 is None else x16_k1 >= 1.6,
        ),
    ]
    for row in [r for r in rep.rows if r.kernel == "weighted_aggregate" and r.case.startswith("K=") and r.fmas]:
        if row.baseline == "NumPy np.stack + matmul" or row.native_ms is None:
            continue  # the same native time as the row above it
        share = row.roofline_share(rep.fma_gflops, rep.read_gbps)
        rep.targets.append(Target(f"aggregate {row.case}: share of the roofline", None if share is None else
                                  100 * share, ">= 80 %", None if share is None else share >= 0.8,
                                  _roofline_note(row, rep)))


def _bench_similarity(
    rep: Report,
    size: dict[str, Any],
    repeat: int,
    rng: np.random.Generator,
    nat: Callable[..., Callable[[], Any] | None],
    steps: _Steps,
) -> None:
    import torch
    import torch.nn.functional as F

    N, d = size["cos"]
    A = rng.standard_normal((N, d), dtype=np.float32)
    case = f"N={N}, d={d:,} f32"
    ta = torch.from_numpy(A)

    def torch_matrix() -> list[torch.Tensor]:  # row by row: the [N, N, d] broadcast would not fit
        return [F.cosine_similarity(ta[i : i + 1], ta, dim=-1) for i in range(N)]

    with steps.step(f"cosine_similarity_matrix {case}"):
        t = compare_ms(
            {
                "native": nat("cosine_similarity_matrix", A, kernels.COSINE_EPS),
                "fallback": lambda: fallback.cosine_similarity_matrix(A, kernels.COSINE_EPS),
                "torch": torch_matrix,
            },
            repeat,
            settle=POOL_SETTLE,
        )
        native_ms, fallback_ms, torch_ms = t["native"], t["fallback"], t["torch"]
    rep.rows.append(
        Row(
            "cosine_similarity_matrix",
            case,
            native_ms,
            fallback_ms,
            "torch F.cosine_similarity",
            torch_ms,
            A.nbytes + N * N * 8,
        )
    )

    N, r, c = size["rowwise"]
    mats = [rng.standard_normal((r, c), dtype=np.float32) for _ in range(N)]
    tm = torch.from_numpy(np.stack(mats))
    case = f"N={N} x [{r}, {c}] f32"

    def torch_rowwise() -> list[torch.Tensor]:  # FedCMD / pFedSim: cos over rows, then the mean
        return [F.cosine_similarity(tm[i : i + 1], tm, dim=-1).mean(-1) for i in range(N)]

    with steps.step(f"rowwise_mean_cosine_matrix {case}"):
        t = compare_ms(
            {
                "native": nat("rowwise_mean_cosine_matrix", mats, kernels.COSINE_EPS),
                "fallback": lambda: fallback.rowwise_mean_cosine_matrix(mats, kernels.COSINE_EPS),
                "torch": torch_rowwise,
            },
            repeat,
            settle=POOL_SETTLE,
        )
        native_ms, fallback_ms, torch_ms = t["native"], t["fallback"], t["torch"]
    rep.rows.append(
        Row(
            "rowwise_mean_cosine_matrix",
            case,
            native_ms,
            fallback_ms,
            "torch F.cosine_similarity + mean",
            torch_ms,
            N * r * c * 4 + N * N * 8,
        )
    )


def vote_overhead(batches: int, repeat: int) -> dict[str, float]:
    """FedCMD's per-batch layer vote against local training: LeNet-5 on random 28x28 data, batch 32.

    The hook is the one ``FedCMDClient.batch_hook`` installs (embed, ``layer_distances`` with the W1
    metric through ``kernels.wasserstein_1d``, argmin), on every ``vote_every``-th batch as FedCMD runs it
    by default; ``overhead_pct`` is the extra wall time of training with it, ``hook_pct`` the time spent
    inside it, both relative to training without it; ``vote_ms`` is the cost of one vote.
    torch runs on one thread here, as on an edge device whose agent pins it: on a shared 2-core
    machine torch's thread pool made tiny tensor ops 50x slower in both runs and drowned the signal."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _vote_overhead(batches, repeat)
    finally:
        torch.set_num_threads(threads)


def _vote_overhead(batches: int, repeat: int) -> dict[str, float]:
    import torch

    from fedcmd_core.models import build_model
    from fedcmd_core.selection import layer_distances
    from fedcmd_core.strategies.fedcmd import SelectionParams
    from fedcmd_core.training import train_epochs

    every = SelectionParams().vote_every

    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    names = [name for name, _ in model.named_children()]
    index = [names.index(c) for c in ("fc1", "fc2", "classifier")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32 * batches, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32 * batches,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inside = [0.0]
    calls = [0]
    votes = np.zeros(len(index), dtype=np.int64)

    def hook(xb: torch.Tensor, yb: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        start = time.perf_counter()
        onehot = torch.nn.functional.one_hot(yb, 10).to(xb.dtype)
        d = layer_distances(xb, onehot, outputs, index, "w1", "minmax_mean")
        votes[int(np.argmin(d))] += 1
        inside[0] += time.perf_counter() - start
        calls[0] += 1

    def run(with_hook: bool) -> float:
        inside[0], calls[0] = 0.0, 0
        start = time.perf_counter()
        train_epochs(
            model, x, y, opt, 1, 32, torch.Generator().manual_seed(1), hook if with_hook else None, hook_every=every
        )
        return time.perf_counter() - start

    run(False)  # warm-up
    plain, hooked, hook_s, hook_calls = math.inf, math.inf, math.inf, 1
    for _ in range(max(1, repeat)):  # interleaved, so a burst of load hits both
        plain = min(plain, run(False))
        t = run(True)
        if t < hooked:
            hooked, hook_s, hook_calls = t, inside[0], max(1, calls[0])
    return {
        "batches": float(batches),
        "vote_every": float(every),
        "train_ms": plain * 1e3,
        "train_with_vote_ms": hooked * 1e3,
        "vote_ms": hook_s * 1e3 / hook_calls,
        "overhead_pct": 100 * (hooked - plain) / plain,
        "hook_pct": 100 * hook_s / plain,
    }


def _roofline_note(row: Row, rep: Report) -> str:
    intensity = row.fmas / row.bytes
    memory = intensity * rep.read_gbps
    bound = "multiply-add" if rep.fma_gflops and rep.fma_gflops < memory else "memory"
    floor = row.roofline_ms(rep.fma_gflops, rep.read_gbps) or 0.0
    return (f"{intensity:.2f} multiply-adds per byte read: the read bandwidth allows {memory:.1f} G/s, the FMA peak "
            f"{rep.fma_gflops or 0:.1f} G/s: {bound}-bound, floor {floor:.1f} ms")


def _pct(share: float | None) -> float | None:
    return None if share is None else 100 * share


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render(rep: Report, console: Console) -> None:
    table = Table(
        title=f"fedcmd bench kernels — backend {rep.backend}, {rep.threads} thread(s), {rep.cpu}",
        caption=(
            f"best of {rep.repeat}; load average {rep.load_average[0]:.2f} {rep.load_average[1]:.2f} "
            f"{rep.load_average[2]:.2f}; copy bandwidth (np.copyto, read+write) {rep.copy_gbps:.1f} GB/s"
            + f"; read bandwidth {rep.read_gbps:.1f} GB/s"
            + (f"; float32 multiply-add peak {rep.fma_gflops:.1f} G/s" if rep.fma_gflops else "")
            + "; % roofline: the call's time at the lower of the FMA peak and the read bandwidth for its "
            "multiply-adds per byte, over its measured time (bandwidth only for kernels that are not multiply-adds)"
        ),
    )
    for col, just in [
        ("kernel", "left"),
        ("case", "left"),
        ("native ms", "right"),
        ("fallback ms", "right"),
        ("baseline", "left"),
        ("baseline ms", "right"),
        ("x fallback", "right"),
        ("x baseline", "right"),
        ("GB/s", "right"),
        ("% copy BW", "right"),
        ("% roofline", "right"),
    ]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rep.rows:
        g = r.gbps()
        table.add_row(
            r.kernel,
            r.case,
            _fmt(r.native_ms, ".3f"),
            _fmt(r.fallback_ms, ".3f"),
            r.baseline,
            _fmt(r.baseline_ms, ".3f"),
            _fmt(r.vs_fallback, ".1f", "x"),
            _fmt(r.vs_baseline, ".1f", "x"),
            _fmt(g, ".1f"),
            _fmt(100 * g / rep.copy_gbps if g and rep.copy_gbps else None, ".0f", "%"),
            _fmt(_pct(r.roofline_share(rep.fma_gflops, rep.read_gbps)), ".0f", "%"),
        )
    v = rep.vote
    case = (
        f"LeNet-5, batch 32, {int(v['batches'])} batches, a vote every {int(v['vote_every'])} "
        "(the default), torch 1 thread"
    )
    per_batch = v["train_ms"] / v["batches"]
    table.add_row(
        "FedCMD vote",
        case,
        _fmt(v["vote_ms"], ".3f"),
        "—",
        "local training (per batch)",
        _fmt(per_batch, ".3f"),
        "—",
        "—",
        "—",
        "—",
        "—",
    )
    console.print(table)
    for t in rep.targets:
        mark = "—" if t.met is None else ("[green]met[/]" if t.met else "[red]NOT met[/]")
        value = _fmt(t.value, ".2f", " %" if "vote" in t.name or "roofline" in t.name else "")
        console.print(f"  {t.name}: {value}  (target {t.goal})  {mark}")
        if t.note:
            console.print(f"      {t.note}")
    console.print(
        f"  vote: +{v['overhead_pct']:.1f} % wall time with the vote, {v['hook_pct']:.1f} % of it inside the hook"
    )
