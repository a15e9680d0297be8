"""The torch back end of `crop_resize`: the reference, and the CPU fallback.

Box by box it gives what `Image.resize(size, BILINEAR or BICUBIC, box=box)` gives. The taps
of every box and both axes come from the plan (one vectorised `axis_weights` call); they are
applied over each box's input span only.

Applying the taps: each pass contracts one axis of a (C, span, other) tensor. Alternatives,
timed on a whole uint8 RGB crop (both passes, Pillow's rounding) on the 2-core CPU, median ms:

    box side -> out (taps)   PIL   K-tap loop  gather+sum  einsum  dense span  banded tiles
    100 -> 448 (K=4)         2.10     1.29        1.80      4.60      1.72         0.87
    300 -> 448 (K=4)         3.01     1.65        2.34      6.51      5.66         1.23
    600 -> 448 (K=6)         5.03     3.22        6.27     22.18     14.56         2.20
    600 -> 112 (K=22)        2.54     2.68        3.88      8.08      3.20         1.30
    600 -> 32  (K=75)        2.19     4.36        3.16      7.26      1.60         1.24

K-tap loop: K rounds of index_select + addcmul. gather+sum and einsum: all K taps gathered
into one tensor, then reduced. Dense span: one (out x span) matmul. Banded tiles (kept):
outputs are cut into tiles of TILE samples, each tile reads one window of L input rows, and
one bmm multiplies every (TILE x L) tile matrix with its gathered window (TILE 4 / 8 / 16 / 32
on 64 crops to 448: 108 / 104 / 108 / 120 ms). The horizontal pass runs on a transposed span
so that both passes gather whole rows, and the 8-bit path keeps bytes between passes, which
makes its transposes and gathers cheaper than in float32.

Stacking: boxes with equal output size and tap counts run as one stack. 64 crops of 10-60%
boxes from four 1024 x 1024 RGB images (last two columns: 10-15% and 2-3% boxes), ms:

    out size                   448    224    112     64     32     32
    one box at a time          108     76     65     57     31     25
    stacks <= STACK_BUDGET     105     71     61     52     12    5.6
    unbounded stacks           171    114     64     54     13    5.7
    PIL, crop by crop          218    122     91     68    9.7    1.6
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import ResamplePlan, finish
from .resample import AxisWeights, quantize_8bit

TILE = 8
# Boxes with equal output size and tap counts share one set of ops (a stack) while padding them
# to a common span costs at most STACK_WASTE in area and the stack stays under STACK_BUDGET
# elements; bigger stacks lose more to allocation and padding than they save (module docstring).
STACK_WASTE = 1.25
STACK_BUDGET = 1 << 21


@dataclass(frozen=True)
class Bands:
    """One axis's taps of N boxes as dense per-tile matrices over a window of the box's span.

    Output tile t (samples t*TILE ... t*TILE+TILE-1) of box n is `weight[n, t] @ span[index[n, t]]`,
    where `index` counts from `lo[n]`, the first input sample the box reads.
    """

    lo: torch.Tensor  # (N,) first input index read
    hi: torch.Tensor  # (N,) one past the last input index read
    index: torch.Tensor  # (N, T, L) window rows relative to lo
    weight: torch.Tensor  # (N, T, TILE, L) float32
    width: torch.Tensor  # (N,) window length L each box needs


def bands(taps: AxisWeights, pillow_8bit: torch.Tensor) -> Bands:
    """Regroup per-sample taps into per-tile dense windows, for all boxes at once.

    Boxes flagged `pillow_8bit` get Pillow's fixed-point rounding of the weights.
    """
    pad = (-taps.first.shape[1]) % TILE
    first, count = F.pad(taps.first, (0, pad)), F.pad(taps.count, (0, pad))
    w = torch.where(pillow_8bit[:, None, None], quantize_8bit(taps.weights), taps.weights)
    w = F.pad(w, (0, 0, 0, pad)).float()
    n, o, k = w.shape
    t = o // TILE
    lo, hi = taps.span()
    real = count > 0
    rel = torch.where(real, first - lo[:, None], 0).view(n, t, TILE)
    start = rel[:, :, 0]  # tiles past a box's output start at 0; their weights are all zero
    offset = rel - start[..., None]  # where each sample's first tap sits in its tile's window
    width = torch.where(real, offset.view(n, o) + count, 0).amax(dim=1)
    length = int(width.max())
    index = (start[..., None] + torch.arange(length)).minimum((hi - lo - 1)[:, None, None])
    column = (offset[..., None] + torch.arange(k)).clamp(min=0, max=length - 1)
    weight = torch.zeros(n, t, TILE, length).scatter_add_(3, column, w.view(n, t, TILE, k))
    return Bands(lo=lo, hi=hi, index=index, weight=weight, width=width)


def apply_bands(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
    """Resample dim 2 of x (B, G, S, M) for B boxes, adding `bias`; the G slices of a box share its taps.

    index (B, T, L) and weight (B, T, P, L) come from `Bands`; returns float32 (B, G, T * P, M).
    """
    b, g, s, m = x.shape
    _, t, length = index.shape
    rows = index[:, None] + (torch.arange(b * g) * s).view(b, g, 1, 1)
    windows = x.reshape(b * g * s, m).index_select(0, rows.reshape(-1)).view(b * g * t, length, m).float()
    taps = weight[:, None].expand(b, g, t, TILE, length).reshape(b * g * t, TILE, length)
    if bias:
        out = torch.baddbmm(windows.new_tensor(bias).expand(b * g * t, TILE, m), taps, windows)
    else:
        out = torch.bmm(taps, windows)
    return out.view(b, g, t * TILE, m)


def crop_resize_torch(plan: ResamplePlan, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The torch back end (the reference, and the CPU path when the compiled one is missing).

    Matches `Image.resize((w, h), BILINEAR/BICUBIC, box=(x1, y1, x2, y2))` on CPU tensors:
    uint8 follows Pillow's 8-bit path (fixed-point taps, rounding and clamping after each
    pass, Pillow 13's pass order), float32 is unrounded, uint16/int16 run in float32 and are
    rounded and clamped to their range once at the end. `out_dtype` only changes the returned
    container (float32 out of uint8 holds the same Pillow levels); an integer `out_dtype`
    rounds and clamps.
    """
    for j, im in enumerate(plan.images):
        if im.device.type != "cpu":
            raise ValueError(f"image {j} is on {im.device}; the torch back end of crop_resize runs on CPU")
    n = plan.n
    if n == 0:
        return []
    sources = plan.sources
    hw, taps = plan.sizes, plan.taps
    band = bands(taps, plan.eight_bit.repeat(2))
    horizontal_first = ~plan.vertical_first

    out: list[torch.Tensor] = [torch.empty(0)] * n
    for group in _groups(sources, hw, horizontal_first, taps.count.amax(dim=1), band):
        members = group.tolist()
        h, w = hw[members[0]].tolist()
        stack = [sources[i] for i in members]
        result = _resample(stack, group, group + n, band, h, w, bool(horizontal_first[members[0]]))
        for k, i in enumerate(members):
            out[i] = finish(result[k], sources[i].dtype, out_dtype)
    return out


