"""The pieces of the vLLM back ends that need no engine: image placeholders (the path that
CPU vLLM cannot run end to end) and the staging of weights for the workers. Real safetensors
files; nothing is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvistagym.policy import PolicyError
from medvistagym.policy.presets import IMAGE_PAD, VISION_END, VISION_START
from medvistagym.policy.vllm_backend import collapse_image_runs, staged_weights

ONE_IMAGE = [1, VISION_START, IMAGE_PAD, VISION_END, 2]


def test_single_placeholders_pass_unchanged():
    two = [1, VISION_START, IMAGE_PAD, VISION_END, VISION_START, IMAGE_PAD, VISION_END, 2]
    assert collapse_image_runs(ONE_IMAGE, IMAGE_PAD, 1) == ONE_IMAGE
    assert collapse_image_runs(two, IMAGE_PAD, 2) == two


def test_expanded_runs_collapse_to_one_placeholder_each():
    expanded = [1, VISION_START, *[IMAGE_PAD] * 6, VISION_END, VISION_START, *[IMAGE_PAD] * 4, VISION_END, 2]
    assert collapse_image_runs(expanded, IMAGE_PAD, 2) == [
        1, VISION_START, IMAGE_PAD, VISION_END, VISION_START, IMAGE_PAD, VISION_END, 2]


def test_placeholder_count_must_match_the_images():
    with pytest.raises(PolicyError) as err:
        collapse_image_runs(ONE_IMAGE, IMAGE_PAD, 2)
    assert not err.value.retryable


def test_tied_tensors_are_staged_in_one_readable_file(tmp_path: Path):
    embed = torch.randn(8, 4)
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": torch.ones(4)}
    with staged_weights(weights, tmp_path) as path:
        assert Path(path).parent.parent == tmp_path
        loaded = load_file(path)
        assert set(loaded) == set(weights)
        assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert list(tmp_path.iterdir()) == []  # removed after the update


def test_files_and_directories_are_passed_as_they_are(tmp_path: Path):
    with staged_weights(tmp_path / "model.safetensors") as path:
        assert path == str(tmp_path / "model.safetensors")
