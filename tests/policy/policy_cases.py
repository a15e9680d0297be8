"""Helpers for the policy tests: prompts with real images made into patches by our kernels."""

from __future__ import annotations

import asyncio

import torch

from medvistagym.kernels import PRESETS, crop_patchify
from medvistagym.policy import ImageInputs, expand_image_tokens
from medvistagym.policy.presets import IMAGE_PAD


def image_prompt(tokenizer, photo: torch.Tensor, preset: str, boxes, question: str) -> tuple[list[int], ImageInputs]:
    """A chat prompt with one image per box (zoomed by our kernels), placeholders expanded."""
    f = PRESETS[preset].factor
    patches = crop_patchify(photo, boxes, [(2 * f, 3 * f)] * len(boxes), preset=preset)
    images = ImageInputs.from_patches(patches)
    content = [{"type": "image"} for _ in boxes] + [{"type": "text", "text": question}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return expand_image_tokens(ids, images, IMAGE_PAD), images


def run(coro):
    return asyncio.run(coro)


async def collect(policy, request):
    """All chunks of one request."""
    return [chunk async for chunk in policy.generate(request)]


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], output: list[int], images, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) of `output` after `prompt` in one plain forward, positions computed
    by the model itself (not by the back end under test)."""
    ids = torch.tensor([prompt + output])
    kwargs = {}
    if images is not None:
        kwargs = {"pixel_values": images.pixel_values, "image_grid_thw": images.grid_thw}
    if getattr(model.config, "image_token_id", None) is not None:
        kwargs["mm_token_type_ids"] = (ids == IMAGE_PAD).int()
    logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1).gather(1, torch.tensor(output)[:, None]).squeeze(1)
