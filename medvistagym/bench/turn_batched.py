"""The baseline of `bench rollout`: the synchronous, turn-batched rollout loop peers run.

A batch of episodes (whole GRPO groups) advances one turn at a time: every active episode's
request goes to the policy at once and the loop waits for all of them (as `llm.generate(batch)`
does), so each turn lasts as long as its slowest member; then, one episode after the other, the
loop parses the turn, runs its tool calls one call at a time with PIL (crop + resize per view
from the source's PIL image, patchify per image) and appends the observation; then the next
turn. The next batch starts when the last episode of this one is done.

Everything else is shared with the engine so that only the scheduling differs: the policy, the
environment, the sampling seeds (so a simulated policy writes the same scripts for both), the
chat template and observation tokens, and the Trajectory records.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..engine.config import EngineConfig
from ..engine.engine import episode_seed
from ..engine.episode import Context, act, record_images, settle
from ..engine.tools import Rendered, join_images
from ..engine.trajectory import Trajectory, TurnRecord
from ..env.config import EnvConfig
from ..env.episode import Episode
from ..env.images import ImageStore
from ..env.task import Task
from ..env.views import View, show
from ..kernels import PRESETS, patchify
from ..policy import Completion, GenerateRequest, ImageInputs, Policy

PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class PilTools:
    """Tool images one call at a time: PIL crop + resize of each view, then its patches."""

    def __init__(self, vision: str, patches: bool, mode: str = "bicubic") -> None:
        self.vision, self.patches, self.filter = vision, patches, PIL_FILTERS[mode]
        self.patch_size = PRESETS[vision].patch_size
        self._sources: dict[str, list[Image.Image]] = {}  # the loaded images, as peers keep them

    def render(self, views: Sequence[View]) -> Rendered:
        pixels = [self._one(view) for view in views]
        pixels = [p.expand(3, -1, -1).contiguous() if p.shape[0] == 1 else p for p in pixels]
        if not pixels:
            return Rendered.empty()
        if self.patches:
            parts = [patchify([p], self.vision) for p in pixels]
            return Rendered(pixels, torch.cat([q.pixel_values for q in parts]), torch.cat([q.grid_thw for q in parts]))
        grid = [(1, p.shape[1] // self.patch_size, p.shape[2] // self.patch_size) for p in pixels]
        return Rendered(pixels, None, torch.tensor(grid, dtype=torch.long))

    def _one(self, view: View) -> torch.Tensor:
        width, height = view.grid
        planes = [np.asarray(ch.resize((width, height), self.filter, box=view.region)) for ch in self._pil(view)]
        values = torch.from_numpy(np.stack(planes))
        return show(view, values)

    def _pil(self, view: View) -> list[Image.Image]:
        """The source as PIL images: one RGB/L image for 8-bit sources, float planes otherwise."""
        key = view.image.key
        if key not in self._sources:
            src = view.image.pixels
            if src.dtype == torch.uint8 and src.shape[0] == 1:
                self._sources[key] = [Image.fromarray(src[0].numpy())]
            elif src.dtype == torch.uint8:
                self._sources[key] = [Image.fromarray(c.numpy()) for c in src]
            else:
                self._sources[key] = [Image.fromarray(c.numpy().astype(np.float32), mode="F") for c in src]
        return self._sources[key]


class _Member:
    """One episode of the batch and its growing trajectory."""

    def __init__(self, ctx: Context, tools: PilTools, episode: Episode, traj: Trajectory, seed: int) -> None:
        self.ctx, self.tools, self.episode, self.traj, self.seed = ctx, tools, episode, traj, seed
        self.images: ImageInputs | None = None  # the next request's model input

    def start(self) -> None:
        observation = self.ctx.env_step(self.episode.start)
        rendered = self.tools.render(observation.views)
        prompt = self.ctx.prompt_ids(self.episode, rendered)
        self.traj.append(prompt)
        self.traj.prompt_length = len(prompt)
        self.images = join_images(self.images, rendered)
        record_images(self.traj, self.episode, rendered, observation.views, 0)

    def request(self) -> GenerateRequest | None:
        """This turn's request, or None when the token budget is spent (the episode ends)."""
        cfg = self.ctx.config
        budget = cfg.max_episode_tokens - len(self.traj.token_ids)
        if budget <= 0:
            self.ctx.env_step(self.episode.truncate)
            return None
        turn = len(self.traj.turns)
        sampling = cfg.sampling(min(cfg.max_new_tokens, budget), self.seed + 1000003 * turn)
        return GenerateRequest(f"{self.traj.episode_id}:t{turn}", self.traj.token_ids, sampling,
                               self.images)

    def step(self, done: Completion) -> None:
        """Parse the turn, run its tools with PIL, append the observation."""
        start, tokens = len(self.traj.token_ids), done.token_ids
        self.traj.append(tokens, logprobs=done.logprobs, version=done.versions)
        text = self.ctx.decode(tokens)
        turn = TurnRecord(text, done.finish_reason, len(tokens), start, 0.0)
        self.traj.turns.append(turn)
        observation = act(self.ctx, self.episode, text, turn)
        if self.episode.done:
            return
        rendered = self.tools.render(observation.views)
        self.images = join_images(self.images, rendered)
        record_images(self.traj, self.episode, rendered, observation.views, len(self.traj.turns))
        self.traj.append(self.ctx.observation_ids(tokens[-1] if tokens else -1, observation.text, rendered))
        turn.observation = observation.text


async def turn_batched_rollout(policy: Policy, tasks: Sequence[Task], env: EnvConfig | None = None,
                               config: EngineConfig | None = None, *, batch_episodes: int = 1024,
                               store: ImageStore | None = None, ctx: Context | None = None) -> list[Trajectory]:
    """Every task's group of `config.group_size` episodes, `batch_episodes` episodes (whole groups)
    per batch; returns the trajectories in task order. A failed request fails its episode.
    `ctx` (optional) is where the tokenizer and environment CPU time is counted."""
    env, config = env or EnvConfig(), config or EngineConfig()
    ctx = ctx or Context(policy, None, env, config)  # no ToolExecutor: PIL per call
    tools = PilTools(policy.vision or "qwen2.5-vl", policy.needs_patches, env.resample)
    store = store or ImageStore()
    n = config.group_size
    per_batch = max(1, batch_episodes // n)
    out: list[Trajectory] = []
    for first in range(0, len(tasks), per_batch):
        members = []
        for k, task in enumerate(tasks[first : first + per_batch], start=first):
            group_id = f"g{k}"  # as the engine numbers groups, so both draw the same seeds
            for i in range(n):
                traj = Trajectory(f"{group_id}-{i}", group_id, i, task.id, task.dataset, task.question, str(task.answer))
                members.append(_Member(ctx, tools, Episode(task, env, store), traj, episode_seed(config.seed, group_id, i)))
        await _run_batch(policy, members)
        out += [m.traj for m in members]
    return out


async def _run_batch(policy: Policy, members: list[_Member]) -> None:
    for m in members:
        m.start()
    active = members
    while active:
        requests = [(m, m.request()) for m in active]
        live = [(m, r) for m, r in requests if r is not None]
        results = await asyncio.gather(*(policy.complete(r) for _, r in live), return_exceptions=True)
        for (m, _), result in zip(live, results):  # the turn is over for all: tools, one call at a time
            if isinstance(result, BaseException):
                m.traj.status = f"error: policy: {result}"
            else:
                m.step(result)
        for m, r in requests:
            if r is None or m.episode.done or not m.traj.ok:
                settle(m.ctx, m.episode, m.traj)
        active = [m for m, r in requests if r is not None and not m.episode.done and m.traj.ok]
