"""Environment configuration: turns, tools, image sizes and the reward."""

from __future__ import annotations

from dataclasses import dataclass, field

from .reward import RewardConfig

TOOL_NAMES = ("zoom_in", "zoom_in_multi", "rotate", "flip", "adjust_window", "enhance_contrast")


@dataclass(frozen=True)
class EnvConfig:
    max_turns: int = 6  # model turns per episode, the answering turn included
    tools: tuple[str, ...] = TOOL_NAMES
    max_calls_per_turn: int = 4
    max_boxes: int = 4  # per zoom_in_multi call
    max_images: int = 16  # images in an episode's context, inputs included
    coordinates: str = "pixel"  # "pixel" (Qwen2.5-VL) or "normalized" (0-1000, Qwen3-VL)
    # Input images are shown at most this large (Qwen smart resize); zooms fill zoom_max_pixels.
    image_max_pixels: int = 64 * 28 * 28
    image_min_pixels: int = 4 * 28 * 28
    zoom_max_pixels: int = 64 * 28 * 28
    max_upscale: float = 4.0  # a zoom shows at most this many output pixels per source pixel
    patch_factor: int = 28
    min_box_size: float = 4.0  # smallest zoom box side, in shown pixels
    resample: str = "bicubic"
    image_placeholder: str = "<image>"
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        unknown = set(self.tools) - set(TOOL_NAMES)
        if unknown:
            raise ValueError(f"unknown tools {sorted(unknown)}; available: {list(TOOL_NAMES)}")
        if self.coordinates not in ("pixel", "normalized"):
            raise ValueError(f"coordinates must be 'pixel' or 'normalized', got {self.coordinates!r}")
        if self.max_turns < 1:
            raise ValueError("max_turns must be at least 1")
