"""``fedcmd algorithms [NAME]``: every algorithm (built in and installed plugins) with a line of description
and each hyper-parameter's default, type and meaning, read from its ``Params`` model."""

from __future__ import annotations

import re
import sys
import typing
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cloud.cli.errors import fail

_out = Console(highlight=False)
# Keys several algorithms share, whose Params leave the meaning to the name.
SHARED_MEANINGS = {
    "share_bn_stats": "average BatchNorm running statistics too (false: they stay on each device)",
    "personal_layers": "layers that stay on the device",
    "head_layers": "layers of the head",
    "selection_metric": "how layer embeddings are compared in the vote",
    "embedding": "the per-sample embedding of a layer's output",
    "body_mode": "weighted: similarity-weighted bodies; relay: the body passes device to device",
    "finetune": "what evaluation fine-tunes: the full model or the head",
}


def _kind(annotation: Any) -> str:
    """A short, honest name for a field's type: the choices of a Literal, else the type's name."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin is tuple or origin is list:
        return f"list of {_kind(args[0])}" if args else "list"
    if args:  # a union such as float | int or str | None
        return " | ".join(_kind(a) for a in args)
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "none")


def _description(record: Any) -> str:
    """The first paragraph of the algorithm's module docstring (its paper and what it does), one line."""
    doc = sys.modules[record.server.__module__].__doc__ or record.params.__doc__ or ""
    first = " ".join(doc.strip().split("\n\n")[0].replace("``", "`").split())
    # design notes outside the package are no help to a user of it
    return re.sub(r"\s*(?:as )?(?:DESIGN|REFERENCE)\.md(?: §[\d.]+)?(?: defines it)?", "", first)


def _params_table(record: Any) -> Table | Text:
    fields = record.params.model_fields
    if not fields:
        return Text("  no hyper-parameters", style="dim")
    table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 2))
    for col in ("key", "default", "type", "meaning"):
        table.add_column(col, overflow="fold")
    for key, field in fields.items():
        default = field.get_default(call_default_factory=True)
        table.add_row(key, repr(default), _kind(field.annotation), field.description or SHARED_MEANINGS.get(key, ""))
    return table


def algorithms(
    name: Optional[str] = typer.Argument(None, help="Show only this algorithm."),
) -> None:
    """List every algorithm with its hyper-parameters (--hp KEY=VALUE, or [hp.<algo>] in a config file)."""
    from fedcmd_core.strategies import algorithms as registry
    from fedcmd_core.strategies import record

    if name is not None:
        try:
            records = [record(name)]
        except ValueError as e:
            fail(str(e))
    else:
        records = list(registry().values())
    for r in records:
        _out.print(Text(r.name, style="bold cyan"), Text(f"  {_description(r)}"), sep="", soft_wrap=False)
        _out.print(_params_table(r))
        _out.print()
