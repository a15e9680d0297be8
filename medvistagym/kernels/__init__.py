"""Image kernels: batched crop + resample matching Pillow, and zooms straight to Qwen-VL patches,
each behind one dispatching function (torch reference, compiled CPU, Triton on CUDA); and the
GRPO loss fused with the LM head, chunked (torch, Triton on CUDA)."""

from .api import BACKENDS, backend_available, crop_patchify, crop_resize
from .grpo_loss import chunked_logprobs, fused_grpo_loss, grpo_loss_reference
from .patchify import PRESETS, Patches, VisionPreset
from .patchify import patchify_torch as patchify  # images already at their final size
from .plan import ResamplePlan, plan_resample

__all__ = [
    "BACKENDS", "PRESETS", "Patches", "ResamplePlan", "VisionPreset", "backend_available", "chunked_logprobs",
    "crop_patchify", "crop_resize", "fused_grpo_loss", "grpo_loss_reference", "patchify", "plan_resample",
]
