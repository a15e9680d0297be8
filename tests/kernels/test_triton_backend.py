"""The Triton back end, run by the Triton interpreter on CPU, against the torch references
`crop_resize_torch` and `crop_patchify_torch`. Cases stay tiny: each program costs the
interpreter tens of milliseconds."""

from __future__ import annotations

import os

# triton.jit picks the interpreter when it decorates the kernels, i.e. on import.
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from importlib.util import find_spec  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medvistagym.kernels import triton_backend as tb  # noqa: E402
from medvistagym.kernels.crop_resize import crop_resize_torch  # noqa: E402
from medvistagym.kernels.patchify import PRESETS, Patches, crop_patchify_torch  # noqa: E402
from medvistagym.kernels.plan import ResamplePlan, plan_resample  # noqa: E402

if not tb.INTERPRETED:
    # Something imported the back end before this module switched the interpreter on, so its
    # kernels were decorated for a GPU; set TRITON_INTERPRET=1 in a conftest.py instead.
    raise RuntimeError("medvistagym.kernels.triton_backend was imported before TRITON_INTERPRET=1 was set")


def noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return torch.randn(shape, generator=g)


def ct_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Hounsfield-like float32: air, soft tissue and bone, with noise."""
    values = noise(shape, seed, torch.float32) * 40.0
    values[..., : shape[-2] // 3, :] -= 1000.0
    values[..., shape[-2] // 3 :, shape[-1] // 2 :] += 700.0
    return values


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [
        noise((3, 40, 52), 1),  # uint8 RGB
        noise((1, 37, 30), 2),  # uint8 gray
        ct_like((1, 48, 44), 3),  # float32 CT
        (ct_like((1, 33, 40), 4) * 2).round().to(torch.int16),
        (ct_like((1, 36, 34), 5) + 1500).round().clamp(0, 65535).to(torch.uint16),
    ]


def assert_matches(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """uint8 sources within one level, float within 1e-4 relative, 16-bit within one unit."""
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if b.dtype.is_floating_point:
            scale = float(b.double().abs().max()) + 1.0
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4 * scale, msg=f"box {i}")
        else:
            assert int((a.long() - b.long()).abs().max()) <= 1, i


def both(plan: ResamplePlan, out_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return tb.crop_resize_triton(plan, out_dtype), crop_resize_torch(plan, out_dtype)


def test_available_under_the_interpreter() -> None:
    assert tb.INTERPRETED and tb.available()


def test_uint8_boxes_of_all_kinds_in_one_call(images: list[torch.Tensor]) -> None:
    rgb, gray = images[0], images[1]
    boxes = [
        (0.0, 0.0, 52.0, 40.0),  # whole image, downscale
        (10.25, 7.5, 19.75, 15.125),  # fractional, upscale
        (0.0, 0.0, 6.5, 40.0),  # touching the left, top and bottom edges
        (44.3, 31.1, 52.0, 40.0),  # touching the right and bottom edges
        (3.0, 4.0, 29.0, 33.0),  # on the gray image
        (0.2, 0.4, 0.7, 0.9),  # sub-pixel box
    ]
    sizes = [(17, 22), (33, 35), (40, 1), (1, 1), (9, 37), (5, 3)]
    plan = plan_resample([rgb, gray], boxes, sizes, image_index=[0, 0, 0, 0, 1, 1])
    assert_matches(*both(plan))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_both_pass_orders_with_clamping(mode: str) -> None:
    # On noise, bicubic overshoot is clamped after each pass, so running the passes in the wrong
    # order, or not rounding in between, is off by many levels.
    src = noise((3, 40, 40), 7)
    plan = plan_resample(src, [(0.0, 0.0, 40.0, 40.0), (2.5, 1.5, 38.0, 39.0)], [(19, 30), (20, 30)], mode=mode)
    assert plan.vertical_first.tolist() == [True, False]
    assert_matches(*both(plan))


def test_vertical_first_over_several_chunks() -> None:
    # 96 rows -> 20: the tile's window spans several CHUNK blocks along both axes.
    src = noise((1, 96, 40), 8)
    plan = plan_resample(src, [(0.0, 0.0, 40.0, 96.0)], [(20, 35)])
    assert bool(plan.vertical_first[0])
    assert_matches(*both(plan))


def test_full_depth_sources(images: list[torch.Tensor]) -> None:
    ct, i16, u16 = images[2], images[3], images[4]
    boxes = [(0.0, 0.0, 44.0, 48.0), (5.5, 6.25, 20.75, 30.0), (1.0, 2.0, 40.0, 33.0), (3.3, 0.0, 34.0, 36.0)]
    plan = plan_resample([ct, i16, u16], boxes, [(20, 33), (40, 17), (12, 50), (1, 9)], image_index=[0, 0, 1, 2])
    assert_matches(*both(plan))


def test_images_of_every_dtype_in_one_launch(images: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    launches = []
    kernel = tb._crop_resize_kernel

    class Counting:
        def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204 - the launcher Triton hands back
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tb, "_crop_resize_kernel", Counting())
    boxes = [(1.0, 2.0, 30.0, 20.0), (0.5, 0.5, 29.5, 36.5), (4.0, 4.0, 40.0, 44.0), (0.0, 0.0, 40.0, 33.0)]
    boxes.append((2.0, 3.0, 20.0, 30.0))
    plan = plan_resample(images, boxes, [(9, 14), (10, 8), (7, 7), (6, 12), (11, 5)])
    ours, ref = both(plan)
    assert len(launches) == 1
    assert [o.dtype for o in ours] == [torch.uint8, torch.uint8, torch.float32, torch.int16, torch.uint16]
    assert_matches(ours, ref)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.uint8, torch.int16, torch.float16, torch.bfloat16])
def test_out_dtype_rounds_and_clamps_like_finish(images: list[torch.Tensor], out_dtype: torch.dtype) -> None:
    bright = images[2] / 3 + 100  # float values beyond 0..255 and negative ones: clamped for uint8
    boxes = [(0.0, 0.0, 52.0, 40.0), (1.5, 2.5, 40.0, 45.0), (0.0, 0.0, 40.0, 33.0)]
    plan = plan_resample([images[0], bright, images[3]], boxes, [(8, 11), (9, 7), (5, 6)], image_index=[0, 1, 2])
    ours, ref = both(plan, out_dtype)
    if out_dtype.is_floating_point and out_dtype != torch.float32:
        # The interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even): one ulp.
        tolerance = {"rtol": 2**-7, "atol": 1e-6} if out_dtype == torch.bfloat16 else {}
        for a, b in zip(ours, ref):
            assert a.dtype == b.dtype == out_dtype
            torch.testing.assert_close(a.float(), b.float(), **tolerance)
    else:
        assert_matches(ours, ref)


def test_strided_images_and_empty_plan(images: list[torch.Tensor]) -> None:
    transposed = images[0].transpose(1, 2)  # x stride != 1: read through a copy
    plan = plan_resample(transposed, [(2.0, 3.0, 37.0, 50.0)], [(10, 12)])
    assert_matches(*both(plan))
    assert tb.crop_resize_triton(plan_resample(images[0], torch.zeros(0, 4), (5, 5))) == []


def test_unsupported_out_dtype_is_refused(images: list[torch.Tensor]) -> None:
    plan = plan_resample(images[0], [(0.0, 0.0, 8.0, 8.0)], (4, 4))
    with pytest.raises(ValueError, match="out_dtype"):
        tb.crop_resize_triton(plan, torch.complex64)


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.sampled_from([1, 3]),
    mode=st.sampled_from(["bilinear", "bicubic"]),
    antialias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_boxes(
    data: st.DataObject, height: int, width: int, channels: int, mode: str, antialias: bool, seed: int
) -> None:
    src = noise((channels, height, width), seed)
    x = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2, unique=True)))
    y = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2, unique=True)))
    if torch.tensor(x).float().diff().item() <= 0 or torch.tensor(y).float().diff().item() <= 0:
        return  # collapses in float32, where Pillow works
    size = (data.draw(st.integers(1, 34)), data.draw(st.integers(1, 34)))
    for image in (src, src.float()):
        plan = plan_resample(image, [(x[0], y[0], x[1], y[1])], size, mode=mode, antialias=antialias)
        assert_matches(*both(plan))


def test_kernel_bytes_counts_spans_read_and_outputs_written(images: list[torch.Tensor]) -> None:
    # Whole-image boxes read the whole image; a box inside reads its span, taps included.
    plan = plan_resample([images[0], images[2]], [(0.0, 0.0, 52.0, 40.0), (0.0, 0.0, 44.0, 48.0)], [(10, 20), (6, 5)])
    assert tb.kernel_bytes(plan) == (3 * 40 * 52 + 3 * 10 * 20) + (4 * 48 * 44 + 4 * 6 * 5)
    assert tb.kernel_bytes(plan, torch.float32) == (3 * 40 * 52 + 4 * 3 * 10 * 20) + (4 * 48 * 44 + 4 * 6 * 5)
    inner = plan_resample(images[0], [(10.0, 10.0, 20.0, 20.0)], (10, 10), mode="bilinear")
    # 1:1 bilinear reads the box and the one zero-weight tap Pillow keeps past its end on each axis.
    assert tb.kernel_bytes(inner) == 3 * 11 * 11 + 3 * 10 * 10
    assert tb.kernel_bytes(plan_resample(images[0], torch.zeros(0, 4), (5, 5))) == 0


def test_copy_bandwidth_is_measured() -> None:
    assert tb.copy_bandwidth_gbs(1 << 20, "cpu", repeats=2) > 0


# ---------------------------------------------------------------------------------------------
# The fused zoom-to-patches path


def assert_patches_match(ours: Patches, ref: Patches, preset: str) -> None:
    """Same layout; values within one display level (uint8 resampling, or a full-depth value
    that lands next to a rounding boundary), almost all of them bit for bit."""
    assert torch.equal(ours.grid_thw, ref.grid_thw) and torch.equal(ours.offsets, ref.offsets)
    assert ours.pixel_values.shape == ref.pixel_values.shape and ours.pixel_values.dtype == torch.float32
    one_level = 1 / 255 / min(PRESETS[preset].image_std)
    diff = (ours.pixel_values - ref.pixel_values).abs()
    assert float(diff.max()) <= one_level * 1.001
    assert float((diff == 0).float().mean()) > 0.99


@pytest.mark.parametrize("preset", ["qwen2.5-vl", "qwen3-vl"])
def test_patchify_uint8_rgb_and_gray(images: list[torch.Tensor], preset: str) -> None:
    f = PRESETS[preset].factor
    plan = plan_resample(images[:2], [(2.5, 3.0, 50.0, 38.5), (0.0, 0.0, 30.0, 37.0)], [(2 * f, f), (f, f)])
    assert plan.vertical_first.tolist() == [False, True]
    assert_patches_match(tb.crop_patchify_triton(plan, preset), crop_patchify_torch(plan, preset), preset)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # numpy, on the width-1 window
def test_patchify_full_depth_windows_and_invert(images: list[torch.Tensor]) -> None:
    # A narrow window makes many values land on exact 0 and 255 and near rounding ties; the
    # width-1 window divides by zero; the uint8 box ignores its NaN window.
    plan = plan_resample(
        images[1:5],
        [(0.0, 0.0, 30.0, 37.0), (1.5, 2.0, 43.0, 47.5), (0.0, 0.0, 40.0, 33.0), (2.0, 1.0, 33.5, 35.0)],
        [(28, 28), (56, 28), (28, 28), (28, 28)],
        image_index=[0, 1, 2, 3],
    )
    windows = [(float("nan"), float("nan")), (40.0, 400.0), (0.0, 1.0), (1500.0, 80.0)]
    invert = [False, True, False, True]
    ours = tb.crop_patchify_triton(plan, "qwen2-vl", windows, invert)
    assert_patches_match(ours, crop_patchify_torch(plan, "qwen2-vl", windows, invert), "qwen2-vl")


def test_patchify_windows_an_8_bit_box_that_has_a_window(images: list[torch.Tensor]) -> None:
    plan = plan_resample(images[:2], [(0.0, 0.0, 30.0, 37.0)] * 2, [(28, 28)] * 2, image_index=[1, 1])
    windows, invert = [(100.0, 60.0), (float("nan"), float("nan"))], [True, False]
    ours = tb.crop_patchify_triton(plan, "qwen2-vl", windows, invert)
    reference = crop_patchify_torch(plan, "qwen2-vl", windows, invert)
    assert_patches_match(ours, reference, "qwen2-vl")
    first, second = reference.pixel_values.split(reference.grid_thw.prod(dim=1).tolist())
    assert not torch.equal(first, second)  # the window changed what the box shows


def test_patchify_errors_name_the_box(images: list[torch.Tensor]) -> None:
    plan = plan_resample(images[2], [(0.0, 0.0, 44.0, 48.0)], [(28, 28)])
    with pytest.raises(ValueError, match="box 0 .*needs a window"):
        tb.crop_patchify_triton(plan, "qwen2-vl")
    with pytest.raises(ValueError, match="box 0 resamples to 20 high"):
        tb.crop_patchify_triton(plan_resample(images[0], [(0.0, 0.0, 8.0, 8.0)], (20, 28)), "qwen2-vl")
    empty = tb.crop_patchify_triton(plan_resample(images[0], torch.zeros(0, 4), (28, 28)), "qwen2-vl")
    assert empty.pixel_values.shape == (0, 3 * 2 * 14 * 14) and empty.offsets.tolist() == [0]


# ---------------------------------------------------------------------------------------------
# What the interpreter cannot check: that the kernels compile for a GPU


@pytest.mark.skipif(find_spec("triton.backends.nvidia") is None, reason="Triton's CUDA back end is not installed")
def test_kernels_compile_for_h100() -> None:
    # Compiles both kernels to sm_90 machine code (ptxas runs; no GPU needed) in a fresh
    # process without the interpreter, with every source and output dtype enabled.
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from medvistagym.kernels import triton_backend as tb

        tables = {"boxes": "*i64", "first": "*i32", "count": "*i32", "weight": "*fp32", "tile_box": "*i32"}
        tile = {"TH": tb.TILE_H, "TW": tb.TILE_W, "BK": tb.CHUNK, "SOURCES": 15}
        kernels = [
            (tb._crop_resize_kernel, {"outs": "*i64", "bounds": "*fp32"}, {"OUTPUTS": 511}),
            (tb._crop_patchify_kernel, {"rows": "*i64", "window": "*fp32", "lut": "*fp32", "pixel_values": "*fp32"},
             {"P": 14, "M": 2, "T": 2}),
        ]
        for kernel, pointers, extra in kernels:
            constants = tile | extra
            signature = tables | pointers | {name: "constexpr" for name in constants}
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": tb.NUM_WARPS})
            assert compiled.asm["cubin"], kernel
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
