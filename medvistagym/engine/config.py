"""Rollout engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..env.protocol import STOP_STRINGS
from ..policy import SamplingParams

FAILED_MEMBER_RULES = ("drop_group", "keep_ok")


@dataclass(frozen=True)
class EngineConfig:
    group_size: int = 8  # GRPO samples per task
    # Admission: episodes start only while both limits hold; submit() waits once
    # max_pending_groups groups are queued behind them.
    max_episodes_in_flight: int = 1024
    max_tokens_in_flight: int = 16_000_000  # summed sequence lengths of the episodes in flight
    max_pending_groups: int = 256
    # Sampling, per turn.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512  # per turn
    max_episode_tokens: int = 16384  # prompt + every turn + observations; past it the episode is truncated
    seed: int = 0  # episode i of a group samples with seed hash(seed, task, i)
    # Failures.
    turn_timeout_s: float = 300.0  # one policy turn, from request to last chunk
    episode_deadline_s: float = 1800.0
    max_retries: int = 2  # retryable policy errors per turn
    retry_backoff_s: float = 0.2  # doubled per retry
    failed_members: str = "drop_group"  # "drop_group": a group with a failed member is not handed out;
    # "keep_ok": hand out its ok members if at least min_group_members remain
    min_group_members: int = 2
    max_staleness: int | None = None  # versions: a group whose oldest token is older is dropped
    # Tool batching: calls from many episodes are rendered together.
    tool_batch_window_s: float = 0.002
    tool_batch_max: int = 512
    # Move everything alive when the engine starts (model, tokenizer, images) out of the garbage
    # collector's sight, as vLLM does: full collections then scan only rollout objects.
    freeze_gc: bool = True
    # The collector's generation-0 threshold while the engine runs (process-wide; Python's default is
    # 700): thousands of episodes keep many young objects alive, and each collection scans them all.
    # None leaves it as it is.
    gc_threshold: int | None = 50_000

    def __post_init__(self) -> None:
        positive = ("group_size", "max_episodes_in_flight", "max_tokens_in_flight", "max_pending_groups",
                    "max_new_tokens", "max_episode_tokens", "tool_batch_max", "gc_threshold")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.failed_members not in FAILED_MEMBER_RULES:
            raise ValueError(f"failed_members must be one of {FAILED_MEMBER_RULES}, got {self.failed_members!r}")
        if self.max_retries < 0 or self.turn_timeout_s <= 0 or self.episode_deadline_s <= 0:
            raise ValueError("max_retries must be >= 0 and timeouts > 0")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        _ = self._sampling  # checks temperature, top_p and top_k now

    def sampling(self, max_new_tokens: int, seed: int) -> SamplingParams:
        return self._sampling.for_request(max_new_tokens, seed)

    @cached_property
    def _sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop=STOP_STRINGS)
