"""The embedded back end: a transformers model in process, decoding many requests as one batch.

A scheduler coroutine owns the batch. Each step it admits waiting requests (prefilled in
groups of equal prompt length, so the n members of a GRPO group share one forward), decodes
one token for every running request in a single forward with a KV cache, samples, checks
stops and streams one-token chunks. The forward passes run in a worker thread so the event
loop (and the rollout engine on it) stays responsive; batch state is touched only by that
thread while the scheduler awaits it.

Rows in the batch are left-padded to a common cache length; positions are passed explicitly
(Qwen-VL's 3-D rotary positions from `get_rope_index` at prefill, then +1 per token), so
padding never shifts a row. Images arrive as model-ready patches (`ImageInputs`) with the
prompt's `<|image_pad|>` runs already expanded: no HF processor in the hot path.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from .base import Chunk, GenerateRequest, Policy, PolicyError, Weights, iter_weights
from .kv import PaddedKV
from .presets import PRESETS, ensure_model, model_class
from .sampling import Sampler
from .stopping import StopChecker, eos_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(model: str | Path) -> Path:
    """A preset name (built once under the cache) or a local model directory."""
    if str(model) in PRESETS:
        return ensure_model(str(model))
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a model preset ({', '.join(PRESETS)}) nor a model directory")
    return path


@dataclass(eq=False)
class _Seq:
    request: GenerateRequest
    stop: StopChecker
    generator: torch.Generator | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    output: list[int] = field(default_factory=list)
    aborted: bool = False
    done: bool = False


@dataclass
class _Event:
    """What one step did to one request: a token, or an error, or its abort."""

    seq: _Seq
    token: int = -1
    logprob: float = 0.0
    finish: tuple[str, Any] | None = None
    error: Exception | None = None


class TransformersPolicy(Policy):
    kind = "transformers"

    def __init__(
        self,
        model: str | Path = "qwen2.5-vl-tiny",
        *,
        device: str = "auto",
        dtype: str = "float32",
        max_batch: int = 64,
        max_prefill_tokens: int = 8192,
        attn_implementation: str = "sdpa",
        seed: int = 0,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.path = resolve_model(model)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        config = AutoConfig.from_pretrained(self.path)
        self._cls = model_class(config)
        self._dtype = DTYPES[dtype]
        self._attn = attn_implementation
        self.model = self._load(self.path)
        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        try:
            generation = GenerationConfig.from_pretrained(self.path)
        except OSError:
            generation = None
        self._eos = eos_token_ids(self._tokenizer, generation)
        self.config = config
        self.image_token_id: int | None = getattr(config, "image_token_id", None)
        self._mrope = self.image_token_id is not None
        self.merge_size = config.vision_config.spatial_merge_size if self._mrope else 1
        self.vision = {"qwen2_5_vl": "qwen2.5-vl", "qwen2_vl": "qwen2-vl", "qwen3_vl": "qwen3-vl"}.get(config.model_type)
        self.max_positions = (config.text_config if self._mrope else config).max_position_embeddings
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._sampler = Sampler()
        self._ids = itertools.count()
        self._requests: dict[str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._weights: deque[tuple[list[tuple[str, torch.Tensor]], asyncio.Future]] = deque()
        self._scheduler: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._reset_batch()

    # -- public interface --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self._validate(request)
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        # Our own prompt: an aborted sequence may sit in the batch until the next step, past its request.
        request = replace(request, prompt_token_ids=list(request.prompt_token_ids))
        seq = _Seq(request, StopChecker(self._tokenizer, request.sampling, self._eos), self._seeded(request))
        self._requests[request.request_id] = seq
        self._waiting.append(seq)
        self._kick()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:  # the consumer went away: free its row at the next step
                seq.aborted = True
            self._requests.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        seq = self._requests.get(request_id)
        if seq is not None:
            seq.aborted = True
            self._kick()

    async def update_weights(self, weights: Weights) -> int:
        named = await asyncio.to_thread(self._read_weights, weights)
        future = asyncio.get_running_loop().create_future()
        self._weights.append((named, future))
        self._kick()
        return await future

    async def close(self) -> None:
        if self._scheduler is not None and not self._scheduler.done():
            self._scheduler.cancel()
            try:
                await self._scheduler
            except asyncio.CancelledError:
                pass
        self._fail_all(PolicyError("policy closed", retryable=False))

    # -- requests ----------------------------------------------------------------------------

    def _validate(self, request: GenerateRequest) -> None:
        ids = request.prompt_token_ids
        total = len(ids) + request.sampling.max_new_tokens
        if total > self.max_positions:
            raise ValueError(f"request {request.request_id}: prompt ({len(ids)}) + max_new_tokens exceeds "
                             f"the model's {self.max_positions} positions")
        if request.images is None:
            if self._mrope and self.image_token_id in ids:
                raise ValueError(f"request {request.request_id}: image placeholders but no images")
            return
        if not self._mrope:
            raise ValueError(f"request {request.request_id}: {self.path.name} is a text-only model")
        if request.images.pixel_values is None:
            raise ValueError(f"request {request.request_id}: this back end needs ImageInputs.pixel_values (patches)")
        placeholders = ids.count(self.image_token_id)
        needed = sum(request.images.num_tokens(self.merge_size))
        if placeholders != needed:
            raise ValueError(f"request {request.request_id}: {placeholders} image tokens in the prompt, the images "
                             f"need {needed} (expand each placeholder with policy.expand_image_tokens)")

    def _seeded(self, request: GenerateRequest) -> torch.Generator | None:
        if request.sampling.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(request.sampling.seed)

    def _kick(self) -> None:
        """Start the scheduler on this event loop if needed, and wake it."""
        loop = asyncio.get_running_loop()
        if self._scheduler is None or self._scheduler.done() or self._scheduler.get_loop() is not loop:
            self._reset_batch()  # a previous loop's batch cannot be resumed
            self._wake = asyncio.Event()
            self._scheduler = loop.create_task(self._schedule(), name="transformers-policy-scheduler")
        self._wake.set()

    # -- the scheduler (event loop side) -----------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._install_weights()
            if not self._rows and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted = self._admit()
            version = self._version
            try:
                events = await asyncio.to_thread(self._step, admitted)
            except Exception as err:  # a failed decode step fails the whole batch, not the policy
                self._fail_batch(admitted, err)
                continue
            self._deliver(events, version)

    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        tokens = 0
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
            seq = self._waiting[0]
            n = len(seq.request.prompt_token_ids)
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            if seq.aborted:
                self._finish(seq, Chunk([], [], self._version, "abort"))
                continue
            admitted.append(seq)
            tokens += n
        return admitted

    def _deliver(self, events: list[_Event], version: int) -> None:
        for ev in events:
            if ev.error is not None:
                self._finish(ev.seq, ev.error)
            elif ev.token < 0:
                self._finish(ev.seq, Chunk([], [], version, "abort"))
            elif ev.finish is not None:
                self._finish(ev.seq, Chunk([ev.token], [ev.logprob], version, ev.finish[0], ev.finish[1]))
            else:
                ev.seq.queue.put_nowait(Chunk([ev.token], [ev.logprob], version))

    def _finish(self, seq: _Seq, item: Chunk | Exception) -> None:
        seq.done = True
        seq.queue.put_nowait(item)

    def _fail_batch(self, admitted: list[_Seq], err: Exception) -> None:
        error = PolicyError(f"transformers backend step failed: {type(err).__name__}: {err}")
        for seq in [*self._rows, *admitted]:
            self._finish(seq, error)
        self._reset_batch()

    def _fail_all(self, err: PolicyError) -> None:
        for seq in [*self._rows, *self._waiting]:
            if not seq.done:
                self._finish(seq, err)
        self._waiting.clear()
        self._reset_batch()
        while self._weights:
            _, future = self._weights.popleft()
            if not future.done():
                future.set_exception(err)

    async def _install_weights(self) -> None:
        while self._weights:
            named, future = self._weights.popleft()
            try:
                await asyncio.to_thread(self._copy_weights, named)
            except Exception as err:
                future.set_exception(err)
                continue
            self._version += 1
            future.set_result(self._version)

    # -- the batch (worker thread side) ------------------------------------------------------

    def _reset_batch(self) -> None:
        self._rows: list[_Seq] = []
        self._kv = PaddedKV()
        self._last = torch.empty(0, dtype=torch.long, device=self.device)
        self._pos = torch.empty(0, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def _step(self, admitted: list[_Seq]) -> list[_Event]:
        events = self._drop_aborted()
        if self._rows:
            events += self._decode()
        for group in _equal_length_groups(admitted):
            try:
                events += self._prefill(group)
            except Exception as err:  # e.g. images that do not fit the prompt: fail those requests only
                events += [_Event(seq, error=PolicyError(f"prefill failed: {type(err).__name__}: {err}",
                                                         retryable=False)) for seq in group]
        self._drop_finished(events)
        return events

    def _drop_aborted(self) -> list[_Event]:
        aborted = [seq for seq in self._rows if seq.aborted]
        if aborted:
            self._keep([i for i, seq in enumerate(self._rows) if not seq.aborted])
        return [_Event(seq) for seq in aborted]

    def _drop_finished(self, events: list[_Event]) -> None:
        ended = {id(ev.seq) for ev in events if ev.finish is not None or ev.error is not None}
        if ended:
            self._keep([i for i, seq in enumerate(self._rows) if id(seq) not in ended])

    def _keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._rows = [self._rows[i] for i in rows]
        self._kv.select(index)
        self._last, self._pos = self._last[index], self._pos[index]

    def _positions(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, L) text positions in the model's layout ((3, B, L) for Qwen-VL's M-RoPE)."""
        return pos.unsqueeze(0).expand(3, -1, -1) if self._mrope else pos

    def _decode(self) -> list[_Event]:
        mask = self._kv.extend_mask()
        out = self.model.model(
            input_ids=self._last.unsqueeze(1), attention_mask=mask, position_ids=self._positions(self._pos.unsqueeze(1)),
            past_key_values=self._kv.cache(), use_cache=True,
        )
        self._kv.store(out.past_key_values)
        self._pos = self._pos + 1
        return self._sample(self._rows, out.last_hidden_state[:, -1], range(len(self._rows)))

    def _prefill(self, group: list[_Seq]) -> list[_Event]:
        """One forward for requests whose prompts have equal length (no padding), merged into the batch."""
        ids = torch.tensor([s.request.prompt_token_ids for s in group], dtype=torch.long, device=self.device)
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        images = [s.request.images for s in group if s.request.images is not None]
        if self._mrope:
            inputs["mm_token_type_ids"] = (ids == self.image_token_id).int()
            if images:
                inputs["pixel_values"] = torch.cat([im.pixel_values for im in images]).to(self.device, self._dtype)
                inputs["image_grid_thw"] = torch.cat([im.grid_thw for im in images]).to(self.device)
            positions, _ = self.model.model.get_rope_index(
                ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=inputs["attention_mask"],
            )
            next_pos = positions.amax(dim=(0, 2)) + 1
        else:
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
            next_pos = torch.full((len(group),), ids.shape[1], device=self.device)
        out = self.model.model(**inputs, position_ids=positions, use_cache=True)
        first = len(self._rows)
        self._kv.append(out.past_key_values, ids.shape[1])
        self._rows += group
        self._pos = torch.cat([self._pos, next_pos.long()])
        self._last = torch.cat([self._last, torch.zeros(len(group), dtype=torch.long, device=self.device)])
        return self._sample(group, out.last_hidden_state[:, -1], range(first, first + len(group)))

    def _sample(self, seqs: list[_Seq], hidden: torch.Tensor, rows: range) -> list[_Event]:
        logits = self._sampler.logits(hidden, self.model.lm_head.weight)
        tokens, logprobs = self._sampler.sample(logits, [s.request.sampling for s in seqs],
                                                [s.generator for s in seqs], self._generator)
        self._last[rows.start : rows.stop] = tokens
        events = []
        for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            seq.output.append(token)
            events.append(_Event(seq, token, logprob, seq.stop.check(seq.output)))
        return events

    # -- weights -----------------------------------------------------------------------------

    def _load(self, path: Path) -> torch.nn.Module:
        model = self._cls.from_pretrained(path, dtype=self._dtype, attn_implementation=self._attn)
        return model.to(self.device).eval()

    def _read_weights(self, weights: Weights) -> list[tuple[str, torch.Tensor]]:
        """Named tensors under this model's parameter names. Files and directories go through
        from_pretrained, which maps checkpoint names (e.g. Qwen-VL's `model.layers.*`) to modules."""
        if isinstance(weights, (str, Path)) and (Path(weights) / "config.json").is_file():
            return list(self._cls.from_pretrained(weights, dtype=self._dtype).state_dict().items())
        named = list(iter_weights(weights))
        params = self.model.state_dict()
        unknown = [n for n, _ in named if n not in params]
        if unknown:
            raise KeyError(f"{len(unknown)} unknown weight names, e.g. {unknown[:3]}")
        wrong = [n for n, t in named if t.shape != params[n].shape]
        if wrong:
            raise ValueError(f"shape mismatch for {wrong[:3]}: expected {[tuple(params[n].shape) for n in wrong[:3]]}")
        return named

    @torch.no_grad()
    def _copy_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        params = self.model.state_dict()
        for name, tensor in named:
            params[name].copy_(tensor)


def _equal_length_groups(seqs: list[_Seq]) -> list[list[_Seq]]:
    groups: dict[int, list[_Seq]] = {}
    for seq in seqs:
        groups.setdefault(len(seq.request.prompt_token_ids), []).append(seq)
    return list(groups.values())
