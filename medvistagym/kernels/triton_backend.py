"""The Triton back end: crop + resample of every box of a plan in one launch, and the fused
zoom-to-patches path that stores straight into Qwen's `pixel_values` layout.

Same contracts as `crop_resize_torch` and `crop_patchify_torch`; on a GPU the tensors stay on
CUDA, under the Triton interpreter (TRITON_INTERPRET=1, set before this module is imported)
they are CPU tensors.

Design
------
Work split. The host turns the plan into tables once: one int64 row per box (source address,
dtype kind and strides, output size, where its taps sit in the flat tap tables, pass order,
8-bit flag, where its tiles start) and one int32 per program naming its box; all tables cross
to the device in one copy. Program t computes one TILE_H x TILE_W tile of one channel of one
box; a box's tiles are consecutive, so neighbouring tiles can find their shared halo in L2.
Sources are read in place through their addresses (no staging copy), so images of any size and
dtype mix in one launch, and outputs go through per-box addresses into one packed buffer per
output dtype.

Taps stay compact. The tables hold Pillow's taps as they come (first input, count, K weights per
output sample, ragged per axis, 8-bit boxes already fixed-point quantised), and each program
expands the few rows it needs into dense banded blocks (CHUNK inputs x TILE outputs) with one
masked gather from that small table. Dense tile matrices built on the host, as the torch back
end does, hold TILE x L floats per tile and axis instead of TILE x K (at an s-fold bicubic
downscale the window is L = (TILE + 4) s inputs and K = 4 s taps): 9x the weight bytes at
32-sample tiles, and for uint8 RGB more bytes than the image pixels the tile reads whenever the
downscale is below about 2.4x (upscales included).

Both passes are `tl.dot`s. The window a tile needs is read in CHUNK x CHUNK blocks S. Horizontal
first (Pillow's usual order): for each block row, inter (CHUNK x TW) = sum over block columns
of S @ Wx^T, rounded and clamped to 0..255 on the 8-bit path, then acc += Wy @ inter. Vertical
first (Pillow 13's order when the height shrinks most) only changes the association:
inter (TH x CHUNK) = sum over block rows of Wy @ S, rounded, then acc += inter @ Wx^T. Either way
the 8-bit intermediate is exactly Pillow's: each intermediate value is one source row (column)
resampled and rounded. Loop bounds come from the tile's window at run time, so one compiled
kernel serves every scale.

Memory traffic: each output element is written once, in its final dtype; each source element of
a tile's window is loaded once per tile, and windows overlap only by the filter support (at a
bicubic downscale (1 + 4/32)^2 = 1.27x the box's span over 32 x 32 tiles), which neighbouring
tiles should find in L2. The price is arithmetic: a dense band multiplies zeros, in each pass
about (TILE + 4) / 4 = 9x the multiply-adds of an explicit tap loop at bicubic downscales (more
at upscales, where windows are padded up to CHUNK). Explicit tap loops would do the minimum
arithmetic but issue one gather load per tap and output; the dot form loads blocks that are
contiguous along x (sources are read with a literal unit x stride, so the compiler knows) and
keeps the arithmetic in registers. Windows start at arbitrary columns, so the compiled sm_90
code still loads uint8 sources one byte per thread. Which form is faster on an H100 has not been
measured.

Precision: fp32 operands and accumulation with input_precision="ieee". TF32 would truncate the
taps to 10 mantissa bits, while Pillow's 8-bit taps carry 22 fraction bits; uint8 results are
Pillow's levels to within one, like the torch back end. IEEE fp32 dots do not use tensor cores.

Fused patches: the sibling kernel shares the resample core and, per tile, turns values into
display levels (uint8 levels pass through unless the box has a window; full-depth values,
unrounded float32 even from 16-bit sources as in the reference, go through the DICOM linear window, optional inversion and
round-half-even to 0..255, as `display_levels`), normalises them through a (3, 256) table
computed by `patchify.normalise` (bit-exact with HF's float64 rescale), and stores each value
temporal_patch_size times at its row and column of `pixel_values`; one channel is written to
all three.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .patchify import Patches, PresetLike, box_windows, check_sizes, normalise
from .patchify import preset as resolve_preset
from .plan import ResamplePlan
from .resample import quantize_8bit

try:
    import triton
    import triton.language as tl

    jit, constexpr = triton.jit, tl.constexpr
except ImportError:  # the module still imports, so that available() can say no
    triton = tl = None
    jit, constexpr = (lambda fn: fn), int

# triton.jit picks the interpreter when it decorates, so what counts is the setting at import.
# The kernels call no triton.language function that is itself @jit (tl.zeros, tl.max, tl.cdiv):
# those were decorated when triton was first imported, which may have been before the setting
# (transformers imports triton), and would then refuse to run under the interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Output tile of one program and the input block of the window loops (>= 16 for tl.dot). FP32
# FMA dots keep whole operand rows in registers: compiled for sm_90 (ptxas -v; never run on a
# GPU), 32 x 32 tiles with 16-input chunks on 8 warps take 126-128 registers and do not spill;
# 32-input chunks take 248 on 8 warps and spill on 4.
TILE_H, TILE_W, CHUNK = 32, 32, 16
NUM_WARPS = 8

SOURCE_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32)
OUTPUT_DTYPES = (
    torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip

# Columns of the per-box table (int64) that both kernels read.
(
    SRC, SRC_KIND, STRIDE_C, STRIDE_Y, CHANNELS, OUT_H, OUT_W,
    X_TAPS, X_WEIGHTS, X_K, Y_TAPS, Y_WEIGHTS, Y_K,
    VERTICAL_FIRST, EIGHT_BIT, TILE_START, TILES_X, TILES_Y,
) = map(constexpr, range(18))  # fmt: skip
BOX_COLS = constexpr(18)
# crop_resize: int64 (address, dtype kind, round flag) and float32 (clamp low, high) per box.
OUT_ADDR, OUT_KIND, OUT_ROUND = map(constexpr, range(3))
# crop_patchify: int64 (first row, invert flag) and float32 (window low, span) per box.
ROW0, INVERT = map(constexpr, range(2))


def available() -> bool:
    """Triton is importable and has somewhere to run: a CUDA device, or the interpreter."""
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


@dataclass(frozen=True)
class Launch:
    """The host tables both kernels read, and the images they point into."""

    boxes: torch.Tensor  # (N, BOX_COLS) int64
    first: torch.Tensor  # flat int32 first input of every output sample, x rows then y rows
    count: torch.Tensor  # flat int32 tap count of every output sample
    weight: torch.Tensor  # flat float32 taps, (outputs, K) per axis row
    tile_box: torch.Tensor  # (tiles,) int32: the box of each program
    sources: int  # bit k set: some box reads SOURCE_DTYPES[k]
    # The images as read (unit x stride). A copy made here must outlive the launch: only its
    # address is in the table, and freed memory could be handed out again as an output buffer.
    images: list[torch.Tensor]

    @property
    def tables(self) -> list[torch.Tensor]:
        return [self.boxes, self.first, self.count, self.weight, self.tile_box]

    @property
    def tiles(self) -> int:
        return self.tile_box.numel()


def crop_resize_triton(plan: ResamplePlan, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`crop_resize_torch`'s contract in one kernel launch: uint8 boxes follow Pillow's 8-bit
    path, other sources resample in float32 and are finished like `plan.finish`; returns N
    (C, h, w) views of packed buffers (one per output dtype)."""
    if out_dtype is not None and out_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not supported by the Triton back end; supported: {OUTPUT_DTYPES}")
    device = _device(plan)
    if plan.n == 0:
        return []
    launch = _launch(plan)
    targets = [out_dtype or s.dtype for s in plan.sources]
    outs, bounds, results = _outputs(plan, targets, device)
    kinds = sum(1 << k for k in {OUTPUT_DTYPES.index(t) for t in targets})
    tables = _upload([*launch.tables, outs, bounds], device)
    _crop_resize_kernel[(launch.tiles,)](
        *tables, TH=TILE_H, TW=TILE_W, BK=CHUNK, SOURCES=launch.sources, OUTPUTS=kinds, num_warps=NUM_WARPS
    )
    return results


