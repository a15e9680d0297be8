"""What is particular to the compiled CPU back end: a failed build, direct comparisons with the
torch back end that the Pillow checks do not make, and the fused zoom-to-patches path.

Its Pillow parity (bit-exact for uint8) is checked with the torch reference's in
test_crop_resize.py, over the `backend` fixture.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pillow_cases import CASES, MODES, as_tensor, level_diff, noise, pil_resize, random_boxes

from medvistagym.cache import CACHE_ENV
from medvistagym.kernels import cpu_backend
from medvistagym.kernels.crop_resize import crop_resize_torch
from medvistagym.kernels.patchify import Patches, crop_patchify_torch, display_levels, patchify_torch
from medvistagym.kernels.plan import ResamplePlan, plan_resample

if not cpu_backend.available():
    pytest.skip(f"compiled CPU back end unavailable: {cpu_backend.unavailable_reason()}", allow_module_level=True)

from medvistagym.kernels.cpu_backend import crop_patchify_cpu, crop_resize_cpu  # noqa: E402


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_float_matches_the_torch_reference_closer_than_pillow(case: str, mode: str, camera: np.ndarray) -> None:
    # Pillow parity (rtol 1e-4) is test_crop_resize.py::test_float_matches_pillow_mode_f[cpu];
    # against the torch reference the compiled back end is held to rtol 1e-5, which that does not imply.
    box, size = CASES[case]
    arr = camera.astype(np.float32) / 7.0 - 3.0  # negative values too
    plan = plan_resample(as_tensor(arr), [box], size, mode=mode)
    (ours,) = crop_resize_cpu(plan)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, crop_resize_torch(plan)[0], rtol=1e-5, atol=1e-4)


def test_many_boxes_over_images_of_different_sizes_and_dtypes_in_one_call(ihc: np.ndarray, camera: np.ndarray) -> None:
    arrays = [
        ihc,
        camera,
        ihc[100:400, 37:200],
        noise(45, 130, seed=3),
        (camera[::3, ::2].astype(np.float32) * 100.0),  # uint16
        (camera[50:, 9:].astype(np.float32) * 200.0 - 25000.0),  # int16
        ihc[::2, ::3].astype(np.float32) / 9.0 - 4.0,  # float32
    ]
    dtypes = [None, None, None, None, torch.uint16, torch.int16, torch.float32]
    images = [as_tensor(a) if d is None else as_tensor(a).to(d) for a, d in zip(arrays, dtypes)]
    boxes, sizes, index = random_boxes([a.shape[:2] for a in arrays], 56, seed=7)
    plan = plan_resample(images, boxes, sizes, image_index=index)
    ours, ref = crop_resize_cpu(plan), crop_resize_torch(plan)
    for box, size, j, o, r in zip(boxes, sizes, index, ours, ref):
        assert o.dtype == r.dtype == images[j].dtype and o.shape == r.shape
        if o.dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
        else:
            assert level_diff(o, r) <= 1
        if o.dtype == torch.uint8:
            assert level_diff(o, pil_resize(arrays[j], box, size, "bicubic")) == 0


@pytest.mark.parametrize(
    "out_dtype", [torch.float32, torch.uint8, torch.int16, torch.uint16, torch.float64, torch.int32]
)
def test_out_dtype_conversions_match_torch(out_dtype: torch.dtype, ihc: np.ndarray) -> None:
    box, size = (5.5, 6.5, 200.0, 100.0), (64, 96)
    sources = [
        as_tensor(ihc),
        as_tensor(ihc.astype(np.float32) * 300.0 - 20000.0),
        as_tensor(ihc).to(torch.uint16) * 250,
    ]
    for src in sources:
        plan = plan_resample(src, [box], size)
        (ours,), (ref,) = crop_resize_cpu(plan, out_dtype), crop_resize_torch(plan, out_dtype)
        assert ours.dtype == ref.dtype == out_dtype and ours.is_contiguous()
        if out_dtype.is_floating_point and src.dtype == torch.float32:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-2)
        else:
            assert float((ours.double() - ref.double()).abs().max()) <= 1


def test_antialias_off_and_non_contiguous_images_match_torch(camera: np.ndarray) -> None:
    src = as_tensor(camera).expand(3, -1, -1)[:, ::2, 1::3]  # strided view of a grey image
    boxes, sizes, _ = random_boxes([tuple(src.shape[1:])], 8, seed=5, max_out=300)
    for antialias in (False, True):
        plan = plan_resample(src, boxes, sizes, antialias=antialias)
        for o, r in zip(crop_resize_cpu(plan), crop_resize_torch(plan)):
            assert level_diff(o, r) <= 1


def test_a_failed_build_reports_unavailable_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_backend, "SOURCE", broken)
    monkeypatch.setattr(cpu_backend, "_extension", functools.cache(cpu_backend._extension.__wrapped__))
    with caplog.at_level(logging.WARNING, logger=cpu_backend.__name__):
        assert not cpu_backend.available()
        assert not cpu_backend.available()
    assert len(caplog.records) == 1 and "unavailable" in caplog.records[0].getMessage()
    assert cpu_backend.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        crop_resize_cpu(plan_resample(torch.zeros(1, 8, 8, dtype=torch.uint8), [(0, 0, 4, 4)], (2, 2)))


# --- the fused zoom-to-patches path ---------------------------------------------------------


def float_plan(plan: ResamplePlan) -> ResamplePlan:
    """16-bit images as float32: how crop_patchify resamples them (unrounded)."""
    return dataclasses.replace(plan, images=[im if im.dtype == torch.uint8 else im.float() for im in plan.images])


def patches_of_our_resample(plan: ResamplePlan, preset: str, windows: torch.Tensor, invert: torch.Tensor) -> Patches:
    """crop_patchify's steps 2 and 3 done by the torch reference on our own resampled values."""
    resampled = crop_resize_cpu(float_plan(plan))
    given = torch.isfinite(windows).all(dim=1).tolist()  # a box without a window has a NaN row
    levels = [display_levels(r, windows[i] if given[i] else None, invert[i]) for i, r in enumerate(resampled)]
    return patchify_torch(levels, preset)


