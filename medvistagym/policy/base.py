"""The one interface every inference back end implements.

Token in, token out: a request carries the prompt as token ids (the engine never
re-tokenises a growing history) plus model-ready images, and `generate` streams
`Chunk`s of sampled token ids with their log-probs, each stamped with the weight
version that sampled it; the last chunk carries the finish reason.

Log-probs are those of the sampling distribution before truncation,
log_softmax(logits / temperature) (raw log_softmax for greedy decoding), which is what
the GRPO loss recomputes with the same temperature.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence, Union

import torch

FINISH_REASONS = ("stop", "length", "abort")

# New weights: a state dict, (name, tensor) pairs, or a safetensors file / HF directory.
Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]], str, Path]


class PolicyError(RuntimeError):
    """A request failed inside the back end (e.g. mid-stream); `retryable` says whether
    sending the same request again may succeed."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings; the text that completes one is kept
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-sequence ids
    seed: int | None = None  # per-request sampling seed: same seed, same tokens
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def for_request(self, max_new_tokens: int, seed: int | None) -> "SamplingParams":
        """A copy with another length limit and seed, what an engine changes per request,
        without checking the other fields again (a tenth of the cost of a new instance)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        params = object.__new__(SamplingParams)
        params.__dict__.update(self.__dict__, max_new_tokens=max_new_tokens, seed=seed)
        return params


@dataclass
class ImageInputs:
    """A request's images, ready for the model: Qwen-VL patches as `kernels.crop_patchify`
    makes them, and/or `display`: the same images as (3, h, w) uint8 at exactly the patched
    size, for back ends that run their own processor (vLLM, HTTP servers). `pixel_values` may
    be None for those (see `Policy.needs_patches`); `grid_thw` is always there."""

    pixel_values: torch.Tensor | None  # (rows, C*T*P*P) float32
    grid_thw: torch.Tensor  # (n, 3) int64
    display: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.grid_thw.ndim != 2 or self.grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be (n, 3), got {tuple(self.grid_thw.shape)}")
        if self.pixel_values is None:
            if self.display is None:
                raise ValueError("ImageInputs needs pixel_values or display images")
        elif self.pixel_values.ndim != 2:
            raise ValueError(f"pixel_values must be 2-D (rows, features), got {tuple(self.pixel_values.shape)}")
        elif (rows := int(self.grid_thw.prod(dim=1).sum())) != self.pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {rows} patch rows but pixel_values has {self.pixel_values.shape[0]}")
        if self.display is not None and len(self.display) != self.grid_thw.shape[0]:
            raise ValueError(f"{len(self.display)} display images for {len(self.grid_thw)} grids")

    @classmethod
    def from_patches(cls, patches: Any, display: list[torch.Tensor] | None = None) -> "ImageInputs":
        """From a `kernels.Patches`."""
        return cls(patches.pixel_values, patches.grid_thw, display)

    def __len__(self) -> int:
        return self.grid_thw.shape[0]

    def num_tokens(self, merge_size: int = 2) -> list[int]:
        """Placeholder tokens each image takes in the prompt."""
        return placeholder_counts(self.grid_thw, merge_size)


def placeholder_counts(grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int = 2) -> list[int]:
    """Placeholder tokens each image of (n, 3) patch grids (a tensor, or its rows) takes in the prompt."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    return [t * h * w // (merge_size * merge_size) for t, h, w in rows]


@dataclass
class GenerateRequest:
    """One request. `prompt_token_ids` is lent, not given: the caller leaves it unchanged until
    the request ends (the rollout engine passes an episode's live sequence, which grows only
    between its turns), and a back end copies it if it keeps it any longer."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: ImageInputs | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")


@dataclass
class Chunk:
    """Tokens sampled since the previous chunk. `finish_reason` is set on the last chunk only:
    "stop" (end-of-sequence, stop token or stop string), "length" (max_new_tokens) or
    "abort" (cancelled); `stop_reason` names the stop string or token id that ended it."""

    token_ids: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Completion:
    """A request's whole output: each token with its log-prob and the weights version that
    sampled it, and why it ended (as the last Chunk says)."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    stop_reason: str | int | None = None


def expand_image_tokens(token_ids: list[int], images: ImageInputs, image_token_id: int, merge_size: int = 2) -> list[int]:
    """Repeat each image's single placeholder token to its number of patch tokens, as the
    Qwen-VL processors do; the k-th placeholder belongs to image k."""
    return expand_placeholders(token_ids, images.num_tokens(merge_size), image_token_id)


def expand_placeholders(token_ids: list[int], counts: list[int], image_token_id: int) -> list[int]:
    """`expand_image_tokens` given each image's token count."""
    found = token_ids.count(image_token_id)  # list.count and list.index scan in C: prompts run to thousands
    if found != len(counts):
        raise ValueError(f"{found} image placeholders for {len(counts)} images")
    out: list[int] = []
    start = 0
    for count in counts:
        at = token_ids.index(image_token_id, start)
        out += token_ids[start:at]
        out += [image_token_id] * count
        start = at + 1
    out += token_ids[start:]
    return out


class Policy(abc.ABC):
    """An inference back end. Use as an async context manager, or call `close()`."""

    kind: str = ""
    # What the engine needs to build prompts for this model: the image placeholder token, how
    # many patches one token merges (per side), and the `kernels` vision preset for patches.
    image_token_id: int | None = None
    merge_size: int = 2
    vision: str | None = None
    # Whether requests must carry `ImageInputs.pixel_values`; back ends that process the
    # display images themselves say False, and the engine then never patchifies.
    needs_patches: bool = True

    def __init__(self) -> None:
        self._version = 0

    @property
    def version(self) -> int:
        """The version of the weights now installed; 0 for the weights it was built with."""
        return self._version

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer (or one with encode/decode/convert_tokens_to_ids)."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream the request's chunks. Raises `PolicyError` if the back end fails it."""

    async def complete(self, request: GenerateRequest) -> Completion:
        """The request's output at once, for callers that need no partial output (the rollout
        engine's turns). Back ends that can skip delivering each chunk override this, as vLLM's
        RequestOutputKind.FINAL_ONLY does; this default gathers the stream."""
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        async for chunk in self.generate(request):
            tokens += chunk.token_ids
            logprobs += chunk.logprobs
            versions += [chunk.version] * len(chunk.token_ids)
            if chunk.finish_reason is not None:
                return Completion(tokens, logprobs, versions, chunk.finish_reason, chunk.stop_reason)
        raise PolicyError(f"stream of {request.request_id} ended without a finish reason")

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with finish_reason "abort". Unknown ids are ignored."""

    @abc.abstractmethod
    async def update_weights(self, weights: Weights) -> int:
        """Install new weights between decoding steps and return the new version. Requests in
        flight continue on the new weights; their later chunks carry the new version."""

    async def close(self) -> None:
        """Release the back end's resources."""

    async def __aenter__(self) -> "Policy":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def iter_weights(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from any accepted form of `Weights`."""
    if isinstance(weights, (str, Path)):
        from safetensors.torch import load_file

        path = Path(weights)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        for f in files:
            yield from load_file(str(f)).items()
    elif isinstance(weights, Mapping):
        yield from weights.items()
    else:
        yield from weights
