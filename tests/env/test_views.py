import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from medvistagym.env.images import SourceImage
from medvistagym.env.views import Orientation, View, full_view, render_views

ORIENTATIONS = [Orientation(t, m) for t, m in itertools.product(range(4), (False, True))]


def _ops(steps):
    """Apply tool steps one after another as plain tensor ops (the ground truth)."""

    def run(x):
        for kind, arg in steps:
            if kind == "rotate":
                x = torch.rot90(x, arg, dims=(-2, -1))
            elif arg == "horizontal":
                x = x.flip(-1)
            else:
                x = x.flip(-2)
        return x

    return run


@pytest.mark.parametrize("steps", [
    [("rotate", 1)], [("flip", "horizontal")], [("flip", "vertical")],
    [("rotate", 1), ("flip", "horizontal")], [("flip", "vertical"), ("rotate", 3)],
    [("rotate", 2), ("flip", "vertical"), ("rotate", 1), ("flip", "horizontal")],
])
def test_orientation_composes_like_the_tools(steps):
    x = torch.arange(2 * 3 * 5).reshape(2, 3, 5)
    orientation = Orientation()
    for kind, arg in steps:
        orientation = orientation.rotated(arg) if kind == "rotate" else orientation.flipped(arg)
    assert torch.equal(orientation.apply(x), _ops(steps)(x))


def test_rotation_is_counterclockwise():
    x = torch.tensor([[[1, 2], [3, 4]]])  # top row 1 2
    assert Orientation(1).apply(x).tolist() == [[[2, 4], [1, 3]]]  # the right column comes to the top


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_point_mapping_follows_the_pixels(orientation):
    grid = (7, 4)  # w, h
    for gx, gy in [(0, 0), (6, 0), (2, 3), (5, 1)]:
        x = torch.zeros(1, grid[1], grid[0])
        x[0, gy, gx] = 1
        shown = orientation.apply(x)
        sy, sx = (shown[0] == 1).nonzero()[0].tolist()
        assert orientation.from_grid(gx + 0.5, gy + 0.5, grid) == pytest.approx((sx + 0.5, sy + 0.5))
        assert orientation.to_grid(sx + 0.5, sy + 0.5, grid) == pytest.approx((gx + 0.5, gy + 0.5))
    assert orientation.shown_size(grid) == (shown.shape[-1], shown.shape[-2])


def _image(w=64, h=48, channels=1):
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 255, size=(channels, h, w), dtype=np.uint8))
    return SourceImage("test", pixels)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_box_round_trip_through_orientation(orientation):
    view = View(_image(), (8.0, 4.0, 40.0, 36.0), (16, 16), orientation)
    box = (1.0, 2.0, 9.0, 15.0)
    assert view.from_source(view.to_source(box)) == pytest.approx(box)


def test_zoom_of_a_zoom_cuts_from_the_source():
    view = full_view(_image(), (32, 24))  # half size
    zoom = view.zoom((8, 6, 24, 18), (32, 24))
    assert zoom.region == pytest.approx((16, 12, 48, 36))
    inner = zoom.zoom((0, 0, 16, 12), (16, 12))
    assert inner.region == pytest.approx((16, 12, 32, 24))


def test_render_matches_pil_crop_resize():
    image = _image(channels=3)
    view = View(image, (10.0, 5.0, 50.0, 45.0), (20, 20))
    (pixels,) = render_views([view])
    pil = Image.fromarray(image.pixels.permute(1, 2, 0).numpy()).resize((20, 20), Image.BICUBIC, box=view.region)
    diff = (pixels.permute(1, 2, 0).int() - torch.from_numpy(np.array(pil)).int()).abs().max()
    assert diff <= 1


def test_render_windows_full_depth_images_and_orients():
    values = torch.linspace(-1000, 1000, 40 * 30).reshape(1, 30, 40)
    image = SourceImage("ct", values, window=(0.0, 400.0))
    view = full_view(image, (40, 30))
    default, = render_views([view])
    assert default.dtype == torch.uint8 and default.shape == (1, 30, 40)
    assert default[0, 0, 0] == 0 and default[0, -1, -1] == 255  # far outside the +-200 window
    wide, = render_views([View(image, view.region, view.grid, window=(0.0, 4000.0))])
    assert 0 < wide[0, 0, 0] < 255
    turned, = render_views([View(image, view.region, view.grid, Orientation(1))])
    assert turned.shape == (1, 40, 30)
    assert torch.equal(turned, torch.rot90(default, 1, dims=(-2, -1)))


def test_render_batches_views_of_mixed_sources():
    gray = SourceImage("g", torch.rand(1, 20, 20) * 100, window=(50.0, 100.0))
    rgb = _image(channels=3)
    views = [full_view(gray, (10, 10)), full_view(rgb, (32, 24)), View(gray, (0, 0, 10, 10), (20, 20), contrast="equalize")]
    out = render_views(views)
    assert [tuple(o.shape) for o in out] == [(1, 10, 10), (3, 24, 32), (1, 20, 20)]
    assert all(o.dtype == torch.uint8 for o in out)
    assert out[2].max() == 255 and out[2].min() == 0  # equalized
