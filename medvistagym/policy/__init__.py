"""Inference back ends behind one async streaming interface (see `base`).

    policy = build_policy("transformers", model="qwen2.5-vl-tiny")
    async for chunk in policy.generate(GenerateRequest("r0", prompt_ids, SamplingParams())):
        ...

Back ends are imported when built, so vLLM or httpx are needed only by their users.
"""

from __future__ import annotations

from typing import Any

from .base import (
    Chunk, Completion, GenerateRequest, ImageInputs, Policy, PolicyError, SamplingParams, Weights, expand_image_tokens,
    expand_placeholders, placeholder_counts,
)

KINDS = ("transformers", "vllm", "openai", "sim")


def build_policy(kind: str, **config: Any) -> Policy:
    """A back end by name; `config` goes to its constructor."""
    if kind == "transformers":
        from .transformers_backend import TransformersPolicy as cls
    elif kind == "vllm":
        from .vllm_backend import VLLMPolicy as cls
    elif kind == "openai":
        from .openai_backend import OpenAIPolicy as cls
    elif kind == "sim":
        from .sim import SimPolicy as cls
    else:
        raise ValueError(f"unknown policy kind {kind!r}; choose one of {', '.join(KINDS)}")
    return cls(**config)


__all__ = [
    "KINDS", "Chunk", "Completion", "GenerateRequest", "ImageInputs", "Policy", "PolicyError", "SamplingParams", "Weights",
    "build_policy", "expand_image_tokens", "expand_placeholders", "placeholder_counts",
]
