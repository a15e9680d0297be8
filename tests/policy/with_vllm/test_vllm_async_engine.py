"""VLLMPolicy against real vLLM: the CPU build of vllm 0.32 runs AsyncLLM (engine core and
worker in their own processes) on a tiny random Qwen2 with the real Qwen tokenizer, fp32,
checked against teacher-forced forward passes of the same weights in transformers.

Not tested here: images (vLLM's CPU build cannot load Qwen-VL models: its processor needs
torchvision, which has no CPU wheel next to this torch; `collapse_image_runs` is tested in
test_vllm_helpers.py) and GPU sleep / wake (on CPU vLLM's worker ignores sleep and the engine
only pauses, which is what the sleep test checks).
"""

from __future__ import annotations

import asyncio

import pytest

from vllm_cases import (
    LONG_NEW_TOKENS, MAX_MODEL_LEN, abort_after_three, check_stop_string, check_weight_update, output, request,
)

from medvistagym.policy import Chunk, PolicyError, build_policy

PROMPT_TEXT = "Describe the chest X-ray: lungs, heart, bones."
TOLERANCE = 1e-3




@pytest.fixture(scope="module")
def policy(text_model_dirs, engine_config, run):
    policy = build_policy("vllm", model=text_model_dirs[0], **engine_config)
    yield policy
    run(policy.close())


@pytest.fixture(scope="module")
def prompt(policy) -> list[int]:
    return policy.tokenizer.encode(PROMPT_TEXT)


