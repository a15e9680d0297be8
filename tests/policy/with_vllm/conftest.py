"""Shared fixtures for the tests against real vLLM (CPU build), run by `make test-vllm` in
.venv-vllm. Without vLLM (the main .venv) the directory is skipped."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Callable

import pytest

from vllm_cases import MAX_MODEL_LEN


def _vllm_installed() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None  # a regular package, not a stray folder


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]

# The tests' engines: the tiny model in fp32, eager (no torch.compile warm-up on CPU), and a
# fixed 256 MiB KV cache rather than a share of RAM (vLLM's CPU default), so the tests do not
# depend on free memory.
KV_CACHE_BYTES = 256 * 2**20


@pytest.fixture(scope="session")
def text_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny random Qwen2 checkpoints (seeds 0 and 1) with the real Qwen tokenizer."""
    from medvistagym.policy.presets import build_model_dir

    root = tmp_path_factory.mktemp("models")
    return build_model_dir("qwen2-tiny", root / "seed0", seed=0), build_model_dir("qwen2-tiny", root / "seed1", seed=1)


@pytest.fixture(scope="session")
def engine_config() -> dict:
    """VLLMPolicy keyword arguments for the tests' engine."""
    return dict(dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, gpu_memory_utilization=0.2,
                seed=0, engine_kwargs={"kv_cache_memory_bytes": KV_CACHE_BYTES})


@pytest.fixture(scope="session")
def server_args() -> list[str]:
    """`vllm serve` options for the same engine."""
    return ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--gpu-memory-utilization", "0.2", "--seed", "0", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]


@pytest.fixture(scope="session")
def run() -> Callable:
    """Runs a coroutine on one event loop shared by the whole session (an engine's output
    handler stays bound to the loop it first ran on)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


class Reference:
    """Teacher-forced forward passes of the same checkpoints in transformers, fp32."""

    def __init__(self) -> None:
        self._models: dict[str, object] = {}

    def model(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        key = str(model_dir)
        if key not in self._models:
            self._models[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
        return self._models[key]

    def next_token_logits(self, model_dir: Path, prompt: list[int], output: list[int]):
        """Logits that predicted each output token."""
        import torch

        with torch.no_grad():
            logits = self.model(model_dir)(torch.tensor([prompt + output])).logits[0]
        return logits[len(prompt) - 1 : -1]

    def logprobs(self, model_dir: Path, prompt: list[int], output: list[int], temperature: float) -> list[float]:
        """log_softmax(logits / T) of each output token; raw log_softmax when greedy."""
        import torch

        logits = self.next_token_logits(model_dir, prompt, output)
        lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        return lp.gather(-1, torch.tensor(output)[:, None])[:, 0].tolist()

    def argmax(self, model_dir: Path, prompt: list[int], output: list[int]) -> list[int]:
        """The greedy choice at each output position, given the output before it."""
        return self.next_token_logits(model_dir, prompt, output).argmax(-1).tolist()

    def state_dict(self, model_dir: Path) -> dict:
        return self.model(model_dir).state_dict()

    @staticmethod
    def stop_string(tokenizer, output: list[int]) -> tuple[str, int]:
        """A stop string that the decoded `output` first contains once token k is added, and
        k: the last (up to two) characters of a token whose text is plain."""
        for k in range(1, len(output)):
            text = tokenizer.decode(output[: k + 1])
            piece = text[len(tokenizer.decode(output[:k])):]
            stop = piece[-2:]
            if stop and stop.isprintable() and "\ufffd" not in text and text.find(stop) == len(text) - len(stop):
                return stop, k
        raise AssertionError("no usable stop string in the output")


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="session")
def complete(run) -> Callable:
    """complete(policy, request) -> the request's chunks, streamed to the end."""

    async def drain(policy, request):
        return [chunk async for chunk in policy.generate(request)]

    return lambda policy, request: run(drain(policy, request))


@pytest.fixture(scope="session")
def update_in_flight() -> Callable:
    """update_in_flight(policy, request, weights) -> the chunks of `request`, streamed while
    `weights` are installed once its first token is in, and aborted after 32 tokens on them.
    The request should be long enough to outlast the update however slow the machine."""

    async def stream(policy, request, weights, after: int = 32):
        got = []
        async for chunk in policy.generate(request):
            got.append(chunk)
            if len(got) == 1:
                await policy.update_weights(weights)
            elif sum(c.version == policy.version for c in got) == after:
                await policy.abort(request.request_id)
        return got

    return stream
