"""Atomic, versioned, exactly resumable training checkpoints.

A checkpoint is one ``torch.save`` dict:
    format: "saq-checkpoint"            marks the file as ours
    format_version: FORMAT_VERSION      bumped whenever the layout changes incompatibly
    saq_version: str                    the package version that wrote it (informational)
    config: dict                        TrainConfig.to_dict() of the run (rebuilds the model)
    model: state_dict                   of the unwrapped model (no DDP "module." prefix)
    optimizer: state_dict               SAQ's (including its base optimizer) or the plain one
    scheduler, scaler: state_dict | None
    rng: dict                           python random, numpy, torch CPU and every CUDA device
    epoch: int                          the epoch to continue in (0-based)
    batch: int                          batches of that epoch already done (0 at epoch ends)
    global_step: int
    best: dict                          best top-1 so far and its epoch
It holds only tensors, numbers, strings, lists, tuples and dicts, so it loads with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.

Writes are atomic: the dict goes to a temp file in the target's folder, is flushed and fsynced,
then ``os.replace``d over the target. A crash or a failing save leaves the previous file intact
and no temp file behind.
"""
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "atomic_save", "capture_rng_state",
           "restore_rng_state", "make_checkpoint", "load_checkpoint", "load_model_state",
           "saq_version"]

FORMAT = "saq-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "config", "model", "optimizer", "rng", "epoch", "batch",
             "global_step")


class CheckpointError(ValueError):
    """A file that is not a usable saq checkpoint; the message names the file and the problem."""


def saq_version() -> str:
    """saq.__version__ (the package this code belongs to, installed or a source tree)."""
    try:
        import saq
        return str(saq.__version__)
    except (ImportError, AttributeError):
        return "unknown"


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str) -> None:
    """torch.save(obj) to ``path`` atomically (temp file in the same folder + fsync + os.replace).

    On any failure the temp file is removed and ``path`` keeps its previous content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        # mkstemp creates the file 0600; a checkpoint gets the permissions of any new file (the
        # umask's), as best.pt, written by copyfile, does; a file system without modes keeps its own
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def capture_rng_state() -> Dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values.

    numpy's MT19937 key (uint32[624]) is stored as an int64 tensor.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of capture_rng_state (mutates the global RNGs). CUDA states are restored for as
    many devices as both the checkpoint and this machine have."""
    py = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate needs tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and state.get("cuda"):
        k = min(len(state["cuda"]), torch.cuda.device_count())
        for i in range(k):
            torch.cuda.set_rng_state(state["cuda"][i].cpu(), i)


def make_checkpoint(*, model_state, optimizer_state, scheduler_state, scaler_state,
                    config: Dict[str, Any], epoch: int, batch: int, global_step: int,
                    best: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint dict (see the module docstring); captures the RNG states now."""
    ckpt = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "saq_version": saq_version(),
        "config": dict(config), "model": model_state, "optimizer": optimizer_state,
        "scheduler": scheduler_state, "scaler": scaler_state, "rng": capture_rng_state(),
        "epoch": int(epoch), "batch": int(batch), "global_step": int(global_step),
        "best": dict(best or {}),
    }
    if extra:
        ckpt["extra"] = dict(extra)
    return ckpt


def load_error_reason(exc: BaseException) -> str:
    """The one line of a torch.load failure worth showing. torch's weights-only message opens
    with advice to retry with weights_only=False, wrong for a damaged file and unsafe for a
    foreign one (saq never loads code from a checkpoint): keep its unpickler's reason."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and validate a saq checkpoint (weights_only: no code from the file runs).

    Raises FileNotFoundError if ``path`` does not exist and CheckpointError (a ValueError) when it
    is unreadable/corrupt, not a saq checkpoint, of another format version, or lacks keys.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is a folder; name a file in it, e.g. "
                                f"{os.path.join(path, 'last.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {path!r} cannot be read (corrupt, truncated or not "
                              f"written by torch.save): {load_error_reason(e)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a saq checkpoint (no "
                              f"format={FORMAT!r} marker); for a plain float state_dict use "
                              f"--pretrained instead")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version "
                              f"{ckpt.get('format_version')!r}; this saq "
                              f"({saq_version()}) reads version {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks key(s) {', '.join(missing)}")
    return ckpt


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
                     what: str = "the model built from its config") -> None:
    """model.load_state_dict(state, strict) with an error naming the file, the missing and
    unexpected keys and the shape mismatches (a checkpoint of another model/bits/quantizer).
    ``what``: the model, as the message names it."""
    from saq.nn.modules import BITS_KEY, INIT_KEY

    own = model.state_dict()
    # "<layer>.quant_initialized" (has the quantizer's first-batch init run?) and
    # "<layer>.quant_bits" are optional: saq checkpoints written before they existed load as
    # initialized, with the config's bits (saq/nn/modules.py)
    optional = ("." + INIT_KEY, "." + BITS_KEY)
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(own[k].shape)]
    # a layer of other bits has the same shapes: its bits entry tells (4.0 == 4 for an average)
    bits = [f"{k[:-len(BITS_KEY) - 1]}: checkpoint {state[k].tolist()} vs model {own[k].tolist()}"
            for k in own if k.endswith("." + BITS_KEY) and k in state
            and hasattr(state[k], "tolist") and tuple(state[k].shape) == tuple(own[k].shape)
            and state[k].tolist() != own[k].tolist()]
    if missing or unexpected or shapes or bits:
        def cut(xs):
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {cut(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {cut(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {cut(shapes)}")
        if bits:
            parts.append(f"bits [weights, activations] mismatch: {cut(bits)}")
        raise CheckpointError(f"checkpoint {path!r} does not fit {what} ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
