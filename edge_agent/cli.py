"""``fedcmd-edge``: the device-side command line."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedcmd_core.atomic import atomic_write  # stdlib only, too
from fedcmd_core.cli_exit import EXIT_CONFIG, EXIT_DISK, EXIT_RETRY  # stdlib only: fine on an inference-only install

app = typer.Typer(
    help="fedcmd edge agent: trains on this device's data when the coordinator asks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)




def fail(message: str, code: int = EXIT_CONFIG) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def disk_fail(message: str) -> None:
    """A file could not be written (read-only or full disk, a file where a folder should be)."""
    fail(f"disk: {escape(message)}", EXIT_DISK)


@app.callback()
def _root() -> None:
    """fedcmd edge agent."""


@app.command()
def run(
    broker: str = typer.Option(..., "--broker", help="mqtt://host:port or mqtts://host:port"),
    client_id: int = typer.Option(..., "--client-id", min=0, help="this device's integer id in the fleet"),
    data: Path = typer.Option(..., "--data", help="partition .npz holding this device's train_<id>/test_<id>"),
    dataset: str = typer.Option(..., "--dataset", "-d", help="the dataset the partition indexes (e.g. mnist5k)"),
    root: Optional[Path] = typer.Option(None, "--root", help="folder of torchvision-format datasets"),
    state_dir: Path = typer.Option(..., "--state-dir", help="personal layers, BN statistics, optimiser state"),
    fleet: str = typer.Option("default", "--fleet", help="fleet name (topic prefix fedcmd/<fleet>/)"),
    username: Optional[str] = typer.Option(None, "--username", help="MQTT username (default with a password: the id)"),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="file holding the MQTT password"),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (TLS)"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="client certificate (TLS)"),
    key: Optional[Path] = typer.Option(None, "--key", help="client private key (TLS)"),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="torch threads on this device [default: the profile's, else 1]"
    ),
    wait: float = typer.Option(300.0, "--wait", help="seconds to wait for the coordinator's run description"),
    profile_name: Optional[str] = typer.Option(
        None, "--profile", help="device profile: rpi4, rpi5, jetson-nano, jetson-orin, x86 (threads, memory check)"
    ),
    onnx_out: Optional[Path] = typer.Option(
        None, "--onnx", help="where to export the personalized model after each round [default: STATE_DIR/model.onnx]"
    ),
    no_onnx: bool = typer.Option(False, "--no-onnx", help="do not export ONNX after rounds"),
) -> None:
    """Connect, wait for the coordinator's run description, then answer tasks until stopped (SIGTERM).

    Exit codes: 2 a configuration mistake, or a run this device cannot build (its presence then says
    "incompatible" and why); 3 retryable (broker unreachable); 4 the state dir cannot hold files."""
    _check_state_dir(state_dir)  # first: a wrong path is found before a second is spent importing torch
    from edge_agent.profiles import ProfileError, apply_kernel_choice, get_profile

    profile = None
    if profile_name is not None:
        try:
            profile = get_profile(profile_name)
        except ProfileError as e:
            fail(escape(str(e)))
            return
        apply_kernel_choice(profile)  # before fedcmd_core.kernels is imported below

    import torch

    from edge_agent.agent import Agent
    from edge_agent.compat import Incompatible
    from edge_agent.startup import (
        StartupError,
        build_device,
        client_data,
        data_bytes,
        load_partition_and_dataset,
        parse_status,
        refuse,
        run_description,
    )
    from fedcmd_core.data import DataError
    from protocols.mqtt import AddressError, CredentialsError, connect
    from protocols.topics import presence_payload, presence_topic, status_topic
    from protocols.transport import TransportError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(threads or (profile.torch_threads() if profile else 1))
    if password_file is not None and username is None:
        username = str(client_id)  # the ACL convention of `fedcmd deploy`: a device's username is its id
    try:
        part, ds = load_partition_and_dataset(data, dataset, root)
        local = client_data(ds, part, client_id)
    except DataError as e:
        fail(str(e))
        return
    except StartupError:
        fail(f"--client-id {client_id} is not in {data} ({part.num_clients} clients)")
        return

    offline = presence_payload(client_id, "offline")
    try:
        transport = connect(
            broker, f"{fleet}-agent-{client_id}", username=username, password_file=password_file, ca=ca, cert=cert,
            key=key, will=(presence_topic(fleet, client_id), offline, True),
        )
    except (CredentialsError, AddressError) as e:
        fail(escape(str(e)))  # 2: fix the command line or the files
        return
    except TransportError as e:
        fail(escape(str(e)), EXIT_RETRY)  # 3: the broker is not there (yet); a restart may work
        return
    status: dict = {}

    def on_status(topic: str, payload: bytes) -> None:
        doc = parse_status(payload)
        if doc is not None:
            status.update(doc)
        else:
            logging.getLogger("fedcmd.edge").warning("ignored a malformed status message")

    transport.subscribe(status_topic(fleet), on_status)
    if not transport.run_until(lambda: run_description(status) is not None, wait):
        transport.close()
        fail(f"no run description from a coordinator of fleet {fleet!r} on {broker} within {wait:.0f} s", EXIT_RETRY)
    try:
        built = build_device(run_description(status), client_id, ds.input_shape, local, data_bytes(ds, local), profile)
    except Incompatible as e:
        # Retained, so the coordinator (and an operator's `fedcmd cloud status`) see why this device is absent.
        refuse(transport, fleet, client_id, str(e), profile.name if profile is not None else None)
        transport.close()
        fail(f"client {client_id}: incompatible run: {escape(str(e))}")
        return
    spec, estimate, client = built.spec, built.estimate, built.client
    if profile is not None:
        err.print(
            f"profile {profile.name}: this run needs {estimate.describe()} of {profile.memory_mb} MB",
            highlight=False, soft_wrap=True,
        )
    # The run description next to the state: `fedcmd-edge export-onnx` rebuilds the model from it.
    try:
        _write_atomic(state_dir / "runspec.json", spec.model_dump_json(indent=2))
    except OSError as e:
        transport.close()
        disk_fail(f"--state-dir {state_dir}: cannot write runspec.json: {e.strerror or e}")
    agent = Agent(
        transport, fleet, client_id, client, state_dir=state_dir,
        profile=profile.name if profile else None,
        export_onnx=None if no_onnx else (onnx_out or state_dir / "model.onnx"),
    )
    # Also the birth message: after every reconnect (a broker restarted without persistence has lost the
    # retained presence) it says the agent's health then, online or unhealthy.
    agent.announce("online")
    stopping = {"now": False}

    def stop(signum: int, frame: object) -> None:
        stopping["now"] = True

    def done() -> bool:
        agent.tick()  # retries a failed state write every ~30 s
        return stopping["now"]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    err.print(f"client {client_id}: online in fleet {fleet!r} ({spec.algo}, {spec.model}); Ctrl-C to stop")
    transport.run_until(done, None)
    agent.announce("offline")  # a clean disconnect does not fire the last will
    transport.close()


def _check_state_dir(state_dir: Path) -> None:
    """One line and exit 4 (disk) for a state dir that cannot hold files: read-only, a file, no space."""
    probe = state_dir / f".fedcmd-write-probe-{os.getpid()}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fedcmd")
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        disk_fail(f"--state-dir {state_dir}: cannot write there: {e.strerror or e}")


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)


@app.command("export-onnx")
def export_onnx(
    state_dir: Path = typer.Option(..., "--state-dir", help="the agent's state dir"),
    client_id: int = typer.Option(..., "--client-id", min=0, help="the device's id"),
    spec_path: Optional[Path] = typer.Option(
        None, "--spec", help="RunSpec JSON [default: STATE_DIR/runspec.json, written by `run`]"
    ),
    out: Path = typer.Option(..., "--out", help="ONNX file to write (atomically)"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel mean stored for uint8 inputs of predict"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel std stored for uint8 inputs of predict"),
) -> None:
    """Export this device's personalized model (cloud body + its personal layers and BN statistics)."""
    from edge_agent.onnx_export import ExportError, export_state_dir, load_spec

    extra = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    try:
        spec = load_spec(spec_path or state_dir / "runspec.json")
        export_state_dir(state_dir, client_id, spec, out, extra)
    except ExportError as e:
        fail(escape(str(e)))
    err.print(f"wrote {out} ({spec.model}, client {client_id}, input [N, {', '.join(map(str, spec.input_shape))}])")


@app.command()
def predict(
    inputs: Path = typer.Argument(..., help=".npy (N,C,H,W float32 normalised, or uint8), a .png, or a folder of PNGs"),
    model: Path = typer.Option(..., "--model", help="ONNX model from export-onnx or the agent"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel mean for uint8 inputs [default: the model's]"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel std for uint8 inputs [default: the model's]"),
    profile_name: Optional[str] = typer.Option(None, "--profile", help="device profile: threads, batch size, CUDA"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON list"),
) -> None:
    """Predict with ONNX Runtime only (no torch): one line per sample: input, class, probability."""
    from edge_agent.inference import InferenceError, Predictor, _floats, format_predictions
    from edge_agent.profiles import ProfileError, get_profile

    try:
        profile = get_profile(profile_name) if profile_name else None
        predictor = Predictor(model, threads=profile.threads if profile else None, cuda=bool(profile and profile.cuda))
        predictions = predictor.predict(
            inputs, _floats(mean), _floats(std), batch_size=profile.batch_size if profile else None
        )
    except (InferenceError, ProfileError) as e:
        fail(escape(str(e)))
        return
    typer.echo(format_predictions(predictions, as_json))


def main() -> None:
    from fedcmd_core.cli_exit import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
