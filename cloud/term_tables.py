"""Tables that fit the terminal they are printed on (``fedcmd simulate``'s rounds, ``fedcmd bench fleet``).

The layout is chosen when rich renders, from the width it has: the full column names; else short names
with a legend below; else, narrower still, one ``name: value | ...`` block per row (folded, never cut).
Nothing is abbreviated to ``fed…``: every value is printed whole in every layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.table import Table
from rich.text import Text

GAP = 3  # what rich puts between two columns: " │ "
EDGE = 4  # the outer border and padding of a table with edges


@dataclass(frozen=True)
class Column:
    name: str
    short: str = ""  # "" = the name is already short
    legend: str = ""  # what the short name stands for, when it is not obvious
    left: bool = False  # left-aligned (text); numbers are right-aligned

    @property
    def brief(self) -> str:
        return self.short or self.name


def _needed(names: Sequence[str], rows: Sequence[Sequence[str]], edge: bool) -> int:
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    return sum(widths) + GAP * (len(widths) - 1) + (EDGE if edge else 0)


@dataclass
class AdaptiveTable:
    columns: Sequence[Column]
    rows: Sequence[Sequence[str]] = field(default_factory=list)
    title: str | None = None
    caption: str | None = None
    edge: bool = True  # a boxed table (False: the compact style of simulate's round tables)

    def _table(self, names: Sequence[str]) -> Table:
        table = Table(title=self.title, caption=self.caption, show_edge=self.edge, pad_edge=self.edge)
        for c, name in zip(self.columns, names):
            table.add_column(name, justify="left" if c.left else "right", no_wrap=True)
        for row in self.rows:
            table.add_row(*row)
        return table

    def layout(self, width: int) -> str:
        """"full", "short" or "rows": what fits ``width`` columns."""
        if _needed([c.name for c in self.columns], self.rows, self.edge) <= width:
            return "full"
        if _needed([c.brief for c in self.columns], self.rows, self.edge) <= width:
            return "short"
        return "rows"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        chosen = self.layout(options.max_width)
        if chosen == "full":
            yield self._table([c.name for c in self.columns])
            return
        legend = "; ".join(f"{c.brief} = {c.legend or c.name}" for c in self.columns if c.brief != c.name)
        if chosen == "short":
            yield Group(self._table([c.brief for c in self.columns]), Text(legend, style="dim"))
            return
        lines: list[RenderableType] = [Text(self.title, style="bold")] if self.title else []
        for row in self.rows:
            lines.append(Text(" | ".join(f"{c.brief}: {v}" for c, v in zip(self.columns, row)), overflow="fold"))
        if legend:
            lines.append(Text(legend, style="dim", overflow="fold"))
        if self.caption:
            lines.append(Text(self.caption, style="dim", overflow="fold"))
        yield Group(*lines)
