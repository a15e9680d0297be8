"""The rollout engine over real tasks with real images, driven by the simulated policy (a
latency model of a continuous-batching server: no model weights exist in it) and, for
token / log-prob bookkeeping, by the tiny real transformers model."""

from __future__ import annotations

import asyncio
from collections import Counter

import torch

from medvistagym.engine import EngineConfig, RolloutEngine, run
from medvistagym.env import EnvConfig
from medvistagym.env.protocol import parse_action
from medvistagym.policy import build_policy

FAST = {"latency": {"time_scale": 0.0}}


def statuses(groups) -> Counter:
    return Counter(t.status.split(":")[0] for g in groups for t in g.trajectories)


def test_every_episode_comes_back_with_aligned_tokens(tasks):
    async def main():
        policy = build_policy("sim", **FAST)
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=4))
        return await engine.generate(tasks * 3), engine, policy

    groups, engine, policy = run(main())
    assert len(groups) == 9 and all(len(g.trajectories) == 4 for g in groups)
    assert statuses(groups) == Counter(ok=36)
    tok = policy.tokenizer
    for g in groups:
        assert len(g.kept) == 4 and g.dropped is None
        for t in g.trajectories:
            n = len(t.token_ids)
            assert len(t.loss_mask) == len(t.logprobs) == len(t.versions) == n
            assert t.loss_mask[: t.prompt_length] == [0] * t.prompt_length
            assert sum(t.loss_mask) == sum(turn.new_tokens for turn in t.turns) > 0
            # The sampled spans decode to the recorded turns, in order.
            spans, cur = [], []
            for token, m in zip(t.token_ids, t.loss_mask):
                if m:
                    cur.append(token)
                elif cur:
                    spans.append(cur)
                    cur = []
            spans += [cur] if cur else []
            assert [tok.decode(s) for s in spans] == [turn.text for turn in t.turns]
            # Image placeholders in the sequence match the images' patch counts.
            pads = t.token_ids.count(151655)
            assert pads == sum(im.pixels.shape[1] * im.pixels.shape[2] // (28 * 28) for im in t.images)
            assert parse_action(t.turns[-1].text).kind == "answer" and t.answer is not None
    m = engine.metrics.snapshot(engine)
    assert m["episodes/finished"] == 36 and m["in_flight/episodes"] == 0 and m["in_flight/tokens"] == 0
    assert m["tools/unique_fraction"] < 1.0  # group members share their question images


def test_named_groups_sample_the_same_episodes_in_any_engine(tasks):
    """Group ids name the sampling seeds: a trainer resuming from its data cursor gets the
    episodes it would have got, whatever the engine ran before."""
    async def main(warm_up: int):
        engine = RolloutEngine(build_policy("sim", **FAST), EnvConfig(), EngineConfig(group_size=2))
        if warm_up:
            await engine.generate(tasks[:warm_up])  # numbered g0, g1, ...
        feeder = asyncio.ensure_future(engine.submit(tasks[:2], group_ids=["s7", "s8"]))
        groups = [await engine.next_group() for _ in range(2)]
        await feeder
        return {g.group_id: [t.token_ids for t in g.trajectories] for g in groups}

    fresh, after_others = run(main(0)), run(main(2))
    assert set(fresh) == {"s7", "s8"} and fresh == after_others


def test_faults_are_retried_counted_and_nothing_is_lost(tasks):
    async def main():
        policy = build_policy("sim", latency={"time_scale": 0.0}, faults={"error_rate": 0.3, "hang_rate": 0.1})
        config = EngineConfig(group_size=4, max_retries=1, retry_backoff_s=0.001, turn_timeout_s=0.2,
                              failed_members="keep_ok", min_group_members=1)
        engine = RolloutEngine(policy, EnvConfig(), config)
        return await engine.generate(tasks * 4), engine

    groups, engine = run(main())
    counts = statuses(groups)
    assert sum(counts.values()) == 48 and counts["ok"] > 0
    assert counts["error"] + counts["timeout"] > 0  # some failed twice in a row
    m = engine.metrics.snapshot(engine)
    assert m["retries"] > 0 and m["episodes/finished"] == 48
    for g in groups:
        assert all(t.ok for t in g.kept)
        failed = [t for t in g.trajectories if not t.ok]
        assert all(t.status == "timeout" or t.status.startswith("error: policy") for t in failed)


def test_episode_deadline_and_close_end_every_episode(tasks):
    """The watchdog's episode deadline ends episodes as `timeout` (their requests aborted);
    `close()` ends those in flight as cancelled; both deliver every group."""
    async def deadline():
        policy = build_policy("sim", latency={"time_scale": 1.0})  # a turn takes >= 70 ms
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=2, episode_deadline_s=0.05))
        groups = await engine.generate(tasks[:2])
        return groups, engine.metrics.snapshot(engine), policy.num_running + policy.num_waiting

    groups, m, left = run(deadline())
    assert statuses(groups) == Counter(timeout=4) and left == 0
    assert [g.dropped for g in groups] == ["failed members"] * 2
    assert m["status/timeout"] == 4 and m["in_flight/episodes"] == 0

    async def close():
        engine = RolloutEngine(build_policy("sim", latency={"time_scale": 1.0}), EnvConfig(), EngineConfig(group_size=2))
        await engine.submit(tasks[:2])
        await asyncio.sleep(0.2)
        await engine.close()
        groups = [await engine.next_group() for _ in range(2)]
        await engine.close()
        return groups

    assert statuses(run(close())) == Counter(error=4)


