"""Behaviour-cloning data: scripted experts acting through the engine's own token path.

VISTA-Gym's recipe warms a policy up on expert trajectories before RL. A random-weight model
never emits a well-formed tool call, so GRPO would have nothing to compare; a few steps of
cloning the oracle teach the protocol (think, zoom on a box, answer) and RL takes over.

The expert's text goes through exactly what the engine does with a model's turn (the same
prompt tokens, the environment's step, rendered tool images and observation tokens), so a
cloned trajectory is laid out like a rolled-out one and packs and trains the same way: the
expert's tokens have loss mask 1, everything else 0.
"""

from __future__ import annotations

import logging
from typing import Sequence

from ..engine.episode import Context, act, first_turn, record_images, settle
from ..engine.trajectory import Trajectory, TurnRecord
from ..env.episode import Episode
from ..env.experts import Agent
from ..env.images import ImageStore
from ..env.task import Task

log = logging.getLogger(__name__)


async def expert_trajectory(ctx: Context, task: Task, agent: Agent, store: ImageStore, episode_id: str) -> Trajectory:
    """One episode of `agent` on `task`, as a trajectory whose model tokens are the agent's."""
    traj = Trajectory(episode_id, episode_id, 0, task.id, task.dataset, task.question, str(task.answer))
    episode = Episode(task, ctx.env, store)
    observation = episode.start()
    first = await first_turn(ctx, episode, observation.views)
    traj.append(first.prompt_ids)
    traj.prompt_length = len(first.prompt_ids)
    record_images(traj, episode, first.rendered, observation.views, 0)
    while not episode.done:
        text = agent.act(episode)
        ids = ctx.encode(text)
        start = len(traj.token_ids)
        traj.append(ids, logprobs=[0.0] * len(ids), version=0)
        turn = TurnRecord(text, "stop", len(ids), start, 0.0)
        traj.turns.append(turn)
        observation = act(ctx, episode, text, turn)
        if episode.done:
            break
        rendered = await ctx.executor.render(observation.views)
        record_images(traj, episode, rendered, observation.views, len(traj.turns))
        traj.append(ctx.observation_ids(ids[-1], observation.text, rendered))
        turn.observation = observation.text
    settle(ctx, episode, traj)
    return traj


async def expert_trajectories(ctx: Context, tasks: Sequence[Task], agent: Agent, store: ImageStore | None = None,
                              ) -> list[Trajectory]:
    """The agent's episode on every task, in task order. A task whose images cannot be read is
    skipped with a warning naming it: there is nothing to clone."""
    store = store or ImageStore()
    out = []
    for i, task in enumerate(tasks):
        try:
            out.append(await expert_trajectory(ctx, task, agent, store, f"bc{i}"))
        except (OSError, ValueError) as err:
            log.warning("behaviour cloning skips task %s: %s: %s", task.id, type(err).__name__, err)
    return out