def zoom_plan(images: list[torch.Tensor], factor: int, n: int, seed: int) -> ResamplePlan:
    rng = np.random.default_rng(seed)
    boxes, sizes, index = [], [], []
    for i in range(n):
        j = i % len(images)
        h, w = images[j].shape[1:]
        x1, y1 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
        boxes.append((x1, y1, rng.uniform(x1 + 4, w), rng.uniform(y1 + 4, h)))
        sizes.append((factor * int(rng.integers(1, 6)), factor * int(rng.integers(1, 6))))
        index.append(j)
    return plan_resample(images, boxes, sizes, image_index=index)


@pytest.mark.parametrize("preset", ["qwen2.5-vl", "qwen3-vl"])
def test_patches_of_uint8_boxes_match_the_torch_reference(preset: str, ihc: np.ndarray, camera: np.ndarray) -> None:
    factor = 28 if preset == "qwen2.5-vl" else 32
    plan = zoom_plan([as_tensor(ihc), as_tensor(camera), as_tensor(noise(70, 90, 3, seed=2))], factor, 9, seed=1)
    assert plan.vertical_first.any() and not plan.vertical_first.all()
    ours = crop_patchify_cpu(plan, preset)
    no_window, no_invert = torch.full((plan.n, 2), float("nan")), torch.zeros(plan.n, dtype=torch.bool)
    exact = patches_of_our_resample(plan, preset, no_window, no_invert)
    assert torch.equal(ours.pixel_values, exact.pixel_values)
    ref = crop_patchify_torch(plan, preset)
    assert torch.equal(ours.grid_thw, ref.grid_thw) and torch.equal(ours.offsets, ref.offsets)
    # The torch back end's uint8 levels are within one of Pillow's: one level is 1 / 255 / std.
    assert float((ours.pixel_values - ref.pixel_values).abs().max()) <= 1 / 255 / 0.26 + 1e-6


