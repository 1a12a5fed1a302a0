"""--use_cuda 1: trains on the GPU where there is one; where there is none, one line and exit 2 (never a
silent fall back to the CPU)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.config import ConfigError, resolve
from cloud.sim.setup import prepare


def test_use_cuda_trains_on_the_gpu_or_says_there_is_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    values = {"algo": "fedavg", "dataset": "digits", "client_num": 4, "global_epoch": 1, "use_cuda": True}
    if torch.cuda.is_available():
        p = prepare(resolve({}, values))
        assert p.device.type == "cuda" and next(p.model.parameters()).is_cuda
        return
    try:
        prepare(resolve({}, values))
    except ConfigError as e:
        assert "--use_cuda 1" in str(e) and "torch.cuda.is_available() is false" in str(e)
    else:
        raise AssertionError("prepare() accepted --use_cuda 1 without a GPU")
    res = CliRunner().invoke(app, ["simulate", "--algo", "fedavg", "-d", "digits", "-cn", "4", "-ge", "1",
                                   "--use_cuda", "1", "-q", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2, res.output
    assert "--use_cuda 1:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
