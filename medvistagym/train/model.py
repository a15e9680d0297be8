"""The model being trained: a transformers model, run to its final hidden states on packed
micro-batches (the fused loss applies the LM head itself, chunk by chunk)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..policy.presets import model_class
from ..policy.transformers_backend import DTYPES, resolve_model
from .packing import Packed

VISION = {"qwen2_5_vl": "qwen2.5-vl", "qwen2_vl": "qwen2-vl", "qwen3_vl": "qwen3-vl"}


class TrainModel:
    """Owns the trainable module, its device and dtype; `hidden()` is the training forward."""

    def __init__(self, model: str | Path, *, device: str = "auto", dtype: str = "float32",
                 gradient_checkpointing: bool = False, trainable: bool = True) -> None:
        from transformers import AutoConfig

        self.path = resolve_model(model)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        config = AutoConfig.from_pretrained(self.path)
        self.module = model_class(config).from_pretrained(self.path, dtype=DTYPES[dtype], attn_implementation="sdpa")
        self.module.to(self.device)
        self.vision = VISION.get(config.model_type)
        if gradient_checkpointing:
            self.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.module.config.use_cache = False
        self.module.train(trainable)
        self.module.requires_grad_(trainable)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.module.lm_head.weight

    def rope_index(self, token_ids: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
        """(3, L) multimodal rotary positions of one sequence, computed on the CPU."""
        ids = token_ids[None]
        image_token = self.module.config.image_token_id
        positions, _ = self.module.model.get_rope_index(
            ids, (ids == image_token).int(), image_grid_thw=grid_thw, attention_mask=torch.ones_like(ids))
        return positions[:, 0]

    def hidden(self, batch: Packed) -> torch.Tensor:
        """(T, H) final hidden states of the packed row."""
        batch = batch.to(self.device)
        inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
        if batch.pixel_values is not None:
            inputs["pixel_values"] = batch.pixel_values.to(self.module.dtype)
            inputs["image_grid_thw"] = batch.image_grid_thw
        return self.module.model(**inputs).last_hidden_state[0]

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the state dict, under the names the policy back ends load."""
        yield from self.module.state_dict().items()
