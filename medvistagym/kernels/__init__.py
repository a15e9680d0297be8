"""Image kernels: batched crop + resample matching Pillow, behind one dispatching function."""

from .api import crop_resize
from .plan import ResamplePlan, plan_resample

__all__ = ["ResamplePlan", "crop_resize", "plan_resample"]
