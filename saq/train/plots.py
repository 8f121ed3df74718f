"""Loss and accuracy curves as PNG files, drawn with matplotlib's Agg canvas.

Uses ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly instead of pyplot, so the plots
need no display, never change the process-wide matplotlib backend and leak no open figures.
"""
import os
from typing import Any, Dict, List, Sequence

__all__ = ["plot_curves", "plot_landscape"]


def _save(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def plot_curves(rows: List[Dict[str, Any]], out_dir: str, title: str = "") -> Sequence[str]:
    """Write <out_dir>/loss.png (train and test loss per epoch) and <out_dir>/accuracy.png (train
    accuracy, test top-1 and top-5 per epoch) from metrics rows; returns the two paths."""
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in rows]
    paths = []
    for name, series, ylabel in (
            ("loss.png", (("train (pass-1)", "train_loss"), ("test", "test_loss")), "loss"),
            ("accuracy.png", (("train top-1", "train_acc"), ("test top-1", "top1"),
                              ("test top-5", "top5")), "accuracy (%)")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
        for label, key in series:
            ax.plot(ep, [r[key] for r in rows], marker="o" if len(ep) < 30 else None,
                    markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        _save(fig, path)
        paths.append(path)
    return paths


def plot_landscape(alphas: Sequence[float], losses: Sequence[float], path: str,
                   title: str = "") -> str:
    """Write the loss along a random filter-normalized direction (``saq analyze --landscape``)
    to ``path`` (PNG); returns it."""
    from matplotlib.figure import Figure

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(alphas), list(losses), marker="o" if len(alphas) < 30 else None, markersize=3)
    ax.axvline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel("alpha (Q(w) + alpha * d, d filter-normalized)")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path
