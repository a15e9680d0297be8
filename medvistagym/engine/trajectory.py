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
from typing import Callable

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


# A run of sampled tokens: where it starts in the sequence, their log-probs and the policy
# version that sampled each. Everything else in the sequence is prompt or observation.
SampledRun = tuple[int, list[float], list[int]]


@dataclass
class Trajectory:
    """An episode's record. The per-token training data is kept as `sampled` runs, not as flat
    per-token lists: an episode grows by a run per turn, and at thousands of episodes in flight
    three more lists of the whole sequence cost the engine ~25 us a turn in allocation, page
    faults and freeing. `loss_mask`, `logprobs` and `versions` are the flat views, built on
    each access (read them once)."""

    episode_id: str
    group_id: str  # the GRPO group: one task, n samples
    sample: int  # index within the group
    task_id: str
    dataset: str
    question: str
    gold: str
    token_ids: list[int] = field(default_factory=list)
    sampled: list[SampledRun] = field(default_factory=list)  # in sequence order, disjoint
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
    def loss_mask(self) -> list[int]:
        """1 for sampled tokens, 0 for prompt and observations."""
        return self._spread(0, lambda lp, v: [1] * len(lp))

    @property
    def logprobs(self) -> list[float]:
        """Sampled tokens' log-probs, 0.0 elsewhere."""
        return self._spread(0.0, lambda lp, v: lp)

    @property
    def versions(self) -> list[int]:
        """The policy version that sampled each token, -1 elsewhere."""
        return self._spread(-1, lambda lp, v: v)

    def _spread(self, fill: float, values: Callable[[list[float], list[int]], list]) -> list:
        out = [fill] * len(self.token_ids)
        for start, lp, v in self.sampled:
            out[start:start + len(lp)] = values(lp, v)
        return out

    @property
    def model_tokens(self) -> int:
        return sum(len(lp) for _, lp, _ in self.sampled)

    def oldest_version(self) -> int | None:
        """The oldest policy version among the sampled tokens (for staleness)."""
        return min((min(v) for _, _, v in self.sampled if v), default=None)

    def append(self, token_ids: list[int], *, logprobs: list[float] | None = None,
               version: int | list[int] = -1) -> None:
        """Extend the sequence: sampled tokens when `logprobs` is given (a run, with the policy
        `version` of all or of each), else prompt/observation tokens. The run keeps the lists
        it is given: the caller hands them over."""
        if logprobs is not None:
            versions = [version] * len(token_ids) if isinstance(version, int) else version
            if not len(logprobs) == len(versions) == len(token_ids):
                raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probs and {len(versions)} versions")
            self.sampled.append((len(self.token_ids), logprobs, versions))
        self.token_ids += token_ids

    def check(self) -> None:
        """Raise if the sampled runs are not aligned, in order and inside the sequence: they
        would train on the wrong tokens."""
        end = 0
        for start, lp, v in self.sampled:
            if len(lp) != len(v) or start < end:
                raise ValueError(f"episode {self.episode_id}: sampled runs overlap, or their log-probs and "
                                 "versions differ in length")
            end = start + len(lp)
        if end > len(self.token_ids):
            raise ValueError(f"episode {self.episode_id}: sampled runs go past the {len(self.token_ids)} tokens")


def sampled_runs(loss_mask: list[int], logprobs: list[float], versions: list[int]) -> list[SampledRun]:
    """The runs of flat per-token lists: each maximal block of mask 1 (adjacent runs merge)."""
    if not len(loss_mask) == len(logprobs) == len(versions):
        raise ValueError("loss_mask, logprobs and versions differ in length")
    runs, start = [], None
    for i, m in enumerate([*loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, list(logprobs[start:i]), list(versions[start:i])))
            start = None
    return runs
