"""Cut many boxes out of many images and resample each to its own size, matching Pillow.

`crop_resize(images, boxes, sizes)` gives, box by box, what `Image.resize(size, BILINEAR or
BICUBIC, box=box)` gives. The taps of every box and both axes come from one vectorised
`axis_weights` call; they are applied over each box's input span only.

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
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .resample import AxisWeights, axis_weights, quantize_8bit

TILE = 8
# Boxes with equal output size and tap counts share one set of ops (a stack) while padding them
# to a common span costs at most STACK_WASTE in area and the stack stays under STACK_BUDGET
# elements; bigger stacks lose more to allocation and padding than they save (module docstring).
STACK_WASTE = 1.25
STACK_BUDGET = 1 << 21
SUPPORTED_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
Boxes = Union[torch.Tensor, Sequence[Sequence[float]]]
Sizes = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


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


def pillow_vertical_first(
    in_h: torch.Tensor, in_w: torch.Tensor, out_h: torch.Tensor, out_w: torch.Tensor
) -> torch.Tensor:
    """Pillow 13 runs the vertical pass first when the height shrinks by > 2x as many pixels as the width.

    The rule (python-pillow/Pillow#9549) looks at whole-image sizes, not the box; the order only
    matters for uint8, where each pass rounds and clamps.
    """
    return (out_h < in_h) & (in_h - out_h > 2 * (in_w - out_w))


def crop_resize(
    images: Images,
    boxes: Boxes,
    sizes: Sizes,
    *,
    image_index: Sequence[int] | torch.Tensor | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Resample box i of `images[image_index[i]]` to `sizes[i]` = (h, w); returns N (C, h, w) tensors.

    Matches `Image.resize((w, h), BILINEAR/BICUBIC, box=(x1, y1, x2, y2))` on CPU tensors:
    uint8 follows Pillow's 8-bit path (fixed-point taps, rounding and clamping after each
    pass, Pillow 13's pass order), float32 is unrounded, uint16/int16 run in float32 and are
    rounded and clamped to their range once at the end. `out_dtype` only changes the returned
    container (float32 out of uint8 holds the same Pillow levels); an integer `out_dtype`
    rounds and clamps. `antialias=False` keeps the filter unscaled when downscaling.
    """
    imgs = _images(images)
    box = _boxes(boxes)
    n = box.shape[0]
    hw = _sizes(sizes, n)
    which = _image_index(image_index, len(imgs), n)
    shape = torch.tensor([list(im.shape) for im in imgs], dtype=torch.int64)[which]  # (N, 3): C, H, W
    _check_boxes(box, shape[:, 1], shape[:, 2], which)
    if n == 0:
        return []
    sources = [imgs[i] for i in which.tolist()]
    # Rows 0..N-1 are the boxes' x axes, rows N..2N-1 their y axes: one call computes every tap.
    taps = axis_weights(
        torch.cat([shape[:, 2], shape[:, 1]]),
        torch.cat([box[:, 0], box[:, 1]]),
        torch.cat([box[:, 2], box[:, 3]]),
        torch.cat([hw[:, 1], hw[:, 0]]),
        mode=mode,
        antialias=antialias,
    )
    band = bands(taps, torch.tensor([s.dtype == torch.uint8 for s in sources]).repeat(2))
    horizontal_first = ~pillow_vertical_first(shape[:, 1], shape[:, 2], hw[:, 0], hw[:, 1])

    out: list[torch.Tensor] = [torch.empty(0)] * n
    for group in _groups(sources, hw, horizontal_first, taps.count.amax(dim=1), band):
        members = group.tolist()
        h, w = hw[members[0]].tolist()
        stack = [sources[i] for i in members]
        result = _resample(stack, group, group + n, band, h, w, bool(horizontal_first[members[0]]))
        for k, i in enumerate(members):
            out[i] = _finish(result[k], sources[i].dtype, out_dtype)
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


def _finish(values: torch.Tensor, source: torch.dtype, out_dtype: torch.dtype | None) -> torch.Tensor:
    """Round and clamp 16-bit results to their range, then cast to `out_dtype` as one contiguous tensor.

    8-bit results arrive as uint8 already; float32 results pass through unrounded.
    """
    if source in (torch.uint16, torch.int16):
        values = _clamp(_round_half_away(values), source)
    target = out_dtype or source
    if target != source and not target.is_floating_point:
        values = _clamp(_round_half_away(values.float()), target)
    return values.to(target, memory_format=torch.contiguous_format).contiguous()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # Pillow's ROUND_UP; torch.round would round halves to even.
    return torch.where(x < 0, torch.ceil(x - 0.5), torch.floor(x + 0.5))


def _clamp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return x.clamp(info.min, info.max)


def _images(images: Images) -> list[torch.Tensor]:
    imgs = [images] if isinstance(images, torch.Tensor) else list(images)
    if not imgs:
        raise ValueError("images is empty")
    for j, im in enumerate(imgs):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] not in (1, 3):
            got = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
            raise ValueError(f"image {j} must be a (C, H, W) tensor with C = 1 or 3, got {got}")
        if im.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"image {j} has dtype {im.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
        if im.device.type != "cpu":
            raise ValueError(f"image {j} is on {im.device}; the torch path of crop_resize runs on CPU")
        if im.shape[1] == 0 or im.shape[2] == 0:
            raise ValueError(f"image {j} is empty: shape {tuple(im.shape)}")
    return imgs


def _boxes(boxes: Boxes) -> torch.Tensor:
    box = torch.as_tensor(boxes, dtype=torch.float64)
    if box.numel() == 0:
        return box.reshape(0, 4)
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2; got {tuple(box.shape)}")
    return box


def _sizes(sizes: Sizes, n: int) -> torch.Tensor:
    size = torch.as_tensor(sizes)
    if size.is_floating_point() and not bool((size == size.round()).all()):
        raise ValueError(f"sizes must be whole numbers of pixels, got {size.tolist()}")
    size = size.long()
    if size.shape == (2,):
        size = size.expand(n, 2)
    elif size.shape != (n, 2):
        raise ValueError(f"sizes must be one (h, w) pair or {n} of them (one per box), got shape {tuple(size.shape)}")
    bad = (size < 1).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"size {i} {tuple(size[i].tolist())} must be at least 1 x 1")
    return size


def _image_index(image_index: Sequence[int] | torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    if image_index is None:
        if m == 1:
            return torch.zeros(n, dtype=torch.int64)
        if m == n:
            return torch.arange(n)
        raise ValueError(f"image_index is required with {m} images and {n} boxes")
    which = torch.as_tensor(image_index, dtype=torch.int64)
    if which.shape != (n,):
        raise ValueError(f"image_index must name one image per box: {n} boxes, got shape {tuple(which.shape)}")
    bad = (which < 0) | (which >= m)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"image_index[{i}] = {int(which[i])} is out of range for {m} images")
    return which


def _check_boxes(box: torch.Tensor, height: torch.Tensor, width: torch.Tensor, which: torch.Tensor) -> None:
    # Pillow receives float32 edges, so judge them as float32 too.
    x1, y1, x2, y2 = box.float().unbind(dim=1)
    problems = (
        (~torch.isfinite(box).all(dim=1), "has a non-finite coordinate"),
        (x2 <= x1, "is empty or inverted (x2 <= x1)"),
        (y2 <= y1, "is empty or inverted (y2 <= y1)"),
        ((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height), "is outside its image"),
    )
    for bad, why in problems:
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            j = int(which[i])
            raise ValueError(
                f"box {i} {tuple(box[i].tolist())} {why}: image {j} is {int(width[i])} wide and {int(height[i])} high"
            )
