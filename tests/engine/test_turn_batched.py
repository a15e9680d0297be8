"""The baseline of `bench rollout` (the turn-batched loop) against the engine: same episodes,
same images, failures accounted for. The policy is the simulator (no model weights exist in it)."""

from __future__ import annotations

from collections import Counter

import torch

from medvistagym.bench.turn_batched import PilTools, turn_batched_rollout
from medvistagym.engine import EngineConfig, RolloutEngine, run
from medvistagym.engine.episode import Context
from medvistagym.engine.tools import ToolExecutor
from medvistagym.env import EnvConfig
from medvistagym.env.episode import Episode
from medvistagym.env.images import ImageStore
from medvistagym.policy import ImageInputs, build_policy, expand_image_tokens

FAST = {"latency": {"time_scale": 0.0}}


def test_baseline_and_engine_run_the_same_episodes(tasks):
    config = EngineConfig(group_size=4)

    async def main():
        policy = build_policy("sim", **FAST)
        base = await turn_batched_rollout(policy, tasks * 2, EnvConfig(), config, batch_episodes=8)
        groups = await RolloutEngine(build_policy("sim", **FAST), EnvConfig(), config).generate(tasks * 2)
        return base, [t for g in groups for t in g.trajectories]

    base, ours = run(main())
    assert len(base) == len(ours) == 24
    assert Counter(t.status for t in base) == Counter(ok=24)
    for b, o in zip(base, ours):  # the same seeds: the simulator writes the same turns for both
        assert (b.episode_id, b.token_ids, b.loss_mask, b.logprobs) == (o.episode_id, o.token_ids, o.loss_mask, o.logprobs)
        assert [t.text for t in b.turns] == [t.text for t in o.turns] and b.reward == o.reward
        assert [(im.turn, im.box, im.pixels.shape) for im in b.images] == [(im.turn, im.box, im.pixels.shape) for im in o.images]


def test_pil_tools_show_what_the_kernels_show(tasks):
    """PIL per call and our batched kernels render the same views within a level (uint8 sources
    bit-exact; full-depth CT through float resampling and the same window)."""
    store = ImageStore()
    views = []
    for task in tasks:
        episode = Episode(task, EnvConfig(), store)
        full = episode.start().views
        views += list(full) + [v.zoom((10.0, 20.0, 90.5, 140.0), (56, 84)) for v in full]

    async def kernels():
        return await ToolExecutor("qwen2.5-vl").render(views)

    ours = run(kernels())
    pil = PilTools("qwen2.5-vl", patches=True).render(views)
    assert [p.shape for p in pil.pixels] == [p.shape for p in ours.pixels]
    for a, b in zip(pil.pixels, ours.pixels):
        assert (a.int() - b.int()).abs().max() <= 1
    assert torch.equal(pil.grid_thw, ours.grid_thw) and pil.pixel_values.shape == ours.pixel_values.shape
    shown = PilTools("qwen2.5-vl", patches=False).render(views)
    assert shown.pixel_values is None and torch.equal(shown.grid_thw, ours.grid_thw)


def test_a_failing_policy_fails_its_episodes_only(tasks):
    async def main():
        policy = build_policy("sim", latency={"time_scale": 0.0}, faults={"error_rate": 0.5})
        return await turn_batched_rollout(policy, tasks * 2, EnvConfig(), EngineConfig(group_size=4), batch_episodes=8)

    trajectories = run(main())
    kinds = Counter(t.status.split(":")[0] for t in trajectories)
    assert len(trajectories) == 24 and kinds["error"] > 0 and kinds["ok"] > 0 and set(kinds) <= {"ok", "error", "truncated"}
    assert all(t.ended_s > 0 for t in trajectories)


def test_first_prompt_reuses_the_system_turn_and_equals_the_chat_template(tasks):
    policy = build_policy("sim", **FAST)
    ctx = Context(policy, ToolExecutor("qwen2.5-vl"), EnvConfig(), EngineConfig())
    tok = policy.tokenizer
    for task in tasks:
        episode = Episode(task, EnvConfig(), ImageStore())
        views = episode.start().views
        rendered = PilTools("qwen2.5-vl", patches=False).render(views)
        full = list(tok.apply_chat_template(episode.messages, add_generation_prompt=True)["input_ids"])
        images = ImageInputs(None, rendered.grid_thw, rendered.pixels)
        assert ctx.prompt_ids(episode, rendered) == expand_image_tokens(full, images, policy.image_token_id)
    assert len(ctx._system_turns) == 1
