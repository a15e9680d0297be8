import asyncio
import statistics
import time

import pytest
import torch
from transformers import AutoTokenizer

from medvistagym.config import ConfigError, load_config
from medvistagym.env.protocol import STOP_STRINGS, parse_action
from medvistagym.policy import Chunk, GenerateRequest, ImageInputs, PolicyError, SamplingParams, build_policy
from medvistagym.policy.presets import qwen_tokenizer_dir
from medvistagym.policy.sim import LengthModel, SimConfig, SimPolicy
from medvistagym.policy.stopping import StopChecker, eos_token_ids

FAST = {"time_scale": 0}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def sim(tok, **overrides) -> SimPolicy:
    overrides.setdefault("latency", FAST)
    return SimPolicy(tokenizer=tok, **overrides)


def request(rid="r", prompt=(1, 2, 3), images=None, **sampling) -> GenerateRequest:
    sampling.setdefault("stop", STOP_STRINGS)
    sampling.setdefault("max_new_tokens", 2048)  # above the reasoning's clipped tail
    return GenerateRequest(rid, list(prompt), SamplingParams(**sampling), images)


async def collect(policy, req) -> list[Chunk]:
    return [c async for c in policy.generate(req)]


async def collect_many(policy, reqs) -> list[list[Chunk] | BaseException]:
    return await asyncio.gather(*(collect(policy, r) for r in reqs), return_exceptions=True)


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def run_one(policy, req) -> list[Chunk]:
    async def go():
        async with policy:
            return await collect(policy, req)
    return asyncio.run(go())


def run_many(policy, reqs) -> list:
    async def go():
        async with policy:
            return await collect_many(policy, reqs)
    return asyncio.run(go())


async def until(predicate, timeout=30.0):  # generous: only a failing test waits it out
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


# --------------------------------------------------------------------------- config


def test_config_overrides_nested_fields_and_loads_from_yaml(tok, tmp_path):
    policy = build_policy("sim", tokenizer=tok, seed=3, latency={"max_batch": 7}, length=LengthModel(kind="fixed"))
    assert isinstance(policy, SimPolicy) and policy.tokenizer is tok
    cfg = policy.config
    assert (cfg.seed, cfg.latency.max_batch, cfg.latency.tick_tokens, cfg.length.kind) == (3, 7, 8, "fixed")
    on_top = SimPolicy(cfg, tokenizer=tok, latency={"time_scale": 0.5}).config
    assert on_top.latency.max_batch == 7 and on_top.latency.time_scale == 0.5 and on_top.seed == 3

    path = tmp_path / "sim.yaml"
    path.write_text("seed: 5\ntool_call_prob: [0.5]\nfaults:\n  error_rate: 0.1\n")
    loaded = load_config(SimConfig, path, ["latency.tick_tokens=4"])
    got = (loaded.seed, loaded.tool_call_prob, loaded.faults.error_rate, loaded.latency.tick_tokens)
    assert got == (5, (0.5,), 0.1, 4)

    with pytest.raises(ConfigError, match="unknown keys"):
        SimPolicy(tokenizer=tok, latency={"max_batchh": 1})
    with pytest.raises(ValueError, match="fault rates"):
        SimPolicy(tokenizer=tok, faults={"error_rate": 2})
    with pytest.raises(ValueError, match="length kind"):
        SimPolicy(tokenizer=tok, length={"kind": "uniform"})


# --------------------------------------------------------------------------- scripts


def test_same_seed_same_stream_and_other_seeds_differ(tok):
    def stream(rid="a", config_seed=0, seed=None):
        chunks = run_one(sim(tok, seed=config_seed), request(rid, seed=seed))
        return tokens(chunks), [lp for c in chunks for lp in c.logprobs]

    first = stream()
    assert stream() == first
    assert stream(config_seed=1) != first
    assert stream(rid="b") != first
    by_seed = stream("x", seed=7)
    assert stream("y", seed=7) == by_seed  # the request seed, not the id, fixes the script
    assert stream("x", seed=8) != by_seed
    assert all(lp <= 0 for lp in first[1]) and len(set(first[1])) > 1


