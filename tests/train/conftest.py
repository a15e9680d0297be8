"""Fixtures: expert trajectories on medvista-mini (real images), laid out by the engine's own
token path for the tiny Qwen2.5-VL (random weights, the real Qwen tokenizer)."""

from __future__ import annotations

import pytest

from medvistagym.engine import EngineConfig, ToolExecutor, run
from medvistagym.engine.engine import Group
from medvistagym.engine.episode import Context
from medvistagym.env.config import EnvConfig
from medvistagym.env.datasets import load_tasks
from medvistagym.env.experts import build_expert
from medvistagym.policy import build_policy
from medvistagym.train.expert import expert_trajectories

ENV = EnvConfig(tools=("zoom_in",), max_turns=3)


@pytest.fixture(scope="session")
def env_config() -> EnvConfig:
    return ENV


@pytest.fixture(scope="session")
def mini_tasks():
    # Tasks with annotated regions (the oracle zooms: two images per episode) and without.
    tasks = load_tasks("medvista-mini", "train")
    zooming = [t for t in tasks if t.regions][:2]
    plain = [t for t in tasks if not t.regions][:2]
    return zooming + plain


async def _trajectories(tasks, agent_name):
    policy = build_policy("transformers", model="qwen2.5-vl-tiny")
    try:
        ctx = Context(policy, ToolExecutor("qwen2.5-vl"), ENV, EngineConfig())
        return await expert_trajectories(ctx, tasks, build_expert(agent_name, tasks, seed=1))
    finally:
        await policy.close()


@pytest.fixture(scope="session")
def oracle_trajectories(mini_tasks):
    return run(_trajectories(mini_tasks, "oracle"))


@pytest.fixture(scope="session")
def groups(mini_tasks, oracle_trajectories):
    """One GRPO group per task: the oracle's episode and a random expert's (different rewards)."""
    random_trajs = run(_trajectories(mini_tasks, "random"))
    out = []
    for task, good, bad in zip(mini_tasks, oracle_trajectories, random_trajs):
        members = [good, bad]
        for i, t in enumerate(members):
            t.group_id, t.sample, t.episode_id = task.id, i, f"{task.id}-{i}"
        out.append(Group(task.id, task, members, kept=members))
    return out