def test_admission_limits_and_pause(tasks):
    async def main():
        policy = build_policy("sim", latency={"time_scale": 0.01})
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=4, max_episodes_in_flight=8))
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.in_flight)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        engine.pause()
        await engine.submit(tasks * 2)
        await asyncio.sleep(0.05)
        paused_in_flight = engine.in_flight
        engine.resume()
        groups = [g async for g in engine.groups()]
        watcher.cancel()
        return groups, peak, paused_in_flight

    groups, peak, paused_in_flight = run(main())
    assert paused_in_flight == 0 and 0 < peak <= 8 and len(groups) == 6


def test_ending_episodes_wake_the_dispatcher_only_when_its_group_fits(tasks):
    """Groups of 4 with room for 8 episodes: a held group fits once 4 episodes have ended, so
    about one ending in 4 wakes the dispatcher, not every one (each wake-up is a task step)."""

    async def main():
        policy = build_policy("sim", latency={"time_scale": 0.01})
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=4, max_episodes_in_flight=8))
        wakes = 0
        set_admit = engine._admit.set

        def counted_set():
            nonlocal wakes
            wakes += not engine._admit.is_set()  # setting it again wakes nobody
            set_admit()

        engine._admit.set = counted_set
        feeder = asyncio.ensure_future(engine.submit(tasks * 4))
        groups = [await engine.next_group() for _ in range(len(tasks) * 4)]
        await feeder
        return groups, wakes

    groups, wakes = run(main())
    episodes = sum(len(g.trajectories) for g in groups)
    assert episodes == 48 and statuses(groups) == Counter(ok=48)
    # At most one wake-up per group admitted after the first two (room opens by episodes ending
    # or by groups being taken, and the held group is woken only once it fits).
    assert wakes <= 10 < episodes


def test_unconsumed_groups_hold_admission_until_one_is_taken(tasks):
    """One group runs at a time, and one finished group left untaken fills the output
    (max_pending_groups=1): nothing more starts, and with no episode in flight only taking
    that group can wake the dispatcher."""

    async def main():
        policy = build_policy("sim", **FAST)
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=2, max_episodes_in_flight=2,
                                                                     max_pending_groups=1))
        feeder = asyncio.ensure_future(engine.submit(tasks[:1] * 4))
        while not engine.done_groups:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time enough to start the next group, were it allowed
        held = engine.in_flight, engine.done_groups
        groups = [await asyncio.wait_for(engine.next_group(), timeout=60) for _ in range(4)]
        await feeder
        return held, groups

    held, groups = run(main())
    assert held == (0, 1)
    assert statuses(groups) == Counter(ok=8)


def test_stale_groups_are_dropped(tasks):
    async def main():
        policy = build_policy("sim", latency={"time_scale": 0.05, "weight_sync_s": 0.0})
        engine = RolloutEngine(policy, EnvConfig(), EngineConfig(group_size=2, max_staleness=0))
        await engine.submit(tasks[:1])
        await asyncio.sleep(0.05)
        await policy.update_weights(None)  # tokens from version 0 now lag by one
        return [g async for g in engine.groups(include_dropped=True)]

    (group,) = run(main())
    assert group.dropped == "stale" and group.kept == []
    assert {v for t in group.trajectories for v, m in zip(t.versions, t.loss_mask) if m} >= {0}


def test_a_corrupt_image_fails_its_group_only(tasks, tmp_path):
    from medvistagym.env.task import ImageRef, Task

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    broken = Task("broken", "test", "test", (ImageRef(path=str(bad)),), "Q?", "yes", tasks[0].answer_type)

    async def main():
        engine = RolloutEngine(build_policy("sim", **FAST), EnvConfig(), EngineConfig(group_size=2))
        return await engine.generate([tasks[0], broken, tasks[1]])

    groups = run(main())
    assert [g.dropped for g in groups] == [None, "failed members", None]
    assert all(t.status.startswith("error: task") and "broken.png" in t.status for t in groups[1].trajectories)


def test_transformers_policy_logprobs_and_versions_line_up(tasks, tmp_path):
    from medvistagym.policy.presets import build_model_dir

    model = build_model_dir("qwen2.5-vl-tiny", tmp_path / "m")

    async def main():
        policy = build_policy("transformers", model=model)
        config = EngineConfig(group_size=2, max_new_tokens=8, max_episode_tokens=4096)
        engine = RolloutEngine(policy, EnvConfig(max_turns=2), config)
        return await engine.generate(tasks[:2]), policy

    groups, policy = run(main())
    for g in groups:
        for t in g.trajectories:
            assert t.status == "truncated" and len(t.turns) == 2  # random weights never answer
            assert {v for v, m in zip(t.versions, t.loss_mask) if m} == {0}
            sampled = [i for i, m in enumerate(t.loss_mask) if m]
            assert all(lp <= 0 for lp in (t.logprobs[i] for i in sampled))
            assert torch.tensor(t.logprobs)[[i for i, m in enumerate(t.loss_mask) if not m]].abs().sum() == 0
