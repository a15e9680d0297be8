"""Engine counters: what was submitted, started, finished (by status and failure kind), tokens,
turns, tool calls and retries; `snapshot` adds rates, in-flight counts, queue depths and the
ToolExecutor's batching, for the progress display and TensorBoard."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .trajectory import Trajectory

if TYPE_CHECKING:
    from .engine import RolloutEngine


def failure_kind(status: str) -> str:
    """"error: policy: boom" -> "error: policy"; other statuses as they are."""
    parts = status.split(":")
    return ":".join(parts[:2]).strip() if parts[0] == "error" and len(parts) > 1 else parts[0]


class Metrics:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.episodes_submitted = self.episodes_started = self.episodes_finished = 0
        self.statuses: Counter[str] = Counter()
        self.model_tokens = self.turns = self.tool_calls = self.retries = 0
        self.groups_done = 0
        self.groups_dropped: Counter[str] = Counter()

    def submitted(self, n: int) -> None:
        self.episodes_submitted += n

    def started(self, n: int) -> None:
        self.episodes_started += n

    def finished(self, traj: Trajectory) -> None:
        self.episodes_finished += 1
        self.statuses[failure_kind(traj.status)] += 1
        self.turns += len(traj.turns)
        for turn in traj.turns:  # per turn, not per token
            self.model_tokens += turn.new_tokens
            self.tool_calls += len(turn.tool_calls)
            self.retries += turn.retries

    def group(self, dropped: str | None) -> None:
        self.groups_done += 1
        if dropped is not None:
            self.groups_dropped[dropped] += 1

    def snapshot(self, engine: "RolloutEngine | None" = None) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out: dict[str, Any] = {
            "elapsed_s": elapsed,
            "episodes/submitted": self.episodes_submitted,
            "episodes/finished": self.episodes_finished,
            "episodes/per_s": self.episodes_finished / elapsed,
            "tokens/model": self.model_tokens,
            "tokens/per_s": self.model_tokens / elapsed,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "retries": self.retries,
            "groups/done": self.groups_done,
            **{f"status/{k}": v for k, v in self.statuses.items()},
            **{f"groups/dropped/{k}": v for k, v in self.groups_dropped.items()},
        }
        if engine is not None:
            ex = engine.executor
            out.update({
                "in_flight/episodes": engine.in_flight,
                "in_flight/tokens": engine.tokens_in_flight,
                "queue/pending_groups": engine.pending_groups,
                "queue/done_groups": engine.done_groups,
                "tools/batches": ex.batches,
                "tools/views_per_batch": ex.views / max(ex.batches, 1),
                "tools/unique_fraction": ex.unique_views / max(ex.views, 1),
                "tools/render_ms_per_batch": 1e3 * ex.render_s / max(ex.batches, 1),
                "tools/failures": ex.failures,
                "policy/version": engine.policy.version,
            })
        return out


class TensorBoardLogger:
    """Snapshots as TensorBoard scalars (numbers only)."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def log(self, snapshot: dict[str, Any], step: int) -> None:
        for key, value in snapshot.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"rollout/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
