"""The compiled CPU back end of crop_resize, and the fused zoom-to-patches path.

`crop_resize_cpu(plan, out_dtype)` gives what `crop_resize_torch` gives, with uint8 bit for bit
as Pillow (22-bit fixed-point taps, int32 sums, rounding and clamping after each pass, Pillow
13's pass order); `crop_patchify_cpu(plan, preset, windows, invert)` gives what
`crop_patchify_torch` gives, the normalised values written straight into Qwen-VL patch rows.
Every box runs in one call into C++ (csrc/resample_cpu.cpp), OpenMP over boxes. The extension
is built on first use (~25 s; 0.1 s to load afterwards) with `torch.utils.cpp_extension.load`
under $MEDVISTAGYM_CACHE/torch_extensions; without a compiler or ninja `available()` is False.

64 zooms to 448 x 448 (boxes 10-50% of each side) from four 2048 x 1536 uint8 RGB photos
(scikit-image, resized), 2-core AMD EPYC (AVX2), torch 2.13 with 2 threads; median ms of 5
after a warm-up, steady state (the previous call's outputs released), machine otherwise idle:

    step                                     torch back end   compiled   speed-up
    plan_resample (shared)                          6.6           6.6
    (a) crop_resize, out_dtype float32            183.8          25.7      7.2x
    (b) crop_resize, uint8 (Pillow-exact)         172.4          20.8      8.3x
    (c) crop_patchify, qwen2.5-vl (308 MB)        459.2          43.4     10.6x
    (c) with fresh output memory each call                      139.9
    float32 sources, crop_resize                  179.8          36.1      5.0x

uint8 sums in int32 are exact, and faster than float32 sums of the same taps (20.0 vs 24.6 ms
for (b)), which are off by one level on ~1e-5 of pixels. (c) is bound by writing 308 MB; a
fresh 308 MB block costs ~100 ms of first-touch page faults, which glibc cannot avoid for
blocks that big, hence `_OutputRecycler`.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from ..cache import cache_root
from .patchify import Patches, PresetLike, VisionPreset, box_windows, check_sizes, normalise
from .patchify import preset as resolve_preset
from .plan import ResamplePlan, finish

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "resample_cpu.cpp"
# Output dtypes the C++ writes itself; any other is converted from these by `finish`.
NATIVE_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32)


def build_directory(name: str) -> Path:
    """Where the extension is built: shared by tests and runs, so it is compiled once per machine."""
    return cache_root() / "torch_extensions" / name


def _build_config() -> tuple[str, list[str]]:
    """Extension name and compiler flags; AVX2 builds get their own name, hence their own folder."""
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "medvistagym_resample_cpu_avx2", [*flags, "-mavx2", "-mfma"]
    return "medvistagym_resample_cpu", flags


@functools.cache
def _extension() -> tuple[ModuleType | None, str | None]:
    """(module, None) once built, or (None, reason) when it cannot be; the warning is logged once."""
    name, flags = _build_config()
    try:
        from torch.utils import cpp_extension

        directory = build_directory(name)
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.glob(f"{name}*.so")):  # say why the first call pauses
            print(f"medvistagym: compiling the CPU kernels into {directory} (first use only, ~30 s)", file=sys.stderr)
        # load() serialises concurrent builders (pytest-xdist workers) with a lock file in `directory`.
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
        return module, None
    except Exception as err:  # no compiler, no ninja, a failed compile: callers fall back to torch
        reason = _reason(err)
        log.warning("compiled CPU resampling is unavailable, the torch back end will be used (%s)", reason)
        return None, reason


def _reason(err: Exception) -> str:
    """The telling line of a build failure (the compiler's first error, a missing tool), not ninja's summary."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    telling = [line for line in lines[1:] if re.search(r"error|not found|no such file", line, re.IGNORECASE)]
    return f"{type(err).__name__}: {(telling or lines)[0][:300]}"


def available() -> bool:
    """Whether the compiled back end can run here (builds it on first call)."""
    return _extension()[0] is not None


def unavailable_reason() -> str | None:
    """Why the extension could not be built, or None if it is available."""
    return _extension()[1]


def _module() -> ModuleType:
    module, reason = _extension()
    if module is None:
        raise RuntimeError(f"the compiled CPU back end is unavailable: {reason}")
    return module


def _plan_arguments(plan: ResamplePlan) -> tuple:
    """The plan as the C++ takes it: contiguous images, per-box indices, sizes, taps and pass order."""
    for j, im in enumerate(plan.images):
        if im.device.type != "cpu":
            raise ValueError(f"image {j} is on {im.device}; the compiled CPU back end runs on CPU")
    taps = plan.taps
    return (
        [im.contiguous() for im in plan.images],
        plan.image_index,
        plan.sizes,
        taps.first.contiguous(),
        taps.count.contiguous(),
        taps.weights.to(torch.float64).contiguous(),
        plan.vertical_first,
    )


def crop_resize_cpu(plan: ResamplePlan, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`crop_resize_torch` compiled: the same results (see its docstring), uint8 bit-exact to Pillow.

    uint8 boxes follow Pillow's 8-bit path; uint16/int16/float32 boxes resample in float32
    and are finished by `plan.finish`'s conventions (16-bit rounded once at the end).
    """
    if plan.n == 0:
        return []
    sources = [src.dtype for src in plan.sources]
    targets = [out_dtype or source for source in sources]
    # Other targets come from the unconverted results (uint8 levels, or float32) through finish.
    native = [t if t in NATIVE_DTYPES else (s if s == torch.uint8 else torch.float32) for s, t in zip(sources, targets)]
    outs = _module().crop_resize(*_plan_arguments(plan), native)
    return [out if out.dtype == t else finish(out, s, t) for out, s, t in zip(outs, sources, targets)]


class _OutputRecycler:
    """Hands the memory of the last pixel_values out again once nothing references it any more.

    Patch outputs are large (64 zooms to 448 x 448 for Qwen2.5-VL: 308 MB). glibc returns blocks
    that big to the OS on free, and first-touch page faults on fresh ones cost more than the
    resampling (~0.4 ms/MB here), so without this no call would run in steady state. A reused block
    may be up to `SLACK` times the size asked for: the returned tensor then views its start.
    """

    SLACK = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: torch.Tensor | None = None  # our own view of the block, so the caller's count as users

    def take(self, rows: int, columns: int) -> torch.Tensor:
        need = rows * columns
        with self._lock:
            spare = self._spare
            free = spare is not None and _module().storage_users(spare) == 1
            if not (free and need <= spare.numel() <= self.SLACK * max(need, 1)):
                spare = self._spare = torch.empty(need, dtype=torch.float32)
            return spare[:need].view(rows, columns)

    def clear(self) -> None:
        with self._lock:
            self._spare = None


_recycler = _OutputRecycler()


def release_cached_output() -> None:
    """Drop the block kept for the next crop_patchify_cpu call (it is freed once the caller lets go too)."""
    _recycler.clear()


@functools.cache
def _normalised_levels(vp: VisionPreset) -> torch.Tensor:
    """(3, 256) float32: `normalise` of every display level, so C++ looks values up bit for bit."""
    levels = torch.arange(256, dtype=torch.float32).expand(3, 1, 256)
    return normalise(levels, vp).reshape(3, 256).contiguous()


def crop_patchify_cpu(
    plan: ResamplePlan,
    preset: PresetLike,
    windows: torch.Tensor | Sequence[Sequence[float]] | None = None,
    invert: torch.Tensor | Sequence[bool] | None = None,
) -> Patches:
    """`crop_patchify_torch` compiled (see its docstring for the contract): resample, window,
    normalise and lay out each box's patches in one pass, with no intermediate image."""
    vp = resolve_preset(preset)
    check_sizes(plan, vp)
    win, flip = box_windows(plan, windows, invert)
    p = vp.patch_size
    grid = torch.cat([torch.ones(plan.n, 1, dtype=torch.int64), plan.sizes // p], dim=1)
    offsets = torch.zeros(plan.n + 1, dtype=torch.int64)
    offsets[1:] = grid.prod(dim=1).cumsum(0)
    columns = 3 * vp.temporal_patch_size * p * p
    pixel_values = _recycler.take(int(offsets[-1]), columns)
    if plan.n:
        # The window constants exactly as display_levels derives them (float64, then float32).
        low = (win[:, 0] - 0.5).float()
        span = (win[:, 1].clamp(min=1.0) - 1.0).float()
        _module().crop_patchify(
            *_plan_arguments(plan),
            pixel_values,
            offsets,
            _normalised_levels(vp),
            low,
            span,
            flip,
            p,
            vp.merge_size,
            vp.temporal_patch_size,
        )
    return Patches(pixel_values, grid, offsets)
