"""Qwen-VL patchify and the fused zoom reference against transformers' own image processors.

The processors are built from their classes with each preset's values (no network). The
released checkpoints name `Qwen2VLImageProcessor` (Qwen2-VL, Qwen2.5-VL) and
`Qwen2VLImageProcessorFast` (Qwen3-VL); transformers 5.23 maps all three model types to
`Qwen2VLImageProcessor` (torchvision back end) or `Qwen2VLImageProcessorPil`. We use the Pil
class, which resizes with Pillow as our reference does and needs no torchvision; Qwen3-VL is
that class with patch 16 and mean = std = 0.5.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
import skimage.data
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from medvistagym.env.images import apply_window
from medvistagym.kernels.patchify import (
    PRESETS,
    Patches,
    VisionPreset,
    crop_patchify_torch,
    display_levels,
    patchify_torch,
    preset,
    zoom_sizes,
)
from medvistagym.kernels.crop_resize import crop_resize_torch
from medvistagym.kernels.plan import ResamplePlan, pillow_vertical_first, plan_resample

PRESET_NAMES = tuple(PRESETS)
# qwen2.5-vl has qwen2-vl's values (test_presets_are_the_released_configs): the slower tests run once for both.
DISTINCT_PRESETS = ("qwen2-vl", "qwen3-vl")


def hf_processor(vp: VisionPreset, **overrides) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=vp.patch_size,
        merge_size=vp.merge_size,
        temporal_patch_size=vp.temporal_patch_size,
        image_mean=list(vp.image_mean),
        image_std=list(vp.image_std),
        min_pixels=vp.min_pixels,
        max_pixels=vp.max_pixels,
        **overrides,
    )


def hf_patches(vp: VisionPreset, images: list, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    out = hf_processor(vp, **overrides)(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def as_chw(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def level_diff(ours: torch.Tensor, ref: torch.Tensor, vp: VisionPreset) -> torch.Tensor:
    """|ours - ref| of patch rows in uint8 levels: one level is 1 / (255 std) in normalised units."""
    std = torch.tensor(vp.image_std).repeat_interleave(vp.temporal_patch_size * vp.patch_size**2)
    return (ours - ref).abs() * std * 255


def unpatchify(rows: torch.Tensor, grid: torch.Tensor, vp: VisionPreset) -> torch.Tensor:
    """Rows of one image back to its (3, h, w) normalised first frame."""
    _, gh, gw = grid.tolist()
    m, p, t = vp.merge_size, vp.patch_size, vp.temporal_patch_size
    x = rows.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [skimage.data.astronaut(), skimage.data.immunohistochemistry(), skimage.data.camera()]


@pytest.fixture(scope="module")
def ct_hu() -> torch.Tensor:
    ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))  # 512 x 512 int16 CT
    hu = ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
    return torch.from_numpy(hu)[None]


# ---------------------------------------------------------------------------- presets


def test_presets_are_the_released_configs():
    q2, q25, q3 = (PRESETS[n] for n in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"))
    for vp in (q2, q25):
        assert (vp.patch_size, vp.merge_size, vp.temporal_patch_size, vp.factor) == (14, 2, 2, 28)
        assert (vp.min_pixels, vp.max_pixels) == (3136, 12845056)
        assert vp.image_mean == (0.48145466, 0.4578275, 0.40821073)
        assert vp.image_std == (0.26862954, 0.26130258, 0.27577711)
    assert (q3.patch_size, q3.merge_size, q3.temporal_patch_size, q3.factor) == (16, 2, 2, 32)
    assert (q3.min_pixels, q3.max_pixels) == (65536, 16777216)
    assert q3.image_mean == q3.image_std == (0.5, 0.5, 0.5)
    assert preset("qwen3-vl") is q3 and preset(q3) is q3


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="unknown vision preset 'qwen-vl-9'.*qwen2-vl"):
        preset("qwen-vl-9")


# ---------------------------------------------------------------------------- layout


TINY = VisionPreset("tiny", patch_size=2, merge_size=2, temporal_patch_size=2,
                    image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), min_pixels=16, max_pixels=1 << 20)


def coded(h: int, w: int) -> torch.Tensor:
    """(3, h, w) uint8 where pixel (c, y, x) holds c * h * w + y * w + x."""
    return torch.arange(3 * h * w, dtype=torch.uint8).reshape(3, h, w)


def test_layout_on_a_coded_image():
    """Every value of pixel_values names the (c, y, x) it came from: check the order exactly."""
    (h, w), (h2, w2) = (8, 8), (4, 8)
    out = patchify_torch([coded(h, w), coded(h2, w2)], TINY)
    assert out.grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]
    assert out.offsets.tolist() == [0, 16, 24]
    assert out.pixel_values.shape == (24, 3 * 2 * 2 * 2) and out.pixel_values.dtype == torch.float32

    for rows, (ih, iw) in ((out.image(0), (h, w)), (out.image(1), (h2, w2))):
        m = p = t = 2
        r, k = torch.meshgrid(torch.arange(rows.shape[0]), torch.arange(rows.shape[1]), indexing="ij")
        # rows: merge block (row-major), then patch in block; columns: channel, temporal copy, patch row, patch column
        bw, mh, mw = (r // (m * m)) % (iw // (p * m)), (r // m) % m, r % m
        bh = r // (m * m) // (iw // (p * m))
        # The temporal copy, (k // (p * p)) % t, does not enter: both copies hold the one frame.
        c, py, px = k // (t * p * p), (k // p) % p, k % p
        y, x = (bh * m + mh) * p + py, (bw * m + mw) * p + px
        code = c * ih * iw + y * iw + x
        assert torch.equal(rows, (code.double() / 255).float())


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_patchify_is_bit_exact_with_hf_without_resize(name):
    """With do_resize=False HF only rescales, normalises and patchifies: we match it bit for bit."""
    vp = PRESETS[name]
    rng = np.random.default_rng(7)
    shapes = [(vp.factor * 2, vp.factor * 3), (vp.factor, vp.factor * 5)]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    ref, grid = hf_patches(vp, [Image.fromarray(a) for a in arrays], do_resize=False)
    ours = patchify_torch([as_chw(a) for a in arrays], vp)
    assert torch.equal(ours.grid_thw, grid)
    assert torch.equal(ours.pixel_values, ref)
    # Float levels are the same numbers as uint8 ones.
    assert torch.equal(patchify_torch([as_chw(a).float() for a in arrays], vp).pixel_values, ref)


def test_patchify_errors():
    with pytest.raises(ValueError, match="image 1 is 30 high and 28 wide; qwen2-vl needs multiples of 28"):
        patchify_torch([torch.zeros(3, 28, 28), torch.zeros(3, 30, 28)], "qwen2-vl")
    with pytest.raises(ValueError, match=r"image 0 must be a \(3, h, w\)"):
        patchify_torch(torch.zeros(1, 32, 32), "qwen3-vl")
    empty = patchify_torch([], "qwen3-vl")
    assert isinstance(empty, Patches) and empty.pixel_values.shape == (0, 1536) and empty.offsets.tolist() == [0]


# ---------------------------------------------------------------------------- whole images


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("budget", ["released", "small"])
def test_whole_images_match_hf(photos, name, budget):
    """Random sub-images of real photos (RGB and grey) as sources, box = the whole source, at
    HF's sizes (zoom_sizes). "small" caps max_pixels at 128 tokens so that most sources shrink.

    Tolerance: one uint8 level (1 / (255 std) in normalised units). Measured: max exactly one
    level, on 7e-6 to 1.2e-4 of the values, from the resample (crop_resize is within one level
    of Pillow); everything else is bit for bit.
    """
    vp = PRESETS[name]
    if budget == "small":
        vp = replace(vp, max_pixels=128 * vp.factor**2)
    rng = np.random.default_rng([PRESET_NAMES.index(name), budget == "small"])
    sources = []
    for photo in photos:
        for _ in range(3):
            h, w = rng.integers(40, 513, 2)
            y, x = rng.integers(0, 513 - h), rng.integers(0, 513 - w)
            sources.append(np.ascontiguousarray(photo[y : y + h, x : x + w]))
    # HF converts the grey camera to RGB; ours replicates its one channel after resampling.
    ref, grid = hf_patches(vp, [Image.fromarray(s) for s in sources])
    boxes = [[0, 0, s.shape[1], s.shape[0]] for s in sources]
    sizes = zoom_sizes(boxes, vp)
    expected = [hf_smart_resize(s.shape[0], s.shape[1], vp.factor, vp.min_pixels, vp.max_pixels) for s in sources]
    assert sizes.tolist() == [list(e) for e in expected]
    ours = crop_patchify_torch(plan_resample([as_chw(s) for s in sources], boxes, sizes), vp)
    assert torch.equal(ours.grid_thw, grid)
    assert ours.pixel_values.shape == ref.shape
    diff = level_diff(ours.pixel_values, ref, vp)
    assert float(diff.max()) <= 1 + 1e-4
    assert float((diff > 1e-3).float().mean()) < 1e-3


# ---------------------------------------------------------------------------- crops


def interior(n: int, side: int) -> torch.Tensor:
    """Outputs along one axis whose bicubic taps stay inside a box of `side` input pixels."""
    scale = side / n
    support = 2.0 * max(scale, 1.0)
    center = (torch.arange(n) + 0.5) * scale
    return (center - support + 0.5 >= 0) & (center + support + 0.5 <= side)


@pytest.mark.parametrize("name", DISTINCT_PRESETS)
def test_crops_match_hf_inside_and_differ_only_at_the_border(photos, name):
    """HF on the PIL crop vs ours with that box on the whole source.

    Pillow's resize(box=...), and so ours, reads the real pixels beyond the box edge; a crop
    then resize clamps at the crop edge. Outputs whose taps stay inside the box match: measured
    max 1 level (our resample vs Pillow) on under 4e-4 of them, the rest bit for bit. Outputs in
    the border band (4-16 rows or columns per side) differ: measured max 24 levels, mean 0.36
    (qwen3-vl, ~2x zooms), max 2, mean 0.03 (qwen2-vl, ~1x).
    Boxes are picked so that Pillow 13 runs the same pass order on the crop and on the source;
    where it does not, Pillow itself differs by up to 4 levels inside (8-bit rounding between passes).
    """
    vp = PRESETS[name]
    photo = photos[0]
    source = as_chw(photo)
    rng = np.random.default_rng(11)
    boxes: list[list[int]] = []
    while len(boxes) < 6:
        w, h = rng.integers(30, 300, 2)
        x, y = int(rng.integers(0, 512 - w)), int(rng.integers(0, 512 - h))
        box = [x, y, x + int(w), y + int(h)]
        out_h, out_w = hf_smart_resize(int(h), int(w), vp.factor, vp.min_pixels, vp.max_pixels)
        orders = [pillow_vertical_first(*map(torch.tensor, (ih, iw, out_h, out_w))) for ih, iw in ((h, w), (512, 512))]
        if bool(orders[0]) == bool(orders[1]):
            boxes.append(box)
    ref, grid = hf_patches(vp, [Image.fromarray(photo).crop(tuple(b)) for b in boxes])
    ours = crop_patchify_torch(plan_resample(source, boxes, zoom_sizes(boxes, vp)), vp)
    assert torch.equal(ours.grid_thw, grid)

    border_diffs = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        rows = slice(int(ours.offsets[i]), int(ours.offsets[i + 1]))
        diff = level_diff(ours.pixel_values[rows], ref[rows], vp)
        image_diff = unpatchify(diff, grid[i], vp)
        _, h, w = image_diff.shape
        inside = interior(h, y2 - y1)[:, None] & interior(w, x2 - x1)[None]
        assert bool(inside.any())
        assert float(image_diff[:, inside].max()) <= 1 + 1e-4, (i, boxes[i])
        border_diffs.append(image_diff[:, ~inside].flatten())
    border = torch.cat(border_diffs)
    assert float(border.max()) > 0  # the border really reads beyond the box
    assert float(border.max()) <= 32 and float(border.mean()) <= 1.0


# ---------------------------------------------------------------------------- windows


def test_display_levels_is_apply_window(ct_hu):
    hu = ct_hu[:, 200:260, 180:250]
    cases = (((40.0, 400.0), False), ((-600.0, 1500.0), True), ((40.0, 100.0), False), ((3.0, 0.5), False))
    for window, invert in cases:
        ours = display_levels(hu, window, invert)
        assert ours.shape == (3, 60, 70) and ours.dtype == torch.float32
        ref = apply_window(hu, window, invert).float()
        # apply_window leaves NaN (then an undefined byte) at the threshold of a width-1 window.
        defined = ~torch.isnan((hu - (window[0] - 0.5)) / (max(window[1], 1.0) - 1.0))[0]
        assert torch.equal(ours[:, defined], ref.expand(3, -1, -1)[:, defined])
    pair = torch.tensor([[40.0, 400.0], [40.0, 400.0]])
    batch = display_levels(torch.stack([hu, hu]), pair, torch.tensor([False, True]))
    assert torch.equal(batch[1], 255 - batch[0])
    grey = torch.randint(0, 256, (1, 5, 6), dtype=torch.uint8)
    assert torch.equal(display_levels(grey), grey.float().expand(3, 5, 6))  # no window: shown as stored
    windowed = apply_window(grey, (40.0, 400.0), True).float().expand(3, 5, 6)
    assert torch.equal(display_levels(grey, (40.0, 400.0), True), windowed)


def footprint_clear(plan: ResamplePlan, i: int, clipped: torch.Tensor) -> torch.Tensor:
    """(h, w) bool: outputs of box i none of whose taps read a clipped source pixel."""
    h, w = plan.sizes[i].tolist()
    ax, ay = plan.axis("x"), plan.axis("y")
    x0, y0 = ax.first[i, :w], ay.first[i, :h]
    x1, y1 = x0 + ax.count[i, :w], y0 + ay.count[i, :h]
    table = torch.zeros(clipped.shape[0] + 1, clipped.shape[1] + 1, dtype=torch.int64)
    table[1:, 1:] = clipped.long().cumsum(0).cumsum(1)
    count = table[y1][:, x1] - table[y0][:, x1] - table[y1][:, x0] + table[y0][:, x0]
    return count == 0


@pytest.mark.parametrize("name", DISTINCT_PRESETS)
def test_ct_windowing_vs_rendering_first(ct_hu, name):
    """Ours resamples HU in float32 then windows; the reference renders the window to uint8
    (apply_window) and runs HF on that.

    Where no tap of an output reads a pixel the window clips, windowing is affine over the
    footprint and both orders agree within 2 levels (rounding of the rendered levels and of
    Pillow's two 8-bit passes): measured max 1 (border bands of crops excluded, see the crop
    test). Where the window clips (air, bone, the -3024 HU padding outside the scan field) the
    orders differ for real: bicubic ringing across thousand-HU edges is windowed, not clamped
    away first. Measured max 253 levels; > 1 level on ~2% of the values of the 512 -> 504
    whole-slice resample, 0.3-0.7% of the zoomed crops. An identity resample (qwen3-vl at
    512 x 512) is exact.
    """
    vp = PRESETS[name]
    windows = [(40.0, 400.0), (-600.0, 1500.0), (40.0, 100.0), (400.0, 1800.0)]
    invert = [False, False, True, False]
    boxes = [(0, 0, 512, 512), (150, 220, 290, 330), (0, 0, 512, 512), (300, 100, 420, 260)]
    rendered = [apply_window(ct_hu, w, inv)[0].numpy() for w, inv in zip(windows, invert)]
    ref, grid = hf_patches(vp, [Image.fromarray(r).crop(b) for r, b in zip(rendered, boxes)])
    plan = plan_resample(ct_hu, boxes, zoom_sizes(boxes, vp))
    ours = crop_patchify_torch(plan, vp, windows, invert)
    assert torch.equal(ours.grid_thw, grid)

    for i, (window, inv) in enumerate(zip(windows, invert)):
        rows = slice(int(ours.offsets[i]), int(ours.offsets[i + 1]))
        diff = unpatchify(level_diff(ours.pixel_values[rows], ref[rows], vp), grid[i], vp)
        if tuple(plan.sizes[i].tolist()) == (boxes[i][3] - boxes[i][1], boxes[i][2] - boxes[i][0]):
            assert float(diff.max()) == 0.0
        clipped = torch.from_numpy((rendered[i] == 0) | (rendered[i] == 255))
        x1, y1, x2, y2 = boxes[i]
        inside = interior(diff.shape[1], y2 - y1)[:, None] & interior(diff.shape[2], x2 - x1)[None]  # see the crop test
        clear = footprint_clear(plan, i, clipped) & inside
        assert float(clear.float().mean()) > 0.15
        assert float(diff[:, clear].max()) <= 2 + 1e-4, (i, window)


def test_full_depth_16_bit_sources_resample_unrounded(ct_hu):
    """uint16/int16 sources resample in float32 without rounding, exactly as their float32 copy."""
    raw = (ct_hu + 1024).round().to(torch.int16)
    boxes = [(100, 120, 161, 190), (0, 0, 512, 512)]
    sizes = zoom_sizes(boxes, "qwen3-vl")
    window = [(1064.0, 400.0), (1064.0, 400.0)]
    as_int = crop_patchify_torch(plan_resample(raw, boxes, sizes), "qwen3-vl", window)
    as_float = crop_patchify_torch(plan_resample(raw.float(), boxes, sizes), "qwen3-vl", window)
    assert torch.equal(as_int.pixel_values, as_float.pixel_values)


# ---------------------------------------------------------------------------- errors


def test_crop_patchify_errors(ct_hu, photos):
    grey = as_chw(photos[2])
    plan = plan_resample([grey, ct_hu], [(0, 0, 100, 100), (0, 0, 100, 100)], [(64, 64), (64, 64)], image_index=[0, 1])
    with pytest.raises(ValueError, match=r"box 1 cuts from a full-depth \(torch.float32\) image and needs a window"):
        crop_patchify_torch(plan, "qwen3-vl")
    with pytest.raises(ValueError, match="box 1 .*needs a window"):
        crop_patchify_torch(plan, "qwen3-vl", [(40.0, 400.0), (float("nan"), 400.0)])
    # A uint8 box needs no window: NaN is fine there.
    out = crop_patchify_torch(plan, "qwen3-vl", [(float("nan"), float("nan")), (40.0, 400.0)], [False, True])
    assert out.grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]
    with pytest.raises(ValueError, match=r"windows must be \(N, 2\)"):
        crop_patchify_torch(plan, "qwen3-vl", [(40.0, 400.0)])
    bad_size = plan_resample(grey, [(0, 0, 100, 100), (0, 0, 50, 50)], [(56, 56), (56, 50)])
    with pytest.raises(ValueError, match="box 1 resamples to 56 high and 50 wide; qwen2-vl needs multiples of 28"):
        crop_patchify_torch(bad_size, "qwen2-vl")
    with pytest.raises(ValueError, match="unknown vision preset"):
        crop_patchify_torch(bad_size, "qwen4-vl")
    with pytest.raises(ValueError, match="need a finite window"):
        display_levels(ct_hu, None)


def test_zoom_sizes():
    vp = PRESETS["qwen2-vl"]
    boxes = [(0, 0, 640, 480), (10.5, 20.25, 110.5, 70.25)]
    assert zoom_sizes(boxes, vp).tolist() == [[476, 644], [56, 112]]
    assert zoom_sizes(torch.zeros(0, 4), vp).shape == (0, 2)
    with pytest.raises(ValueError, match="box 0 .*positive"):
        zoom_sizes([(5, 5, 5, 9)], vp)


def test_a_window_re_windows_an_8_bit_box():
    """adjust_window on an 8-bit X-ray: the window applies to its 0..255 levels, as env.images does."""
    gray = torch.from_numpy(np.asarray(skimage.data.camera(), dtype=np.uint8))[None]
    plan = plan_resample([gray, gray], [(0, 0, 512, 512)] * 2, (56, 56))
    out = crop_patchify_torch(plan, "qwen2-vl", [(100.0, 80.0), (float("nan"), float("nan"))], [False, False])
    resampled = crop_resize_torch(plan)[0]
    expected = patchify_torch([apply_window(resampled, (100.0, 80.0)).expand(3, -1, -1)], "qwen2-vl")
    plain = patchify_torch([resampled.expand(3, -1, -1)], "qwen2-vl")
    first, second = out.pixel_values.split(out.grid_thw.prod(dim=1).tolist())
    assert torch.allclose(first, expected.pixel_values, atol=1e-6)
    assert torch.allclose(second, plain.pixel_values, atol=1e-6)
