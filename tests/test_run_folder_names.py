"""The default run folder: two runs started in the same second never collide."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloud import run_output
from cloud.config import resolve


def test_a_run_started_in_the_same_second_gets_the_next_free_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261202-112807")
    cfg = resolve({}, {"algo": "fedavg", "dataset": "digits"})
    first = run_output.default_out(cfg)
    assert first == Path("runs/fedavg/digits/20261202-112807")
    first.mkdir(parents=True)
    assert run_output.default_out(cfg) == Path("runs/fedavg/digits/20261202-112807-2")
    # a run still staging its folder holds the name too
    (first.parent / ".20261202-112807-2.partial").mkdir()
    assert run_output.default_out(cfg) == Path("runs/fedavg/digits/20261202-112807-3")
