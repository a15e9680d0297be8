"""crop_resize against Pillow's Image.resize(size, filter, box=...) and against a direct reference.

Every check of results runs once per CPU back end (the `backend` fixture): the torch reference
within one uint8 level of Pillow, the compiled CPU back end bit-exact (UINT8_LEVELS).
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pillow_cases import CASES, MODES, UINT8_LEVELS, as_tensor, level_diff, noise, pil_resize, random_boxes

from medvistagym.kernels import crop_resize, plan_resample
from medvistagym.kernels.resample import axis_weights

# The package re-exports the function under the module's name, so fetch the module itself.
crop_resize_module = importlib.import_module("medvistagym.kernels.crop_resize")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_uint8_matches_pillow_rgb_and_l(
    case: str, mode: str, backend: str, ihc: np.ndarray, camera: np.ndarray
) -> None:
    box, size = CASES[case]
    for arr in (ihc, camera):
        (ours,) = crop_resize(as_tensor(arr), [box], size, mode=mode, backend=backend)
        assert level_diff(ours, pil_resize(arr, box, size, mode)) <= UINT8_LEVELS[backend], (case, arr.ndim)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_float_matches_pillow_mode_f(case: str, mode: str, backend: str, camera: np.ndarray) -> None:
    box, size = CASES[case]
    arr = camera.astype(np.float32) / 7.0 - 3.0  # negative values too
    (ours,) = crop_resize(as_tensor(arr), [box], size, mode=mode, backend=backend)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].numpy(), pil_resize(arr, box, size, mode)[0], rtol=1e-4, atol=1e-4)


def test_noise_exercises_clamping_and_pass_order(backend: str) -> None:
    # Bicubic overshoot on noise is clamped after each pass, so a wrong pass order or a
    # missing intermediate rounding shows up as errors of many levels here.
    arr = noise(96, 80, 3, seed=1)
    boxes = [(0.0, 0.0, 80.0, 96.0), (3.5, 2.25, 70.0, 90.5), (10.0, 10.0, 20.0, 30.0), (0.5, 0.0, 79.5, 96.0)]
    sizes = [(20, 70), (40, 200), (150, 45), (7, 64)]  # the first runs the vertical pass first in Pillow 13
    plan = plan_resample(as_tensor(arr), boxes, sizes)
    assert plan.vertical_first.any() and not plan.vertical_first.all()  # both pass orders in one call
    outs = crop_resize(as_tensor(arr), boxes, sizes, backend=backend)
    for box, size, ours in zip(boxes, sizes, outs):
        assert level_diff(ours, pil_resize(arr, box, size, "bicubic")) <= UINT8_LEVELS[backend]


@pytest.mark.parametrize(("height", "out_h"), [(40, 19), (40, 20), (80, 59), (80, 60)])
def test_pass_order_switches_where_pillow_13_switches(height: int, out_h: int, backend: str) -> None:
    # Pillow 13 goes vertical-first once the height loses > 2x the pixels the width loses:
    # 40 -> 19 rows is vertical-first and 40 -> 20 is not when 40 -> 30 columns (likewise 80 -> 59 / 60).
    arr = noise(height, 40, 3, seed=height + out_h)
    box = (0.0, 0.0, 40.0, float(height))
    (ours,) = crop_resize(as_tensor(arr), [box], (out_h, 30), backend=backend)
    assert level_diff(ours, pil_resize(arr, box, (out_h, 30), "bicubic")) <= UINT8_LEVELS[backend]


def test_many_boxes_over_images_of_different_sizes_in_one_call(
    backend: str, ihc: np.ndarray, camera: np.ndarray
) -> None:
    images = [ihc, camera, ihc[100:400, 37:200], noise(45, 130, seed=3), camera[::3, ::2]]
    boxes, sizes, index = random_boxes([a.shape[:2] for a in images], 40, seed=7)
    outs = crop_resize([as_tensor(a) for a in images], boxes, sizes, image_index=index, backend=backend)
    assert len(outs) == len(boxes)
    for box, size, j, ours in zip(boxes, sizes, index, outs):
        assert level_diff(ours, pil_resize(images[j], box, size, "bicubic")) <= UINT8_LEVELS[backend]


# Equal output sizes and near-equal spans: boxes the torch back end puts into shared stacks.
STACKED_SIZE = (32, 40)
STACKED_BOXES = [(10.0 + 37.3 * k, 5.0 + 21.7 * k, 110.0 + 37.3 * k, 95.0 + 21.7 * k + 0.1 * k) for k in range(9)]


def test_stacked_boxes_share_torch_stacks(ihc: np.ndarray) -> None:
    # Checks that test_stacked_boxes_match_pillow_and_single_calls covers torch's padded, batched path.
    src, size, boxes, n = as_tensor(ihc), STACKED_SIZE, STACKED_BOXES, len(STACKED_BOXES)
    box = torch.tensor(boxes, dtype=torch.float64)
    taps = axis_weights(
        torch.tensor([512] * 2 * n),
        torch.cat([box[:, 0], box[:, 1]]),
        torch.cat([box[:, 2], box[:, 3]]),
        torch.tensor([size[1]] * n + [size[0]] * n),
    )
    band = crop_resize_module.bands(taps, torch.ones(2 * n, dtype=torch.bool))
    hw, horizontal_first = torch.tensor([size] * n), torch.ones(n, dtype=torch.bool)
    groups = crop_resize_module._groups([src] * n, hw, horizontal_first, taps.count.amax(dim=1), band)
    assert max(len(g) for g in groups) > 1


def test_stacked_boxes_match_pillow_and_single_calls(backend: str, ihc: np.ndarray) -> None:
    src, size, boxes = as_tensor(ihc), STACKED_SIZE, STACKED_BOXES
    stacked = crop_resize(src, boxes, size, backend=backend)
    singles = [crop_resize(src, [b], size, backend=backend)[0] for b in boxes]
    for b, ours, single in zip(boxes, stacked, singles):
        assert level_diff(ours, pil_resize(ihc, b, size, "bicubic")) <= UINT8_LEVELS[backend]
        assert level_diff(ours, single) <= 1


def test_per_box_sizes_as_list_and_tensor(backend: str, camera: np.ndarray) -> None:
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.5, 60.5, 300.25, 200.0], [0.0, 0.0, 512.0, 512.0]])
    sizes = [(10, 20), (200, 33), (1, 512)]
    from_list = crop_resize(as_tensor(camera), boxes, sizes, backend=backend)
    from_tensor = crop_resize(as_tensor(camera), boxes, torch.tensor(sizes), backend=backend)
    for box, size, a, b in zip(boxes.tolist(), sizes, from_list, from_tensor):
        assert tuple(a.shape) == (1, *size)
        assert torch.equal(a, b)
        assert level_diff(a, pil_resize(camera, tuple(box), size, "bicubic")) <= UINT8_LEVELS[backend]


def test_default_image_index_pairs_box_i_with_image_i(backend: str, ihc: np.ndarray, camera: np.ndarray) -> None:
    images = [as_tensor(camera), as_tensor(ihc)]
    boxes = [(0.0, 0.0, 40.0, 40.0), (10.0, 10.0, 50.0, 50.0)]
    a, b = crop_resize(images, boxes, (20, 20), backend=backend)
    assert a.shape == (1, 20, 20) and b.shape == (3, 20, 20)
    assert level_diff(b, pil_resize(ihc, boxes[1], (20, 20), "bicubic")) <= UINT8_LEVELS[backend]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([1, 3]),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_property_random_boxes_match_pillow(
    backend: str, data: st.DataObject, height: int, width: int, channels: int, mode: str, seed: int
) -> None:
    arr = noise(height, width, channels if channels == 3 else 0, seed=seed)
    n = data.draw(st.integers(1, 4), label="boxes")
    boxes, sizes = [], []
    for _ in range(n):
        x = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2, unique=True)))
        y = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2, unique=True)))
        if np.float32(x[1]) <= np.float32(x[0]) or np.float32(y[1]) <= np.float32(y[0]):
            continue  # collapses in float32, where Pillow works
        boxes.append((x[0], y[0], x[1], y[1]))
        sizes.append((data.draw(st.integers(1, 50)), data.draw(st.integers(1, 50))))
    if not boxes:
        return
    outs = crop_resize(as_tensor(arr), boxes, sizes, mode=mode, backend=backend)
    for box, size, ours in zip(boxes, sizes, outs):
        assert level_diff(ours, pil_resize(arr, box, size, mode)) <= UINT8_LEVELS[backend]
    floats = crop_resize(as_tensor(arr.astype(np.float32)), boxes, sizes, mode=mode, backend=backend)
    for box, size, ours in zip(boxes, sizes, floats):
        ref = pil_resize(arr.astype(np.float32), box, size, mode)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-3)


def test_uint16_and_int16_match_a_rounded_float_reference(backend: str, camera: np.ndarray) -> None:
    # Rounding once allows 0.5; float32 sums near 6e4 add a few hundredths.
    tolerance = 0.5 + 0.05
    box, size = (12.5, 30.25, 400.0, 500.0), (77, 150)
    wide = camera.astype(np.float32) * 257.0  # full uint16 range, overshoot clamps at 65535
    (u16,) = crop_resize(as_tensor(wide.astype(np.uint16)), [box], size, backend=backend)
    ref = pil_resize(wide, box, size, "bicubic")
    assert u16.dtype == torch.uint16
    assert np.abs(u16.numpy().astype(np.float64) - np.clip(ref, 0, 65535)).max() <= tolerance

    signed = camera.astype(np.float32) * 200.0 - 25000.0
    (i16,) = crop_resize(as_tensor(signed.astype(np.int16)), [box], size, backend=backend)
    ref = pil_resize(signed, box, size, "bicubic")
    assert i16.dtype == torch.int16
    assert np.abs(i16.numpy().astype(np.float64) - np.clip(ref, -32768, 32767)).max() <= tolerance


def test_out_dtype_float_holds_the_same_pillow_levels(backend: str, ihc: np.ndarray) -> None:
    box, size = (5.5, 6.5, 200.0, 100.0), (64, 96)
    (levels,) = crop_resize(as_tensor(ihc), [box], size, backend=backend)
    (floats,) = crop_resize(as_tensor(ihc), [box], size, out_dtype=torch.float32, backend=backend)
    assert floats.dtype == torch.float32
    assert torch.equal(floats, levels.float())
    assert level_diff(levels, pil_resize(ihc, box, size, "bicubic")) <= UINT8_LEVELS[backend]
    (back,) = crop_resize(
        as_tensor(ihc.astype(np.float32) * 2), [box], size, out_dtype=torch.uint8, backend=backend
    )
    assert back.dtype == torch.uint8 and int(back.max()) == 255  # rounded and clamped


def reference_weights(in_size: int, start: float, end: float, out_size: int, mode: str, antialias: bool) -> np.ndarray:
    """Dense (out, in) matrix of Pillow-style taps, written out loop by loop."""
    support, kernel = {"bilinear": (1.0, _triangle), "bicubic": (2.0, _keys_cubic)}[mode]
    start32, end32 = np.float32(start), np.float32(end)
    scale = float(end32 - start32) / out_size
    stretch = max(scale, 1.0) if antialias else 1.0
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = float(start32) + (i + 0.5) * scale
        lo = max(int(center - support * stretch + 0.5), 0)
        hi = min(int(center + support * stretch + 0.5), in_size)
        taps = [kernel((x - center + 0.5) / stretch) for x in range(lo, hi)]
        total = sum(taps)
        matrix[i, lo:hi] = [t / total for t in taps] if total else taps
    return matrix


def _triangle(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


def _keys_cubic(x: float) -> float:
    x, a = abs(x), -0.5
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def reference_resize(
    arr: np.ndarray, box: tuple[float, ...], size: tuple[int, int], mode: str, antialias: bool
) -> np.ndarray:
    wy = reference_weights(arr.shape[0], box[1], box[3], size[0], mode, antialias)
    wx = reference_weights(arr.shape[1], box[0], box[2], size[1], mode, antialias)
    return wy @ arr.astype(np.float64) @ wx.T


@pytest.mark.parametrize("mode", MODES)
def test_reference_itself_agrees_with_pillow(mode: str, camera: np.ndarray) -> None:
    arr = camera.astype(np.float32)
    for box, size in (CASES["downscale-fractional"], CASES["upscale-fractional"]):
        ref = reference_resize(arr, box, size, mode, antialias=True)
        np.testing.assert_allclose(ref, pil_resize(arr, box, size, mode)[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_antialias_false_matches_unscaled_reference(mode: str, backend: str, camera: np.ndarray) -> None:
    arr = camera.astype(np.float32)
    boxes = [(3.3, 7.9, 500.1, 480.6), (100.25, 60.5, 163.75, 140.125), (0.0, 0.0, 512.0, 512.0)]
    sizes = [(97, 131), (301, 233), (40, 500)]
    outs = crop_resize(as_tensor(arr), boxes, sizes, mode=mode, antialias=False, backend=backend)
    for box, size, ours in zip(boxes, sizes, outs):
        ref = reference_resize(arr, box, size, mode, antialias=False)
        np.testing.assert_allclose(ours[0].numpy(), ref, rtol=1e-4, atol=1e-3)
        aliased = reference_resize(arr, box, size, mode, antialias=True)
        if box[2] - box[0] > size[1] or box[3] - box[1] > size[0]:  # downscaling: the two must differ
            assert np.abs(ours[0].numpy() - aliased).max() > 1.0


def test_axis_weights_batch_equals_single_calls_and_rows_sum_to_one() -> None:
    starts, ends = torch.tensor([0.0, 3.25, 10.5]), torch.tensor([64.0, 9.75, 200.0])
    outs, sizes = torch.tensor([16, 40, 7]), torch.tensor([64, 30, 200])
    batch = axis_weights(sizes, starts, ends, outs)
    for n in range(3):
        one = axis_weights(int(sizes[n]), float(starts[n]), float(ends[n]), int(outs[n]))
        o, k = one.weights.shape[1:]
        assert torch.equal(batch.first[n, :o], one.first[0])
        assert torch.equal(batch.weights[n, :o, :k], one.weights[0])
        assert float(batch.weights[n, o:].abs().sum()) == 0.0
        dense = reference_weights(int(sizes[n]), float(starts[n]), float(ends[n]), int(outs[n]), "bicubic", True)
        ours = np.zeros_like(dense)
        for i in range(o):
            f, c = int(one.first[0, i]), int(one.count[0, i])
            ours[i, f : f + c] = one.weights[0, i, :c].numpy()
        np.testing.assert_allclose(ours, dense, atol=1e-12)
    np.testing.assert_allclose(batch.weights.sum(-1)[batch.count > 0].numpy(), 1.0, atol=1e-12)


def test_no_boxes_gives_no_crops(backend: str, camera: np.ndarray) -> None:
    assert crop_resize(as_tensor(camera), torch.zeros(0, 4), (8, 8), backend=backend) == []


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((10.0, 10.0, 600.0, 20.0), r"box 1 .* is outside its image: image 0 is 512 wide and 512 high"),
        ((-0.5, 10.0, 20.0, 20.0), r"box 1 .* is outside its image"),
        ((10.0, 10.0, 20.0, 512.5), r"box 1 .* is outside its image"),
        ((30.0, 10.0, 20.0, 20.0), r"box 1 .* is empty or inverted \(x2 <= x1\)"),
        ((10.0, 20.0, 20.0, 20.0), r"box 1 .* is empty or inverted \(y2 <= y1\)"),
        ((10.0, 10.0, 10.0, 20.0), r"box 1 .* is empty or inverted \(x2 <= x1\)"),
        ((10.0, math.nan, 20.0, 20.0), r"box 1 .* has a non-finite coordinate"),
    ],
)
def test_bad_boxes_name_the_box_and_the_reason(box: tuple[float, ...], message: str, camera: np.ndarray) -> None:
    with pytest.raises(ValueError, match=message):
        crop_resize(as_tensor(camera), [(0.0, 0.0, 5.0, 5.0), box], (4, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [[0.0, 0.0, 5.0]]}, r"boxes must have shape \(N, 4\)"),
        ({"images": torch.zeros(8, 8, dtype=torch.uint8)}, r"image 0 must be a \(C, H, W\) tensor"),
        ({"images": torch.zeros(2, 8, 8, dtype=torch.uint8)}, r"image 0 must be a \(C, H, W\) tensor with C = 1 or 3"),
        ({"images": torch.zeros(1, 8, 8, dtype=torch.int32)}, r"image 0 has dtype torch.int32"),
        ({"images": []}, r"images is empty"),
        ({"sizes": [(4, 4), (4, 4), (4, 4)]}, r"sizes must be one \(h, w\) pair or 2 of them"),
        ({"sizes": (0, 4)}, r"size 0 \(0, 4\) must be at least 1 x 1"),
        ({"sizes": (2.5, 4)}, r"sizes must be whole numbers"),
        ({"image_index": [0]}, r"image_index must name one image per box: 2 boxes"),
        ({"image_index": [0, 1]}, r"image_index\[1\] = 1 is out of range for 1 images"),
        ({"images": [torch.zeros(1, 8, 8, dtype=torch.uint8)] * 3}, r"image_index is required with 3 images and 2"),
        ({"mode": "lanczos"}, r"mode must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    args = {
        "images": torch.zeros(1, 8, 8, dtype=torch.uint8),
        "boxes": [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 8.0, 8.0]],
        "sizes": (4, 4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        crop_resize(args.pop("images"), args.pop("boxes"), args.pop("sizes"), **args)
