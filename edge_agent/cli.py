"""``fedcmd-edge``: the device-side command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="fedcmd edge agent: trains on this device's data when the coordinator asks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads on this device"),
    wait: float = typer.Option(300.0, "--wait", help="seconds to wait for the coordinator's run description"),
) -> None:
    """Connect, wait for the coordinator's run description, then answer tasks until stopped (SIGTERM)."""
    import torch

    from edge_agent.agent import Agent
    from fedcmd_core.data import DataError, Partition, load_dataset
    from fedcmd_core.runspec import RunSpec, build_client
    from fedcmd_core.strategies import ClientData
    from protocols.mqtt import MqttTransport, TlsConfig
    from protocols.topics import presence_topic, status_topic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(threads)
    password = password_file.read_text().strip() if password_file else None
    if password is not None and username is None:
        username = str(client_id)  # the ACL convention of `fedcmd deploy`: a device's username is its id
    tls = TlsConfig(str(ca), str(cert) if cert else None, str(key) if key else None) if ca else None
    try:
        ds = load_dataset(dataset, root=root)
        part = Partition.load(data, ds)
    except DataError as e:
        fail(str(e))
        return
    if client_id >= part.num_clients:
        fail(f"--client-id {client_id} is not in {data} ({part.num_clients} clients)")
    tr, te = torch.from_numpy(part.train[client_id]), torch.from_numpy(part.test[client_id])
    local = ClientData(ds.x[tr], ds.y[tr], ds.x[te], ds.y[te])
    state_dir.mkdir(parents=True, exist_ok=True)

    offline = json.dumps({"state": "offline", "client": client_id}).encode()
    transport = MqttTransport(
        broker, f"{fleet}-agent-{client_id}", username=username, password=password, tls=tls,
        will=(presence_topic(fleet, client_id), offline, True),
    )
    status: dict = {}

    def on_status(topic: str, payload: bytes) -> None:
        try:
            status.update(json.loads(payload))
        except ValueError:
            logging.getLogger("fedcmd.edge").warning("ignored a malformed status message")

    transport.subscribe(status_topic(fleet), on_status)
    if not transport.run_until(lambda: "run" in status and bool(status["run"]), wait):
        transport.close()
        fail(f"no run description from a coordinator of fleet {fleet!r} on {broker} within {wait:.0f} s")
    spec = RunSpec(**status["run"])
    if tuple(spec.input_shape) != ds.input_shape:
        fail(f"the coordinator's model expects inputs {tuple(spec.input_shape)}; {dataset} has {ds.input_shape}")
    agent = Agent(transport, fleet, client_id, build_client(spec, client_id, local), state_dir=state_dir)
    agent.announce("online")
    stopping = {"now": False}

    def stop(signum: int, frame: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    err.print(f"client {client_id}: online in fleet {fleet!r} ({spec.algo}, {spec.model}); Ctrl-C to stop")
    transport.run_until(lambda: stopping["now"], None)
    agent.announce("offline")  # a clean disconnect does not fire the last will
    transport.close()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