def _groups(
    sources: list[torch.Tensor], hw: torch.Tensor, horizontal_first: torch.Tensor, tap_counts: torch.Tensor, band: Bands
) -> list[torch.Tensor]:
    """Stacks of boxes that share one set of ops: same dtype, channels, output size, pass order and
    tap counts (x rows, then y rows), spans within STACK_WASTE and data within STACK_BUDGET."""
    n = len(sources)
    spans = (band.hi - band.lo).tolist()
    span_x, span_y = spans[:n], spans[n:]
    keys = zip(
        [(s.dtype, s.shape[0]) for s in sources],
        map(tuple, hw.tolist()),
        horizontal_first.tolist(),
        tap_counts[:n].tolist(),
        tap_counts[n:].tolist(),
    )
    by_key: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups: list[list[int]] = []
    for ((_, channels), (h, w), *_), members in by_key.items():
        members.sort(key=lambda i: -span_x[i] * span_y[i])
        bucket: list[int] = []
        sx = sy = 0
        for i in members:
            # Largest first, so the newest member is the most padded one.
            px, py = max(sx, span_x[i]), max(sy, span_y[i])
            elements = (len(bucket) + 1) * channels * (px + w) * (py + h)  # spans, intermediate, output
            if bucket and (px * py > STACK_WASTE * span_x[i] * span_y[i] or elements > STACK_BUDGET):
                groups.append(bucket)
                bucket, px, py = [], span_x[i], span_y[i]
            bucket.append(i)
            sx, sy = px, py
        groups.append(bucket)
    return [torch.tensor(g) for g in groups]


