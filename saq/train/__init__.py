"""The training package behind ``saq train`` / ``saq eval``: configuration and presets, the
SAQ/SAM/QAT loop, atomic resumable checkpoints, metrics, plots and torchrun support.

    from saq.train import TrainConfig, build_config, train
    summary = train(build_config({"epochs": 5, "out": "runs/try"}))
"""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import PRESETS, ConfigError, TrainConfig
from .loop import build_config, build_model, build_optimizer, evaluate, evaluate_checkpoint, train

__all__ = ["TrainConfig", "PRESETS", "ConfigError", "CheckpointError", "build_config",
           "build_model", "build_optimizer", "evaluate", "evaluate_checkpoint", "train",
           "atomic_save", "load_checkpoint"]
