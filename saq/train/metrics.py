"""Per-epoch metrics (metrics.jsonl + metrics.csv), the run summary (summary.json) and meters.

One row per epoch, same fields in both files (CSV columns in EPOCH_FIELDS order):
    epoch            1-based epoch number
    steps            optimizer steps run in the epoch (after a mid-epoch resume: the rest)
    train_loss       mean pass-1 loss over the epoch's training samples (all ranks)
    train_acc        top-1 % of the pass-1 predictions on those samples
    test_loss, top1, top5   on the whole test split (summed over ranks)
    lr               learning rate of the first parameter group at the end of the epoch
    epoch_time       seconds for the epoch (training + evaluation)
    time_per_step    training seconds per optimizer step (excluding evaluation)
    images_per_s     training images per second, all ranks together
    skipped_steps    steps whose update was skipped for non-finite gradients (fp16 overflow)
"""
import csv
import json
import math
import os
from typing import Any, Dict, List, Optional

import torch

__all__ = ["EPOCH_FIELDS", "MetricsLogger", "read_jsonl", "summarize", "format_summary",
           "write_json", "topk_correct"]

EPOCH_FIELDS = ("epoch", "steps", "train_loss", "train_acc", "test_loss", "top1", "top5", "lr",
                "epoch_time", "time_per_step", "images_per_s", "skipped_steps")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> List[torch.Tensor]:
    """Number of samples whose target is in the top-k logits, for each k (k capped at the class
    count), as 0-dim float tensors on the logits' device (no host sync).

    logits [B, C], target [B] int64.
    """
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = pred.eq(target[:, None])
    return [hit[:, :min(k, kmax)].any(dim=1).sum().float() for k in ks]


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSONL file ([] when the file does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON through a temp file + os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one row per epoch to <out>/metrics.jsonl and <out>/metrics.csv.

    enabled=False (non-zero ranks) makes every method a no-op that returns nothing.
    ``truncate(first_epoch)`` drops rows with epoch >= first_epoch from both files (a resumed run
    redoes those epochs, so its rows replace theirs).
    """

    def __init__(self, out_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")

    def rows(self) -> List[Dict[str, Any]]:
        return read_jsonl(self.jsonl)

    def truncate(self, first_epoch: int) -> None:
        if not self.enabled:
            return
        kept = [r for r in self.rows() if r.get("epoch", 0) < first_epoch]
        for p in (self.jsonl, self.csv):
            if os.path.exists(p):
                os.remove(p)
        for r in kept:
            self.log(r)

    def log(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not os.path.exists(self.csv) or os.path.getsize(self.csv) == 0
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(EPOCH_FIELDS), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in EPOCH_FIELDS})


def summarize(rows: List[Dict[str, Any]], total_time: float,
              extra: Optional[Dict[str, Any]] = None, partial_last: bool = False) -> Dict[str, Any]:
    """Summary of a run from its epoch rows: best and final top-1/top-5/test loss, final train
    loss, mean time per step and images/s weighted by steps, total time (seconds). ``extra``
    entries are added last (and win: the loop passes the true global step count as "steps",
    since a row resumed mid-epoch counts only the steps run after the resume).
    ``partial_last``: the last row is a run stopped mid-epoch; it is the final state but not a
    candidate for best while a whole epoch exists (as for best.pt), and "last_epoch_partial"
    says so."""
    s: Dict[str, Any] = {"epochs": len(rows), "total_time": total_time}
    if partial_last:
        s["last_epoch_partial"] = True
    if rows:
        whole = rows[:-1] if partial_last and len(rows) > 1 else rows
        best = max(whole, key=lambda r: r["top1"])
        last = rows[-1]
        steps = sum(r["steps"] for r in rows)
        train_time = sum(r["time_per_step"] * r["steps"] for r in rows)
        images = sum(r["images_per_s"] * r["time_per_step"] * r["steps"] for r in rows)
        s.update({
            "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
            "final_top1": last["top1"], "final_top5": last["top5"],
            "final_test_loss": last["test_loss"], "final_train_loss": last["train_loss"],
            "final_train_acc": last["train_acc"], "steps": steps,
            "time_per_step": train_time / steps if steps else math.nan,
            "images_per_s": images / train_time if train_time > 0 else math.nan,
            "skipped_steps": sum(r.get("skipped_steps", 0) for r in rows),
        })
    if extra:
        s.update(extra)
    return s


def format_summary(s: Dict[str, Any]) -> str:
    """A few human-readable lines of a summary dict."""
    if "final_top1" not in s:
        return f"no epoch finished (total {s.get('total_time', 0):.1f} s)"
    return "\n".join([
        f"final: top-1 {s['final_top1']:.2f}%  top-5 {s['final_top5']:.2f}%  "
        f"test loss {s['final_test_loss']:.4f}  train loss {s['final_train_loss']:.4f}",
        f"best:  top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']})  "
        f"top-5 {s['best_top5']:.2f}%",
        f"speed: {s['time_per_step'] * 1e3:.1f} ms/step  {s['images_per_s']:.0f} images/s  "
        f"{s['steps']} steps  {s['skipped_steps']} skipped  total {s['total_time']:.1f} s",
    ])
