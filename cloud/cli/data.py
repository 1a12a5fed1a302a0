"""``fedcmd data``: partition a dataset among clients (the seed's generate_data.py) and inspect partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cloud.cli.apps import new_app
from cloud.cli.errors import fail
from cloud.config import RunConfig
from fedcmd_core.data import (
    DATASET_INFO,
    DATASET_NAMES,
    NATURAL_DATASETS,
    DataError,
    Dataset,
    Partition,
    PartitionArgs,
    load_dataset,
    make_partition,
    plot_label_distribution,
)

data_app = new_app("Partition datasets among clients and inspect partitions.")
_SIM = RunConfig.model_fields  # partition's defaults are simulate's: the same split either way
# Resolved at print time, so test runners that swap sys.stdout/sys.stderr see the output.
_out = Console(highlight=False)
_NAMES = ", ".join(DATASET_NAMES)
_HELP = {
    "dataset": f"Dataset to split: {_NAMES}.",
    "iid": "IID split (the seed's --iid 1); for synthetic: Synthetic-IID data.",
    "seed": "Seed of every random choice: same seed, same partition.",
    "split": "sample: every client splits its data into train/test; user: whole clients are train or test.",
    "fraction": "Train share of each client (split=sample) or share of training clients (split=user).",
    "classes": "Labels per client (scheme 'classes'); for synthetic: its number of classes, as the seed.",
    "shards": "Sorted-label shards per client (FedAvg's pathological split).",
    "alpha": "Dirichlet label skew, the scheme when no other is given (smaller: more skewed; not with --iid, -c, "
    "-s, --semantic; femnist, celeba and domainnet split naturally unless -a is given).",
    "least": "Dirichlet: redraw until every client holds at least this many samples.",
    "redraws": "Dirichlet: give up, with a hint of what works, after this many draws.",
    "emnist": "EMNIST split: byclass (62 classes), bymerge, balanced, letters, digits, mnist.",
    "root": "Folder holding the dataset files; `fedcmd data list` shows where each set goes under it.",
    "download": "Let torchvision download missing files (needs the network).",
    "out": "Output .npz [default: runs/partitions/<dataset>-<scheme>-s<seed>.npz].",
    "semantic": "Semantic scheme (FL-bench's -sm): per-class Gaussian-mixture clusters matched across classes.",
    "features": "Semantic: feature extractor; only pca (PCA of the pixels: no pretrained weights offline).",
    "pca": "Semantic: PCA dimensions of the features.",
    "gmm_iter": "Semantic: EM iterations of each class's Gaussian mixture.",
    "gmm_init": "Semantic: mixture initialisation (kmeans, k-means++, random, random_from_data).",
    "attribute": "CelebA: the attribute that is the binary label (LEAF: Smiling).",
    "max_users": "CelebA: load only the first N celebrities (0: all); bounds memory and decoding time.",
    "domain_classes": "DomainNet: how many of its 345 classes to keep (drawn as FL-bench, seed 42).",
    "domain_size": "DomainNet: images are resized to this many pixels square.",
}


def _fail(message: str) -> NoReturn:
    fail(" ".join(message.split()))  # one line, whatever the wrapped exception text looked like


def _one_scheme(ctx: typer.Context, name: str, alpha: float, **schemes: Any) -> float:
    """The Dirichlet alpha to use: the shared default (simulate's) unless another scheme is given, or the
    dataset has a natural split; -a beside another scheme is a conflict, never a silent choice."""
    typed = ctx.get_parameter_source("alpha").name not in ("DEFAULT", "DEFAULT_MAP")
    if name == "synthetic":  # --iid and -c shape the synthetic data themselves; they are not schemes there
        schemes = {k: v for k, v in schemes.items() if k not in ("iid", "classes")}
    others = [f"--{k}" for k, v in schemes.items() if v]
    if typed and alpha > 0 and others:
        _fail(f"-a/--alpha {alpha:g} (Dirichlet) and {others[0]} are two partition schemes; give one")
    if len(others) > 1:
        _fail(f"{others[0]} and {others[1]} are two partition schemes; give one")
    if others or (not typed and name in NATURAL_DATASETS):
        return 0.0
    return alpha


def _default_out(dataset: str, args: PartitionArgs, natural: bool) -> Path:
    return Path("runs") / "partitions" / f"{dataset}-{args.scheme_tag(natural)}-s{args.seed}.npz"


def _top_labels(row: np.ndarray, k: int = 3) -> str:
    order = np.argsort(-row, kind="stable")[:k]
    return " ".join(f"{int(j)}:{int(row[j])}" for j in order if row[j] > 0)


def _summary(part: Partition, out: Path, png: Path | None) -> Table:
    sizes = np.array([len(a) + len(b) for a, b in zip(part.train, part.test, strict=True)])
    table = Table(title="partition", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    meta = part.meta
    table.add_row("dataset", f"{meta.get('dataset')} ({meta.get('dataset_size')} samples)")
    table.add_row("scheme", str(meta.get("scheme")) + (
        f" ({meta['dirichlet_draws']} draws)" if "dirichlet_draws" in meta else ""))
    table.add_row("clients", str(part.num_clients))
    table.add_row("train / test", f"{sum(map(len, part.train))} / {sum(map(len, part.test))}")
    table.add_row("samples per client", f"min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}")
    if part.label_histogram is not None:
        held = (part.label_histogram > 0).sum(axis=1)
        table.add_row("labels per client", f"min {held.min()}, mean {held.mean():.1f}, max {held.max()}")
    if "train_clients" in meta:
        kept = len(meta["train_clients"])
        table.add_row("train / test clients", f"{kept} / {part.num_clients - kept} (split=user)")
    if meta.get("unused_samples"):
        table.add_row("unused samples", str(meta["unused_samples"]))
    table.add_row("written", str(out) + (f" and {png}" if png else ""))
    return table


@data_app.command()
def partition(
    ctx: typer.Context,
    dataset: str = typer.Option(_SIM["dataset"].default, "--dataset", "-d", help=_HELP["dataset"]),
    iid: bool = typer.Option(False, "--iid/--no-iid", help=_HELP["iid"]),
    client_num: int = typer.Option(_SIM["client_num"].default, "--client_num", "--client-num", "-cn",
                                   help="Number of clients."),
    seed: int = typer.Option(_SIM["seed"].default, "--seed", help=_HELP["seed"]),
    split: str = typer.Option("sample", "--split", help=_HELP["split"]),
    fraction: float = typer.Option(0.5, "--fraction", "-f", help=_HELP["fraction"]),
    classes: int = typer.Option(0, "--classes", "-c", help=_HELP["classes"]),
    shards: int = typer.Option(0, "--shards", "-s", help=_HELP["shards"]),
    alpha: float = typer.Option(_SIM["alpha"].default, "--alpha", "-a", help=_HELP["alpha"]),
    least_samples: int = typer.Option(_SIM["least_samples"].default, "--least_samples", "--least-samples", "-ls",
                                      help=_HELP["least"]),
    max_redraws: int = typer.Option(10000, "--max_redraws", "--max-redraws", help=_HELP["redraws"]),
    gamma: float = typer.Option(0.5, "--gamma", help="Synthetic: how much the clients' models differ."),
    beta: float = typer.Option(0.5, "--beta", help="Synthetic: how much the clients' inputs differ."),
    dimension: int = typer.Option(60, "--dimension", help="Synthetic: input dimension."),
    emnist_split: str = typer.Option("byclass", "--emnist_split", "--emnist-split", help=_HELP["emnist"]),
    semantic: bool = typer.Option(False, "--semantic/--no-semantic", "-sm", help=_HELP["semantic"]),
    semantic_features: str = typer.Option("pca", "--semantic-features", "--semantic_features",
                                          help=_HELP["features"]),
    pca_components: int = typer.Option(32, "--pca_components", "--pca-components", help=_HELP["pca"]),
    gmm_max_iter: int = typer.Option(100, "--gmm_max_iter", "--gmm-max-iter", help=_HELP["gmm_iter"]),
    gmm_init_params: str = typer.Option("kmeans", "--gmm_init_params", "--gmm-init-params", help=_HELP["gmm_init"]),
    attribute: str = typer.Option("Smiling", "--attribute", help=_HELP["attribute"]),
    max_users: int = typer.Option(0, "--max_users", "--max-users", help=_HELP["max_users"]),
    domain_classes: int = typer.Option(10, "--domain_classes", "--domain-classes", help=_HELP["domain_classes"]),
    domain_size: int = typer.Option(64, "--domain_size", "--domain-size", help=_HELP["domain_size"]),
    root: Path | None = typer.Option(None, "--root", help=_HELP["root"]),
    download: bool = typer.Option(False, "--download/--no-download", help=_HELP["download"]),
    out: Path | None = typer.Option(None, "--out", help=_HELP["out"]),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Also write the label plot beside it (.png)."),
) -> None:
    """Split a dataset among clients (the seed's generate_data.py) and save the partition as .npz."""
    name = dataset.strip().lower()
    alpha = _one_scheme(ctx, name, alpha, iid=iid, classes=classes, shards=shards, semantic=semantic)
    options: dict[str, Any] = {}
    if name == "synthetic":
        # As the seed: the synthetic set is generated per client, so these shape the data itself.
        options = {"gamma": gamma, "beta": beta, "dimension": dimension, "client_num": client_num,
                   "seed": seed, "iid": iid, "classes": classes or 10}
        iid, classes = False, 0
    elif name == "emnist":
        options = {"split": emnist_split}
    elif name == "celeba":
        options = {"attribute": attribute, "max_users": max_users}
    elif name == "domainnet":
        options = {"class_num": domain_classes, "image_size": domain_size}
    args = PartitionArgs(client_num=client_num, iid=iid, alpha=alpha, classes=classes, shards=shards,
                         least_samples=least_samples, split=split,  # type: ignore[arg-type]  # checked later
                         fraction=fraction, seed=seed, max_redraws=max_redraws, semantic=semantic,
                         semantic_features=semantic_features, pca_components=pca_components,
                         gmm_max_iter=gmm_max_iter, gmm_init_params=gmm_init_params)
    try:
        natural = name in NATURAL_DATASETS
        if out is None:
            out = _default_out(name, args, natural)
        elif out.suffix != ".npz":
            out = out.with_name(out.name + ".npz")
        if out.exists() and not force:
            _fail(f"{out} already exists; pass --force to overwrite it or choose another --out")
        data = load_dataset(name, root=root, download=download, **options)
        part = make_partition(data, args)
    except DataError as e:
        _fail(str(e))
    png = out.with_name(out.name + ".png") if plot else None  # p.npz -> p.npz.png: plainly the plot of p.npz
    saved = False
    try:
        part.save(out)
        saved = True
        if png is not None:
            plot_label_distribution(part.label_histogram, png, title=_title(data.name, part))
    except OSError as e:
        if saved:  # never leave a partition without the plot the user asked for
            out.unlink(missing_ok=True)
        _fail(f"could not write {e.filename or out}: {e.strerror or e}; choose another --out")
    _out.print(_summary(part, out, png))


def _title(name: str, part: Partition) -> str:
    args = part.meta.get("args", {})
    detail = {"dirichlet": f"alpha={args.get('alpha')}", "classes": f"{args.get('classes')} labels/client",
              "shards": f"{args.get('shards')} shards/client",
              "semantic": f"{args.get('semantic_features')} features"}.get(str(part.meta.get("scheme")), "")
    scheme = part.meta.get("scheme", "partition")
    return f"{name}: {scheme}{' ' + detail if detail else ''}, {part.num_clients} clients"


def _dataset_for(part: Partition, name: str | None, root: Path | None, download: bool) -> Dataset | None:
    recorded = part.meta.get("dataset")
    if name is None and recorded in DATASET_NAMES:
        name = recorded
    if name is None:
        return None
    return load_dataset(name, root=root, download=download, **part.dataset_options(name))


@data_app.command()
def show(
    path: Path = typer.Argument(..., help="Partition .npz: ours, or any npz of train_<c>/test_<c> indices."),
    dataset: str | None = typer.Option(
        None, "--dataset", "-d", help=f"Dataset the indices refer to [default: the one recorded]: {_NAMES}."
    ),
    root: Path | None = typer.Option(None, "--root", help="Folder holding torchvision-format files."),
    download: bool = typer.Option(False, "--download/--no-download", help="Let torchvision download missing files."),
    png: Path | None = typer.Option(None, "--png", help="Also write the label-distribution PNG here."),
) -> None:
    """Print the per-client table of a partition (ours or an external npz) and optionally its PNG."""
    try:
        part = Partition.load(path)
        # Our files carry their label histogram; load the data only when asked or when labels are missing.
        wanted = dataset is not None or part.label_histogram is None
        data = _dataset_for(part, dataset, root, download) if wanted else None
        if data is not None:
            part.check(data, source=str(path))
    except DataError as e:
        _fail(str(e))
    hist = part.label_histogram
    if png is not None and hist is None:
        _fail(f"{path} records no labels; pass -d DATASET to draw its label distribution")
    table = Table(title=f"{path} ({part.meta.get('dataset', '?')}, {part.meta.get('scheme', '?')})")
    for col in ("client", "train", "test", "labels present"):
        table.add_column(col, justify="right")
    table.add_column("top labels (label:count)")
    for c in range(part.num_clients):
        row = hist[c] if hist is not None else None
        table.add_row(str(c), str(len(part.train[c])), str(len(part.test[c])),
                      str(int((row > 0).sum())) if row is not None else "?",
                      _top_labels(row) if row is not None else "")
    _out.print(table)
    if hist is None:
        _out.print("[yellow]note:[/] no labels recorded in this file; pass -d DATASET to see them")
    if png is not None and hist is not None:
        try:
            plot_label_distribution(hist, png, title=_title(str(part.meta.get("dataset", path.stem)), part))
        except OSError as e:
            _fail(f"could not write {png}: {e.strerror or e}; choose another --png")
        _out.print(f"wrote {png}")


@data_app.command("list")
def list_datasets() -> None:
    """Print every dataset name with its inputs, classes and where its files go under --root."""
    table = Table(title="datasets")
    table.add_column("name", style="bold")
    table.add_column("inputs, classes; files under --root")
    for name in DATASET_NAMES:
        table.add_row(name, DATASET_INFO.get(name, ""))
    _out.print(table)
