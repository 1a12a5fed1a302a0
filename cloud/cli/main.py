"""The ``fedcmd`` command line."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud.cli.errors import err_console, fail, print_error
from cloud.config import ConfigError, load_config_file, resolve

app = typer.Typer(
    help="fedcmd: personalized federated learning (FedCMD and baselines) for edge fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)


# The whole command tree in one place: sub-apps, the commands mounted on them, top-level commands from
# other modules. No module registers itself by being imported.
SUBCOMMANDS = (
    ("cloud.cli.data", "data_app", "data", "Partition datasets among clients and inspect partitions."),
    ("cloud.cli.service", "cloud_app", "cloud", "The coordinator service: serve a fleet, read its status."),
    ("cloud.cli.bench", "bench_app", "bench", "Benchmarks: kernels against their named baselines."),
    ("cloud.cli.deploy", "deploy_app", "deploy", "Deployment: TLS certificates, password file, ACL, systemd units."),
)
# (sub-app module, sub-app, command name, module of the command function, function)
SUBAPP_COMMANDS = (
    ("cloud.cli.bench", "bench_app", "fleet", "cloud.bench.fleet", "fleet"),
    ("cloud.cli.bench", "bench_app", "partition", "cloud.bench.partition", "partition"),
    ("cloud.cli.bench", "bench_app", "hostile", "cloud.bench.hostile", "hostile"),
)
COMMANDS = (
    ("experiment", "cloud.cli.experiment", "experiment"),
    ("compare", "cloud.cli.compare", "compare"),
    ("monitor", "cloud.cli.monitor", "monitor"),
)  # (name, module, function) on the main app


def _mount_subcommands() -> None:
    import importlib

    def load(module: str, attr: str) -> Any:
        return getattr(importlib.import_module(module), attr)

    for app_module, app_attr, name, module, attr in SUBAPP_COMMANDS:
        load(app_module, app_attr).command(name)(load(module, attr))
    for module, attr, name, help_text in SUBCOMMANDS:
        app.add_typer(load(module, attr), name=name, help=help_text)
    for name, module, attr in COMMANDS:
        app.command(name)(load(module, attr))


def _parse_hp(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values or []:
        if "=" not in item:
            fail(f"--hp expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare word: a string value such as body_mode=relay
    return out


@app.command()
def simulate(
    algo: Optional[str] = typer.Option(None, "--algo", "--algorithm", help="local, fedavg, fedper, pfedsim, fedcmd"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="mnist5k, digits, synthetic, mnist, ..."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="lenet5, 2nn, avgcnn, mobile, res18"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seeds sampling, initialisation, shuffling"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file; command-line options override it"),
    partition: Optional[Path] = typer.Option(
        None, "--partition", "-p", help="partition .npz (ours or any npz of train_<c>/test_<c> index arrays)"
    ),
    client_num: Optional[int] = typer.Option(None, "--client-num", "--client_num", "-cn", help="clients"),
    alpha: Optional[float] = typer.Option(None, "--alpha", "-a", help="Dirichlet alpha when partitioning here"),
    least_samples: Optional[int] = typer.Option(None, "--least-samples", "--least_samples", "-ls"),
    root: Optional[Path] = typer.Option(None, "--root", help="folder holding torchvision-format datasets"),
    join_ratio: Optional[float] = typer.Option(None, "--join-ratio", "--join_ratio", "-jr", help="clients/round"),
    global_epoch: Optional[int] = typer.Option(None, "--global-epoch", "--global_epoch", "-ge", help="rounds"),
    local_epoch: Optional[int] = typer.Option(None, "--local-epoch", "--local_epoch", "-le"),
    finetune_epoch: Optional[int] = typer.Option(None, "--finetune-epoch", "--finetune_epoch", "-fe"),
    test_gap: Optional[int] = typer.Option(None, "--test-gap", "--test_gap", "-tg", help="evaluate all clients"),
    eval_test: Optional[int] = typer.Option(None, "--eval-test", "--eval_test", "-ee"),
    eval_train: Optional[int] = typer.Option(None, "--eval-train", "--eval_train", "-er"),
    local_lr: Optional[float] = typer.Option(None, "--local-lr", "--local_lr", "-lr"),
    momentum: Optional[float] = typer.Option(None, "--momentum", "-mom"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", "--weight_decay", "-wd"),
    verbose_gap: Optional[int] = typer.Option(None, "--verbose-gap", "--verbose_gap", "-vg", help="table every N"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch_size", "-bs"),
    use_cuda: Optional[int] = typer.Option(None, "--use-cuda", "--use_cuda", help="1: use a GPU if present"),
    global_testset: Optional[int] = typer.Option(None, "--global-testset", "--global_testset"),
    straggler_ratio: Optional[float] = typer.Option(None, "--straggler-ratio", "--straggler_ratio"),
    straggler_min_local_epoch: Optional[int] = typer.Option(
        None, "--straggler-min-local-epoch", "--straggler_min_local_epoch"
    ),
    external_model_params_file: Optional[Path] = typer.Option(
        None, "--external-model-params-file", "--external_model_params_file", help="initial weights (.safetensors)"
    ),
    save_log: Optional[int] = typer.Option(None, "--save-log", "--save_log"),
    save_model: Optional[int] = typer.Option(None, "--save-model", "--save_model"),
    save_fig: Optional[int] = typer.Option(None, "--save-fig", "--save_fig"),
    save_metrics: Optional[int] = typer.Option(None, "--save-metrics", "--save_metrics"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default 1)"),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", help="processes training a round's clients in parallel, results identical to one "
        "(default 0: the cores not already busy; 1: this process)"
    ),
    transport: Optional[str] = typer.Option(
        None, "--transport", help="memory (one process) or mqtt (real MQTT agents in worker processes)"
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", help="with --transport mqtt: auto (private local broker) or mqtt://host:port"
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="agent worker processes (default: cores)"),
    round_deadline: Optional[float] = typer.Option(
        None, "--round-deadline", "--round_deadline", help="with --transport mqtt: seconds a round waits for devices"
    ),
    update_codec: Optional[str] = typer.Option(
        None, "--update-codec", help="none, fp16 or int8: how devices encode their updates"
    ),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="coordinator checkpoint written after every round; an existing one is resumed"
    ),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", "--state_dir", help="agents keep their state here (resumable)"
    ),
    body_budget_mb: Optional[float] = typer.Option(
        None, "--body-budget-mb", help="FedCMD: MB of per-client bodies the cloud keeps in memory; "
        "the rest in memory-mapped files under --state-dir (0, the default: all in memory)"
    ),
    aggregation: Optional[str] = typer.Option(
        None, "--aggregation", help="mean (default), trimmed_mean or median: how averaging rounds combine updates"
    ),
    trim_ratio: Optional[float] = typer.Option(
        None, "--trim-ratio", "--trim_ratio", help="trimmed_mean: share dropped at each end, 0 <= x < 0.5 (0.1)"
    ),
    clip_factor: Optional[float] = typer.Option(
        None, "--clip-factor", "--clip_factor", help="clip update norms to this x the median norm (3.0; 0 = off)"
    ),
    attackers: Optional[int] = typer.Option(
        None,
        "--attackers",
        help="this many simulated devices are malicious (chosen with --seed); over MQTT "
        "give --round-deadline too: a rejected attacker never answers",
    ),
    attack: Optional[str] = typer.Option(
        None, "--attack", help="what attackers send: scale, signflip, noise or nan (cloud/sim/attacks.py)"
    ),
    attack_scale: Optional[float] = typer.Option(
        None, "--attack-scale", "--attack_scale", help="the attack's factor s (1e6)"
    ),
    hp: Optional[list[str]] = typer.Option(
        None, "--hp", help="algorithm hyper-parameter KEY=VALUE, repeatable (e.g. --hp body_mode=relay)"
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default runs/<algo>/<dataset>/<time>)"),
    visible: Optional[str] = typer.Option(
        None, "--visible", help="watch the run: 1 = live web dashboard (+ Prometheus /metrics), tensorboard = "
        "per-round scalars for TensorBoard, 0 = off"),
    visible_host: Optional[str] = typer.Option(
        None, "--visible-host", "--visible_host",
        help="dashboard address (127.0.0.1; others need FEDCMD_MONITOR_TOKEN)"),
    visible_port: Optional[int] = typer.Option(None, "--visible-port", "--visible_port", help="dashboard port (8097)"),
    visible_keep: Optional[float] = typer.Option(None, "--visible-keep", help="seconds the dashboard stays up after"),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="TensorBoard folder for per-round scalars"),
    force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or round tables"),
) -> None:
    """Run coordinator + all clients in one process over the in-memory transport (or MQTT agents).

    Exit codes: 0 done; 2 a mistake in the options or config; 3 the MQTT broker unreachable (worth a
    retry); 4 disk: --out, --checkpoint or --state-dir could not be written (read-only or full disk; an
    earlier checkpoint is kept).
    """
    cli_values = {k: v for k, v in locals().items() if k not in ("config", "force", "quiet", "hp")}
    from cloud import run_output
    from cloud.config import DiskError, Unavailable, check_writable
    from cloud.monitor.events import EventBus
    from cloud.monitor.launch import watch_simulation
    from cloud.sim.simulate import build_and_run
    from fedcmd_core.cli_exit import EXIT_DISK, EXIT_RETRY
    from fedcmd_core.data import DataError

    for flag in (
        "eval_test",
        "eval_train",
        "use_cuda",
        "global_testset",
        "save_log",
        "save_model",
        "save_fig",
        "save_metrics",
    ):
        if cli_values[flag] is not None:
            cli_values[flag] = bool(cli_values[flag])
    cli_values["hp"] = _parse_hp(hp)
    try:
        file_values = load_config_file(config) if config else {}
        cfg = resolve(file_values, cli_values)
        target = cfg.out or run_output.default_out(cfg)
        run_output.check_out(target, force)
        check_writable(target.parent, "--out")  # the run folder is staged beside it
    except ConfigError as e:
        fail(str(e))
        return
    except DiskError as e:
        _exit_disk(e, EXIT_DISK)

    log_buffer = io.StringIO()
    _setup_logging(log_buffer, quiet)
    progress = Progress(
        TextColumn("[bold cyan]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )
    state: dict[str, Any] = {}

    def on_start(total: int) -> None:
        state["task"] = progress.add_task(f"{cfg.algo} on {cfg.dataset}", total=total, status="")

    def on_round(record: Any) -> None:
        acc = record.metrics.get("test_before_acc")
        status = f"round {record.round + 1}: acc {acc:.2f}%" if acc is not None else ""
        progress.update(state["task"], advance=1, status=status)
        logging.getLogger("fedcmd.rounds").info(
            "round %d (%s): %s",
            record.round + 1,
            record.phase,
            " ".join(f"{k}={v:.4f}" for k, v in sorted(record.metrics.items())),
        )
        state.setdefault("rows", []).append(record)
        if not quiet and (record.round + 1) % cfg.verbose_gap == 0:
            progress.console.print(_round_table(state["rows"][-cfg.verbose_gap :]))

    events = EventBus()  # the coordinator's event stream: the dashboard, Prometheus, TensorBoard
    try:
        watchers = watch_simulation(cfg, events, target.name)
    except ConfigError as e:
        fail(str(e))
        return
    if watchers.url and not quiet:
        console.print(f"dashboard: {watchers.url}  (Prometheus: {watchers.url.split('?')[0]}metrics)")
    elif watchers.url:
        print_error(f"dashboard: {watchers.url}")
    if watchers.tensorboard and not quiet:
        console.print(f"tensorboard: tensorboard --logdir {watchers.tensorboard}")
    try:
        with progress, run_output.staged(target, force) as folder:
            result = build_and_run(cfg, on_round=on_round, on_start=on_start, events=events)
            run_output.write_run(result, folder, log_buffer.getvalue())
    except (ConfigError, DataError) as e:
        watchers.stop()
        fail(str(e))
        return
    except Unavailable as e:
        print_error(str(e))
        raise typer.Exit(EXIT_RETRY) from None
    except DiskError as e:
        _exit_disk(e, EXIT_DISK)
    except KeyboardInterrupt:
        fail("interrupted; no run folder was written")
        return
    watchers.stop()
    summ = run_output.summary(result)
    console.print(_summary_table(summ, target))


def _exit_disk(e: Exception, code: int) -> NoReturn:
    print_error(f"disk: {e}")
    raise typer.Exit(code) from None


def _setup_logging(buffer: io.StringIO, quiet: bool) -> None:
    from cloud.run_output import capture_log

    root = capture_log(buffer)
    screen = RichHandler(console=err_console, show_path=False, level=logging.WARNING)
    root.addHandler(screen)


def _round_table(records: list[Any]) -> Table:
    table = Table(title=None, show_edge=False, pad_edge=False)
    for col in ("round", "phase", "acc before", "acc after", "loss before", "down KiB", "up KiB", "s"):
        table.add_column(col, justify="right")
    for r in records:
        m = r.metrics
        table.add_row(
            str(r.round + 1),
            r.phase,
            f"{m.get('test_before_acc', float('nan')):.2f}",
            f"{m.get('test_after_acc', float('nan')):.2f}",
            f"{m.get('test_before_loss', float('nan')):.4f}",
            f"{r.bytes_down / 1024:.0f}",
            f"{r.bytes_up / 1024:.0f}",
            f"{r.seconds:.2f}",
        )
    return table


def _summary_table(s: dict[str, Any], folder: Path) -> Table:
    table = Table(title=f"{s['algo']} on {s['dataset']} ({s['clients']} clients, {s['rounds']} rounds)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("paper metric: last-10-round mean of test_before (%)", f"{s['paper_metric']:.2f}")
    if s.get("final_personalized_acc") is not None:
        table.add_row("final personalized accuracy, all clients (%)", f"{s['final_personalized_acc']:.2f}")
    strat = s.get("strategy", {})
    if strat.get("chosen_layer"):
        table.add_row("chosen personal layer", str(strat["chosen_layer"]))
        table.add_row("layer votes", ", ".join(f"{k}:{v}" for k, v in strat.get("vote_counts", {}).items()))
    if s.get("attackers"):
        a = s["attackers"]
        table.add_row("attackers", f"{a['attack']} x{a['scale']:g}: devices {a['devices']}")
    if s.get("rejected_updates") or s.get("clipped_updates"):
        rejected = ", ".join(f"{k}:{v}" for k, v in sorted((s.get("rejected_updates") or {}).items()))
        table.add_row("rejected / clipped updates", f"{rejected or '-'} / {s.get('clipped_updates', 0)}")
    table.add_row("MiB down / up", f"{s['bytes_down'] / 2**20:.1f} / {s['bytes_up'] / 2**20:.1f}")
    table.add_row("seconds (per round)", f"{s['seconds']:.1f} ({s['seconds_per_round']:.3f})")
    table.add_row("run folder", str(folder))
    return table


_mount_subcommands()


if __name__ == "__main__":  # `python -m cloud.cli.main`: run the one imported copy of this module, not __main__
    import importlib

    from fedcmd_core.cli_exit import run_cli

    run_cli(lambda: importlib.import_module("cloud.cli.main").app())