def _resample(
    sources: list[torch.Tensor],
    x_rows: torch.Tensor,
    y_rows: torch.Tensor,
    band: Bands,
    h: int,
    w: int,
    horizontal_first: bool,
) -> torch.Tensor:
    """Both passes for a stack of B boxes: (B, C, h, w), uint8 on the 8-bit path else float32, maybe strided.

    `x_rows`/`y_rows` pick the stack's rows of `band`. Each pass contracts dim 2 of a
    (B, C, span, other) tensor, so the horizontal pass runs on a transposed span.
    """
    # Between passes the 8-bit path keeps Pillow's rounded levels as bytes.
    store = torch.uint8 if sources[0].dtype == torch.uint8 else torch.float32
    x_span, y_span = (band.lo[x_rows], band.hi[x_rows]), (band.lo[y_rows], band.hi[y_rows])
    span = _spans(sources, x_span, y_span, store, transposed=horizontal_first)
    if horizontal_first:
        out = _pass(span, band, x_rows, w, store).transpose(2, 3).contiguous()  # (B, C, Sy, w)
        return _pass(out, band, y_rows, h, store)
    out = _pass(span, band, y_rows, h, store).transpose(2, 3).contiguous()  # (B, C, Sx, h)
    return _pass(out, band, x_rows, w, store).transpose(2, 3)


def _spans(
    sources: list[torch.Tensor],
    x_span: tuple[torch.Tensor, torch.Tensor],
    y_span: tuple[torch.Tensor, torch.Tensor],
    store: torch.dtype,
    *,
    transposed: bool,
) -> torch.Tensor:
    """The input each box reads as (B, C, Sy, Sx), or (B, C, Sx, Sy) if transposed, zero-padded to the largest."""
    corners = zip(x_span[0].tolist(), x_span[1].tolist(), y_span[0].tolist(), y_span[1].tolist())
    views = [
        # A plain copy first: transposing a compact block is much faster than one strided by the image width.
        _compact(src[:, a:b, p:q], store).transpose(1, 2) if transposed else src[:, a:b, p:q]
        for src, (p, q, a, b) in zip(sources, corners)
    ]
    if len(views) == 1:
        return _compact(views[0], store)[None]
    span = torch.zeros(len(views), *(max(v.shape[d] for v in views) for d in range(3)), dtype=store)
    for k, v in enumerate(views):
        span[k, : v.shape[0], : v.shape[1], : v.shape[2]] = v
    return span


def _compact(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() hands back the strided input itself when the dtype already matches.
    return x.to(dtype, memory_format=torch.contiguous_format).contiguous()


def _pass(x: torch.Tensor, band: Bands, rows: torch.Tensor, out: int, store: torch.dtype) -> torch.Tensor:
    """Resample dim 2 of x (B, C, S, M) to `out` samples with the taps in `rows` of `band`, stored as `store`.

    Storing uint8 is Pillow's fixed-point rounding: +0.5 (fused into the bmm), clamp, and the
    cast truncates, which is floor as the values are >= 0.
    """
    tiles = -(-out // TILE)
    length = int(band.width[rows].max())
    index, weight = band.index[rows, :tiles, :length], band.weight[rows, :tiles, :, :length]
    if store != torch.uint8:
        return apply_bands(x, index, weight)[:, :, :out]
    return apply_bands(x, index, weight, bias=0.5)[:, :, :out].clamp_(0, 255).to(torch.uint8)
