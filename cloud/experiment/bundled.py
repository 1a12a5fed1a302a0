"""The grid files shipped with the package (``cloud/experiment/grids/*.toml``; ``experiments/*.toml`` in the
repository are links to them), so ``fedcmd experiment offline`` works from any folder of any install."""

from __future__ import annotations

from pathlib import Path

GRIDS = Path(__file__).resolve().parent / "grids"


def bundled_grids() -> dict[str, Path]:
    """Name (the file's stem) -> path of every shipped grid."""
    return {p.stem: p for p in sorted(GRIDS.glob("*.toml"))}


def find_grid(name_or_path: Path) -> Path | None:
    """An existing file as given, else the shipped grid of that name (``offline`` or ``offline.toml``)."""
    if name_or_path.is_file():
        return name_or_path
    if name_or_path.parent != Path("."):
        return None  # a path that does not exist is not a grid name
    return bundled_grids().get(name_or_path.name.removesuffix(".toml"))
