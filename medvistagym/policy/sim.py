"""A simulated inference back end: a continuous-batching server without a model.

`SimPolicy` looks like vLLM from the outside (streamed chunks of token ids and log-probs,
finish reasons, abort, weight versions) and is meant for rollout-scheduler benchmarks and
fault-injection tests of the engines that drive it.

Latency. One scheduler task runs ticks. A tick first admits waiting requests in FIFO order
while fewer than `max_batch` hold a slot, then advances every running request by `tick_tokens`
tokens (the stream interval) and lasts

    (tick_tokens * (decode_base_s + decode_per_seq_s * B) + prefill_s_per_token * P) * time_scale

with B running requests and P prompt tokens admitted in the tick that its prefix cache does not
hold (vLLM's automatic prefix caching: LRU blocks of prompts and outputs seen). Ticks follow a clock of their
own, as a GPU would: the simulator's CPU time does not stretch the modelled time, and a loop that
fell behind gets the ticks it missed back to back; the clock restarts when the server idles or
pauses for a weight update (`weight_sync_s`, between ticks).

Streaming. A tick only moves each request's produced-token count; the consumer cuts its chunk
when it wakes, so one that falls behind gets the ticks it missed merged into one chunk (split
where the weight version changed), as vLLM's output collector merges them. Each chunk carries
the version of the tick that produced it.

Script. Each turn is scripted from an RNG seeded by (config seed, the request's sampling seed or
else its id, turn index = number of <tool_response> tokens in the prompt):
    <think>\\n{reasoning}\\n</think>\\n  then  <tool_call>\\n{zoom_in json}\\n</tool_call>  or  <answer>X</answer>
followed by <|im_end|>. The reasoning length has a long tail (lognormal) and its tokens are cut
from a pool of medical sentences; fixed fragments are encoded once, so a request costs no
tokenizer work beyond its few new fragments. Where the stream stops (stop strings, stop token
ids, end of sequence, max_new_tokens, as `StopChecker` decides) is computed from the script up
front, so no tick decodes anything.

Faults, drawn per request from the seed, its id and the number of faults that id already had
(so a retry of a failed request may succeed): a retryable error after some tokens, a hang that
keeps the request's slot until it is aborted, or a slow request that advances on every
`slow_factor`-th tick only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import random
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from ..config import from_dict
from ..env.protocol import ANSWER_CLOSE, ANSWER_OPEN, CALL_CLOSE, CALL_OPEN, RESPONSE_OPEN, THINK_CLOSE, THINK_OPEN
from .base import Chunk, Completion, GenerateRequest, Policy, PolicyError, SamplingParams, Weights
from .stopping import eos_token_ids

log = logging.getLogger(__name__)

EOS_TOKEN = "<|im_end|>"
FILLER_SENTENCES = (
    "The image shows an axial slice of the chest.",
    "There is a small rounded opacity in the right lower lobe.",
    "The cardiac silhouette appears within normal limits.",
    "I should look more closely at the region near the hilum.",
    "No pleural effusion or pneumothorax is visible.",
    "The margins of the lesion are irregular, which suggests it may not be benign.",
    "Comparing both sides helps to judge the density of the finding.",
)
FILLER_POOL_TOKENS = 512  # reasoning is cut from a pool about this long, wrapping around
LOGPROB_POOL = 8192  # log-probs are read from a pool this long at a per-request offset


@dataclass(frozen=True)
class LatencyModel:
    tick_tokens: int = 8  # tokens per running request per tick: the stream interval
    decode_base_s: float = 0.012  # one decode step of the batch, fixed part
    decode_per_seq_s: float = 7e-5  # one decode step, added per running request
    prefill_s_per_token: float = 3e-5  # per uncached prompt token of the requests admitted in a tick
    prefix_cache_tokens: int = 1_000_000  # automatic prefix caching (LRU, 256-token blocks); 0 disables
    max_batch: int = 256  # requests holding a slot at once; the rest wait in FIFO order
    weight_sync_s: float = 0.5  # one update_weights; decoding pauses meanwhile
    time_scale: float = 1.0  # multiplies every delay; 0 runs ticks back to back

    def __post_init__(self) -> None:
        _require(self.tick_tokens >= 1 and self.max_batch >= 1, "tick_tokens and max_batch must be >= 1")
        _require(self.prefix_cache_tokens >= 0, "prefix_cache_tokens must be >= 0")
        times = (self.decode_base_s, self.decode_per_seq_s, self.prefill_s_per_token, self.weight_sync_s)
        _require(min(times) >= 0 and self.time_scale >= 0, "latencies and time_scale must be >= 0")


@dataclass(frozen=True)
class LengthModel:
    kind: str = "lognormal"  # "lognormal" (long tail) or "fixed"
    median_tokens: int = 48  # median reasoning length in tokens; the length itself when "fixed"
    sigma: float = 1.0  # lognormal shape: p99/p50 = exp(2.33 * sigma)
    max_filler_tokens: int = 1024  # the tail is clipped here

    def __post_init__(self) -> None:
        _require(self.kind in ("lognormal", "fixed"), f"length kind must be lognormal or fixed, got {self.kind!r}")
        _require(1 <= self.median_tokens <= self.max_filler_tokens, "need 1 <= median_tokens <= max_filler_tokens")
        _require(self.sigma >= 0, "sigma must be >= 0")


@dataclass(frozen=True)
class FaultModel:
    error_rate: float = 0.0  # requests that raise a retryable PolicyError after some tokens
    hang_rate: float = 0.0  # requests that stop streaming and keep their slot until aborted
    slow_rate: float = 0.0  # requests that advance on every slow_factor-th tick only
    slow_factor: int = 4

    def __post_init__(self) -> None:
        rates = (self.error_rate, self.hang_rate, self.slow_rate)
        _require(all(0 <= r <= 1 for r in rates), "fault rates must be in [0, 1]")
        _require(self.slow_factor >= 1, "slow_factor must be >= 1")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0  # with the request's seed or id and the turn, fixes every script and fault
    tool_call_prob: tuple[float, ...] = (0.8, 0.6, 0.4, 0.2)  # P(tool call) at turn 0, 1, ...; later turns answer
    answers: tuple[str, ...] = ("yes", "no", "A", "B", "C", "D", "left lung")  # final answers drawn from
    malformed_call_rate: float = 0.0  # tool calls whose JSON is cut short
    patch_size: int = 14  # image pixels per grid_thw cell, for the size the model saw
    default_image_size: tuple[int, int] = (448, 448)  # (width, height) when a request carries no images
    logprob_mean: float = 0.5  # log-probs are -Exponential(mean)
    latency: LatencyModel = field(default_factory=LatencyModel)
    length: LengthModel = field(default_factory=LengthModel)
    faults: FaultModel = field(default_factory=FaultModel)

    def __post_init__(self) -> None:
        rates = (*self.tool_call_prob, self.malformed_call_rate)
        _require(all(0 <= p <= 1 for p in rates), "tool_call_prob and malformed_call_rate must be in [0, 1]")
        _require(bool(self.answers) and all(self.answers), "answers must be non-empty strings")
        _require(self.patch_size >= 1 and min(self.default_image_size) >= 1, "image sizes must be positive")
        _require(self.logprob_mean > 0, "logprob_mean must be > 0")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def make_config(config: SimConfig | Mapping[str, Any] | None = None, **overrides: Any) -> SimConfig:
    """`config` (a SimConfig, a mapping as read from YAML, or None) with `overrides` on top;
    nested overrides (mappings or dataclasses) replace only the fields they name."""
    base = _as_dict(config) if config is not None else {}
    return from_dict(SimConfig, _merge(base, overrides))


def _as_dict(value: Any) -> dict:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


def _merge(base: dict, top: Mapping[str, Any]) -> dict:
    out = dict(base)
    for key, value in top.items():
        if dataclasses.is_dataclass(value) or isinstance(value, Mapping):
            value = _as_dict(value)
            if isinstance(out.get(key), dict):
                value = _merge(out[key], value)
        out[key] = value
    return out


# --------------------------------------------------------------------------- scripts


class _Piece:
    """Token ids with their text. `ends` (text length after each token) is found only for a
    piece a stop string ends in; reasoning pieces read it from the pool's offsets."""

    __slots__ = ("ids", "text", "ends", "pool_start")

    def __init__(self, ids: list[int], text: str, pool_start: int | None = None) -> None:
        self.ids, self.text, self.pool_start = ids, text, pool_start
        self.ends: list[int] | None = None


