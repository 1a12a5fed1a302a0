"""`--optimizer sgd|adam|adamw` and `--lr-scheduler none|step|cosine` (fedcmd_core/optim.py): the schedule is
torch's own, the optimiser's state and the schedule's position stay on the device between rounds (in the
client's state, never in its update), and the flags reach a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import ConfigError, resolve
from fedcmd_core import optim
from fedcmd_core.models import build_model
from fedcmd_core.optim import OptimSettings
from fedcmd_core.strategies import ClientContext, ClientData, ModelSpec, Task, algorithm, parse_params
from fedcmd_core.training import TrainConfig


@pytest.mark.parametrize(
    ("settings", "torch_scheduler"),
    [
        (OptimSettings(lr=0.1, lr_scheduler="step", step_size=3, gamma=0.5),
         lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
        (OptimSettings(lr=0.1, lr_scheduler="cosine", t_max=7, eta_min=0.001),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=0.001)),
    ],
)
def test_the_schedule_is_torchs(settings: OptimSettings, torch_scheduler) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    sched = torch_scheduler(opt)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [optim.scheduled_lr(settings, e) for e in range(12)] == pytest.approx(expected, rel=1e-12)


def _client(train: TrainConfig):
    torch.manual_seed(0)
    model = build_model("2nn", (8,), 3, seed=0)
    x = torch.randn(40, 8)
    y = torch.randint(0, 3, (40,))
    ctx = ClientContext(model, ModelSpec.from_model(model), ClientData(x, y, x[:8], y[:8]), train, 1, 0)
    _, client_cls = algorithm("fedavg")
    return client_cls(parse_params("fedavg", {}), ctx)


def _task(client, rnd: int) -> Task:
    spec = client.ctx.spec
    return Task(rnd, "fit", {k: v.copy() for k, v in spec.initial.items()}, {"upload": spec.keys, "local_epoch": 2})


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_state_and_schedule_stay_on_the_device_between_rounds(name: str) -> None:
    train = TrainConfig(local_epoch=2, batch_size=10, lr=0.01, optimizer=name, lr_scheduler="step", lr_step_size=1,
                        lr_gamma=0.5)
    client = _client(train)
    first = client.fit(_task(client, 0))
    steps = [v for k, v in client.state.items() if k.startswith("optim.step::")]
    assert steps and all(float(np.asarray(s).reshape(-1)[0]) == 8 for s in steps)  # 2 epochs x 4 batches
    assert any(k.startswith("optim.exp_avg_sq::") for k in client.state)
    assert optim.scheduler_epoch(client.state) == 2
    assert not any(k.startswith(("optim.", "lr_scheduler")) for k in first.arrays)  # never on the wire
    moments = {k: v.copy() for k, v in client.state.items() if k.startswith("optim.exp_avg::")}
    client.fit(_task(client, 1))
    steps = [v for k, v in client.state.items() if k.startswith("optim.step::")]
    assert all(float(np.asarray(s).reshape(-1)[0]) == 16 for s in steps)  # carried on, not restarted
    assert optim.scheduler_epoch(client.state) == 4
    assert any(not np.array_equal(moments[k], client.state[k]) for k in moments)
    # the carried state changes what the device computes: a fresh device on round 1 trains differently
    fresh = _client(train)
    again = _client(train)
    again.fit(_task(again, 0))
    a, b = again.fit(_task(again, 1)), fresh.fit(_task(fresh, 1))
    assert any(not np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_plain_sgd_keeps_no_state_and_momentum_keeps_its_old_name() -> None:
    client = _client(TrainConfig(local_epoch=1, batch_size=10))
    client.fit(_task(client, 0))
    assert not any("::" in k for k in client.state)
    client = _client(TrainConfig(local_epoch=1, batch_size=10, momentum=0.9))
    client.fit(_task(client, 0))
    assert any(k.startswith("momentum::") for k in client.state)  # state dirs of earlier runs still load


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        resolve({}, {"optimizer": "lion"})
    with pytest.raises(ConfigError, match="lr_scheduler"):
        resolve({}, {"lr_scheduler": "plateau"})
    with pytest.raises(ConfigError, match="adam has no momentum"):
        resolve({}, {"optimizer": "adam", "momentum": 0.9})
    cfg = resolve({"optimizer": "adamw", "lr_scheduler": "cosine", "lr_t_max": 4}, {})
    t = cfg.train_config()
    assert (t.optimizer, t.lr_scheduler, t.lr_t_max) == ("adamw", "cosine", 4)


def test_the_flags_reach_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["simulate", "--algo", "fedavg", "-d", "synthetic", "-m", "2nn", "-cn", "4", "-jr", "1", "-ge", "2",
            "-le", "1", "-tg", "0", "--optimizer", "adam", "-lr", "0.001", "--lr-scheduler", "cosine",
            "--lr-t-max", "3", "--quiet", "--no-save-fig", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import json

    config = json.loads((out / "config.json").read_text())
    assert (config["optimizer"], config["lr_scheduler"], config["lr_t_max"]) == ("adam", "cosine", 3)
