"""Held-out evaluation of a policy through the rollout engine: greedy, one episode per task,
the RL reward and each benchmark's own metric (`score`) side by side."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Sequence

from ..engine import EngineConfig, RolloutEngine
from ..engine.trajectory import Trajectory
from ..env.config import EnvConfig
from ..env.evaluation import EpisodeResult, result
from ..env.task import Task
from ..policy import Policy


async def rollout_eval(policy: Policy, tasks: Sequence[Task], env: EnvConfig, engine: EngineConfig,
                       ) -> list[Trajectory]:
    """Every task once, greedy; all trajectories, failed ones included."""
    config = replace(engine, group_size=1, temperature=0.0, top_p=1.0, top_k=0, max_staleness=None)
    groups = await RolloutEngine(policy, env, config).generate(tasks)
    return [t for g in groups for t in g.trajectories]


def summarize(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Mean reward, accuracy (the benchmark metric), well-formed answers, tool calls and
    turns per episode, failures; and accuracy per data set."""
    n = max(len(trajectories), 1)
    out = {
        "episodes": float(len(trajectories)),
        "reward": sum(t.reward for t in trajectories) / n,
        "accuracy": sum(t.score for t in trajectories) / n,
        "answered": sum(t.answer is not None for t in trajectories) / n,
        "tool_calls": sum(len(c.tool_calls) for t in trajectories for c in t.turns) / n,
        "turns": sum(len(t.turns) for t in trajectories) / n,
        "failed": sum(not t.ok for t in trajectories) / n,
    }
    for part in ("correct", "format", "tool", "penalty"):
        out[f"reward/{part}"] = sum(t.reward_parts.get(part, 0.0) for t in trajectories) / n
    by_dataset: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        by_dataset[t.dataset].append(t.score)
    for name, scores in by_dataset.items():
        out[f"accuracy/{name}"] = sum(scores) / len(scores)
    return out


def episode_results(tasks: Sequence[Task], trajectories: Sequence[Trajectory]) -> list[EpisodeResult]:
    """Trajectories as `env.evaluation` results, for its per-answer-type report."""
    by_id = {t.id: t for t in tasks}
    return [result(by_id[t.task_id], t.status, t.score, t.reward, len(t.turns), sum(len(c.tool_calls) for c in t.turns))
            for t in trajectories]