def crop_patchify_triton(
    plan: ResamplePlan,
    preset: PresetLike,
    windows: torch.Tensor | Sequence[Sequence[float]] | None = None,
    invert: torch.Tensor | Sequence[bool] | None = None,
) -> Patches:
    """`crop_patchify_torch`'s contract in one kernel launch: box i becomes image i of the Patches.

    pixel_values is on the images' device; grid_thw and offsets are host metadata on the CPU.
    """
    vp = resolve_preset(preset)
    check_sizes(plan, vp)
    win, flip = box_windows(plan, windows, invert)
    device = _device(plan)
    p, t = vp.patch_size, vp.temporal_patch_size
    grid = torch.cat([torch.ones(plan.n, 1, dtype=torch.int64), plan.sizes // p], dim=1)
    offsets = torch.zeros(plan.n + 1, dtype=torch.int64)
    offsets[1:] = grid.prod(dim=1).cumsum(0)
    pixel_values = torch.empty(int(offsets[-1]), 3 * t * p * p, dtype=torch.float32, device=device)
    if plan.n:
        launch = _launch(plan)
        rows = torch.stack([offsets[:-1], flip.long()], dim=1)
        # The window as display_levels computes it: both terms from float64, rounded to float32.
        center, width = win.unbind(1)
        window = torch.stack([(center - 0.5).float(), (width.clamp(min=1.0) - 1.0).float()], dim=1)
        lut = normalise(torch.arange(256, dtype=torch.float32).expand(3, 1, 256), vp).reshape(3, 256)
        tables = _upload([*launch.tables, rows, window, lut], device)
        _crop_patchify_kernel[(launch.tiles,)](
            *tables, pixel_values, TH=TILE_H, TW=TILE_W, BK=CHUNK, SOURCES=launch.sources,
            P=p, M=vp.merge_size, T=t, num_warps=NUM_WARPS,
        )  # fmt: skip
    return Patches(pixel_values, grid, offsets)


def kernel_bytes(plan: ResamplePlan, out_dtype: torch.dtype | None = None) -> int:
    """Bytes crop_resize must move: each box's source span read once, each output written once.

    Spans of boxes that overlap count once per box; the halo that neighbouring tiles re-read
    is not counted (it should come from L2), so bytes / time is the effective bandwidth.
    """
    if plan.n == 0:
        return 0
    lo, hi = plan.taps.span()
    n = plan.n
    sources = plan.sources
    channels = plan.shapes[:, 0]
    read = channels * (hi[:n] - lo[:n]) * (hi[n:] - lo[n:]) * torch.tensor([s.dtype.itemsize for s in sources])
    out_size = torch.tensor([(out_dtype or s.dtype).itemsize for s in sources])
    written = channels * plan.sizes.prod(dim=1) * out_size
    return int((read + written).sum())


def copy_bandwidth_gbs(nbytes: int, device: torch.device | str | None = None, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy of `nbytes`, measured now, counting bytes read plus
    written (as `kernel_bytes` does). The default device is CUDA when there is one, else the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults and lazy initialisation
    if dev.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        stop.record()
        stop.synchronize()
        seconds = start.elapsed_time(stop) / 1e3
    else:
        began = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - began
    return 2 * nbytes * repeats / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Host tables


def _device(plan: ResamplePlan) -> torch.device:
    devices = {im.device for im in plan.images}
    if len(devices) != 1:
        names = ", ".join(map(str, devices))
        raise ValueError(f"images are on several devices ({names}); the Triton back end needs one")
    device = devices.pop()
    wanted = "cpu" if INTERPRETED else "cuda"
    if device.type != wanted:
        why = "under the Triton interpreter" if INTERPRETED else "without the Triton interpreter"
        raise ValueError(f"images are on {device}; {why} the Triton back end needs {wanted} tensors")
    return device


def _launch(plan: ResamplePlan) -> Launch:
    # Kernels read rows with a literal unit stride, so a strided-x image is copied once.
    images = [im if im.stride(2) == 1 else im.contiguous() for im in plan.images]
    which = plan.image_index
    per_image = torch.tensor(
        [[im.data_ptr(), SOURCE_DTYPES.index(im.dtype), im.stride(0), im.stride(1)] for im in images], dtype=torch.int64
    )[which]
    first, count, weight, tap_base, weight_base, k = _ragged_taps(plan)
    n = plan.n
    channels = plan.shapes[:, 0]
    h, w = plan.sizes.unbind(1)
    tiles_y, tiles_x = -(-h // TILE_H), -(-w // TILE_W)
    tiles = channels * tiles_y * tiles_x
    columns = {
        SRC: per_image[:, 0], SRC_KIND: per_image[:, 1], STRIDE_C: per_image[:, 2], STRIDE_Y: per_image[:, 3],
        CHANNELS: channels, OUT_H: h, OUT_W: w,
        X_TAPS: tap_base[:n], X_WEIGHTS: weight_base[:n], X_K: k[:n],
        Y_TAPS: tap_base[n:], Y_WEIGHTS: weight_base[n:], Y_K: k[n:],
        VERTICAL_FIRST: plan.vertical_first.long(), EIGHT_BIT: plan.eight_bit.long(),
        TILE_START: tiles.cumsum(0) - tiles, TILES_X: tiles_x, TILES_Y: tiles_y,
    }  # fmt: skip
    boxes = torch.empty(n, int(BOX_COLS), dtype=torch.int64)
    for column, values in columns.items():
        boxes[:, int(column)] = values
    tile_box = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), tiles)
    sources = sum(1 << k for k in set(per_image[:, 1].tolist()))
    return Launch(boxes, first, count, weight, tile_box, sources, images)


def _ragged_taps(plan: ResamplePlan) -> tuple[torch.Tensor, ...]:
    """The plan's taps without padding: per axis row (x rows 0..N-1, y rows N..2N-1) its real
    outputs and K = its largest tap count. Returns flat first, count, weights and, per row, where
    its outputs and weights start and its K."""
    taps = plan.taps
    n_out = torch.cat([plan.sizes[:, 1], plan.sizes[:, 0]])
    k = taps.count.amax(dim=1).clamp(min=1)
    real = torch.arange(taps.first.shape[1]) < n_out[:, None]
    eight = plan.eight_bit.repeat(2)[:, None, None]
    weights = torch.where(eight, quantize_8bit(taps.weights), taps.weights).float()
    real_taps = real[:, :, None] & (torch.arange(weights.shape[2]) < k[:, None, None])
    tap_base = n_out.cumsum(0) - n_out
    weight_base = (n_out * k).cumsum(0) - n_out * k
    return taps.first[real].int(), taps.count[real].int(), weights[real_taps], tap_base, weight_base, k


def _outputs(
    plan: ResamplePlan, targets: list[torch.dtype], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One packed buffer per output dtype; per box its address, dtype kind and finishing rule;
    and the (C, h, w) views handed back."""
    shapes = [(c, h, w) for c, (h, w) in zip(plan.shapes[:, 0].tolist(), plan.sizes.tolist())]
    sizes = [c * h * w for c, h, w in shapes]
    results: list[torch.Tensor] = [torch.empty(0)] * plan.n
    addresses = [0] * plan.n
    for dtype in dict.fromkeys(targets):
        members = [i for i, t in enumerate(targets) if t == dtype]
        buffer = torch.empty(sum(sizes[i] for i in members), dtype=dtype, device=device)
        offset = 0
        for i in members:
            results[i] = buffer[offset : offset + sizes[i]].view(shapes[i])
            addresses[i] = results[i].data_ptr()
            offset += sizes[i]
    rules = [_finish_rule(s.dtype, t) for s, t in zip(plan.sources, targets)]
    outs = torch.tensor(
        [[a, OUTPUT_DTYPES.index(t), r] for a, t, (r, _, _) in zip(addresses, targets, rules)], dtype=torch.int64
    )
    bounds = torch.tensor([[lo, hi] for _, lo, hi in rules], dtype=torch.float32)
    return outs, bounds, results


def _upload(tables: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tables as views of one device buffer: one (pinned, asynchronous) copy instead of one
    per table. Each view starts on a 16-byte boundary, as Triton specialises pointers on that."""
    chunks = [t.contiguous().reshape(-1).view(torch.uint8) for t in tables]
    padded = [torch.nn.functional.pad(c, (0, -c.numel() % 16)) for c in chunks]
    blob = torch.cat(padded)
    if device.type == "cuda":
        blob = blob.pin_memory().to(device, non_blocking=True)
    views = blob.split([c.numel() for c in padded])
    return [v[: c.numel()].view(t.dtype).view(t.shape) for v, c, t in zip(views, chunks, tables)]


def _finish_rule(source: torch.dtype, target: torch.dtype) -> tuple[bool, float, float]:
    """`plan.finish` as (round half away?, low, high): integer sources and integer targets each
    round and clamp to their range, which composes to the intersection of the ranges."""
    low, high = -float("inf"), float("inf")
    for dtype in (source, target):
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            low, high = max(low, info.min), min(high, info.max)
    return low != -float("inf"), low, high


# ---------------------------------------------------------------------------------------------
# Kernels


@jit
def _crop_resize_kernel(
    boxes, first, count, weight, tile_box, outs, bounds,
    TH: constexpr, TW: constexpr, BK: constexpr, SOURCES: constexpr, OUTPUTS: constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.load(tile_box + t).to(tl.int64)
    v, c, oy, ox, h, w = _resample_tile(boxes, b, t, first, count, weight, TH, TW, BK, SOURCES)
    out = outs + b * 3
    low = tl.load(bounds + b * 2)
    high = tl.load(bounds + b * 2 + 1)
    v = tl.where(tl.load(out + OUT_ROUND) != 0, tl.minimum(tl.maximum(_round_half_away(v), low), high), v)
    offs = c * h * w + oy[:, None] * w + ox[None, :]
    mask = (oy[:, None] < h) & (ox[None, :] < w)
    _store(tl.load(out + OUT_ADDR), tl.load(out + OUT_KIND), offs, v, mask, OUTPUTS)


@jit
def _crop_patchify_kernel(
    boxes, first, count, weight, tile_box, rows, window, lut, pixel_values,
    TH: constexpr, TW: constexpr, BK: constexpr, SOURCES: constexpr, P: constexpr, M: constexpr, T: constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    b = tl.load(tile_box + t).to(tl.int64)
    v, c, oy, ox, h, w = _resample_tile(boxes, b, t, first, count, weight, TH, TW, BK, SOURCES)
    box = boxes + b * BOX_COLS
    invert = tl.load(rows + b * 2 + INVERT) != 0
    low = tl.load(window + b * 2)
    shown = _display_levels(v, low, tl.load(window + b * 2 + 1), invert)
    # uint8 levels are shown as stored unless the box has a window (its row is NaN when it has none).
    level = tl.where((tl.load(box + EIGHT_BIT) != 0) & (low != low), v, shown).to(tl.int32)
    # pixel_values row: merge block (row-major), then patch within the block; column: channel,
    # temporal copy, row and column inside the patch. Split into a y part and an x part.
    cols = 3 * T * P * P
    blocks_across = (w // P) // M
    ph, pw = oy // P, ox // P
    y_part = ((ph // M) * blocks_across * M * M + (ph % M) * M) * cols + (oy % P) * P
    x_part = ((pw // M) * M * M + pw % M) * cols + ox % P
    dst = pixel_values + tl.load(rows + b * 2 + ROW0) * cols + y_part[:, None] + x_part[None, :]
    mask = (oy[:, None] < h) & (ox[None, :] < w)
    # A one-channel source is shown as three equal channels.
    gray = tl.load(box + CHANNELS) == 1
    for out_c in range(tl.where(gray, 0, c), tl.where(gray, 3, c + 1)):
        x = tl.load(lut + out_c * 256 + level, mask=mask, other=0.0)
        for copy in tl.static_range(T):
            tl.store(dst + (out_c * T + copy) * P * P, x, mask=mask)


@jit
def _resample_tile(boxes, b, t, first, count, weight, TH: constexpr, TW: constexpr, BK: constexpr, SOURCES: constexpr):
    """Program t's tile of box b: (values (TH, TW) float32, channel, output rows, output columns,
    h, w). Values are Pillow's 8-bit levels for 8-bit boxes, unrounded float32 otherwise."""
    box = boxes + b * BOX_COLS
    h = tl.load(box + OUT_H)
    w = tl.load(box + OUT_W)
    tiles_x = tl.load(box + TILES_X)
    per_channel = tiles_x * tl.load(box + TILES_Y)
    local = t - tl.load(box + TILE_START)
    c = local // per_channel
    oy0 = ((local % per_channel) // tiles_x) * TH
    ox0 = (local % tiles_x) * TW
    oy, ox = oy0 + tl.arange(0, TH), ox0 + tl.arange(0, TW)
    x_taps, y_taps = tl.load(box + X_TAPS), tl.load(box + Y_TAPS)
    xf, xc = first + x_taps, count + x_taps
    yf, yc = first + y_taps, count + y_taps
    xw, xk = weight + tl.load(box + X_WEIGHTS), tl.load(box + X_K)
    yw, yk = weight + tl.load(box + Y_WEIGHTS), tl.load(box + Y_K)
    x_lo, x_hi = _window(xf, xc, ox0, w, TW)
    y_lo, y_hi = _window(yf, yc, oy0, h, TH)
    src = tl.load(box + SRC)
    kind = tl.load(box + SRC_KIND)
    base = c * tl.load(box + STRIDE_C)
    sy = tl.load(box + STRIDE_Y)
    eight = tl.load(box + EIGHT_BIT) != 0
    r = tl.arange(0, BK)
    acc = tl.full((TH, TW), 0.0, tl.float32)
    if tl.load(box + VERTICAL_FIRST) != 0:
        for x0 in range(x_lo, x_hi, BK):
            xs = x0 + r
            inter = tl.full((TH, BK), 0.0, tl.float32)
            for y0 in range(y_lo, y_hi, BK):
                ys = y0 + r
                mask = (ys[:, None] < y_hi) & (xs[None, :] < x_hi)
                s = _load_source(src, kind, base + ys[:, None] * sy + xs[None, :], mask, SOURCES)
                inter = tl.dot(_band(yf, yc, yw, yk, oy[:, None], ys[None, :], h), s, inter, input_precision="ieee")
            inter = tl.where(eight, _level(inter), inter)
            acc = tl.dot(inter, _band(xf, xc, xw, xk, ox[None, :], xs[:, None], w), acc, input_precision="ieee")
    else:
        for y0 in range(y_lo, y_hi, BK):
            ys = y0 + r
            inter = tl.full((BK, TW), 0.0, tl.float32)
            for x0 in range(x_lo, x_hi, BK):
                xs = x0 + r
                mask = (ys[:, None] < y_hi) & (xs[None, :] < x_hi)
                s = _load_source(src, kind, base + ys[:, None] * sy + xs[None, :], mask, SOURCES)
                inter = tl.dot(s, _band(xf, xc, xw, xk, ox[None, :], xs[:, None], w), inter, input_precision="ieee")
            inter = tl.where(eight, _level(inter), inter)
            acc = tl.dot(_band(yf, yc, yw, yk, oy[:, None], ys[None, :], h), inter, acc, input_precision="ieee")
    return tl.where(eight, _level(acc), acc), c, oy, ox, h, w


@jit
def _window(first, count, o0, n_out, T: constexpr):
    """[lo, hi): the inputs that outputs o0 .. o0 + T - 1 (those < n_out) read. Pillow's first
    input and end (first + count) never decrease along an axis, so the ends of the tile decide."""
    last = tl.minimum(o0 + T, n_out) - 1
    return tl.load(first + o0), tl.load(first + last) + tl.load(count + last)


@jit
def _band(first, count, weight, k_row, o, j, n_out):
    """Dense band block: the tap of output o (< n_out) on input j, zero where o does not read j.
    `o` and `j` broadcast against each other, which picks the block's orientation."""
    real = o < n_out
    f = tl.load(first + o, mask=real, other=0)
    n = tl.load(count + o, mask=real, other=0)
    k = j - f
    return tl.load(weight + o * k_row + k, mask=(k >= 0) & (k < n), other=0.0)


@jit
def _load_source(addr, kind, offs, mask, SOURCES: constexpr):
    """Source values as float32, read through the box's address as its dtype (kind: index into
    SOURCE_DTYPES). Branches for kinds absent from the launch compile away."""
    v = tl.full(offs.shape, 0.0, tl.float32)
    if SOURCES & 1:
        if kind == 0:
            v = tl.load(addr.to(tl.pointer_type(tl.uint8), bitcast=True) + offs, mask=mask, other=0).to(tl.float32)
    if SOURCES & 2:
        if kind == 1:
            v = tl.load(addr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, mask=mask, other=0).to(tl.float32)
    if SOURCES & 4:
        if kind == 2:
            v = tl.load(addr.to(tl.pointer_type(tl.int16), bitcast=True) + offs, mask=mask, other=0).to(tl.float32)
    if SOURCES & 8:
        if kind == 3:
            v = tl.load(addr.to(tl.pointer_type(tl.float32), bitcast=True) + offs, mask=mask, other=0.0)
    return v


@jit
def _store(addr, kind, offs, v, mask, OUTPUTS: constexpr):
    """Store v through the box's output address as its dtype (kind: index into OUTPUT_DTYPES).
    One branch per dtype, written out: each device-function call costs the interpreter ~1 ms."""
    if OUTPUTS & 1:
        if kind == 0:
            tl.store(addr.to(tl.pointer_type(tl.uint8), bitcast=True) + offs, v.to(tl.uint8), mask=mask)
    if OUTPUTS & 2:
        if kind == 1:
            tl.store(addr.to(tl.pointer_type(tl.int8), bitcast=True) + offs, v.to(tl.int8), mask=mask)
    if OUTPUTS & 4:
        if kind == 2:
            tl.store(addr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, v.to(tl.uint16), mask=mask)
    if OUTPUTS & 8:
        if kind == 3:
            tl.store(addr.to(tl.pointer_type(tl.int16), bitcast=True) + offs, v.to(tl.int16), mask=mask)
    if OUTPUTS & 16:
        if kind == 4:
            tl.store(addr.to(tl.pointer_type(tl.int32), bitcast=True) + offs, v.to(tl.int32), mask=mask)
    if OUTPUTS & 32:
        if kind == 5:
            tl.store(addr.to(tl.pointer_type(tl.float16), bitcast=True) + offs, v.to(tl.float16), mask=mask)
    if OUTPUTS & 64:
        if kind == 6:
            tl.store(addr.to(tl.pointer_type(tl.bfloat16), bitcast=True) + offs, v.to(tl.bfloat16), mask=mask)
    if OUTPUTS & 128:
        if kind == 7:
            tl.store(addr.to(tl.pointer_type(tl.float32), bitcast=True) + offs, v, mask=mask)
    if OUTPUTS & 256:
        if kind == 8:
            tl.store(addr.to(tl.pointer_type(tl.float64), bitcast=True) + offs, v.to(tl.float64), mask=mask)


@jit
def _level(x):
    """Pillow's 8-bit store: round half up, clamp to 0..255."""
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), 0.0), 255.0)


@jit
def _round_half_away(x):
    return tl.where(x < 0, tl.ceil(x - 0.5), tl.floor(x + 0.5))


@jit
def _display_levels(v, low, span, invert):
    """`display_levels` of full-depth values: DICOM linear window, NaN -> 0, clamp, invert,
    255 s rounded half to even (IEEE division, as torch divides)."""
    s = tl.math.div_rn(v - low, span) + 0.5
    s = tl.minimum(tl.maximum(tl.where(s != s, 0.0, s), 0.0), 1.0)
    x = tl.where(invert, 1.0 - s, s) * 255.0
    r = tl.floor(x + 0.5)
    odd = tl.floor(r * 0.5) * 2.0 != r
    return tl.where((r - x == 0.5) & odd, r - 1.0, r)
