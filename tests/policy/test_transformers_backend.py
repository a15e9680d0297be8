"""The transformers back end with tiny real Qwen2.5-VL and Qwen3-VL models (random weights,
real tokenizer, real images through our kernels), on CPU in fp32."""

from __future__ import annotations

import asyncio

import pytest
import torch
from policy_cases import collect, image_prompt, run, teacher_forced_logprobs

from medvistagym.policy import GenerateRequest, PolicyError, SamplingParams, build_policy
from medvistagym.policy.presets import build_model_dir

PRESET_OF = {"qwen2.5-vl-tiny": "qwen2.5-vl", "qwen3-vl-tiny": "qwen3-vl"}


@pytest.fixture(scope="module", params=list(PRESET_OF))
def policy(request, model_dirs):
    return build_policy("transformers", model=model_dirs[request.param], max_batch=16)


def requests_for(policy, photo) -> list[GenerateRequest]:
    """A mixed batch: 0-2 images, different prompt lengths and sampling settings."""
    preset = PRESET_OF[policy.path.name]
    tok = policy.tokenizer
    one, one_images = image_prompt(tok, photo, preset, [(0, 0, 256, 256)], "Which stain is this?")
    two, two_images = image_prompt(tok, photo, preset, [(0, 0, 256, 256), (100, 200, 400, 500)], "Compare them.")
    text = tok.apply_chat_template([{"role": "user", "content": "Is the lesion benign?"}], add_generation_prompt=True)
    text = list(text["input_ids"] if hasattr(text, "keys") else text)
    specs = [
        (one, one_images, SamplingParams(max_new_tokens=12, seed=1)),
        (one, one_images, SamplingParams(max_new_tokens=9, seed=2)),
        (two, two_images, SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=3)),
        (text, None, SamplingParams(max_new_tokens=14, temperature=0.0)),
        (text, None, SamplingParams(max_new_tokens=8, top_k=50, seed=5)),
    ]
    return [GenerateRequest(f"r{i}", ids, sp, images) for i, (ids, images, sp) in enumerate(specs)]


async def generate_all(policy, requests):
    return await asyncio.gather(*(collect(policy, r) for r in requests))


def flat(chunks):
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs]


def test_logprobs_equal_teacher_forced_forward(policy, photo):
    requests = requests_for(policy, photo)
    results = run(generate_all(policy, requests))
    worst = 0.0
    for request, chunks in zip(requests, results):
        tokens, logprobs = flat(chunks)
        assert len(tokens) == request.sampling.max_new_tokens and chunks[-1].finish_reason == "length"
        ref = teacher_forced_logprobs(policy.model, request.prompt_token_ids, tokens, request.images,
                                      request.sampling.temperature)
        worst = max(worst, (ref - torch.tensor(logprobs)).abs().max().item())
    assert worst <= 1e-3, worst


def test_batched_generation_equals_generation_alone(policy, photo):
    requests = requests_for(policy, photo)
    together = run(generate_all(policy, requests))
    for request, chunks in zip(requests, together):
        alone = run(collect(policy, request))
        assert flat(alone)[0] == flat(chunks)[0]
        assert torch.allclose(torch.tensor(flat(alone)[1]), torch.tensor(flat(chunks)[1]), atol=1e-4)


def test_seeds_reproduce_and_differ(policy, photo):
    request = requests_for(policy, photo)[0]
    a = flat(run(collect(policy, request)))[0]
    b = flat(run(collect(policy, request)))[0]
    other = GenerateRequest("x", request.prompt_token_ids, SamplingParams(max_new_tokens=12, seed=99), request.images)
    assert a == b
    assert flat(run(collect(policy, other)))[0] != a


def test_stop_strings_and_stop_tokens(policy, photo):
    base = requests_for(policy, photo)[3]  # greedy
    tokens = flat(run(collect(policy, base)))[0]
    text = policy.tokenizer.decode(tokens[:6])
    stop = text[-3:] if text[-3:].strip() else text[-4:]
    chunks = run(collect(policy, GenerateRequest("s", base.prompt_token_ids, SamplingParams(
        max_new_tokens=14, temperature=0.0, stop=(stop,)))))
    out = flat(chunks)[0]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop
    assert stop in policy.tokenizer.decode(out) and stop not in policy.tokenizer.decode(out[:-1])
    chunks = run(collect(policy, GenerateRequest("t", base.prompt_token_ids, SamplingParams(
        max_new_tokens=14, temperature=0.0, stop_token_ids=(tokens[4],)))))
    assert flat(chunks)[0] == tokens[: tokens.index(tokens[4]) + 1]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", tokens[4])


