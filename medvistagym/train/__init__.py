"""GRPO training: advantages, packing, the fused loss, weight sync, checkpoints, and the job
(`medvistagym train`) that evaluates, warm-starts by behaviour cloning and trains."""

from .config import LossConfig, OptimConfig, TrainConfig, WarmStartConfig
from .loop import train
from .trainer import GRPOTrainer

__all__ = ["GRPOTrainer", "LossConfig", "OptimConfig", "TrainConfig", "WarmStartConfig", "train"]