def test_reasoning_lengths_have_a_long_tail(tok):
    think_open, think_close = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def think_lengths(kind):
        policy = sim(tok, length={"kind": kind}, latency={"time_scale": 0, "max_batch": 2000, "tick_tokens": 64})
        outs = run_many(policy, [request(f"r{i}") for i in range(2000)])
        lengths = []
        for chunks in outs:
            ids = tokens(chunks)
            lengths.append(ids.index(think_close) - ids.index(think_open))
        q = statistics.quantiles(lengths, n=100)
        return q[98] / q[49]

    assert think_lengths("lognormal") > 3
    assert think_lengths("fixed") == 1


def test_scripts_parse_as_actions_with_boxes_inside_the_image(tok):
    grid = torch.tensor([[1, 16, 24]])  # 224 x 336 pixels at patch size 14
    images = ImageInputs(torch.zeros(16 * 24, 4), grid)
    reqs = [request(f"r{i}", images=images if i % 2 else None) for i in range(200)]
    outs = run_many(sim(tok), reqs)
    kinds = set()
    for req, chunks in zip(reqs, outs):
        text = tok.decode(tokens(chunks), skip_special_tokens=False)
        action = parse_action(text)
        assert action.well_formed, (text, action.errors)
        assert action.think and chunks[-1].finish_reason == "stop" and text.endswith(chunks[-1].stop_reason)
        kinds.add(action.kind)
        if action.kind == "answer":
            assert action.answer in SimConfig().answers
            continue
        (call,) = action.tool_calls
        x1, y1, x2, y2 = call.arguments["bbox_2d"]
        width, height = (336, 224) if req.images is not None else (448, 448)
        assert call.name == "zoom_in" and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert min(x2 - x1, y2 - y1) >= 4
    assert kinds == {"answer", "tool_calls"}


def test_malformed_calls_are_invalid_json(tok):
    outs = run_many(sim(tok, tool_call_prob=(1.0,), malformed_call_rate=1.0), [request(f"r{i}") for i in range(20)])
    for chunks in outs:
        action = parse_action(tok.decode(tokens(chunks), skip_special_tokens=False))
        assert not action.tool_calls and "not valid JSON" in action.errors[0]


def test_turn_index_changes_the_script(tok):
    response = tok.convert_tokens_to_ids("<tool_response>")
    turn = [tokens(run_one(sim(tok), request("a", [1] + [response] * k))) for k in range(3)]
    assert len({tuple(t) for t in turn}) == 3
    late = run_many(sim(tok), [request(f"r{i}", [response] * 4) for i in range(50)])  # past tool_call_prob
    assert all(parse_action(tok.decode(tokens(c), skip_special_tokens=False)).kind == "answer" for c in late)


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sampling", [
    {"stop": STOP_STRINGS},
    {"stop": ()},
    {"stop": ("</think>",)},
    {"stop": ("e",)},
    {"stop": ("ion", "\n")},
    {"stop": ("bbox", "</answer>")},
    {"stop": (), "stop_token_ids": (151668,)},  # </think>
    {"stop": ("</think>",), "stop_token_ids": (151668,)},  # the token wins the tie
    {"stop": (), "ignore_eos": True, "max_new_tokens": 300},
    {"stop": STOP_STRINGS, "max_new_tokens": 5},
])
def test_streams_stop_where_stop_checker_stops(tok, sampling):
    outs = run_many(sim(tok), [request(f"r{i}", **sampling) for i in range(20)])
    eos = eos_token_ids(tok)
    for chunks in outs:
        ids = tokens(chunks)
        assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].token_ids
        checker = StopChecker(tok, SamplingParams(**sampling), eos)
        assert all(checker.check(ids[:k]) is None for k in range(1, len(ids)))
        assert checker.check(ids) == (chunks[-1].finish_reason, chunks[-1].stop_reason)


