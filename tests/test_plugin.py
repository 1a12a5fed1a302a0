"""A user's algorithm in its own installed package (examples/fedcmd-median, through the
``fedcmd.algorithms`` entry points) runs through ``fedcmd simulate --algo NAME``, in memory and over MQTT,
with no change to this repository; a broken or clashing plugin is left out with the reason."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedcmd_core.strategies as registry
from fedcmd_core.models import build_model
from fedcmd_core.strategies import ModelSpec, ServerContext, Update

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fedcmd-median"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a folder of its own (offline: no build isolation)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "fedcmd-median"
    # pip builds in the source folder: build a copy, so nothing lands in the repository
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (target / "fedcmd_median.py").is_file()
    assert list(target.glob("fedcmd_median-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setattr(registry, "_plugins", None)
    monkeypatch.setattr(registry, "_plugin_errors", {})
    yield
    sys.modules.pop("fedcmd_median", None)


def test_the_registry_finds_the_plugin_and_it_aggregates_by_the_median(with_plugin) -> None:
    assert "median_fedavg" in registry.algorithms() and "median_fedavg" not in registry.BUILTIN
    server_cls, client_cls = registry.algorithm("median_fedavg")
    assert server_cls.name == client_cls.name == "median_fedavg"
    spec = ModelSpec.from_model(build_model("lenet5", (1, 28, 28), 10, seed=0))
    server = server_cls(registry.parse_params("median_fedavg", {"min_updates": 2}), ServerContext(spec, 3, 5, 0))
    rng = np.random.default_rng(0)
    ups = {c: Update(0, {k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in spec.initial.items()
                         if v.dtype.kind == "f"}, 10) for c in range(3)}
    ups[2].arrays = {k: v * 1e6 for k, v in ups[2].arrays.items()}  # one wild update: the median ignores it
    assert server.aggregate(0, {0: ups[0]}) == {"aggregated": False}  # below min_updates: model kept
    np.testing.assert_array_equal(server.global_arrays["conv1.0.weight"], spec.initial["conv1.0.weight"])
    assert server.aggregate(0, ups) == {"median_of": 3}
    for k in ups[0].arrays:
        expected = np.median(np.stack([u.arrays[k] for u in ups.values()]), axis=0)
        np.testing.assert_allclose(server.global_arrays[k], expected, rtol=1e-6)
        assert np.abs(server.global_arrays[k]).max() < 1e3
    with pytest.raises(ValueError, match="min_updates"):
        registry.parse_params("median_fedavg", {"min_updates": 0})


def _simulate(site: Path, out: Path, partition: Path, *extra: str, algo: str = "median_fedavg") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cloud", "simulate", "--algo", algo, "-d", "mnist5k", "-p",
           str(partition), "-jr", "0.1", "-ge", "3", "-le", "1", "-tg", "0", "--seed", "5", "--out", str(out),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    with (out / "metrics.csv").open() as f:
        summary["curve"] = [float(r["test_before_acc"]) for r in csv.DictReader(f)]
    return summary


def test_a_plugin_runs_through_simulate_in_memory_and_over_mqtt_alike(
    plugin_site: Path, shared_partition: Path, tmp_path: Path, mosquitto_broker
) -> None:
    memory = _simulate(plugin_site, tmp_path / "memory", shared_partition)
    mqtt = _simulate(plugin_site, tmp_path / "mqtt", shared_partition, "--transport", "mqtt", "--broker",
                     mosquitto_broker.url, "--workers", "1")
    fedavg = _simulate(plugin_site, tmp_path / "fedavg", shared_partition, algo="fedavg")
    assert memory["algo"] == mqtt["algo"] == "median_fedavg" and memory["rounds"] == mqtt["rounds"] == 3
    assert mqtt["curve"] == pytest.approx(memory["curve"], abs=1e-6)
    assert mqtt["final_personalized_acc"] == pytest.approx(memory["final_personalized_acc"], abs=1e-6)
    # the plugin's own aggregation ran: the same command with FedAvg gives another model from round 2 on
    assert memory["curve"][0] == pytest.approx(fedavg["curve"][0])  # round 1 evaluates the same initial model
    assert memory["curve"][1:] != pytest.approx(fedavg["curve"][1:], abs=1e-3)


def test_a_broken_or_clashing_plugin_is_left_out_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "badplugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badplugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fedcmd.algorithms]\nbroken = badplugins_missing:ALGORITHM\nclash = badplugins_clash:ALGORITHM\n"
    )
    (tmp_path / "badplugins_clash.py").write_text(
        "from fedcmd_core.strategies import Algorithm, HyperParams\n"
        "from fedcmd_core.strategies.fedavg import FedAvgClient, FedAvgServer\n"
        "class S(FedAvgServer): pass\nclass C(FedAvgClient): pass\n"
        "ALGORITHM = Algorithm('fedavg', HyperParams, S, C)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins", None)
    monkeypatch.setattr(registry, "_plugin_errors", {})
    known = registry.algorithms()
    assert known["fedavg"] is registry.BUILTIN["fedavg"]  # a plugin never shadows a built-in
    assert registry.algorithm("fedavg")[0].__name__ == "FedAvgServer"
    with pytest.raises(ValueError, match=r"broken.*failed to load: ModuleNotFoundError"):
        registry.algorithm("broken")
    assert "takes the built-in name 'fedavg'" in registry._plugin_errors["fedavg"]
    with pytest.raises(ValueError, match="did you mean 'fedcmd'"):
        registry.algorithm("fedcdm")
    sys.modules.pop("badplugins_clash", None)