_WAITING, _RUNNING, _HUNG, _DONE = range(4)
_FINISHED = object()  # `_Req.final` of a request whose script ran to its end


class _Req:
    """One request in flight: its precomputed output, its place in the server, and what its
    consumer has taken. Ticks move `pos`; the consumer cuts chunks from `sent` to `pos`."""

    __slots__ = ("id", "tokens", "logprobs", "finish_reason", "stop_reason", "fault", "limit", "period", "prefill",
                 "state", "pos", "sent", "version", "splits", "final", "waiter", "final_only")

    def __init__(self, request_id: str, tokens: tuple[int, ...], logprobs: tuple[float, ...],
                 finish: tuple[str, str | int | None], fault: str | None, limit: int, period: int,
                 prefill: int) -> None:
        self.id = request_id
        # Tuples of numbers leave the garbage collector's tracking, so 16k long outputs in
        # flight add nothing to its full collections.
        self.tokens, self.logprobs = tokens, logprobs
        self.finish_reason, self.stop_reason = finish
        self.fault = fault  # None, "error" or "hang", striking once `limit` tokens are out
        self.limit = limit
        self.period = period  # advances on ticks divisible by this
        self.prefill = prefill
        self.state = _WAITING
        self.pos = 0  # tokens produced
        self.sent = 0  # tokens handed to the consumer
        self.version = 0  # weights that produced tokens[sent:pos] after the last split
        self.splits: list[tuple[int, int]] | None = None  # (end, version) of earlier unsent runs
        self.final: Any = None  # then _FINISHED, the abort Chunk or a PolicyError
        self.waiter: asyncio.Future | None = None  # the consumer waiting for more
        self.final_only = False  # the consumer waits for the end only (complete())

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # a cancelled consumer has not run its cleanup yet
                waiter.set_result(None)

    def stamp(self, version: int) -> None:
        """Tokens from here on come from `version`; unsent ones from before keep theirs."""
        if self.sent < self.pos:
            self.splits = self.splits or []
            self.splits.append((self.pos, self.version))
        self.version = version

    def output(self) -> Completion:
        """Everything produced, for a consumer that took nothing: version runs from the splits."""
        versions: list[int] = []
        start = 0
        for end, version in self.splits or ():
            versions += [version] * (end - start)
            start = end
        versions += [self.version] * (self.pos - start)
        if self.final is _FINISHED:
            reason, stop = self.finish_reason, self.stop_reason
        else:
            reason, stop = "abort", None
        return Completion(list(self.tokens[: self.pos]), list(self.logprobs[: self.pos]), versions, reason, stop)

    def take(self) -> Chunk:
        """The next chunk of produced tokens, carrying the finish reason if it is the last."""
        end, version = self.splits.pop(0) if self.splits else (self.pos, self.version)
        start, self.sent = self.sent, end
        chunk = Chunk(list(self.tokens[start:end]), list(self.logprobs[start:end]), version)
        if self.final is _FINISHED and end == self.pos:
            chunk.finish_reason, chunk.stop_reason = self.finish_reason, self.stop_reason
        return chunk


