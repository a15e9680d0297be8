"""Fixtures: tiny real Qwen-VL models built offline (random weights, the real Qwen tokenizer)
and a real image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from medvistagym.policy.presets import build_model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: build_model_dir(name, root / name) for name in ("qwen2.5-vl-tiny", "qwen3-vl-tiny")}


@pytest.fixture(scope="session")
def photo() -> torch.Tensor:
    """A real pathology image (skimage's immunohistochemistry), (3, H, W) uint8."""
    return torch.from_numpy(np.ascontiguousarray(data.immunohistochemistry())).permute(2, 0, 1).contiguous()
