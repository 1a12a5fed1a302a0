"""The ``fedcmd`` command line: the main app, the table that mounts every sub-app, and ``simulate``."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cloud.cli.apps import new_app
from cloud.cli.errors import err_console, fail, print_error
from cloud.cli.tables import round_table, summary_table
from cloud.config import ConfigError, RunConfig, load_config_file, resolve
from fedcmd_core.data import DATASET_NAMES
from fedcmd_core.names import ALGORITHM_NAMES, MODEL_NAMES

app = new_app(
    "fedcmd: personalized federated learning (FedCMD and baselines) for edge fleets.",
    add_completion=True,
)
console = Console(stderr=False)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fedcmd {version('fedcmd')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("fedcmd (not installed)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                      help="Print the installed fedcmd version and exit."),
) -> None:
    """fedcmd: personalized federated learning (FedCMD and baselines) for edge fleets.

    Start with `fedcmd data partition`, then `fedcmd simulate`; `fedcmd algorithms` lists every method
    with its hyper-parameters. Every on/off option takes --flag, --no-flag, --flag 1 or --flag 0.
    """


# The whole command tree in one place: sub-apps, the commands mounted on them, top-level commands from
# other modules. No module registers itself by being imported.
SUBCOMMANDS = (
    ("cloud.cli.data", "data_app", "data", "Partition datasets among clients and inspect partitions."),
    ("cloud.cli.service", "cloud_app", "cloud", "The coordinator service: serve a fleet, read its status."),
    ("cloud.cli.bench", "bench_app", "bench", "Benchmarks: kernels, a fleet, hostile clients, partitioning."),
    ("cloud.cli.deploy", "deploy_app", "deploy", "Deployment: TLS certificates, password file, ACL, systemd units."),
)
# (sub-app module, sub-app, command name, module of the command function, function)
SUBAPP_COMMANDS = (
    ("cloud.cli.bench", "bench_app", "fleet", "cloud.bench.fleet", "fleet"),
    ("cloud.cli.bench", "bench_app", "partition", "cloud.bench.partition", "partition"),
    ("cloud.cli.bench", "bench_app", "hostile", "cloud.bench.hostile", "hostile"),
    ("cloud.cli.bench", "bench_app", "monitor", "cloud.bench.monitor", "monitor"),
    ("cloud.cli.bench", "bench_app", "simulate", "cloud.bench.simulate", "simulate"),
)
# (name, module, function) on the main app
COMMANDS = (
    ("experiment", "cloud.cli.experiment", "experiment"),
    ("compare", "cloud.cli.compare", "compare"),
    ("monitor", "cloud.cli.monitor", "monitor"),
    ("algorithms", "cloud.cli.algorithms", "algorithms"),
)


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


_F = RunConfig.model_fields


def _d(name: str) -> Any:
    """The default of a RunConfig field: what --help shows is what a run without the option uses."""
    return _F[name].default


_ALGOS = ", ".join(ALGORITHM_NAMES)


@app.command()
def simulate(
    ctx: typer.Context,
    algo: str = typer.Option(_d("algo"), "--algo", "--algorithm",
                             help=f"Algorithm: {_ALGOS}, or an installed plugin; `fedcmd algorithms` "
                             "lists each one's hyper-parameters."),
    dataset: str = typer.Option(_d("dataset"), "--dataset", "-d",
                                help=f"Dataset: {', '.join(DATASET_NAMES)} (`fedcmd data list`)."),
    model: str = typer.Option(_d("model"), "--model", "-m", help=f"Model: {', '.join(MODEL_NAMES)}."),
    seed: int = typer.Option(_d("seed"), "--seed", help="Seeds the partition, initialisation, sampling and shuffling."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML run config (any option below by its field name, [hp] and [hp.<algo>] "
        "tables); options given here override it."),
    partition: Optional[Path] = typer.Option(
        None, "--partition", "-p", help="Partition .npz (ours, or any npz of train_<c>/test_<c> index arrays); "
        "without it the data are split here with the options below."),
    client_num: int = typer.Option(_d("client_num"), "--client-num", "--client_num", "-cn",
                                   help="Clients, when splitting here."),
    alpha: float = typer.Option(_d("alpha"), "--alpha", "-a",
                                help="Dirichlet label skew when splitting here (smaller: more skewed)."),
    iid: bool = typer.Option(_d("iid"), "--iid/--no-iid", help="IID split instead of Dirichlet (not with -a)."),
    classes: int = typer.Option(_d("classes"), "--classes", "-c",
                                help="Labels per client instead of Dirichlet (0: off; not with -a)."),
    shards: int = typer.Option(_d("shards"), "--shards", "-s",
                               help="Sorted-label shards per client instead of Dirichlet (0: off; not with -a)."),
    least_samples: int = typer.Option(_d("least_samples"), "--least-samples", "--least_samples", "-ls",
                                      help="Dirichlet: redraw until every client holds this many samples."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder holding the dataset files "
                                        "(`fedcmd data list` shows where each goes)."),
    join_ratio: float = typer.Option(_d("join_ratio"), "--join-ratio", "--join_ratio", "-jr",
                                     help="Share of the clients sampled each round."),
    global_epoch: int = typer.Option(_d("global_epoch"), "--global-epoch", "--global_epoch", "-ge", help="Rounds."),
    local_epoch: int = typer.Option(_d("local_epoch"), "--local-epoch", "--local_epoch", "-le",
                                    help="Local epochs per round."),
    finetune_epoch: int = typer.Option(_d("finetune_epoch"), "--finetune-epoch", "--finetune_epoch", "-fe",
                                       help="Epochs each client fine-tunes a copy before the final evaluation."),
    test_gap: int = typer.Option(_d("test_gap"), "--test-gap", "--test_gap", "-tg",
                                 help="Evaluate every client every N rounds (0: only at the end)."),
    eval_test: bool = typer.Option(_d("eval_test"), "--eval-test/--no-eval-test", "--eval_test/--no_eval_test",
                                   "-ee", help="Evaluate on the clients' test splits."),
    eval_train: bool = typer.Option(_d("eval_train"), "--eval-train/--no-eval-train",
                                    "--eval_train/--no_eval_train", "-er",
                                    help="Evaluate on the clients' training splits too."),
    optimizer: str = typer.Option(_d("optimizer"), "--optimizer", help="Local optimiser: sgd, adam or adamw."),
    local_lr: float = typer.Option(_d("local_lr"), "--local-lr", "--local_lr", "-lr", help="Local learning rate."),
    momentum: float = typer.Option(_d("momentum"), "--momentum", "-mom",
                                   help="SGD momentum (kept on each device between rounds)."),
    weight_decay: float = typer.Option(_d("weight_decay"), "--weight-decay", "--weight_decay", "-wd",
                                       help="Weight decay (L2 for sgd/adam, decoupled for adamw)."),
    lr_scheduler: str = typer.Option(_d("lr_scheduler"), "--lr-scheduler", "--lr_scheduler",
                                     help="Learning-rate schedule over each device's local epochs: none, step "
                                     "or cosine."),
    lr_step_size: int = typer.Option(_d("lr_step_size"), "--lr-step-size", help="step: epochs between decays."),
    lr_gamma: float = typer.Option(_d("lr_gamma"), "--lr-gamma", help="step: factor of each decay."),
    lr_t_max: int = typer.Option(_d("lr_t_max"), "--lr-t-max", help="cosine: epochs of one half-period."),
    lr_eta_min: float = typer.Option(_d("lr_eta_min"), "--lr-eta-min", help="cosine: the lowest rate."),
    verbose_gap: int = typer.Option(_d("verbose_gap"), "--verbose-gap", "--verbose_gap", "-vg",
                                    help="Print the round table every N rounds (the rest at the end)."),
    batch_size: int = typer.Option(_d("batch_size"), "--batch-size", "--batch_size", "-bs", help="Batch size."),
    use_cuda: bool = typer.Option(_d("use_cuda"), "--use-cuda/--no-use-cuda", "--use_cuda/--no_use_cuda",
                                  help="Train on a GPU when one is present."),
    global_testset: bool = typer.Option(_d("global_testset"), "--global-testset/--no-global-testset",
                                        "--global_testset/--no_global_testset",
                                        help="Evaluate every client on the union of all test splits."),
    straggler_ratio: float = typer.Option(_d("straggler_ratio"), "--straggler-ratio", "--straggler_ratio",
                                          help="Share of sampled clients that train fewer local epochs."),
    straggler_min_local_epoch: int = typer.Option(
        _d("straggler_min_local_epoch"), "--straggler-min-local-epoch", "--straggler_min_local_epoch",
        help="Stragglers train between this and --local-epoch epochs."),
    external_model_params_file: Optional[Path] = typer.Option(
        None, "--external-model-params-file", "--external_model_params_file",
        help="Initial weights (.safetensors with the model's state names)."),
    save_log: bool = typer.Option(_d("save_log"), "--save-log/--no-save-log", "--save_log/--no_save_log",
                                  help="Write run.log."),
    save_model: bool = typer.Option(_d("save_model"), "--save-model/--no-save-model",
                                    "--save_model/--no_save_model", help="Write model.safetensors."),
    save_fig: bool = typer.Option(_d("save_fig"), "--save-fig/--no-save-fig", "--save_fig/--no_save_fig",
                                  help="Write accuracy.png."),
    save_metrics: bool = typer.Option(_d("save_metrics"), "--save-metrics/--no-save-metrics",
                                      "--save_metrics/--no_save_metrics", help="Write metrics.csv."),
    threads: int = typer.Option(_d("threads"), "--threads", help="Torch threads."),
    jobs: int = typer.Option(_d("jobs"), "--jobs", "-j", help="Processes training a round's clients in parallel, "
                             "results identical to one (0: the cores not already busy; 1: this process)."),
    transport: str = typer.Option(_d("transport"), "--transport",
                                  help="memory (one process) or mqtt (real MQTT agents in worker processes)."),
    broker: str = typer.Option(_d("broker"), "--broker",
                               help="With --transport mqtt: auto (a private local broker) or mqtt://host:port."),
    workers: int = typer.Option(_d("workers"), "--workers", help="Agent worker processes (0: one per core)."),
    round_deadline: Optional[float] = typer.Option(
        None, "--round-deadline", "--round_deadline",
        help="With --transport mqtt: seconds a round waits for its devices [default: until all answer]."),
    update_codec: str = typer.Option(_d("update_codec"), "--update-codec",
                                     help="How devices encode their updates: none, fp16 or int8."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Coordinator checkpoint written after every round; an existing one is resumed."),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", "--state_dir", help="Agents keep their state here (resumable)."),
    body_budget_mb: float = typer.Option(
        _d("body_budget_mb"), "--body-budget-mb", help="FedCMD: MB of per-client bodies the cloud keeps in "
        "memory; the rest in memory-mapped files under --state-dir (0: all in memory)."),
    aggregation: str = typer.Option(_d("aggregation"), "--aggregation",
                                    help="How averaging rounds combine updates: mean, trimmed_mean or median."),
    trim_ratio: float = typer.Option(_d("trim_ratio"), "--trim-ratio", "--trim_ratio",
                                     help="trimmed_mean: share dropped at each end, 0 <= x < 0.5."),
    clip_factor: float = typer.Option(_d("clip_factor"), "--clip-factor", "--clip_factor",
                                      help="Clip update norms to this many times the round's median (0: off)."),
    attackers: int = typer.Option(
        _d("attackers"), "--attackers",
        help="This many simulated devices are malicious (chosen with --seed); over MQTT give --round-deadline "
        "too: a rejected attacker never answers."),
    attack: str = typer.Option(_d("attack"), "--attack",
                               help="What attackers send: scale, signflip, noise or nan (cloud/sim/attacks.py)."),
    attack_scale: float = typer.Option(_d("attack_scale"), "--attack-scale", "--attack_scale",
                                       help="The attack's factor s."),
    hp: Optional[list[str]] = typer.Option(
        None, "--hp", help="Algorithm hyper-parameter KEY=VALUE, repeatable (e.g. --hp body_mode=relay); "
        "`fedcmd algorithms` lists the keys."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run folder [default: runs/<algo>/<dataset>/<time>]."),
    visible: str = typer.Option(
        _d("visible"), "--visible",
        help="Watch the run: 1 = a live web dashboard (with Prometheus /metrics) at --visible-host:--visible-port, "
        "tensorboard = per-round scalars for TensorBoard (runs/tensorboard/<run>, or --tensorboard DIR); 0 = off."),
    visible_host: str = typer.Option(
        _d("visible_host"), "--visible-host", "--visible_host",
        help="Address the dashboard listens on; anything but loopback needs FEDCMD_MONITOR_TOKEN (16+ characters)."),
    visible_port: int = typer.Option(_d("visible_port"), "--visible-port", "--visible_port",
                                     help="Port of the dashboard (0: any free port; the URL is printed)."),
    visible_keep: float = typer.Option(_d("visible_keep"), "--visible-keep",
                                       help="Seconds the dashboard stays up after the run ends."),
    tensorboard: Optional[Path] = typer.Option(
        None, "--tensorboard", help="Also write per-round scalars for TensorBoard into this folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or round tables."),
) -> None:
    """Run coordinator + all clients in one process over the in-memory transport (or MQTT agents).

    Exit codes: 0 done; 2 a mistake in the options or config; 3 the MQTT broker unreachable (worth a
    retry); 4 disk: --out, --checkpoint or --state-dir could not be written (read-only or full disk; an
    earlier checkpoint is kept); 130 Ctrl-C, 143 SIGTERM (no run folder is left behind).
    """
    given = {k: v for k, v in locals().items() if k not in ("ctx", "config", "force", "quiet", "hp")}
    # Only what the user typed overrides the config file: a default is the file's (or RunConfig's) business.
    cli_values = {k: v for k, v in given.items() if _typed(ctx, k)}
    cli_values["hp"] = _parse_hp(hp)
    try:  # the mistakes found without torch come first: their one line is there in a fraction of a second
        file_values = load_config_file(config) if config else {}
        _check_names({**file_values, **cli_values})
    except ConfigError as e:
        fail(str(e))
    from cloud import run_output
    from cloud.config import DiskError, Unavailable, check_writable
    from cloud.monitor.events import EventBus
    from cloud.monitor.launch import watch_simulation
    from cloud.sim.simulate import build_and_run
    from fedcmd_core.cli_exit import EXIT_DISK, EXIT_RETRY
    from fedcmd_core.data import DataError

    try:
        cfg = resolve(file_values, cli_values)
        target = cfg.out or run_output.default_out(cfg)
        run_output.check_out(target, force)
        base = _existing_parent(target)
        try:
            check_writable(base, "--out")  # the run folder is staged beside it
        except DiskError as e:  # name the folder the user asked for, and the one that refused
            why = os.strerror(e.errno) if e.errno else str(e)
            raise DiskError(f"--out: cannot write to {target.parent}: {base} refuses new files ({why})", e.errno) from e
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
    state: dict[str, Any] = {"rows": [], "printed": 0}

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
        state["rows"].append(record)
        if not quiet and len(state["rows"]) - state["printed"] >= cfg.verbose_gap:
            progress.console.print(round_table(state["rows"][state["printed"]:]))
            state["printed"] = len(state["rows"])

    created = _missing_ancestors(target)
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
        with _sigterm_as_interrupt(), progress, run_output.staged(target, force) as folder:
            result = build_and_run(cfg, on_round=on_round, on_start=on_start, events=events)
            run_output.write_run(result, folder, log_buffer.getvalue())
    except BaseException as e:
        watchers.stop(linger=False)
        _remove_empty(created)  # a failed run leaves no empty runs/<algo>/<dataset>/ behind
        if isinstance(e, (ConfigError, DataError)):
            fail(str(e))
        if isinstance(e, Unavailable):
            print_error(str(e))
            raise typer.Exit(EXIT_RETRY) from None
        if isinstance(e, DiskError):
            _exit_disk(e, EXIT_DISK)
        if isinstance(e, _Terminated):
            print_error("terminated (SIGTERM); no run folder was written")
            raise typer.Exit(EXIT_TERMINATED) from None
        if isinstance(e, KeyboardInterrupt):
            print_error("interrupted; no run folder was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise
    if not quiet and state["printed"] < len(state["rows"]):  # the last, partial block of rounds
        console.print(round_table(state["rows"][state["printed"]:]))
    watchers.stop()
    summ = run_output.summary(result)
    console.print(summary_table(summ, target))


def _check_names(values: dict[str, Any]) -> None:
    """A mistyped algorithm, model or dataset: one line at once, before torch is imported for the run (the
    registries check the names again when the run is built). Installed plugin algorithms count as known."""
    from fedcmd_core.names import ALGORITHM_ALIASES, ENTRY_POINT_GROUP, MODEL_ALIASES, unknown_name

    algo, model, dataset = values.get("algo"), values.get("model"), values.get("dataset")
    if isinstance(algo, str):
        from importlib.metadata import entry_points

        plugins = tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        message = unknown_name("algorithm", algo, (*ALGORITHM_NAMES, *plugins), ALGORITHM_ALIASES)
        if message:
            raise ConfigError(f"algo: {message}")
    if isinstance(model, str) and (message := unknown_name("model", model, MODEL_NAMES, MODEL_ALIASES)):
        raise ConfigError(f"model: {message}")
    if isinstance(dataset, str) and (message := unknown_name("dataset", dataset, DATASET_NAMES, {})):
        raise ConfigError(f"dataset: {message}")


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or through its environment variable)."""
    source = ctx.get_parameter_source(name)  # typer's bundled click: compare by name
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _existing_parent(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (the writability check must not create folders)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _missing_ancestors(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first: a failed run removes them again."""
    out: list[Path] = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        out.append(parent)
        parent = parent.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only if empty: never a folder something else wrote into meanwhile
        except OSError:
            return


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that the staged run folder is removed on the way out."""


class _sigterm_as_interrupt:  # a context manager, named for what it does
    def __enter__(self) -> None:
        def raise_terminated(signum: int, frame: FrameType | None) -> None:
            raise _Terminated()

        try:
            self.previous = signal.signal(signal.SIGTERM, raise_terminated)
        except ValueError:  # not the main thread (a test runner's thread): leave SIGTERM alone
            self.previous = None

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _exit_disk(e: Exception, code: int) -> NoReturn:
    print_error(f"disk: {e}")
    raise typer.Exit(code) from None


def _setup_logging(buffer: io.StringIO, quiet: bool) -> None:
    from cloud.run_output import capture_log

    root = capture_log(buffer)
    screen = RichHandler(console=err_console, show_path=False, level=logging.WARNING)
    root.addHandler(screen)


_mount_subcommands()


if __name__ == "__main__":  # `python -m cloud.cli.main`: run the one imported copy of this module, not __main__
    import importlib

    from fedcmd_core.cli_exit import run_cli

    run_cli(lambda: importlib.import_module("cloud.cli.main").app())
