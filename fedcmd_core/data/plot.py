"""PNG of a partition's per-client label distribution (stacked bars, one colour per class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcmd_core.atomic import atomic_write


def plot_label_distribution(histogram: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Draw ``histogram`` [clients, classes] as stacked bars and write it to ``path`` atomically."""
    # Figure + Agg canvas directly: no pyplot global state, works without a display.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hist = np.asarray(histogram, dtype=np.int64)
    clients, classes = hist.shape
    fig = Figure(figsize=(min(4 + 0.18 * clients, 24), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab10" if classes <= 10 else "tab20" if classes <= 20 else "turbo"]
    x = np.arange(clients)
    bottom = np.zeros(clients)
    for k in range(classes):
        colour = cmap(k) if classes <= 20 else cmap(k / max(classes - 1, 1))
        ax.bar(x, hist[:, k], bottom=bottom, width=0.85, color=colour, label=str(k), linewidth=0)
        bottom += hist[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("samples (train + test)")
    ax.set_title(title or f"label distribution over {clients} clients")
    ax.set_xlim(-0.6, clients - 0.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # clients are whole numbers
    ax.margins(y=0.05)
    if classes <= 20:
        ax.legend(title="label", fontsize=7, ncols=2 if classes > 10 else 1, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()

    return atomic_write(path, lambda f: fig.savefig(f, format="png"), make_parents=True)
