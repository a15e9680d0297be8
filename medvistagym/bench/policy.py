"""`medvistagym bench policy`: decoding throughput of the transformers back end.

Workload: c concurrent requests, each the environment's real prompt (system prompt with the
tool schemas, one 224x224 image zoomed by our kernels = 64 image tokens, a question), sampled
at temperature 1 for exactly `new_tokens` tokens with log-probs. Ours: all c requests through
`TransformersPolicy` (continuous batching, one decode forward per step for the batch).
Baselines, same model and prompts: HF `generate` one request at a time (what a rollout loop
calling `generate` per episode does), and HF `generate` on one static batch of c (every
request padded to and waiting for the batch). The serial baseline's rate does not depend on
c, so it is measured over min(c, 8) requests. All sample from the full distribution (top-k and
top-p off), as GRPO needs for its log-probs to be the sampler's. Best of `repeats` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medvistagym.env import EnvConfig
from medvistagym.env.prompt import system_prompt
from medvistagym.kernels import PRESETS as VISION, crop_patchify
from medvistagym.policy import GenerateRequest, ImageInputs, SamplingParams, expand_image_tokens
from medvistagym.policy.transformers_backend import TransformersPolicy

SERIAL_CAP = 8


def workload(policy: TransformersPolicy, preset: str | None) -> tuple[list[int], ImageInputs | None]:
    """The environment's first-turn prompt about a real pathology image."""
    from skimage import data

    tok = policy.tokenizer
    content: list[dict] = [{"type": "text", "text": "Question: Which stain is shown? Answer with a short phrase."}]
    images = None
    if policy.image_token_id is not None:
        photo = torch.from_numpy(np.ascontiguousarray(data.immunohistochemistry())).permute(2, 0, 1).contiguous()
        side = 8 * VISION[preset].factor
        images = ImageInputs.from_patches(crop_patchify(photo, [(0, 0, 512, 512)], [(side, side)], preset=preset))
        content.insert(0, {"type": "image"})
    messages = [{"role": "system", "content": system_prompt(EnvConfig())}, {"role": "user", "content": content}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return (expand_image_tokens(ids, images, policy.image_token_id) if images is not None else ids), images


async def _ours(policy: TransformersPolicy, prompt: list[int], images, c: int, new_tokens: int) -> float:
    async def one(i: int) -> int:
        request = GenerateRequest(f"bench-{i}", prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                                                       seed=i), images)
        return sum([len(chunk.token_ids) async for chunk in policy.generate(request)])

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def _hf_generate(policy: TransformersPolicy, prompt: list[int], images, rows: int, new_tokens: int) -> int:
    ids = torch.tensor([prompt] * rows, device=policy.device)
    kwargs = {}
    if images is not None:
        kwargs = {"pixel_values": torch.cat([images.pixel_values] * rows).to(policy.device, policy.model.dtype),
                  "image_grid_thw": torch.cat([images.grid_thw] * rows).to(policy.device),
                  "mm_token_type_ids": (ids == policy.image_token_id).int()}
    out = policy.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, do_sample=True, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, output_scores=True, return_dict_in_generate=True, top_k=0,
    )
    return (out.sequences.shape[1] - ids.shape[1]) * rows


def _rate(fn, *args) -> float:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens / (time.perf_counter() - start)


def bench_policy(model: str = "qwen2.5-vl-tiny", concurrency: Sequence[int] = (1, 8, 64), new_tokens: int = 64,
                 device: str = "auto", dtype: str = "float32", repeats: int = 2) -> list[dict]:
    policy = TransformersPolicy(model, device=device, dtype=dtype, max_batch=max(concurrency))
    prompt, images = workload(policy, policy.vision)
    asyncio.run(_ours(policy, prompt, images, max(concurrency), 4))  # warm-up: buffers at full size
    _hf_generate(policy, prompt, images, 1, 4)
    rows = []
    for c in concurrency:
        ours = max(asyncio.run(_ours(policy, prompt, images, c, new_tokens)) for _ in range(repeats))
        serial = _rate(lambda n: sum(_hf_generate(policy, prompt, images, 1, new_tokens) for _ in range(n)),
                       min(c, SERIAL_CAP))
        static = max(_rate(_hf_generate, policy, prompt, images, c, new_tokens) for _ in range(repeats))
        rows.append({"concurrency": c, "prompt_tokens": len(prompt), "ours": ours, "serial": serial,
                     "static": static, "vs_serial": ours / serial, "vs_static": ours / static})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen2.5-vl-tiny", help="a model preset or a local model directory")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    rows = bench_policy(args.model, args.concurrency, args.new_tokens, args.device, args.dtype, args.repeats)
    table = Table(title=f"{args.model}: tokens/s sampling {args.new_tokens} tokens per request ({args.dtype}, "
                        f"prompt {rows[0]['prompt_tokens']} tokens with one image)")
    for column in ("concurrent", "ours", "HF generate, serial", "HF generate, static batch", "vs serial", "vs static"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), f"{r['ours']:.0f}", f"{r['serial']:.0f}", f"{r['static']:.0f}",
                      f"{r['vs_serial']:.1f}x", f"{r['vs_static']:.2f}x")
    Console(width=max(Console().width, 120)).print(table)
    return 0
