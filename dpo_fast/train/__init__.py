"""The dpo_fast trainer: `train(config)` / `DPOFastTrainer`, composed of small modules.

config (options), model_loading, optim, ref_cache, logging, checkpoint, sft, loop, trainer.
"""
from __future__ import annotations

from .config import DEFAULT_LR, TrainConfig
from .trainer import DPOFastTrainer, TrainResult, train

__all__ = ["TrainConfig", "DPOFastTrainer", "TrainResult", "train", "DEFAULT_LR"]
