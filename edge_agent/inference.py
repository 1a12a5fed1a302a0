"""Serve predictions from an exported personalized model with ONNX Runtime alone.

This module and what it imports must never pull in torch or torchvision: a device that only serves
predictions installs ``numpy onnxruntime pillow`` (``fedcmd[edge-infer]``), not a ~1-5 GB torch.
It works without the rest of fedcmd too: ``python -m edge_agent.inference --model M.onnx INPUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class InferenceError(ValueError):
    """A model or an input that cannot be used; the message is one line for the user."""


@dataclass
class Prediction:
    name: str  # the sample's index in a .npy, or its file name
    label: int
    probability: float

    def as_json(self) -> dict[str, object]:
        return {"input": self.name, "class": self.label, "probability": self.probability}


def _floats(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    if isinstance(text, str):
        try:
            return [float(v) for v in text.split(",")] if text.strip() else None
        except ValueError:
            raise InferenceError(f"{text!r} is not a comma-separated list of numbers") from None
    return [float(v) for v in text]


class Predictor:
    """One ONNX Runtime session over a model exported by :mod:`edge_agent.onnx_export`."""

    def __init__(self, model: Path, threads: int | None = None, cuda: bool = False) -> None:
        import onnxruntime as ort

        model = Path(model)
        if not model.is_file():
            raise InferenceError(f"model file {model} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # ORT's own warnings would break the one-line contract on stderr
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(model), options, providers=providers)
        except Exception as e:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, ...)
            raise InferenceError(f"{model} is not a usable ONNX model: {_one_line(e)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or inputs[0].type != "tensor(float)" or len(outputs[0].shape) != 2:
            raise InferenceError(
                f"{model} is not a fedcmd classifier (want one float input and one [batch, classes] output)"
            )
        self.input_name = inputs[0].name
        dims = inputs[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise InferenceError(f"{model} has a non-fixed sample shape {dims}")
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in dims)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def normalisation(
        self, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean/std for uint8 inputs: the given ones, else the export's metadata, else 0/1."""
        mean = mean if mean is not None else _floats(self.metadata.get("fedcmd.mean")) or [0.0]
        std = std if std is not None else _floats(self.metadata.get("fedcmd.std")) or [1.0]
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        out = []
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise InferenceError(f"--{name} has {len(values)} values; the model has {channels} channels")
            out.append(np.asarray(values, dtype=np.float32).reshape(-1, *([1] * (len(self.input_shape) - 1))))
        if np.any(out[1] == 0):
            raise InferenceError("--std must not be 0")
        return out[0], out[1]

    def prepare(
        self, x: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> np.ndarray:
        """Check and convert a batch: float inputs are used as they are (already normalised), uint8 images
        are scaled to [0, 1] and normalised."""
        if x.dtype == np.uint8:
            m, s = self.normalisation(mean, std)
            x = (x.astype(np.float32) / 255.0 - m) / s
        elif x.dtype in (np.float32, np.float64, np.float16):
            x = x.astype(np.float32, copy=False)
        else:
            raise InferenceError(f"inputs of type {x.dtype} are not supported (float32 normalised, or uint8 images)")
        if x.shape == self.input_shape:
            x = x[None]  # one sample
        elif self.input_shape[:1] == (1,) and x.ndim == len(self.input_shape) and x.shape[1:] == self.input_shape[1:]:
            x = x[:, None]  # [N, H, W] grey images
        if x.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise InferenceError(f"input shape {tuple(x.shape)} does not fit the model's [N, {want}]")
        if not np.all(np.isfinite(x)):
            raise InferenceError("the input holds NaN or infinite values")
        return np.ascontiguousarray(x)

    def probabilities(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities [N, classes] of a prepared batch, run ``batch_size`` samples at a time."""
        step = batch_size or max(len(x), 1)
        chunks = []
        for start in range(0, len(x), step):
            try:
                (logits,) = self.session.run(None, {self.input_name: x[start : start + step]})
            except Exception as e:
                raise InferenceError(f"the model rejected the input: {_one_line(e)}") from None
            chunks.append(softmax(logits))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)

    def predict(
        self,
        inputs: Path,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int | None = None,
    ) -> list[Prediction]:
        names, x = load_inputs(Path(inputs), self.input_shape)
        x = self.prepare(x, mean, std)
        names = names or [str(i) for i in range(len(x))]
        probs = self.probabilities(x, batch_size)
        labels = probs.argmax(axis=1)
        return [Prediction(n, int(k), float(probs[i, k])) for i, (n, k) in enumerate(zip(names, labels))]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_inputs(path: Path, input_shape: tuple[int, ...]) -> tuple[list[str] | None, np.ndarray]:
    """(file names, array) from a folder of PNGs or a .png; (None, array) from a .npy (samples by index)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise InferenceError(f"{path} holds no .png files")
        return [p.name for p in files], np.stack([_load_png(p, input_shape) for p in files])
    if not path.is_file():
        raise InferenceError(f"input {path} does not exist")
    if path.suffix.lower() == ".png":
        return [path.name], _load_png(path, input_shape)[None]
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)  # never unpickle a file someone handed us
        except (ValueError, OSError) as e:
            raise InferenceError(f"{path} is not a readable .npy array: {_one_line(e)}") from None
        if x.ndim == 0:
            raise InferenceError(f"{path} holds a scalar, not samples")
        return None, x
    raise InferenceError(f"{path}: inputs are .npy arrays, .png images or folders of PNGs")


def _load_png(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise InferenceError("PNG inputs need Pillow: pip install pillow") from None
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InferenceError(f"the model takes {list(input_shape)} samples, not images")
    channels, height, width = input_shape
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            x = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise InferenceError(f"{path} is not a readable PNG: {_one_line(e)}") from None
    if x.shape[:2] != (height, width):
        # No silent resizing: a model trained on 28x28 digits says nothing useful about a resized photo.
        raise InferenceError(f"{path.name} is {x.shape[1]}x{x.shape[0]} pixels; the model takes {width}x{height}")
    return x[None] if channels == 1 else x.transpose(2, 0, 1)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def format_predictions(predictions: list[Prediction], as_json: bool) -> str:
    if as_json:
        return json.dumps([p.as_json() for p in predictions])
    return "\n".join(f"{p.name}\t{p.label}\t{p.probability:.4f}" for p in predictions)


def main(argv: Sequence[str] | None = None) -> int:
    """The torch-free entry point: ``python -m edge_agent.inference --model M.onnx INPUT``."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.inference", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help=".npy (N,C,H,W), .png or a folder of PNGs")
    parser.add_argument("--model", type=Path, required=True, help="ONNX model exported by fedcmd-edge")
    parser.add_argument("--mean", help="per-channel mean for uint8 inputs, comma-separated")
    parser.add_argument("--std", help="per-channel std for uint8 inputs, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON list instead of lines")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(args.model, threads=args.threads)
        predictions = predictor.predict(args.input, _floats(args.mean), _floats(args.std), args.batch_size)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_predictions(predictions, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
