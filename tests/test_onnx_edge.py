"""ONNX export of a device's personalized model and torch-free inference with real ONNX Runtime sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edge_agent.agent import Agent
from edge_agent.inference import InferenceError, Predictor
from edge_agent.onnx_export import ExportError, export_state_dir, load_spec, personalized_model
from fedcmd_core.runspec import RunSpec, build_client, build_server
from fedcmd_core.strategies import ClientData, ClientStrategy
from protocols.codec import Header, decode, encode
from protocols.memory import MemoryTransport
from protocols.topics import presence_topic, task_topic, update_topic

ROOT = Path(__file__).resolve().parents[1]
FLEET = "onnx"


@dataclass
class Trained:
    spec: RunSpec
    client: ClientStrategy
    initial: dict[str, np.ndarray]
    global_arrays: dict[str, np.ndarray]
    state_dir: Path
    onnx: Path  # written by the agent after its last fit
    presence: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A LeNet-5 device that took part in two FedPer rounds through a real Agent (personal classifier + BN)."""
    spec = RunSpec(
        algo="fedper", model="lenet5", input_shape=(1, 28, 28), num_classes=10, num_clients=2, global_epoch=2,
        local_epoch=1, batch_size=16, momentum=0.9,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    data = ClientData(x[:32], y[:32], x[32:], y[32:])
    state_dir = tmp_path_factory.mktemp("state")
    (state_dir / "runspec.json").write_text(spec.model_dump_json())
    transport = MemoryTransport()
    client = build_client(spec, 0, data)
    agent = Agent(transport, FLEET, 0, client, state_dir=state_dir, profile="rpi4", export_onnx=state_dir / "m.onnx")
    presence: dict = {}
    transport.subscribe(presence_topic(FLEET, 0), lambda t, p: presence.update(json.loads(p)))
    updates: list[Header] = []
    transport.subscribe(update_topic(FLEET, 0), lambda t, p: updates.append(decode(p)[0]))
    agent.announce("online")
    server = build_server(spec)
    for rnd in range(2):
        task = server.task_for(rnd, 0)
        header = Header(type="task", fleet=FLEET, round=rnd, client=0, kind="fit", payload=task.config)
        transport.publish(task_topic(FLEET, 0), encode(header, task.arrays))
        assert transport.run_until(lambda r=rnd: len(updates) > r)
    return Trained(spec, client, spec.build_model().state_dict(), dict(server.global_arrays), state_dir,
                   state_dir / "m.onnx", presence)


def torch_logits(t: Trained, x: np.ndarray) -> np.ndarray:
    model = personalized_model(t.client.ctx.model, t.client.state)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_export_is_the_personalized_model(trained: Trained) -> None:
    state = trained.client.state
    # BN statistics and the personal classifier are the device's own, not the initial or the cloud's.
    assert not np.allclose(state["conv1.1.running_mean"], trained.initial["conv1.1.running_mean"].numpy())
    assert not np.allclose(state["classifier.weight"], trained.global_arrays["classifier.weight"])
    assert trained.presence == {"state": "online", "client": 0, "profile": "rpi4"}


@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_onnx_runtime_equals_torch(trained: Trained, batch: int) -> None:
    predictor = Predictor(trained.onnx)
    assert predictor.input_shape == (1, 28, 28)
    assert predictor.metadata["fedcmd.round"] == "1" and predictor.metadata["fedcmd.client"] == "0"
    x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    (logits,) = predictor.session.run(None, {predictor.input_name: x})
    expected = torch_logits(trained, x)
    assert logits.shape == (batch, 10)
    assert np.abs(logits - expected).max() <= 1e-5
    probs = predictor.probabilities(x, batch_size=5)  # chunked runs give the same answer
    assert np.abs(probs - torch.softmax(torch.from_numpy(expected), 1).numpy()).max() <= 1e-5


def test_export_on_demand_matches_the_agents_export(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "demand.onnx"
    export_state_dir(trained.state_dir, 0, load_spec(trained.state_dir / "runspec.json"), out, {"mean": "0.5"})
    x = np.random.default_rng(1).standard_normal((7, 1, 28, 28)).astype(np.float32)
    a, b = Predictor(out), Predictor(trained.onnx)
    assert a.metadata["fedcmd.model"] == "lenet5" and a.metadata["fedcmd.mean"] == "0.5"
    np.testing.assert_allclose(a.probabilities(x), b.probabilities(x), atol=1e-6)
    with pytest.raises(ExportError, match="no state for client 5"):
        export_state_dir(trained.state_dir, 5, trained.spec, out)
    other = trained.spec.model_copy(update={"model": "2nn"})
    with pytest.raises(ExportError, match="does not fit the model"):
        export_state_dir(trained.state_dir, 0, other, out)


def test_inference_path_imports_no_torch(trained: Trained, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import sys
import edge_agent.inference as inf
preds = inf.Predictor({str(trained.onnx)!r}).predict({str(tmp_path / "x.npy")!r})
assert len(preds) == 4, preds
from typer.testing import CliRunner
from edge_agent.cli import app
r = CliRunner().invoke(app, ["predict", "--model", {str(trained.onnx)!r}, {str(tmp_path / "x.npy")!r}])
assert r.exit_code == 0, r.output
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
assert not bad, bad
print([p.label for p in preds])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == torch_logits(trained, x).argmax(1).tolist()


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The real `fedcmd-edge` entry point in a fresh process: exit codes and stderr exactly as a user sees them."""
    argv = [sys.executable, "-c", "from edge_agent.cli import main; main()", *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def assert_one_line_error(out: subprocess.CompletedProcess[str], match: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error:") and match in lines[0], lines[0]


def test_predict_cli_npy_png_and_folder(trained: Trained, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img, mode="L").save(folder / f"digit{i}.png")
    mean, std = 0.1307, 0.3081
    normalised = ((images.astype(np.float32) / 255 - mean) / std)[:, None]
    np.save(tmp_path / "x.npy", normalised)
    expected = torch_logits(trained, normalised)
    want = expected.argmax(1).tolist()

    out = cli("predict", "--model", trained.onnx, tmp_path / "x.npy", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [p["class"] for p in got] == want and [p["input"] for p in got] == ["0", "1", "2"]
    probs = torch.softmax(torch.from_numpy(expected), 1).numpy()
    assert all(abs(p["probability"] - probs[i, want[i]]) < 1e-5 for i, p in enumerate(got))

    out = cli("predict", "--model", trained.onnx, folder / "digit1.png", "--mean", str(mean), "--std", str(std))
    assert out.returncode == 0, out.stderr
    name, label, prob = out.stdout.split()
    assert (name, int(label)) == ("digit1.png", want[1]) and abs(float(prob) - probs[1, want[1]]) < 1e-4

    out = cli("predict", "--model", trained.onnx, folder, "--mean", str(mean), "--std", str(std))
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [(r[0], int(r[1])) for r in rows] == [(f"digit{i}.png", want[i]) for i in range(3)]


def test_predict_cli_bad_input(trained: Trained, tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 32, 32), dtype=np.float32))
    assert_one_line_error(cli("predict", "--model", trained.onnx, tmp_path / "wrong.npy"), "does not fit")
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 28, 28), dtype=np.int64))
    assert_one_line_error(cli("predict", "--model", trained.onnx, tmp_path / "ints.npy"), "int64")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(trained.onnx.read_bytes()[:300])
    assert_one_line_error(cli("predict", "--model", corrupt, tmp_path / "wrong.npy"), "not a usable ONNX model")
    assert_one_line_error(cli("predict", "--model", tmp_path / "none.onnx", tmp_path / "wrong.npy"), "does not exist")
    assert_one_line_error(cli("predict", "--model", trained.onnx, tmp_path / "nothing.npy"), "does not exist")
    assert_one_line_error(
        cli("predict", "--model", trained.onnx, tmp_path / "wrong.npy", "--profile", "pi9"), "unknown device profile"
    )
    assert_one_line_error(
        cli("export-onnx", "--state-dir", tmp_path, "--client-id", "0", "--out", tmp_path / "o.onnx"),
        "runspec.json does not exist",
    )


def test_predictor_rejects_a_mismatched_model(tmp_path: Path) -> None:
    """A model for 8x8 digits handed 28x28 images: a clear error, never a silent resize or a crash."""
    from edge_agent.onnx_export import export_model
    from fedcmd_core.models import build_model

    path = export_model(build_model("2nn", (1, 8, 8), 10, seed=0), (1, 8, 8), tmp_path / "digits.onnx")
    predictor = Predictor(path)
    with pytest.raises(InferenceError, match=r"does not fit the model's \[N, 1, 8, 8\]"):
        predictor.prepare(np.zeros((1, 1, 28, 28), dtype=np.float32))
    with pytest.raises(InferenceError, match="NaN"):
        predictor.prepare(np.full((1, 1, 8, 8), np.nan, dtype=np.float32))
