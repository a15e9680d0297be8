"""vLLM's V1 engine (`AsyncLLM`) in this process, token in / token out.

    policy = build_policy("vllm", model="/models/qwen2.5-vl-7b", dtype="bfloat16", max_model_len=8192)

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, the log-softmax of the
logits after temperature scaling: log_softmax(logits / T), our contract, at any temperature
(vLLM's default "raw_logprobs" is log_softmax(logits), ignoring T). Greedy requests get the
raw log_softmax, as the contract says. vLLM takes the processed values after top-k / top-p
truncation too, so with top_p < 1 or top_k > 0 a token's log-prob is renormalised over the
kept tokens (higher than the contract's by -log(kept mass)); RL rollouts normally sample
untruncated. On CUDA this mode also turns off FlashInfer's fused top-k/top-p sampler.

Weight updates: a safetensors file or directory is passed to the workers as it is; other
weights are written to a temporary file (under /dev/shm when there is one). Generation is
paused with vLLM's `pause_generation(mode="keep", clear_cache=True)`: requests in flight stay
queued, and the caches the old weights made are dropped (prefix and encoder caches; running
requests are preempted and recompute their KV on resume). Every worker then loads the file
through `vllm_worker.WeightSyncExtension`, and generation resumes: requests in flight continue
on the new weights. Each request's outputs are read by a task as the engine delivers them and
stamped with the version installed then; the pause returns once the engine has sent its last
outputs and let them reach the requests' streams, so tokens sampled before the update carry
the old version and tokens sampled after it the new one.

Images: a prompt holds one <|image_pad|> per image or each image's expanded run; vLLM 0.32
always expands placeholders itself (`BaseMultiModalProcessor._apply_prompt_updates` replaces
every single image token with the full run), so runs are collapsed to one token first, and
the images go as PIL images from `ImageInputs.display` for vLLM's own processor. Untested on
CPU: vLLM's CPU build cannot load Qwen-VL models.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

import torch

from .base import Chunk, GenerateRequest, ImageInputs, Policy, PolicyError, SamplingParams, Weights, iter_weights

WORKER_EXTENSION = "medvistagym.policy.vllm_worker.WeightSyncExtension"
LOAD_WEIGHTS_RPC = "medvista_load_weights"

Emit = Callable[[Chunk], None]


class StreamTasks:
    """Runs each request's producer as a task that pushes chunks to a queue the caller's
    stream reads: chunks are stamped when they arrive, not when the caller gets to them, and
    `abort` cancels the task (which cancels the request in the engine or closes its HTTP
    stream), ending the stream with an empty "abort" chunk."""

    _END = object()

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}

    async def stream(
        self, request_id: str, produce: Callable[[Emit], Awaitable[None]], version: Callable[[], int]
    ) -> AsyncIterator[Chunk]:
        if request_id in self._tasks:
            raise PolicyError(f"request {request_id} is already in flight", retryable=False)
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def finished(task: asyncio.Task) -> None:
            if task.cancelled():
                queue.put_nowait(Chunk([], [], version(), "abort"))
            else:
                queue.put_nowait(task.exception() or self._END)

        task = asyncio.create_task(produce(queue.put_nowait))
        task.add_done_callback(finished)
        self._tasks[request_id] = task
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is self._END:
                    raise PolicyError(f"request {request_id}: stream ended without a finish reason")
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            task.cancel()  # the caller stopped early: cancel the request too
            self._tasks.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def abort_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def collapse_image_runs(token_ids: list[int], image_token_id: int, num_images: int) -> list[int]:
    """One image token per image: each run of `image_token_id` becomes a single token (the
    chat template puts <|vision_start|> / <|vision_end|> between images)."""
    out = [t for t, prev in zip(token_ids, [None, *token_ids]) if not (t == image_token_id == prev)]
    runs = sum(t == image_token_id for t in out)
    if runs != num_images:
        raise PolicyError(f"{runs} image placeholders for {num_images} images", retryable=False)
    return out


def display_images(images: ImageInputs) -> list[Any]:
    """The request's images as PIL images, for vLLM's own image processor."""
    from PIL import Image

    if images.display is None:
        raise PolicyError("this back end needs ImageInputs.display (the images as uint8 pixels)", retryable=False)
    return [Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()) for img in images.display]


def default_weights_dir() -> str | None:
    """/dev/shm (RAM-backed) when writable, else the system's temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def _owned_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; safetensors refuses tensors that share storage (tied
    embeddings), so a tensor whose storage was already taken is copied."""
    seen: set[int] = set()
    out = {}
    for name, tensor in iter_weights(weights):
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


@contextmanager
def staged_weights(weights: Weights, directory: str | Path | None = None) -> Iterator[str]:
    """A safetensors path the workers can read: a given file or directory as it is, else the
    tensors written to a temporary file under `directory`, removed afterwards."""
    if isinstance(weights, (str, Path)):
        yield str(weights)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="medvista-weights-", dir=directory) as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file(_owned_tensors(weights), str(path))
        yield str(path)


def vllm_sampling_params(sampling: SamplingParams) -> Any:
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k,  # 0 disables top-k in vLLM 0.32 as here
        max_tokens=sampling.max_new_tokens, stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed, ignore_eos=sampling.ignore_eos,
        logprobs=0,  # the sampled token's log-prob only
        output_kind=RequestOutputKind.DELTA, include_stop_str_in_output=True,
        detokenize=bool(sampling.stop),  # text is needed only to find stop strings
        skip_special_tokens=False,  # stop strings are matched on the full text, as StopChecker does
    )


def to_chunk(output: Any, version: int) -> Chunk:
    """A chunk from a vLLM `CompletionOutput` delta."""
    ids = list(output.token_ids)
    logprobs = [entry[t].logprob for t, entry in zip(ids, output.logprobs or [])]
    finish = output.finish_reason
    if finish == "error":
        raise PolicyError("vLLM failed the request")
    stop_reason = output.stop_reason
    if finish == "stop" and stop_reason is None and ids:
        stop_reason = ids[-1]  # vLLM leaves it unset for end-of-sequence
    return Chunk(ids, logprobs, version, finish, stop_reason if finish else None)


def _policy_error(exc: Exception) -> PolicyError:
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    retryable = not isinstance(exc, (EngineDeadError, VLLMClientError))
    return PolicyError(f"vLLM: {type(exc).__name__}: {exc}", retryable=retryable)


class VLLMPolicy(Policy):
    kind = "vllm"
    needs_patches = False  # the server processes the display images itself

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        seed: int = 0,
        engine_kwargs: Mapping[str, Any] | None = None,
        weights_dir: str | Path | None = None,
    ) -> None:
        """`engine_kwargs` go to `AsyncEngineArgs` as they are (e.g. enable_sleep_mode=True
        for `sleep` on GPUs); `weights_dir` holds weight files during updates (default
        /dev/shm)."""
        super().__init__()
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(
            model=str(model), dtype=dtype, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, seed=seed, logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION, **(engine_kwargs or {}),
        )
        self._tokenizer = AutoTokenizer.from_pretrained(str(model))
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._streams = StreamTasks()
        self._update_lock = asyncio.Lock()
        self._weights_dir = weights_dir if weights_dir is not None else default_weights_dir()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self._streams.stream(request.request_id, lambda emit: self._produce(request, emit), lambda: self._version)

    async def _produce(self, request: GenerateRequest, emit: Emit) -> None:
        try:
            prompt = await self._render(request)
            async for out in self._engine.generate(prompt, vllm_sampling_params(request.sampling), request.request_id):
                emit(to_chunk(out.outputs[0], self._version))
        except PolicyError:
            raise
        except Exception as exc:
            raise _policy_error(exc) from exc

    async def _render(self, request: GenerateRequest) -> Any:
        """The engine input, rendered as vLLM's own servers do (passing a raw prompt to
        `AsyncLLM.generate` is deprecated in 0.32)."""
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if request.images is not None and len(request.images):
            image_token_id = getattr(self._engine.model_config.hf_config, "image_token_id", None)
            if image_token_id is None:
                raise PolicyError("the model takes no images", retryable=False)
            prompt["prompt_token_ids"] = collapse_image_runs(prompt["prompt_token_ids"], image_token_id, len(request.images))
            prompt["multi_modal_data"] = {"image": display_images(request.images)}
        parsed = parse_model_prompt(self._engine.model_config, prompt)
        (engine_input,) = await self._engine.renderer.render_cmpl_async([parsed])
        return engine_input

    async def abort(self, request_id: str) -> None:
        """Cancels the request's task: a cancelled `AsyncLLM.generate` aborts it in the engine."""
        self._streams.abort(request_id)

    async def update_weights(self, weights: Weights) -> int:
        async with self._update_lock:
            with staged_weights(weights, self._weights_dir) as path:
                # Keep requests in flight; clear_cache drops every cache the old weights made
                # (prefix and encoder caches, and the KV of running requests, which recompute it
                # on the new weights). Nothing runs between this and resume.
                await self._engine.pause_generation(mode="keep", clear_cache=True)
                try:
                    await self._engine.collective_rpc(LOAD_WEIGHTS_RPC, args=(path,))
                    self._version += 1
                except Exception as exc:
                    raise PolicyError(f"weight update failed, the engine may hold part of it: {exc}",
                                      retryable=False) from exc
                finally:
                    await self._engine.resume_generation()
        return self._version

    async def sleep(self, level: int = 1) -> None:
        """vLLM's sleep: level 1 offloads the weights to CPU and drops the KV cache, level 2
        drops both (reload with `update_weights` after waking). Requests in flight are aborted.
        Needs engine_kwargs={"enable_sleep_mode": True} on GPUs; the CPU build pauses
        generation and keeps everything in memory."""
        await self._engine.sleep(level)

    async def wake_up(self) -> None:
        await self._engine.wake_up()

    async def close(self) -> None:
        await self._streams.abort_all()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

