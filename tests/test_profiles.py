"""Device profiles: lookup, the memory check before a run, and the profile in the presence message."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from edge_agent.agent import Agent
from edge_agent.cli import app
from edge_agent.profiles import (
    MB,
    PROFILES,
    ProfileError,
    apply_kernel_choice,
    check_memory,
    estimate_for_model,
    estimate_memory,
    get_profile,
    tensor_bytes,
)
from fedcmd_core.data import load_dataset
from fedcmd_core.models import build_model
from fedcmd_core.runspec import RunSpec, build_client
from fedcmd_core.strategies import ClientData
from protocols.memory import MemoryTransport
from protocols.topics import presence_topic


@pytest.mark.parametrize("name", ["rpi4", "rpi5", "jetson-nano", "jetson-orin", "x86"])
def test_each_profile_loads(name: str) -> None:
    p = get_profile(name)
    assert p.name == name and p is get_profile(name.upper())
    assert p.batch_size > 0 and p.memory_mb > p.runtime_overhead_mb and p.torch_threads() >= 1
    assert p.cuda == name.startswith("jetson")
    assert json.loads(json.dumps(p.as_json()))["memory_mb"] == p.memory_mb
    assert set(PROFILES) == {"rpi4", "rpi5", "jetson-nano", "jetson-orin", "x86"}


def test_unknown_profile() -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile 'pi9'; known profiles: rpi4, rpi5"):
        get_profile("pi9")
    # `run` refuses before touching the network: one line, exit 2.
    args = ["run", "--broker", "mqtt://127.0.0.1:1", "--client-id", "0", "--data", "x.npz", "-d", "mnist5k",
            "--state-dir", "s", "--profile", "pi9"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "unknown device profile 'pi9'" in r.output and len(r.output.strip().splitlines()) == 1


def test_memory_estimate_adds_up() -> None:
    e = estimate_memory(1_000_000, 0, 10 * MB, momentum=True, activation_floats_per_sample=1000, batch_size=32,
                        runtime_mb=200)
    # params, grads, momentum + the strategy's two NumPy copies = 5 floats per parameter
    assert e.model_mb == pytest.approx(5 * 4e6 / MB)
    assert e.activations_mb == pytest.approx(2 * 1000 * 32 * 4 / MB)
    assert e.total_mb == pytest.approx(e.model_mb + e.activations_mb + 10 + 200)
    no_momentum = estimate_memory(1_000_000, 0, 0, momentum=False, activation_floats_per_sample=0, batch_size=1,
                                  runtime_mb=0)
    assert no_momentum.model_mb == pytest.approx(4 * 4e6 / MB)


def test_lenet5_on_mnist5k_fits_rpi4_and_an_impossible_budget_is_refused() -> None:
    ds = load_dataset("mnist5k")
    model = build_model("lenet5", ds.input_shape, 10, seed=0)
    rpi4 = get_profile("rpi4")
    # What `fedcmd-edge run` holds: the whole loaded set plus the device's slices (at most the set again).
    data_bytes = 2 * tensor_bytes([ds.x, ds.y])
    estimate = estimate_for_model(model, ds.input_shape, 32, data_bytes, momentum=True,
                                  runtime_mb=rpi4.runtime_overhead_mb)
    check_memory(rpi4, estimate)  # accepted
    assert 0.5 < estimate.model_mb < 2  # 61.7k params x 5 copies
    assert 25 < estimate.data_mb < 40 and estimate.activations_mb > 0
    assert estimate.total_mb < rpi4.memory_mb - 1000  # leaves room on a 2 GB Pi
    tiny = dataclasses.replace(rpi4, memory_mb=128)
    with pytest.raises(ProfileError) as info:
        check_memory(tiny, estimate)
    message = str(info.value)
    assert "profile rpi4 has a 128 MB memory budget but this run needs" in message
    assert "runtime 370 MB" in message and "\n" not in message


def test_memory_estimate_counts_activations_of_the_batch() -> None:
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    one = estimate_for_model(model, (1, 28, 28), 1, 0, momentum=False, runtime_mb=0)
    many = estimate_for_model(model, (1, 28, 28), 100, 0, momentum=False, runtime_mb=0)
    assert many.activations_mb == pytest.approx(100 * one.activations_mb)
    assert model.training  # the probe restores the mode it found


def test_kernel_choice_respects_an_explicit_setting() -> None:
    off = dataclasses.replace(get_profile("rpi4"), native_kernels=False)
    env: dict[str, str] = {}
    apply_kernel_choice(off, env)
    assert env == {"FEDCMD_NATIVE": "0"}
    env = {"FEDCMD_NATIVE": "1"}
    apply_kernel_choice(off, env)
    assert env == {"FEDCMD_NATIVE": "1"}
    env = {}
    apply_kernel_choice(get_profile("x86"), env)
    assert env == {}


def test_presence_carries_the_profile() -> None:
    spec = RunSpec(algo="fedavg", model="2nn", input_shape=(1, 8, 8), num_classes=10, num_clients=1, global_epoch=1)
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    seen: list[dict] = []
    for profile in ("jetson-orin", None):
        transport = MemoryTransport()
        agent = Agent(transport, "f", 3, build_client(spec, 3, ClientData(x, y, x, y)), profile=profile)
        transport.subscribe(presence_topic("f", 3), lambda t, p: seen.append(json.loads(p)))
        agent.announce("online")
        transport.run_until(lambda: False)
    assert seen == [{"state": "online", "client": 3, "profile": "jetson-orin"}, {"state": "online", "client": 3}]