def test_abort_and_abandoned_streams_free_their_rows(model_dirs, photo):
    policy = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"], max_batch=2)
    request = requests_for(policy, photo)[3]

    async def scenario():
        long = SamplingParams(max_new_tokens=500, temperature=1.0, ignore_eos=True)
        r1, r2 = GenerateRequest("a", request.prompt_token_ids, long), GenerateRequest("b", request.prompt_token_ids, long)
        stream = policy.generate(r1)
        first = await stream.__anext__()
        await policy.abort("a")
        rest = [c async for c in stream]
        async for _ in policy.generate(r2):  # walk away after one chunk
            break
        # Both rows must be free again: two more requests finish although max_batch is 2.
        done = await asyncio.wait_for(asyncio.gather(*(collect(policy, GenerateRequest(
            f"c{i}", request.prompt_token_ids, SamplingParams(max_new_tokens=3))) for i in range(2))), 60)
        return first, rest, done

    first, rest, done = run(scenario())
    assert len(first.token_ids) == 1
    assert rest[-1].finish_reason == "abort" and rest[-1].token_ids == []
    assert sum(len(c.token_ids) for c in rest) < 500
    assert [flat(c)[0].__len__() for c in done] == [3, 3]


def test_update_weights_changes_generations_and_versions(model_dirs, photo, tmp_path):
    policy = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"])
    other = build_model_dir("qwen2.5-vl-tiny", tmp_path / "other", seed=7)
    request = requests_for(policy, photo)[0]
    greedy = GenerateRequest("g", request.prompt_token_ids, SamplingParams(max_new_tokens=8, temperature=0.0),
                             request.images)
    before = torch.tensor(flat(run(collect(policy, greedy)))[1])

    async def update_mid_stream():
        long = GenerateRequest("m", request.prompt_token_ids, SamplingParams(max_new_tokens=30, ignore_eos=True),
                               request.images)
        chunks, version = [], None
        async for chunk in policy.generate(long):
            chunks.append(chunk)
            if len(chunks) == 5:
                version = await policy.update_weights(other)
        return chunks, version

    chunks, version = run(update_mid_stream())
    versions = [c.version for c in chunks]
    assert version == 1 == policy.version
    assert versions[:5] == [0] * 5 and versions[-1] == 1 and versions == sorted(versions)
    after_tokens, after_logprobs = flat(run(collect(policy, greedy)))
    assert (torch.tensor(after_logprobs) - before).abs().max() > 0.01  # far above fp32 noise (~1e-6)
    # The new weights sampled them: greedy = argmax of a teacher-forced pass of the new checkpoint.
    from transformers import AutoModelForImageTextToText

    reference = AutoModelForImageTextToText.from_pretrained(other).eval()
    ref = teacher_forced_logprobs(reference, greedy.prompt_token_ids, after_tokens, greedy.images)
    assert (ref - torch.tensor(after_logprobs)).abs().max() <= 1e-3
    # A state dict under the module's names works too, and brings the old behaviour back.
    original = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"]).model.state_dict()
    assert run(policy.update_weights(original)) == 2
    assert torch.allclose(torch.tensor(flat(run(collect(policy, greedy)))[1]), before, atol=1e-5)


def test_bad_requests_and_weights_get_clear_errors(model_dirs, photo):
    policy = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"])
    request = requests_for(policy, photo)[0]
    short = GenerateRequest("bad", request.prompt_token_ids[:-3], request.sampling, request.images)
    with pytest.raises(ValueError, match="image tokens"):
        run(collect(policy, GenerateRequest("bad", [t for t in request.prompt_token_ids if t != 151655], request.sampling, request.images)))
    with pytest.raises(ValueError, match="image placeholders but no images"):
        run(collect(policy, GenerateRequest("bad", request.prompt_token_ids, request.sampling)))
    with pytest.raises(KeyError, match="unknown weight names"):
        run(policy.update_weights({"no.such.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="SamplingParams|top_p"):
        SamplingParams(top_p=0)
    assert short.images is request.images

    async def duplicate():
        stream = policy.generate(GenerateRequest("dup", request.prompt_token_ids, SamplingParams(max_new_tokens=50),
                                                 request.images))
        await stream.__anext__()
        try:
            await collect(policy, GenerateRequest("dup", [1, 2], SamplingParams()))
        finally:
            await stream.aclose()

    with pytest.raises(ValueError, match="already in flight"):
        run(duplicate())


def test_a_failing_step_fails_its_requests_and_the_policy_keeps_serving(model_dirs, photo, monkeypatch):
    policy = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"])
    request = requests_for(policy, photo)[3]
    real = type(policy.model.model).forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):  # stands in for a device error (e.g. out of memory) mid-stream
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(policy.model.model), "forward", flaky)
    with pytest.raises(PolicyError, match="simulated device failure"):
        run(collect(policy, GenerateRequest("f", request.prompt_token_ids, SamplingParams(max_new_tokens=10))))
    chunks = run(collect(policy, GenerateRequest("g", request.prompt_token_ids, SamplingParams(max_new_tokens=5))))
    assert len(flat(chunks)[0]) == 5


def test_bfloat16_runs_and_stays_near_the_fp32_distribution(model_dirs, photo):
    policy = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"], dtype="bfloat16")
    assert policy.model.dtype == torch.bfloat16
    request = requests_for(policy, photo)[0]
    tokens, logprobs = flat(run(collect(policy, request)))
    fp32 = build_policy("transformers", model=model_dirs["qwen2.5-vl-tiny"]).model
    ref = teacher_forced_logprobs(fp32, request.prompt_token_ids, tokens, request.images)
    assert len(tokens) == 12 and (ref - torch.tensor(logprobs)).abs().max() < 0.1  # bf16 rounding, not a bug
