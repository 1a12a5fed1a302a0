"""Export a device's personalized model to ONNX (the torch side; :mod:`edge_agent.inference` runs it).

The personalized model of a device is the cloud body it last received plus its own personal layers and
BN statistics: exactly the model entries of ``ClientStrategy.state`` after a fit. The export has a
dynamic batch dimension and carries fedcmd facts (client, model, input shape, normalisation) as ONNX
metadata, so ``fedcmd-edge predict`` needs nothing but the file.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcmd_core.atomic import atomic_write
from fedcmd_core.params import load_arrays
from fedcmd_core.runspec import RunSpec
from fedcmd_core.state_tree import StateError, load_state_file
from fedcmd_core.strategies import ClientStrategy

OPSET = 17  # onnxruntime >= 1.14 runs it; old enough for JetPack's onnxruntime-gpu builds
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(ValueError):
    """The state dir, spec or state cannot make a personalized model."""


class _Logits(nn.Module):
    """Calls the model with only a tensor: LayeredModel's ``return_all`` flag would be traced as a constant
    input (with a TracerWarning) if the exporter saw the bare model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def personalized_model(template: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """A copy of ``template`` with every model entry taken from the device's ``state``, in eval mode."""
    model = copy.deepcopy(template)
    keys = list(model.state_dict())
    missing = [k for k in keys if k not in state]
    if missing:
        raise ExportError(
            f"the device state lacks {len(missing)} of the model's {len(keys)} entries (first: {missing[0]}): "
            "it has not finished a training round with this model yet"
        )
    try:
        load_arrays(model, {k: state[k] for k in keys})
    except ValueError as e:
        raise ExportError(f"the device state does not fit the model: {e}") from None
    return model.eval()


def export_model(
    model: nn.Module, input_shape: tuple[int, ...], out: Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``model`` as ONNX (dynamic batch) to ``out`` atomically: a crash leaves the old file or the new."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install onnx") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    was_training = model.training
    model.eval()  # BN uses the device's running statistics, dropout is off
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice on every call
            torch.onnx.export(
                _Logits(model),
                (torch.zeros(1, *input_shape),),
                str(tmp),
                dynamo=False,  # the dynamo exporter needs onnxscript, which edge installs do not carry
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
            )
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"fedcmd.{key}", str(value)
        proto.producer_name = "fedcmd"
        onnx.checker.check_model(proto)
        atomic_write(out, proto.SerializeToString())
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return out


def spec_metadata(spec: RunSpec, client_id: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        "client": str(client_id),
        "algo": spec.algo,
        "model": spec.model,
        "input_shape": json.dumps(list(spec.input_shape)),
        "num_classes": str(spec.num_classes),
        **(extra or {}),
    }


def export_strategy(strategy: ClientStrategy, out: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Export the personalized model a client strategy holds (what the agent does after each fit)."""
    model = personalized_model(strategy.ctx.model, strategy.state)
    input_shape = tuple(int(d) for d in strategy.ctx.data.x_train.shape[1:])
    return export_model(model, input_shape, out, {"client": str(strategy.ctx.client_id), **(metadata or {})})


def load_spec(path: Path) -> RunSpec:
    try:
        return RunSpec.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise ExportError(f"run description {path} does not exist (an agent writes it when it starts)") from None
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0]
        raise ExportError(f"{path} is not a fedcmd RunSpec: {first}") from None


def export_state_dir(
    state_dir: Path, client_id: int, spec: RunSpec, out: Path, extra: Mapping[str, str] | None = None
) -> Path:
    """On-demand export: the device's stored state, the run's model architecture, to ``out``."""
    state_file = Path(state_dir) / f"client-{client_id}.state.safetensors"
    if not state_file.is_file():
        raise ExportError(f"no state for client {client_id} in {state_dir} ({state_file.name} is missing)")
    try:
        values, _ = load_state_file(state_file)
    except StateError as e:
        raise ExportError(str(e)) from None
    state = values.get("state")
    if not isinstance(state, dict):
        raise ExportError(f"{state_file} holds no model state")
    try:
        template = spec.build_model()
    except ValueError as e:
        raise ExportError(str(e)) from None
    model = personalized_model(template, state)
    return export_model(model, tuple(spec.input_shape), out, spec_metadata(spec, client_id, extra))
