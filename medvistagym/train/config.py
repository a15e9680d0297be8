"""Training configuration: one dataclass per concern, one TrainConfig holding them.

The defaults are the CPU demo (`medvistagym train` with no arguments): the tiny Qwen2.5-VL on
medvista-mini, a short behaviour-cloning warm start, then GRPO, all within minutes on two
cores. Real runs load a YAML preset (configs/*.yaml) and override `key=value`, dotted for the
nested sections (`optim.lr=1e-6`, `engine.group_size=16`, `env.max_turns=4`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.config import EngineConfig
from ..env.config import EnvConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
SCHEDULES = ("constant", "linear", "cosine")
MODES = ("sync", "async")


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "dapo"
    importance_level: str = "token"  # "sequence": GSPO
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher
    dual_clip: float | None = None  # e.g. 3.0
    beta: float = 0.0  # k3 KL to a frozen reference model; > 0 loads one
    tis_cap: float | None = 2.0  # truncated importance weight against the sampler's log-probs; None: off
    chunk_size: int | None = None  # tokens per loss chunk; None: sized from the vocabulary

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_level not in ("token", "sequence"):
            raise ValueError(f"importance_level must be 'token' or 'sequence', got {self.importance_level!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: constant, linear or cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ValueError("lr and max_grad_norm must be > 0")


@dataclass(frozen=True)
class WarmStartConfig:
    """Behaviour cloning of a scripted expert before GRPO (VISTA-Gym's recipe); steps=0: off."""

    expert: str = "oracle"
    steps: int = 100
    tasks_per_step: int = 8
    lr: float = 3e-3


@dataclass(frozen=True)
class TrainConfig:
    # Model and rollout back end.
    model: str = "qwen2.5-vl-tiny"  # a preset or a Hugging Face model directory
    policy: str = "transformers"  # rollout back end: transformers (in process) or vllm
    policy_args: dict = field(default_factory=dict)  # to the back end's constructor
    dtype: str = "float32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    # Data.
    datasets: tuple[str, ...] = ("medvista-mini",)  # trained on together, shuffled as one list
    split: str = "train"
    data_root: str | None = None  # a folder with one subfolder per benchmark (else $MEDVISTAGYM_DATA)
    eval_datasets: tuple[str, ...] = ("medvista-mini",)
    eval_split: str = "test"
    eval_limit: int = 0  # tasks per eval data set; 0: all
    # GRPO.
    steps: int = 16
    tasks_per_step: int = 6  # groups per step (engine.group_size episodes each)
    updates_per_step: int = 1  # optimizer steps per rollout batch (> 1: old log-probs recomputed first)
    advantage_scale: str = "group"  # divide by the group's std, the batch's, or not at all (Dr. GRPO)
    skip_uniform_groups: bool = True  # groups with equal rewards carry no signal: not trained on
    micro_batch_tokens: int = 4096  # packed tokens per forward
    mode: str = "sync"  # async: rollout of step k+1 overlaps training of step k
    max_staleness: int = 1  # async: policy versions a token may lag behind the trained weights
    # Bookkeeping.
    seed: int = 0
    output_dir: str = "runs/train"
    checkpoint_every: int = 4  # steps; the last step always saves
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; 0: only before and after
    sample_trajectories: int = 32  # written per eval, for `medvistagym view`
    progress: bool = True
    # Sections.
    env: EnvConfig = field(default_factory=lambda: EnvConfig(tools=("zoom_in",), max_turns=3))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        group_size=6, max_new_tokens=96, max_episode_tokens=2048, max_episodes_in_flight=256, turn_timeout_s=600.0))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def __post_init__(self) -> None:
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(f"advantage_scale must be one of {ADVANTAGE_SCALES}, got {self.advantage_scale!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("tasks_per_step", "updates_per_step", "micro_batch_tokens", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.steps < 0 or self.max_staleness < 0:
            raise ValueError("steps and max_staleness must be >= 0")
