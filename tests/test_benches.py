"""The benchmarks report what they say: `bench fleet` (per-row peak RSS, ratios against FedAvg fp32),
`bench kernels`' K=1 baseline column, `bench partition`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cloud.bench import kernels as cli_bench
from cloud.bench.fleet import RATIO_KEYS, add_ratios, render
from cloud.cli.main import app
from cloud.sim.fleet import peak_rss_mb

runner = CliRunner()

_HOG = "import sys, time; x = bytearray(int(sys.argv[1]) << 20); x[::4096] = b'x' * len(x[::4096]); " + (
    "print('ready', flush=True); time.sleep(30)"
)


def _peak_of_a_process_holding(mb: int) -> float | None:
    proc = subprocess.Popen([sys.executable, "-c", _HOG, str(mb)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return peak_rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_rss_is_the_process_own_not_the_largest_child_so_far() -> None:
    big = _peak_of_a_process_holding(300)
    small = _peak_of_a_process_holding(20)
    assert big is not None and small is not None
    assert big > 300 and small < big - 200  # RUSAGE_CHILDREN.ru_maxrss would say >= 300 for both
    own = peak_rss_mb()
    assert own is not None and own > 0
    assert peak_rss_mb(2**31 - 1) is None  # no such process


def _row(algo: str, codec: str, **values: float) -> dict[str, Any]:
    base = dict.fromkeys((*RATIO_KEYS, "aggregate_s", "transfer_s"), 1.0) | {"agents_per_worker": 2.0}
    return {"algo": algo, "codec": codec, **base, **values}


def test_ratios_are_each_row_over_the_fedavg_fp32_row_and_the_table_prints_them() -> None:
    rows = [
        _row("fedcmd", "none", round_s=3.0, bytes_up=4096.0, worker_rss_mb=500.0),
        _row("fedavg", "none", round_s=2.0, bytes_up=8192.0, worker_rss_mb=400.0),
        _row("fedavg", "fp16", round_s=2.0, bytes_up=4096.0, worker_rss_mb=np.nan),
    ]
    add_ratios(rows)
    assert rows[1]["vs_fedavg_fp32"] == dict.fromkeys(RATIO_KEYS, 1.0)
    assert rows[0]["vs_fedavg_fp32"]["round_s"] == 1.5 and rows[0]["vs_fedavg_fp32"]["worker_rss_mb"] == 1.25
    assert rows[2]["vs_fedavg_fp32"]["bytes_up"] == 0.5 and rows[2]["vs_fedavg_fp32"]["worker_rss_mb"] is None
    console = Console(width=250, record=True)
    console.print(render(rows, 4, 2, 2))
    text = console.export_text()
    assert "3.00 (1.50x)" in text and "500.0 (1.25x)" in text and "4 (0.50x)" in text
    no_base = [_row("fedcmd", "none")]
    add_ratios(no_base)
    assert set(no_base[0]["vs_fedavg_fp32"].values()) == {None}


def test_kernel_bench_k1_row_compares_with_the_k1_float32_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the NumPy backend the K=1 f16 row's baseline was the K=10 float32 time."""
    timed: dict[str, float] = {}

    def fake_compare(fns: dict[str, Any], repeat: int, min_seconds: float = 0.01, settle: float = 0.0) -> Any:
        out: dict[str, float | None] = {}
        for k, f in fns.items():  # a distinct time for every contender, so each column shows whose it is
            out[k] = None if f is None else timed.setdefault(k, float(100 + len(timed)))
        return out

    monkeypatch.setattr(cli_bench, "compare_ms", fake_compare)
    rep = cli_bench.Report("numpy", True, 1, 1, [0.0], "test")
    size = {"agg": (4, 3, 64)}
    cli_bench._bench_aggregate(rep, size, 1, np.random.default_rng(0), lambda *a: None, cli_bench._Steps(None, 1))
    (k1,) = [r for r in rep.rows if r.case.startswith("K=1 ")]
    assert k1.fallback_ms == timed["fallback16_k1"]
    assert k1.baseline_ms == timed["fallback32_k1"] != timed["fallback32"]


def test_bench_partition_reports_the_give_up_time() -> None:
    result = runner.invoke(app, ["bench", "partition", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    bad, hinted = rep["impossible"], rep["hinted"]
    assert bad["draws"] == 300 and bad["seconds"] > 0 and bad["target_s"] == 5.0
    assert bad["ms_per_draw"] == pytest.approx(bad["seconds"] / 300 * 1e3)
    assert 0 < hinted["least_samples"] < 40 and 1 <= hinted["draws"] <= 300


@pytest.mark.slow
def test_bench_fleet_rows_are_measured_each_on_its_own(mosquitto_broker: Any, tmp_path: Path) -> None:
    args = ["bench", "fleet", "--agents", "3", "--per-round", "2", "--rounds", "2", "--workers", "1"]
    result = runner.invoke(app, [*args, "--broker", mosquitto_broker.url, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["algo"], r["codec"]) for r in rows] == [
        ("fedcmd", "none"),
        ("fedcmd", "fp16"),
        ("fedavg", "none"),
        ("fedavg", "fp16"),
    ]
    cmd32, cmd16, avg32, avg16 = rows
    # where rows must differ: fp16 halves the updates, not the tasks; FedCMD keeps its personal layer home
    for fp32, fp16 in ((cmd32, cmd16), (avg32, avg16)):
        assert 0.45 < fp16["bytes_up"] / fp32["bytes_up"] < 0.55
        assert fp16["bytes_down"] == pytest.approx(fp32["bytes_down"], rel=1e-3)
    assert cmd32["bytes_down"] < 0.95 * avg32["bytes_down"]
    # peaks of each row's own processes (fresh coordinator and workers), not the first row's lifetime peak
    for r in rows:
        assert 50 < r["coordinator_rss_mb"] < 8000 and 50 < r["worker_rss_mb"] < 8000
    assert len({r["worker_rss_mb"] for r in rows}) > 1  # kB resolution: four equal peaks were the old bug
    # ratios are computed from the row values, against the FedAvg fp32 row
    for r in rows:
        for k in RATIO_KEYS:
            assert r["vs_fedavg_fp32"][k] == pytest.approx(r[k] / avg32[k]), (r["algo"], r["codec"], k)
    assert avg32["vs_fedavg_fp32"] == dict.fromkeys(RATIO_KEYS, 1.0)
