"""Loss and accuracy curves as PNG files, drawn with matplotlib's Agg canvas.

Uses ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly instead of pyplot, so the plots
need no display, never change the process-wide matplotlib backend and leak no open figures.
"""
import os
from typing import Any, Dict, List, Sequence

__all__ = ["plot_curves"]


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
