"""Image kernels: batched crop + resample matching Pillow."""

from .crop_resize import crop_resize

__all__ = ["crop_resize"]