def test_streams_deltas_until_the_length_budget(policy, prompt, complete):
    chunks = complete(policy, request("stream", prompt, temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=1))
    assert len(chunks) > 1  # deltas, not one cumulative output
    assert len(output(chunks)) == 16
    assert all(len(c.token_ids) == len(c.logprobs) for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert {c.version for c in chunks} == {0}


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_transformers(policy, prompt, complete, reference, text_model_dirs, temperature):
    chunks = complete(policy, request(f"lp{temperature}", prompt, temperature=temperature, max_new_tokens=32,
                                      ignore_eos=True, seed=5))
    out = output(chunks)
    expected = reference.logprobs(text_model_dirs[0], prompt, out, temperature)
    got = [lp for c in chunks for lp in c.logprobs]
    delta = max(abs(a - b) for a, b in zip(got, expected))
    print(f"in-process vLLM, T={temperature}: max |Δ logprob| = {delta:.2e}")
    assert len(got) == len(out) == 32 and delta <= TOLERANCE
    if temperature == 0:
        assert out == reference.argmax(text_model_dirs[0], prompt, out)


def test_stop_token_id_ends_the_stream(policy, prompt, complete):
    greedy = output(complete(policy, request("g1", prompt, temperature=0, max_new_tokens=12, ignore_eos=True)))
    stop_id = greedy[4]
    first = greedy.index(stop_id)
    chunks = complete(policy, request("stop-id", prompt, temperature=0, max_new_tokens=12, ignore_eos=True,
                                      stop_token_ids=(stop_id,)))
    assert output(chunks) == greedy[: first + 1]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", stop_id)


def test_stop_string_is_kept_in_the_output(policy, prompt, complete, reference):
    greedy = check_stop_string(policy, prompt, complete, reference)
    stop, k = reference.stop_string(policy.tokenizer, greedy)
    assert policy.tokenizer.decode(greedy[: k + 1]).endswith(stop)


def test_same_seed_same_tokens_alone_or_among_32_concurrent(policy, prompt, run):
    async def sample(request_id: str, seed: int) -> list[Chunk]:
        req = request(request_id, prompt, temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=seed)
        return [c async for c in policy.generate(req)]

    async def concurrent() -> list[list[Chunk]]:
        return await asyncio.gather(*(sample(f"batch{seed}", seed) for seed in range(32)))

    alone = output(run(sample("alone", 7)))
    batch = run(concurrent())
    assert all(len(output(chunks)) == 16 and chunks[-1].finish_reason == "length" for chunks in batch)
    assert output(batch[7]) == alone
    assert len({tuple(output(chunks)) for chunks in batch}) == 32


def test_abort_ends_the_stream_and_the_request(policy, prompt, run):
    chunks = run(abort_after_three(policy, prompt))
    run(asyncio.sleep(0.5))
    assert chunks[-1] == Chunk([], [], 0, "abort")
    assert len(output(chunks)) < LONG_NEW_TOKENS
    assert policy._engine.get_num_unfinished_requests() == 0


def test_closing_the_stream_early_cancels_the_request(policy, prompt, run):
    async def take_two() -> list[Chunk]:
        long = request("early", prompt, temperature=0, max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True)
        stream = policy.generate(long)
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        await asyncio.sleep(0.5)
        return first

    assert len(run(take_two())) == 2
    assert policy._engine.get_num_unfinished_requests() == 0


def test_bad_requests_fail_without_retry(policy, prompt, complete, run):
    with pytest.raises(PolicyError) as too_long:
        complete(policy, request("too-long", prompt * (MAX_MODEL_LEN // len(prompt) + 1), max_new_tokens=4))
    assert not too_long.value.retryable

    async def same_id_twice() -> None:
        first = policy.generate(request("dup", prompt, temperature=0, max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True))
        await anext(first)
        try:
            await anext(policy.generate(request("dup", prompt, max_new_tokens=4)))
        finally:
            await first.aclose()

    with pytest.raises(PolicyError, match="already in flight") as duplicate:
        run(same_id_twice())
    assert not duplicate.value.retryable


def test_sleep_aborts_requests_in_flight_and_wake_up_resumes(policy, prompt, complete, run):
    # On CPU vLLM's worker ignores sleep (it keeps weights and KV cache); the engine still
    # aborts what is in flight and pauses until wake_up.
    greedy = dict(temperature=0, max_new_tokens=8, ignore_eos=True)
    before = output(complete(policy, request("w1", prompt, **greedy)))

    async def sleep_during_stream() -> list[Chunk]:
        got = []
        long = request("asleep", prompt, temperature=0, max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True)
        async for chunk in policy.generate(long):
            got.append(chunk)
            if len(got) == 2:
                await policy.sleep(1)
        return got

    chunks = run(sleep_during_stream())
    assert chunks[-1].finish_reason == "abort" and len(output(chunks)) < LONG_NEW_TOKENS
    run(policy.wake_up())
    assert output(complete(policy, request("w2", prompt, **greedy))) == before


# Weight updates change the module's engine: these run last, and the last one puts the first
# weights back.


def test_update_weights_moves_requests_in_flight_and_new_ones(policy, prompt, run, complete, reference, text_model_dirs,
                                                             update_in_flight):
    check_weight_update(policy, prompt, run, complete, reference, text_model_dirs, update_in_flight)


def test_partial_update_and_update_from_pairs(policy, prompt, run, complete, reference, text_model_dirs):
    old = text_model_dirs[0]
    # Only the embedding and the final norm, set so that end-of-sequence is every step's
    # argmax: embedding column 0 becomes a large constant, so the residual stream carries it
    # with a fixed sign, the final norm keeps only that dimension, and the (tied) output row
    # of <|im_end|> doubles it.
    state = reference.state_dict(old)
    embed, norm = state["model.embed_tokens.weight"].clone(), state["model.norm.weight"].clone()
    eos = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    embed[:, 0] = 20.0
    embed[eos, 0] = 40.0
    norm.zero_()
    norm[0] = 1.0
    assert run(policy.update_weights({"model.embed_tokens.weight": embed, "model.norm.weight": norm})) == 2
    chunks = complete(policy, request("eos", prompt, temperature=0, max_new_tokens=8))
    assert output(chunks) == [eos]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason, chunks[-1].version) == ("stop", eos, 2)

    # Back to the first weights, as (name, tensor) pairs that include the tied lm_head.weight.
    assert run(policy.update_weights(iter(state.items()))) == 3
    chunks = complete(policy, request("back", prompt, temperature=0, max_new_tokens=16, ignore_eos=True))
    assert output(chunks) == reference.argmax(old, prompt, output(chunks))
    assert {c.version for c in chunks} == {3}
