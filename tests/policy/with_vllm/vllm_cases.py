"""Helpers shared by the tests of both vLLM back ends."""

from __future__ import annotations

from medvistagym.policy import Chunk, GenerateRequest, ImageInputs, SamplingParams

MAX_MODEL_LEN = 8192
# The length of the requests a test acts on mid-stream (abort, weight update): at ~10 ms a token
# on a 2-core CPU they run for over a minute, so a starved test process still acts before the
# server finishes them. They end early on the test's abort.
LONG_NEW_TOKENS = MAX_MODEL_LEN - 128


def output(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def request(request_id: str, prompt: list[int], images: ImageInputs | None = None, **sampling) -> GenerateRequest:
    return GenerateRequest(request_id, prompt, SamplingParams(**sampling), images)


def check_weight_update(policy, prompt, run, complete, reference, text_model_dirs, update_in_flight) -> list[int]:
    """Install the second checkpoint while a greedy request is in flight: its tokens before the
    update follow the old weights, those after follow the new ones on the whole prefix (the KV
    cache was recomputed), versions go 0 then 1, and new requests follow the new weights.
    Returns the greedy output of the old weights."""
    old, new = text_model_dirs
    greedy = dict(temperature=0, max_new_tokens=16, ignore_eos=True)
    before = output(complete(policy, request("before", prompt, **greedy)))
    long = request("in-flight", prompt, temperature=0, max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True)
    chunks = run(update_in_flight(policy, long, new / "model.safetensors"))
    versions = [c.version for c in chunks]
    n_old = versions.count(0)
    # The stream ends at the abort, or at the length limit when the server outran this client
    # (on a busy machine it can buffer the rest of the request before the abort is read).
    ends = (versions[0], versions[-1], n_old, len(versions), chunks[-1].finish_reason)
    assert 0 < n_old < len(versions) and versions == [0] * n_old + [1] * (len(versions) - n_old), ends
    assert chunks[-1].finish_reason in ("abort", "length"), ends
    out = output(chunks)
    assert out[:n_old] == reference.argmax(old, prompt, out[:n_old])
    assert out[n_old:] == reference.argmax(new, prompt, out)[n_old:]
    after = complete(policy, request("after", prompt, **greedy))
    assert {c.version for c in after} == {1} and policy.version == 1
    assert output(after) == reference.argmax(new, prompt, output(after)) != before
    return before


def check_stop_string(policy, prompt, complete, reference) -> list[int]:
    """A stop string taken from the greedy output ends the stream at the token completing it,
    kept in the output. Returns the greedy output."""
    greedy = output(complete(policy, request("greedy", prompt, temperature=0, max_new_tokens=24, ignore_eos=True)))
    stop, k = reference.stop_string(policy.tokenizer, greedy)
    chunks = complete(policy, request("stop-str", prompt, temperature=0, max_new_tokens=24, ignore_eos=True,
                                      stop=(stop,)))
    assert output(chunks) == greedy[: k + 1]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", stop)
    return greedy


async def abort_after_three(policy, prompt) -> list[Chunk]:
    """Stream a long greedy request, aborting it (and an unknown id, which is ignored) after
    its third chunk; returns the chunks."""
    got = []
    long = request("abort", prompt, temperature=0, max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True)
    async for chunk in policy.generate(long):
        got.append(chunk)
        if len(got) == 3:
            await policy.abort("abort")
            await policy.abort("no-such-request")
    return got