def test_patches_of_full_depth_boxes_are_windowed_inverted_and_replicated(camera: np.ndarray) -> None:
    images = [
        as_tensor(camera).to(torch.uint16) * 200,
        as_tensor(camera.astype(np.float32) * 100.0 - 9000.0).to(torch.int16),
        as_tensor(np.stack([camera, camera.T, camera[::-1]], axis=-1).astype(np.float32) / 255.0),
        as_tensor(camera),
    ]
    plan = zoom_plan(images, 28, 8, seed=3)
    windows = torch.tensor([[25000.0, 30000.0], [3000.0, 9000.0], [0.4, 0.5], [float("nan")] * 2] * 2)
    windows[5] = torch.tensor([1000.0, 1.0])  # width 1: a hard threshold
    invert = torch.tensor([False, True, False, True, True, False, True, False])
    ours = crop_patchify_cpu(plan, "qwen2.5-vl", windows, invert)
    assert torch.equal(ours.pixel_values, patches_of_our_resample(plan, "qwen2.5-vl", windows, invert).pixel_values)
    ref = crop_patchify_torch(plan, "qwen2.5-vl", windows, invert)
    diff = (ours.pixel_values - ref.pixel_values).abs()
    # Float sums in another order may round a level the other way where 255 s lands on a half.
    assert float(diff.max()) <= 1 / 255 / 0.26 + 1e-6 and float((diff > 0).float().mean()) < 1e-3


def test_patches_of_8_bit_boxes_with_a_window_are_re_windowed(camera: np.ndarray) -> None:
    plan = zoom_plan([as_tensor(camera)], 28, 4, seed=5)
    windows = torch.tensor([[100.0, 60.0], [float("nan")] * 2, [200.0, 20.0], [float("nan")] * 2])
    invert = torch.tensor([True, False, False, True])
    ours = crop_patchify_cpu(plan, "qwen2.5-vl", windows, invert)
    assert torch.equal(ours.pixel_values, patches_of_our_resample(plan, "qwen2.5-vl", windows, invert).pixel_values)
    plain = crop_patchify_cpu(plan, "qwen2.5-vl")
    rows = ours.offsets.tolist()
    assert not torch.equal(ours.pixel_values[rows[0] : rows[1]], plain.pixel_values[rows[0] : rows[1]])
    assert torch.equal(ours.pixel_values[rows[1] : rows[2]], plain.pixel_values[rows[1] : rows[2]])


def test_patches_check_sizes_and_windows_like_the_reference(camera: np.ndarray) -> None:
    plan = plan_resample(as_tensor(camera), [(0.0, 0.0, 100.0, 100.0)], (28, 30))
    with pytest.raises(ValueError, match="box 0 resamples to 28 high and 30 wide"):
        crop_patchify_cpu(plan, "qwen2.5-vl")
    full_depth = plan_resample(as_tensor(camera).to(torch.uint16), [(0.0, 0.0, 100.0, 100.0)], (28, 28))
    with pytest.raises(ValueError, match="needs a window"):
        crop_patchify_cpu(full_depth, "qwen2.5-vl")
    empty = crop_patchify_cpu(plan_resample(as_tensor(camera), torch.zeros(0, 4), (28, 28)), "qwen2.5-vl")
    assert empty.pixel_values.shape == (0, 3 * 2 * 14 * 14) and empty.offsets.tolist() == [0]


def test_patch_memory_is_reused_only_after_every_view_is_released(camera: np.ndarray) -> None:
    plan = zoom_plan([as_tensor(camera)], 28, 3, seed=4)
    first = crop_patchify_cpu(plan, "qwen2.5-vl")
    expected = first.pixel_values.clone()
    second = crop_patchify_cpu(plan, "qwen2.5-vl")  # first is still held: new memory
    assert second.pixel_values.data_ptr() != first.pixel_values.data_ptr()
    assert torch.equal(first.pixel_values, expected) and torch.equal(second.pixel_values, expected)
    del first
    view, address = second.image(1), second.pixel_values.data_ptr()
    del second
    third = crop_patchify_cpu(plan, "qwen2.5-vl")  # a view of second is still alive
    assert third.pixel_values.data_ptr() != address
    address = third.pixel_values.data_ptr()
    del view, third
    fourth = crop_patchify_cpu(plan, "qwen2.5-vl")
    assert fourth.pixel_values.data_ptr() == address and torch.equal(fourth.pixel_values, expected)
    cpu_backend.release_cached_output()
    assert torch.equal(fourth.pixel_values, expected)
