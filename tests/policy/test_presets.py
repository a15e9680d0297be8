"""Model presets: normal Hugging Face directories that from_pretrained loads, with the real
Qwen tokenizer and a chat template that renders images and tools."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from medvistagym.env import EnvConfig
from medvistagym.env.tools import tool_schemas
from medvistagym.policy.presets import IMAGE_PAD, PRESETS, VISION_END, VISION_START, build_config, ensure_model
from medvistagym.policy.transformers_backend import resolve_model

MESSAGES = [
    {"role": "system", "content": "You read medical images."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]},
    {"role": "assistant", "content": "<think>look closer</think>",
     "tool_calls": [{"type": "function", "function": {"name": "zoom_in", "arguments": {"bbox_2d": [10, 20, 110, 120]}}}]},
    {"role": "tool", "content": [{"type": "text", "text": "Image 1:"}, {"type": "image"}]},
]


@pytest.mark.parametrize("name", ["qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_directory_loads_like_a_checkpoint(model_dirs, name):
    path = model_dirs[name]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json"):
        assert (path / f).is_file(), f
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.image_token_id == IMAGE_PAD and model.config.text_config.hidden_size == PRESETS[name].hidden
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    processor = AutoImageProcessor.from_pretrained(path)
    assert processor.merge_size == 2 and processor.patch_size == (16 if "qwen3" in name else 14)


def test_chat_template_renders_images_tools_and_tool_turns(model_dirs):
    tok = AutoTokenizer.from_pretrained(model_dirs["qwen2.5-vl-tiny"])
    tools = tool_schemas(EnvConfig())
    text = tok.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou read medical images.\n\n# Tools\n")
    assert all(json.dumps(t) in text for t in tools)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox_2d": [10, 20, 110, 120]}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nImage 1:<|vision_start|>" in text
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids.count(VISION_START) == ids.count(VISION_END) == ids.count(IMAGE_PAD) == 2
    assert tok.decode(ids) == text  # special tokens round-trip as single ids


def test_text_only_preset_and_configs():
    config = build_config(PRESETS["qwen2-tiny"])
    assert config.model_type == "qwen2" and config.hidden_size // config.num_attention_heads == 64
    for name, preset in PRESETS.items():
        if preset.arch != "qwen2":
            c = build_config(preset)
            assert sum(c.text_config.rope_parameters["mrope_section"]) == preset.head_dim // 2, name


def test_ensure_model_builds_once_and_resolves_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVISTAGYM_CACHE", str(tmp_path))
    path = resolve_model("qwen2-tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("qwen2-tiny") == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(path)
    assert AutoConfig.from_pretrained(path).model_type == "qwen2"
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(FileNotFoundError, match="neither a model preset"):
        resolve_model(tmp_path / "nothing-here")
