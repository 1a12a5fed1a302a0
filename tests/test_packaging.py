"""The installs pyproject.toml promises: `fedcmd[edge-infer]` serves predictions without torch, and a
command that needs the training stack says which install it needs instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _closure(extras: set[str]) -> set[str]:
    """Canonical names of every distribution `pip install fedcmd[extras]` brings, from installed metadata."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [("fedcmd", extras)]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""}))
            dep = canonicalize_name(req.name)
            if not env_ok:
                continue
            if dep == "fedcmd":  # a self-reference such as dev -> fedcmd[full]
                todo.append(("fedcmd", set(req.extras)))
                continue
            if dep not in seen:
                seen.add(dep)
                todo.append((dep, set(req.extras)))
    return seen


def test_edge_infer_install_brings_no_torch() -> None:
    infer = _closure({"edge-infer"})
    assert {"numpy", "onnxruntime", "pillow"} <= infer
    assert not infer & {"torch", "torchvision", "scipy", "scikit-learn", "matplotlib", "onnx"}, sorted(infer)
    assert {"torch", "torchvision", "onnx", "pydantic"} <= _closure({"full"})


@pytest.fixture
def lenet_onnx(tmp_path: Path) -> Path:
    import torch

    from edge_agent.onnx_export import export_model
    from fedcmd_core.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10).eval()
    out = tmp_path / "m.onnx"
    export_model(model, (1, 28, 28), out)
    return out


def test_predict_uses_only_what_edge_infer_installs(lenet_onnx: Path, tmp_path: Path) -> None:
    """Every module the predict command loads comes from the standard library, fedcmd itself or a
    distribution of the `edge-infer` closure."""
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 28, 28), np.float32))
    code = f"""
import json, sys
before = set(sys.modules)
from typer.testing import CliRunner
from edge_agent.cli import app
r = CliRunner().invoke(app, ["predict", "--model", {str(lenet_onnx)!r}, {str(tmp_path / "x.npy")!r}])
assert r.exit_code == 0, r.output
print(json.dumps(sorted({{m.split(".")[0] for m in set(sys.modules) - before}})))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    owners = metadata.packages_distributions()
    allowed = _closure({"edge-infer"}) | {"fedcmd"}
    ours = {"cloud", "edge_agent", "fedcmd_core", "protocols"}
    foreign = {}
    for mod in loaded - set(sys.stdlib_module_names) - ours:
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        if mod.startswith("_") and not dists:
            continue  # interpreter internals (e.g. _distutils_hack from setuptools' .pth)
        if not dists & allowed:
            foreign[mod] = sorted(dists)
    assert "onnxruntime" in loaded and "torch" not in loaded
    assert not foreign, f"modules from outside the edge-infer install: {foreign}"


@pytest.mark.parametrize(
    ("argv", "blocked", "expected"),
    [
        (["fedcmd", "--help"], "pydantic", "needs 'pydantic', which is not installed: pip install 'fedcmd[full]'"),
        (["fedcmd-edge", "export-onnx", "--help"], None, None),
        (["fedcmd-edge", "run", "--broker", "mqtt://127.0.0.1:1", "--client-id", "0", "--data", "p.npz",
          "-d", "mnist5k", "--state-dir", "s"], "torch", "needs 'torch', which is not installed: pip install "
         "'fedcmd[full]'"),
    ],
)
def test_missing_training_stack_is_one_line_naming_the_install(
    argv: list[str], blocked: str | None, expected: str | None, tmp_path: Path
) -> None:
    # None in sys.modules makes `import <name>` fail exactly as an absent package does
    entry = {"fedcmd": "cloud.__main__", "fedcmd-edge": "edge_agent.cli"}[argv[0]]
    block = f"sys.modules[{blocked!r}] = None; " if blocked else ""
    code = f"import sys; {block}sys.argv = {argv!r}; from {entry} import main; main()"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": str(BIN)})
    if expected is None:
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"error: this command {expected}", out.stderr
    assert "Traceback" not in out.stderr