def test_stop_reasons(tok):
    (done,) = run_many(sim(tok), [request(stop=())])
    assert done[-1].stop_reason == tok.convert_tokens_to_ids("<|im_end|>") == done[-1].token_ids[-1]
    (talks_on,) = run_many(sim(tok), [request(stop=(), ignore_eos=True, max_new_tokens=300)])
    ids = tokens(talks_on)
    assert talks_on[-1].finish_reason == "length" and len(ids) == 300 and done[-1].stop_reason in ids
    (short,) = run_many(sim(tok), [request(max_new_tokens=5)])
    assert short[-1].finish_reason == "length" and len(tokens(short)) == 5


# --------------------------------------------------------------------------- the server


def test_ticks_take_the_modelled_time(tok):
    latency = {"tick_tokens": 8, "decode_base_s": 0.002, "decode_per_seq_s": 2e-4, "prefill_s_per_token": 0.0,
               "max_batch": 20}
    length = {"kind": "fixed", "median_tokens": 40}
    policy = sim(tok, latency=latency, length=length, tool_call_prob=(), answers=("yes",))  # equal lengths

    async def go():
        start = time.monotonic()
        outs = await collect_many(policy, [request(f"r{i}") for i in range(40)])
        return time.monotonic() - start, outs

    elapsed, outs = asyncio.run(go())
    n = len(tokens(outs[0]))
    assert all(len(tokens(o)) == n for o in outs)
    ticks = 2 * -(-n // 8)  # two waves of 20
    assert policy.ticks == ticks
    expected = ticks * 8 * (0.002 + 2e-4 * 20)
    # Never faster than the model; a loaded machine may make it slower, so no upper bound.
    assert elapsed >= 0.95 * expected


def test_slow_requests_advance_every_nth_tick(tok):
    policy = sim(tok, faults={"slow_rate": 1.0, "slow_factor": 3})
    n = len(tokens(run_one(policy, request())))
    assert abs(policy.ticks - 3 * -(-n // 8)) <= 2


def test_abort_ends_the_stream(tok):
    policy = sim(tok, latency={"decode_base_s": 0.001, "max_batch": 1},
                 length={"kind": "fixed", "median_tokens": 1000, "max_filler_tokens": 1000})

    async def go():
        running = policy.generate(request("a", max_new_tokens=2000))
        first = await running.__anext__()
        waiting = asyncio.create_task(collect(policy, request("b")))
        await until(lambda: policy.num_waiting == 1)
        await policy.abort("b")
        await policy.abort("a")
        await policy.abort("unknown")
        rest = [c async for c in running]
        return [first, *rest], await waiting

    chunks, waited = asyncio.run(go())
    assert chunks[-1] == Chunk([], [], 0, finish_reason="abort")
    assert 0 < len(tokens(chunks)) < 1000
    assert waited == [Chunk([], [], 0, finish_reason="abort")]


def test_consumers_that_leave_free_their_slot(tok):
    # A leaked slot holds the next request for 1000 tokens x 10 ms; a freed one, for one tick.
    policy = sim(tok, latency={"decode_base_s": 0.01, "max_batch": 1},
                 length={"kind": "fixed", "median_tokens": 1000, "max_filler_tokens": 1000})

    async def started(rid):
        stream = policy.generate(request(rid, max_new_tokens=2000))
        await asyncio.wait_for(stream.__anext__(), 5.0)
        return stream

    async def go():
        async for _ in policy.generate(request("break", max_new_tokens=2000)):
            break
        await until(lambda: policy.num_running == 0)
        stream = await started("aclose")
        await stream.aclose()
        assert policy.num_running == 0
        task = asyncio.create_task(collect(policy, request("cancel", max_new_tokens=2000)))
        await until(lambda: policy.ticks > 0 and policy.num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert policy.num_running == 0
        await (await started("last")).aclose()
        await policy.close()

    asyncio.run(go())


def test_chunks_carry_the_version_that_produced_them(tok):
    full = tokens(run_one(sim(tok, length={"kind": "fixed", "median_tokens": 400}), request(max_new_tokens=1000)))
    policy = sim(tok, length={"kind": "fixed", "median_tokens": 400})

    async def go():
        stream = policy.generate(request(max_new_tokens=1000))
        chunks = [await stream.__anext__()]
        for _ in range(10):
            await asyncio.sleep(0)  # ticks run while the consumer does not read...
        assert await policy.update_weights({"w": torch.zeros(1)}) == 1
        for _ in range(10):
            await asyncio.sleep(0)  # ...before and after the update
        chunks += [c async for c in stream]
        return chunks

    chunks = asyncio.run(go())
    assert [c.version for c in chunks[:3]] == [0, 0, 1] and chunks[-1].version == 1
    assert min(len(c.token_ids) for c in chunks[1:3]) > 8  # missed ticks come merged, split at the update
    assert tokens(chunks) == full and policy.version == 1


def test_version_changes_mid_stream_in_real_time(tok):
    policy = sim(tok, latency={"decode_base_s": 0.001, "weight_sync_s": 0.02},
                 length={"kind": "fixed", "median_tokens": 200})

    async def go():
        chunks, update = [], None
        async for chunk in policy.generate(request()):
            chunks.append(chunk)
            if len(chunks) == 3:
                update = asyncio.create_task(policy.update_weights(None))
        return chunks, await update

    chunks, version = asyncio.run(go())
    versions = [c.version for c in chunks]
    assert version == 1 and versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1


def test_injected_errors_are_retryable_and_retries_succeed(tok):
    policy = sim(tok, faults={"error_rate": 0.25})

    async def go():
        reqs = [request(f"r{i}") for i in range(400)]
        partial: dict[str, list[int]] = {}

        async def attempt(req):
            got = []
            try:
                async for chunk in policy.generate(req):
                    got += chunk.token_ids
            except PolicyError as err:
                assert err.retryable and "simulated backend error" in str(err)
                partial.setdefault(req.request_id, got)
                return None
            return got

        first = await asyncio.gather(*(attempt(r) for r in reqs))
        failed = [r for r, out in zip(reqs, first) if out is None]
        done = {}
        for _ in range(10):  # the same ids again: each retry draws its faults anew
            retried = await asyncio.gather(*(attempt(r) for r in failed))
            done.update({r.request_id: out for r, out in zip(failed, retried) if out is not None})
            failed = [r for r, out in zip(failed, retried) if out is None]
        return len(partial) / len(reqs), partial, done, failed

    rate, partial, done, failed = asyncio.run(go())
    assert 0.18 <= rate <= 0.32 and not failed
    assert all(done[rid][: len(got)] == got for rid, got in partial.items())  # an error cuts the same script


def test_hung_requests_hold_their_slot_until_aborted(tok):
    policy = sim(tok, latency={"time_scale": 0, "max_batch": 1}, faults={"hang_rate": 1.0})
    got: list[Chunk] = []

    async def consume(rid):
        async for chunk in policy.generate(request(rid)):
            got.append(chunk)

    async def go():
        hung = asyncio.create_task(consume("a"))
        await until(lambda: policy.num_running == 1)
        await asyncio.sleep(0.02)
        seen = len(got)
        await asyncio.sleep(0.05)
        assert not hung.done() and len(got) == seen
        queued = asyncio.create_task(collect(policy, request("b")))
        await until(lambda: policy.num_waiting == 1)
        await asyncio.sleep(0.02)
        assert policy.num_waiting == 1  # no slot while "a" hangs
        await policy.abort("a")
        await hung
        await until(lambda: policy.num_waiting == 0 and policy.num_running == 1)
        await policy.close()
        with pytest.raises(PolicyError, match="policy closed") as err:
            await queued
        assert not err.value.retryable

    asyncio.run(go())
    assert got[-1].finish_reason == "abort" and all(c.finish_reason is None for c in got[:-1])


def test_a_crashing_tick_fails_its_requests_and_the_server_goes_on(tok):
    policy = sim(tok, length={"kind": "fixed", "median_tokens": 400})

    async def go():
        a, b = policy.generate(request("a", max_new_tokens=1000)), policy.generate(request("b", max_new_tokens=1000))
        await a.__anext__()
        await b.__anext__()
        policy._requests["a"].limit = None  # the next tick trips over it
        for stream in (a, b):
            with pytest.raises(PolicyError, match="crashed") as err:
                async for _ in stream:
                    pass
            assert err.value.retryable
        return await collect(policy, request("c"))

    assert asyncio.run(go())[-1].finish_reason == "stop"


def test_duplicate_ids_and_use_after_close(tok):
    policy = sim(tok, latency={"decode_base_s": 0.01}, length={"kind": "fixed", "median_tokens": 400})

    async def go():
        first = policy.generate(request("a"))
        await first.__anext__()
        with pytest.raises(ValueError, match="already in flight"):
            await policy.generate(request("a")).__anext__()
        await policy.close()
        with pytest.raises(PolicyError, match="policy closed"):
            async for _ in first:
                pass
        with pytest.raises(PolicyError, match="policy closed"):
            await policy.generate(request("b")).__anext__()
        with pytest.raises(PolicyError, match="policy closed"):
            await policy.update_weights(None)

    asyncio.run(go())


def test_prefix_cache_prefills_only_what_follows_the_cached_blocks():
    from medvistagym.policy.sim import _PrefixCache

    b = _PrefixCache.BLOCK
    cache = _PrefixCache(b * 100)
    prompt = list(range(1000, 1000 + 3 * b + 8))  # 3 whole blocks and 8 tokens
    assert cache.admit(prompt, (7,) * 30) == 3 * b + 8  # a cold cache
    # The episode's next turn: its prompt, the output, an observation. The prompt's 3 whole
    # blocks are cached; the block straddling prompt and output was never whole.
    nxt = prompt + [7] * 30 + list(range(5000, 5000 + b + 62))
    assert cache.admit(nxt, ()) == len(nxt) - 3 * b
    assert cache.admit(nxt, ()) == len(nxt) - 4 * b  # now 4 of its blocks are
    assert cache.admit([9, *prompt], ()) == 3 * b + 9  # blocks are chained: a shifted prompt misses
    small = _PrefixCache(b * 2)
    small.admit(prompt, ())
    assert small.admit(prompt, ()) == b + 8  # the two head blocks stay; the tail was evicted first
    assert _PrefixCache(0).admit(prompt, ()) == 3 * b + 8


def test_complete_returns_what_the_stream_returns(tok):
    """complete() wakes its caller once, with the stream's tokens, log-probs, versions and reason."""
    reqs = [request(f"r{i}", seed=i) for i in range(6)]
    streamed = run_many(sim(tok), reqs)

    async def go():
        policy = sim(tok)
        async with policy:
            return await asyncio.gather(*(policy.complete(r) for r in reqs))

    for chunks, done in zip(streamed, asyncio.run(go())):
        assert done.token_ids == tokens(chunks) and done.logprobs == [lp for c in chunks for lp in c.logprobs]
        assert done.versions == [0] * len(done.token_ids)
        assert (done.finish_reason, done.stop_reason) == (chunks[-1].finish_reason, chunks[-1].stop_reason)


def test_complete_keeps_versions_across_an_update_and_raises_errors(tok):
    latency = {"tick_tokens": 1, "decode_base_s": 0.002, "decode_per_seq_s": 0.0, "weight_sync_s": 0.0}

    async def go():
        policy = sim(tok, latency=latency, length={"kind": "fixed", "median_tokens": 200})
        async with policy:
            task = asyncio.ensure_future(policy.complete(request("long", seed=1)))
            await until(lambda: policy.ticks >= 20)
            await policy.update_weights({})
            done = await task
            failing = sim(tok, faults={"error_rate": 1.0})
            with pytest.raises(PolicyError):
                await failing.complete(request("bad", seed=1))
            await failing.close()
            return done

    done = asyncio.run(go())
    n_old = done.versions.count(0)
    assert 20 <= n_old < len(done.versions) and done.versions == [0] * n_old + [1] * (len(done.versions) - n_old)