class _Scripter:
    """Turns requests into scripted, already-cut token streams."""

    def __init__(self, tokenizer: Any, config: SimConfig) -> None:
        self._tok = tokenizer
        self._config = config
        self._pieces: dict[str, _Piece] = {}
        self._response_id = tokenizer.convert_tokens_to_ids(RESPONSE_OPEN)
        if self._response_id is None or self._response_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {RESPONSE_OPEN} token to count turns by")
        eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        if eos is None or eos == tokenizer.unk_token_id:
            eos = tokenizer.eos_token_id
        self._eos = _Piece([eos], tokenizer.decode([eos], skip_special_tokens=False))
        self._eos_ids = frozenset(eos_token_ids(tokenizer)) | {eos}
        self._build_filler_pool()
        rng = random.Random(f"{config.seed}|logprobs")
        self._lp = tuple(-rng.expovariate(1 / config.logprob_mean) for _ in range(LOGPROB_POOL))
        self._lp2 = self._lp + self._lp  # any window of LOGPROB_POOL is one slice
        self._cache = _PrefixCache(config.latency.prefix_cache_tokens)

    def _build_filler_pool(self) -> None:
        text = " ".join(FILLER_SENTENCES) + " "
        cycle = len(self._tok.encode(text, add_special_tokens=False))
        ids = self._tok.encode(text * max(1, FILLER_POOL_TOKENS // cycle), add_special_tokens=False)
        # The sentences are ASCII, so every token decodes to whole characters.
        pieces = self._tok.batch_decode([[t] for t in ids], skip_special_tokens=False)
        self._pool, self._pool_text, self._cycle = ids, "".join(pieces), cycle
        self._pool_ends = [0, *itertools.accumulate(len(p) for p in pieces)]

    def plan(self, request: GenerateRequest, attempt: int) -> _Req:
        """The request's stream; `attempt` counts injected faults its id already had."""
        config, sampling = self._config, request.sampling
        turn = request.prompt_token_ids.count(self._response_id)
        who = f"seed={sampling.seed}" if sampling.seed is not None else f"id={request.request_id}"
        rng = random.Random(f"{config.seed}|{who}|turn={turn}")
        pieces = self._turn(rng, turn, self._image_size(request))
        tokens, finish = self._cut(pieces, sampling)
        logprobs = self._logprobs(rng.randrange(LOGPROB_POOL), len(tokens))
        fault, limit, period = self._faults(f"{config.seed}|{request.request_id}|turn={turn}|{attempt}", len(tokens))
        # Image runs come expanded, as the transformers back end wants: they count as tokens.
        prefill = self._cache.admit(request.prompt_token_ids, tokens)
        return _Req(request.request_id, tokens, logprobs, finish, fault, limit, period, prefill)

    def _image_size(self, request: GenerateRequest) -> tuple[int, int]:
        """(width, height) of image 0 as the model saw it."""
        if request.images is None or len(request.images) == 0:
            return self._config.default_image_size
        _, h, w = request.images.grid_thw[0].tolist()
        return w * self._config.patch_size, h * self._config.patch_size

    def _turn(self, rng: random.Random, turn: int, size: tuple[int, int]) -> list[_Piece]:
        probs = self._config.tool_call_prob
        call = turn < len(probs) and rng.random() < probs[turn]
        pieces = [self._piece(THINK_OPEN + "\n"), *self._filler(rng.randrange(self._cycle), self._filler_len(rng)),
                  self._piece("\n" + THINK_CLOSE + "\n")]
        if call:
            pieces += self._zoom_call(rng, size)
        else:
            pieces.append(self._piece(ANSWER_OPEN + rng.choice(self._config.answers) + ANSWER_CLOSE))
        pieces.append(self._eos)
        return pieces

    def _filler_len(self, rng: random.Random) -> int:
        m = self._config.length
        if m.kind == "fixed":
            return m.median_tokens
        return min(m.max_filler_tokens, max(1, round(rng.lognormvariate(math.log(m.median_tokens), m.sigma))))

    def _zoom_call(self, rng: random.Random, size: tuple[int, int]) -> list[_Piece]:
        (x1, x2), (y1, y2) = _span(rng, size[0]), _span(rng, size[1])
        malformed = rng.random() < self._config.malformed_call_rate
        parts = [CALL_OPEN + '\n{"name": "zoom_in", "arguments": {"bbox_2d": [',
                 str(x1), ", ", str(y1), ", ", str(x2), ", ", str(y2),
                 "]}" if malformed else "]}}", "\n" + CALL_CLOSE]
        return [self._piece(p) for p in parts]

    def _piece(self, text: str) -> _Piece:
        """`text` encoded once: fragments and numbers repeat across requests."""
        piece = self._pieces.get(text)
        if piece is None:
            piece = self._pieces[text] = _Piece(self._tok.encode(text, add_special_tokens=False), text)
        return piece

    def _filler(self, start: int, n: int) -> list[_Piece]:
        """`n` reasoning tokens from pool offset `start`, wrapping around the pool."""
        pool, ends, out = self._pool, self._pool_ends, []
        while n > 0:
            take = min(n, len(pool) - start)
            out.append(_Piece(pool[start : start + take], self._pool_text[ends[start] : ends[start + take]], start))
            n -= take
            start = 0
        return out

    def _cut(self, pieces: list[_Piece], sampling: SamplingParams) -> tuple[tuple[int, ...], tuple[str, Any]]:
        """The tokens a server would send and why it stops, as StopChecker decides it."""
        if sampling.ignore_eos:  # the model talks on past its end of sequence
            pieces += self._filler(0, sampling.max_new_tokens - sum(len(p.ids) for p in pieces))
            stop_ids = set(sampling.stop_token_ids)
        else:
            stop_ids = self._eos_ids.union(sampling.stop_token_ids)
        tokens = tuple(itertools.chain.from_iterable(p.ids for p in pieces))
        end, reason = self._stop_string(pieces, sampling.stop)
        for t in stop_ids:  # a stop token wins over a stop string completed by the same token
            with contextlib.suppress(ValueError):
                end, reason = tokens.index(t, 0, end if end is not None else len(tokens)) + 1, t
        if end is None or end > sampling.max_new_tokens:
            return tokens[: sampling.max_new_tokens], ("length", None)
        return tokens[:end], ("stop", reason)

    def _stop_string(self, pieces: list[_Piece], stops: tuple[str, ...]) -> tuple[int | None, str | None]:
        """(tokens up to the one completing the first stop string, that string)."""
        if not stops:
            return None, None
        text = "".join(p.text for p in pieces)
        first: tuple[int, str] | None = None
        for s in stops:
            i = text.find(s)
            if i >= 0 and (first is None or i + len(s) < first[0]):
                first = (i + len(s), s)
        if first is None:
            return None, None
        return self._tokens_through(pieces, first[0]), first[1]

    def _tokens_through(self, pieces: list[_Piece], char_end: int) -> int:
        """How many tokens it takes to produce the first `char_end` characters."""
        offset = count = 0
        for p in pieces:
            if offset + len(p.text) >= char_end:
                return count + bisect.bisect_left(self._ends(p), char_end - offset) + 1
            offset += len(p.text)
            count += len(p.ids)
        raise AssertionError("stop string beyond the script")

    def _ends(self, piece: _Piece) -> list[int]:
        if piece.ends is None:
            if piece.pool_start is not None:
                s, ends = piece.pool_start, self._pool_ends
                piece.ends = [e - ends[s] for e in ends[s + 1 : s + 1 + len(piece.ids)]]
            else:
                ids, decode = piece.ids, self._tok.decode
                piece.ends = [len(decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]
        return piece.ends

    def _logprobs(self, start: int, n: int) -> tuple[float, ...]:
        if n <= LOGPROB_POOL:
            return self._lp2[start : start + n]
        return (self._lp * (n // LOGPROB_POOL + 2))[start : start + n]

    def _faults(self, key: str, n: int) -> tuple[str | None, int, int]:
        """(fault, tokens sent before it strikes, tick period), from a hash of `key`: cheaper
        than seeding another RNG."""
        f = self._config.faults
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        u_error, u_hang, u_slow, u_at = (u / 2**32 for u in struct.unpack("<4I", digest))
        fault = "error" if u_error < f.error_rate else "hang" if u_hang < f.hang_rate else None
        period = f.slow_factor if u_slow < f.slow_rate else 1
        return fault, int(u_at * n) if fault else n, period


class _PrefixCache:
    """Automatic prefix caching as vLLM does it, by blocks: a prompt prefills only what follows
    its longest run of cached whole blocks; a request's prompt and output are cached (LRU), so
    the next turn of an episode prefills just the observation."""

    BLOCK = 256  # tokens; vLLM's are 16, but only the prefill count matters here

    def __init__(self, tokens: int) -> None:
        self.capacity = tokens // self.BLOCK
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def admit(self, prompt: list[int], output: tuple[int, ...]) -> int:
        """Prompt tokens to prefill; caches the prompt's and the output's blocks."""
        if not self.capacity:
            return len(prompt)
        b, blocks, cached, h = self.BLOCK, self._blocks, 0, 0
        seq = prompt + list(output)
        chain = []
        for i in range(0, len(seq) - b + 1, b):
            h = hash((h, tuple(seq[i : i + b])))
            chain.append(h)
            if cached == i and i + b <= len(prompt) and h in blocks:
                cached = i + b
        for h in reversed(chain):  # a chain's head is used most: evict from its tail, as vLLM does
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        return len(prompt) - cached


def _span(rng: random.Random, size: int) -> tuple[int, int]:
    """A box side between 1/8 and 1/2 of the image, inside it."""
    side = rng.randint(max(1, size // 8), max(1, size // 2))
    lo = rng.randint(0, size - side)
    return lo, lo + side


# --------------------------------------------------------------------------- the server


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        from .presets import CHAT_TEMPLATE, qwen_tokenizer_dir

        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
        tok.chat_template = CHAT_TEMPLATE  # the package's template is text-only
        return tok
    return tokenizer


class SimPolicy(Policy):
    """A simulated continuous-batching server (see the module docstring). Lives on one event
    loop: the scheduler task starts with the first request."""

    kind = "sim"
    image_token_id = 151655  # the Qwen tokenizer's <|image_pad|>
    vision = "qwen2.5-vl"
    needs_patches = False  # reads image sizes from grid_thw only

    def __init__(self, config: SimConfig | Mapping[str, Any] | None = None, *, tokenizer: Any = None,
                 **overrides: Any) -> None:
        """`config` plus `overrides` as in `make_config`; `tokenizer` is a tokenizer, a directory
        to load one from, or None for the Qwen tokenizer."""
        super().__init__()
        self.config = make_config(config, **overrides)
        self._tokenizer = _load_tokenizer(tokenizer)
        self._scripter = _Scripter(self._tokenizer, self.config)
        self._requests: dict[str, _Req] = {}  # in flight, by id, until their consumer lets go
        self._waiting: deque[_Req] = deque()  # FIFO; left requests are skipped lazily
        self._n_waiting = 0
        self._running: dict[str, _Req] = {}
        self._hung: dict[str, _Req] = {}  # stuck, holding their slots
        self._faults_by_id: dict[str, int] = {}  # injected faults per id, until it succeeds
        self._wakeup = asyncio.Event()
        self._step = asyncio.Lock()  # held by a tick, or by a weight update between ticks
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = 0.0  # when the current tick ends, in loop time
        self._ticks = 0
        self._closed = False
        # CPU time of the simulated back end (planning, ticks, taking requests and handing out their
        # output), for benchmarks to tell apart from their callers'.
        self.server_cpu_s = 0.0

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def ticks(self) -> int:
        """Scheduler ticks run so far (decode steps / tick_tokens)."""
        return self._ticks

    @property
    def num_running(self) -> int:
        """Requests holding a batch slot, hung ones included."""
        return len(self._running) + len(self._hung)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return self._n_waiting

    # ----------------------------------------------------------------- client side

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        req = self._submit(request)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if req.sent < req.pos:
                    chunk = req.take()
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                elif req.final is None:
                    req.waiter = loop.create_future()
                    await req.waiter
                elif isinstance(req.final, PolicyError):
                    raise req.final
                else:
                    yield req.final  # the abort chunk
                    return
        finally:  # the consumer finished, broke off, closed us or was cancelled
            self._release(req)

    async def complete(self, request: GenerateRequest) -> Completion:
        """The whole output, waking the caller once instead of on every tick."""
        req = self._submit(request)
        req.final_only = True
        try:
            while req.final is None:
                req.waiter = self._loop.create_future()  # _submit set it (get_running_loop is a getpid on 3.11)
                await req.waiter
        finally:
            start = time.thread_time()
            self._release(req)
        try:
            if isinstance(req.final, PolicyError):
                raise req.final
            return req.output()
        finally:
            self.server_cpu_s += time.thread_time() - start

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None and req.state != _DONE:
            self._detach(req)
            req.final = Chunk([], [], self._version, finish_reason="abort")
            req.wake()

    async def update_weights(self, weights: Weights) -> int:
        """Ignores `weights`; pauses decoding for weight_sync_s between ticks."""
        self._check_open()
        lat = self.config.latency
        async with self._step:
            await asyncio.sleep(lat.weight_sync_s * lat.time_scale)
            self._version += 1
            version = self._version
            self._clock = asyncio.get_running_loop().time()
        return version

    async def close(self) -> None:
        """Stop the scheduler; requests in flight fail with a non-retryable PolicyError."""
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # our caller's own cancellation still propagates

    def _check_open(self) -> None:
        if self._closed:
            raise PolicyError("policy closed", retryable=False)

    def _submit(self, request: GenerateRequest) -> _Req:
        self._check_open()
        start = time.thread_time()
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already in flight")
        attempt = self._faults_by_id.get(rid, 0)
        req = self._scripter.plan(request, attempt)
        if req.fault is not None:
            self._faults_by_id[rid] = attempt + 1
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="sim-policy-scheduler")
        self._requests[rid] = req
        self._waiting.append(req)
        self._n_waiting += 1
        self._wakeup.set()
        self.server_cpu_s += time.thread_time() - start
        return req

    def _release(self, req: _Req) -> None:
        """The consumer let go of `req`."""
        self._detach(req)
        if self._requests.get(req.id) is req:
            del self._requests[req.id]

    def _detach(self, req: _Req) -> None:
        """Take `req` out of the server, freeing its slot."""
        state, req.state = req.state, _DONE
        if state == _WAITING:
            self._n_waiting -= 1
        elif state == _RUNNING:
            del self._running[req.id]
        elif state == _HUNG:
            del self._hung[req.id]
        if self._n_waiting:  # a freed slot may let a waiting request in
            self._wakeup.set()

    def _fail(self, reqs: list[_Req], message: str, retryable: bool) -> None:
        for req in reqs:
            self._detach(req)
            req.final = PolicyError(message, retryable=retryable)
            req.wake()

    # ----------------------------------------------------------------- scheduler

    async def _run(self) -> None:
        loop = self._loop
        self._clock = loop.time()
        try:
            while True:
                if not self._running and not (self._n_waiting and self._free_slots()):
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    self._clock = loop.time()  # idle time is not decode time
                    continue
                async with self._step:
                    try:
                        await self._tick(loop)
                    except Exception as err:  # a bug here must fail requests, not hang them
                        log.exception("simulated scheduler tick failed")
                        self._fail(list(self._running.values()), f"simulated backend crashed: {err!r}", True)
        finally:
            self._task = None
            pending = [r for r in self._requests.values() if r.state != _DONE]
            message = "policy closed" if self._closed else "simulated scheduler stopped"
            self._fail(pending, message, retryable=not self._closed)

    def _free_slots(self) -> int:
        return self.config.latency.max_batch - self.num_running

    async def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        lat = self.config.latency
        start = time.thread_time()
        prefill = self._admit()
        step_s = lat.decode_base_s + lat.decode_per_seq_s * len(self._running)
        self._clock += (lat.tick_tokens * step_s + lat.prefill_s_per_token * prefill) * lat.time_scale
        self.server_cpu_s += time.thread_time() - start
        await asyncio.sleep(max(self._clock - loop.time(), 0.0))
        start = time.thread_time()
        self._ticks += 1
        self._advance(self._version)
        self.server_cpu_s += time.thread_time() - start

    def _admit(self) -> int:
        """Move waiting requests into free slots; returns their prompt tokens."""
        prefill, free, waiting = 0, self._free_slots(), self._waiting
        while free > 0 and waiting:
            req = waiting.popleft()
            if req.state != _WAITING:  # aborted or abandoned while waiting
                continue
            req.state = _RUNNING
            req.version = self._version
            self._running[req.id] = req
            self._n_waiting -= 1
            free -= 1
            prefill += req.prefill
        return prefill

    def _advance(self, version: int) -> None:
        """The hot loop: a few attribute updates per running request, no allocation."""
        k, tick, ending = self.config.latency.tick_tokens, self._ticks, []
        for req in self._running.values():
            if req.period != 1 and tick % req.period:
                continue
            end = req.pos + k
            if end >= req.limit:
                ending.append(req)
                continue
            if req.version != version:
                req.stamp(version)
            req.pos = end
            waiter = req.waiter  # req.wake(), inlined
            if waiter is not None and not req.final_only:
                req.waiter = None
                if not waiter.done():
                    waiter.set_result(None)
        for req in ending:
            self._end(req, version)

    def _end(self, req: _Req, version: int) -> None:
        """Produce what is left up to `limit`, then finish, fail or hang."""
        if req.version != version:
            req.stamp(version)
        req.pos = req.limit
        if req.fault is None:
            self._detach(req)
            self._faults_by_id.pop(req.id, None)
            req.final = _FINISHED
        elif req.fault == "error":
            self._detach(req)
            req.final = PolicyError(f"simulated backend error in request {req.id!r} after {req.limit} tokens")
        else:
            del self._running[req.id]
            self._hung[req.id] = req
            req.state = _HUNG
        req.wake()
