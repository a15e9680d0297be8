"""What an episode leaves behind: the token sequence the trainer consumes, and a record of
each turn for people, metrics and the trajectory viewer.

The sequence is token in, token out: the first prompt, then per turn the tokens the policy
sampled (loss mask 1, with their log-probs and the policy version that sampled each) and the
observation tokens the engine appended (mask 0). Images are kept as the uint8 pixels the model
was shown, in the order their placeholders appear in the sequence; their patches are a pure
function of those pixels (`kernels.patchify`), so nothing lossy stands between rollout and
training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATUSES = ("ok", "truncated", "timeout", "error")  # "error: <reason>" carries its reason


@dataclass(slots=True)  # one object for the collector to scan, not two
class ImageRecord:
    """One image in the model's context."""

    pixels: torch.Tensor  # (3, h, w) uint8, exactly as shown
    turn: int  # 0 = the question's images; k = made by a tool in turn k
    source: str  # the task image it was cut from (file name or content key)
    task_image: int  # index of that image in the task, -1 when unknown
    box: tuple[float, float, float, float]  # region of the source, in source pixels
    caption: str = ""


@dataclass(slots=True)
class ToolCallRecord:
    name: str
    arguments: dict
    ok: bool
    error: str = ""


@dataclass(slots=True)
class TurnRecord:
    text: str  # what the model wrote
    finish_reason: str  # from the policy: stop, length, abort
    new_tokens: int
    prompt_tokens: int  # sequence length when the turn started
    generate_s: float  # first request to last chunk, retries included
    tool_s: float = 0.0
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    observation: str = ""  # the text appended after the turn (tool responses or errors)
    retries: int = 0


@dataclass
class Trajectory:
    episode_id: str
    group_id: str  # the GRPO group: one task, n samples
    sample: int  # index within the group
    task_id: str
    dataset: str
    question: str
    gold: str
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # 0.0 where loss_mask is 0
    versions: list[int] = field(default_factory=list)  # -1 where loss_mask is 0
    prompt_length: int = 0  # tokens of the first prompt
    images: list[ImageRecord] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    answer: str | None = None
    score: float = 0.0  # the benchmark's own metric for the answer
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    started_s: float = 0.0  # wall-clock (time.time) start and end
    ended_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "truncated")

    @property
    def failure(self) -> str | None:
        """The failure kind for metrics (timeout, error), None for ok/truncated episodes."""
        return None if self.ok else self.status.split(":", 1)[0]

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    def oldest_version(self) -> int | None:
        """The oldest policy version among the sampled tokens (for staleness)."""
        sampled = [v for v, m in zip(self.versions, self.loss_mask) if m]
        return min(sampled) if sampled else None

    def append(self, token_ids: list[int], *, logprobs: list[float] | None = None, version: int | list[int] = -1) -> None:
        """Extend the sequence: sampled tokens when `logprobs` is given (mask 1), else
        prompt/observation tokens (mask 0)."""
        n = len(token_ids)
        self.token_ids.extend(token_ids)
        if logprobs is None:
            self.loss_mask.extend([0] * n)
            self.logprobs.extend([0.0] * n)
            self.versions.extend([-1] * n)
            return
        if len(logprobs) != n:
            raise ValueError(f"{n} tokens but {len(logprobs)} log-probs")
        self.loss_mask.extend([1] * n)
        self.logprobs.extend(logprobs)
        self.versions.extend([version] * n if isinstance(version, int) else version)


class SequenceBuilder:
    """A trajectory's token sequence while its episode runs. Each turn extends only `token_ids`
    (every request needs them) and notes the run; `seal` writes the loss mask, log-probs and
    versions once, when the episode ends. Four growing per-token lists cost the engine ~40 us
    a turn at 4k episodes in flight; three lists allocated once at their final size, ~12 us."""

    __slots__ = ("traj", "_runs")

    def __init__(self, traj: Trajectory) -> None:
        if traj.token_ids:
            raise ValueError(f"episode {traj.episode_id}: build from an empty trajectory")
        self.traj = traj
        self._runs: list[tuple[int, list[float], list[int]]] = []  # (start, log-probs, versions) of sampled runs

    def add(self, token_ids: list[int], *, logprobs: list[float] | None = None,
            versions: list[int] | None = None) -> None:
        """Sampled tokens when `logprobs` (and their `versions`) are given, else prompt/observation tokens."""
        if logprobs is not None:
            if not len(logprobs) == len(versions) == len(token_ids):
                raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probs and {len(versions)} versions")
            self._runs.append((len(self.traj.token_ids), logprobs, versions))
        self.traj.token_ids += token_ids

    def seal(self) -> None:
        """Write the trajectory's loss mask, log-probs and versions."""
        n = len(self.traj.token_ids)
        mask, logprobs, versions = [0] * n, [0.0] * n, [-1] * n
        for start, lp, v in self._runs:
            end = start + len(lp)
            mask[start:end] = [1] * len(lp)
            logprobs[start:end] = lp
            versions[start:end] = v
        self.traj.loss_mask, self.traj.logprobs, self.traj.versions = mask, logprobs, versions
