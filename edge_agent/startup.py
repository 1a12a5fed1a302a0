"""Device start-up in one place: ``fedcmd-edge run`` and the fleet-simulation workers (``cloud/sim/fleet.py``)
both build a device here, from the run description (RunSpec) the coordinator publishes in its retained
status and the device's own data, so a simulated fleet exercises the start-up a real device runs.

The steps: this device's data (:func:`load_local_data`, or :func:`client_data` from a dataset already
loaded), the status message (:func:`parse_status`), the checked spec and client strategy
(:func:`build_device`: ``Incompatible`` with the one-line reason when the device cannot serve it), and,
when it cannot, the retained "incompatible" presence that tells the coordinator why (:func:`refuse`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from edge_agent.profiles import DeviceProfile, MemoryEstimate
    from fedcmd_core.data import Dataset, Partition
    from fedcmd_core.runspec import RunSpec
    from fedcmd_core.strategies import ClientData, ClientStrategy, ModelSpec
    from protocols.transport import Transport

MAX_STATUS_BYTES = 1 << 20  # a retained status larger than this is not a coordinator's


class StartupError(ValueError):
    """This device's own inputs are wrong (its data file, its id): a setup mistake, one line."""


def client_data(dataset: Dataset, partition: Partition, client_id: int) -> ClientData:
    """The device's train/test samples: its partition indices into ``dataset`` (only its own rows are
    copied out; the dataset itself is shared by every device of a process)."""
    import torch

    from fedcmd_core.strategies import ClientData

    if not 0 <= client_id < partition.num_clients:
        raise StartupError(f"client id {client_id} is not in the partition ({partition.num_clients} clients)")
    tr = torch.from_numpy(partition.train[client_id]).long()
    te = torch.from_numpy(partition.test[client_id]).long()
    return ClientData(dataset.x[tr], dataset.y[tr], dataset.x[te], dataset.y[te])


def load_partition_and_dataset(data: Path, dataset_name: str, root: Path | None) -> tuple[Partition, Dataset]:
    """The partition file and the dataset it indexes, loaded with the options it was made with (DataError)."""
    from fedcmd_core.data import Partition, load_dataset

    part = Partition.load(data)
    ds = load_dataset(dataset_name, root=root, **part.dataset_options(dataset_name))
    part.check(ds, source=str(data))
    return part, ds


def data_bytes(dataset: Dataset, local: ClientData) -> int:
    """What this device's data hold in memory (the profile's memory check counts it)."""
    from edge_agent.profiles import tensor_bytes

    return tensor_bytes([dataset.x, dataset.y, local.x_train, local.y_train, local.x_test, local.y_test])


def parse_status(payload: bytes) -> dict[str, Any] | None:
    """A status message as a dict, or None when it is not one (untrusted: size, JSON, type)."""
    if len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def run_description(status: dict[str, Any]) -> Any | None:
    """The RunSpec a status carries, once the coordinator has published one."""
    run = status.get("run")
    return run if run else None


@dataclass
class DeviceBuild:
    spec: RunSpec
    client: ClientStrategy
    estimate: MemoryEstimate


Checker = Callable[[Any, tuple[int, ...], int, "DeviceProfile | None"], "tuple[RunSpec, MemoryEstimate]"]


def build_device(
    raw_run: Any,
    client_id: int,
    input_shape: tuple[int, ...],
    local: ClientData,
    nbytes: int,
    profile: DeviceProfile | None = None,
    *,
    model: torch.nn.Module | None = None,
    model_spec: ModelSpec | None = None,
    eval_data: ClientData | None = None,
    check: Checker | None = None,
) -> DeviceBuild:
    """Check the coordinator's run against this device and build its client strategy.

    ``model`` is the workspace (default: a new model from the spec; the agents of one simulation worker
    share one, as they train one at a time). ``check`` replaces :func:`edge_agent.compat.check_run`
    (a worker caches it: the same spec is checked once, not once per agent). Raises ``Incompatible`` with
    the one-line reason the device reports in its presence."""
    from edge_agent.compat import Incompatible, check_run
    from fedcmd_core.runspec import build_client

    try:
        spec, estimate = (check or check_run)(raw_run, tuple(input_shape), nbytes, profile)
        workspace = model if model is not None else spec.build_model()
        client = build_client(spec, client_id, local, model=workspace, model_spec=model_spec, eval_data=eval_data)
    except Incompatible:
        raise
    except Exception as e:  # the spec came from the broker: whatever it makes fail, this device cannot serve it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Incompatible(f"cannot build the coordinator's run: {reason}") from None
    return DeviceBuild(spec, client, estimate)


def refuse(transport: Transport, fleet: str, client_id: int, reason: str, profile: str | None = None) -> None:
    """The retained "incompatible" presence: the coordinator (and `fedcmd cloud status`) see why."""
    from protocols.topics import presence_payload, presence_topic

    info = {"profile": profile} if profile is not None else {}
    transport.publish(presence_topic(fleet, client_id),
                      presence_payload(client_id, "incompatible", reason=reason, **info), retain=True)
