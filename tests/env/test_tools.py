import json
from dataclasses import replace

import jsonschema
import pytest
import torch

from medvistagym.env.config import EnvConfig
from medvistagym.env.images import SourceImage
from medvistagym.env.protocol import ToolCall
from medvistagym.env.tools import ToolArgumentError, run_tool, tool_schemas
from medvistagym.env.views import full_view

CONFIG = EnvConfig()


def _views(channels=1, size=(800, 600)):
    w, h = size
    pixels = torch.zeros(channels, h, w, dtype=torch.float32 if channels == 1 else torch.uint8)
    image = SourceImage("src", pixels, window=(0.0, 100.0) if channels == 1 else None, meta={"Modality": "CT"})
    return [full_view(image, (200, 150))]  # shown 4x smaller than the source


def call(name, views=None, config=CONFIG, **arguments):
    return run_tool(ToolCall(name, arguments), views or _views(), config)


def test_schemas_are_openai_tools_and_validate_good_arguments():
    schemas = tool_schemas(CONFIG)
    assert [s["function"]["name"] for s in schemas] == list(CONFIG.tools)
    json.dumps(schemas)
    by_name = {s["function"]["name"]: s["function"]["parameters"] for s in schemas}
    jsonschema.validate({"bbox_2d": [1, 2, 3, 4], "label": "x"}, by_name["zoom_in"])
    jsonschema.validate({"bboxes": [{"bbox_2d": [1, 2, 3, 4]}]}, by_name["zoom_in_multi"])
    jsonschema.validate({"angle": 90}, by_name["rotate"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"angle": 45}, by_name["rotate"])
    only_zoom = tool_schemas(replace(CONFIG, tools=("zoom_in",)))
    assert len(only_zoom) == 1


def test_zoom_maps_shown_pixels_to_source_and_magnifies():
    result = call("zoom_in", bbox_2d=[50, 30, 100, 80], label="nodule")
    (view,) = result.views
    assert view.region == pytest.approx((200, 120, 400, 320))  # 4x the shown box
    assert view.size[0] % 28 == 0 and view.size[1] % 28 == 0
    assert view.size[0] * view.size[1] <= CONFIG.zoom_max_pixels
    assert view.size[0] > 50  # bigger than the box was shown
    assert "nodule" in result.captions[0]


def test_zoom_upscale_is_capped():
    (view,) = call("zoom_in", bbox_2d=[0, 0, 5, 5]).views  # 20 source pixels
    assert view.size[0] <= 20 * CONFIG.max_upscale + 28


def test_normalized_coordinates():
    config = replace(CONFIG, coordinates="normalized")
    (view,) = call("zoom_in", config=config, bbox_2d=[0, 0, 500, 500]).views
    assert view.region == pytest.approx((0, 0, 400, 300))


def test_partly_outside_boxes_are_clipped_with_a_note():
    result = call("zoom_in", bbox_2d=[150, 100, 260, 200])
    assert result.views[0].region == pytest.approx((600, 400, 800, 600))
    assert "clipped" in result.notes[0]


@pytest.mark.parametrize("arguments,match", [
    ({"bbox_2d": [10, 10, 5, 40]}, "inverted"),
    ({"bbox_2d": [300, 10, 400, 40]}, "outside image 0 \\(200x150"),
    ({"bbox_2d": [-50, -50, -1, -1]}, "outside"),
    ({"bbox_2d": [10, 10, 12, 40]}, "too small"),
    ({"bbox_2d": [10, 10, 40]}, "4 numbers"),
    ({"bbox_2d": "10,10,40,40"}, "4 numbers"),
    ({"bbox_2d": [10, "10", 40, 40]}, "bbox_2d\\[1\\] must be a finite number"),
    ({"bbox_2d": [10, True, 40, 40]}, "finite number"),
    ({"bbox_2d": [10, float("nan"), 40, 40]}, "finite number"),
    ({}, "missing required argument"),
    ({"bbox_2d": [1, 1, 40, 40], "zoom": 2}, "unknown argument"),
    ({"bbox_2d": [1, 1, 40, 40], "image_index": 3}, "image_index 3 does not exist"),
    ({"bbox_2d": [1, 1, 40, 40], "image_index": "0"}, "image_index must be an integer"),
    ({"bbox_2d": [1, 1, 40, 40], "label": 7}, "label must be a string"),
])
def test_zoom_arguments_are_checked_with_clear_errors(arguments, match):
    with pytest.raises(ToolArgumentError, match=match):
        call("zoom_in", **arguments)


def test_zoom_in_multi():
    result = call("zoom_in_multi", bboxes=[{"bbox_2d": [0, 0, 50, 50], "label": "a"}, [100, 100, 150, 140]])
    assert len(result.views) == 2
    per_box = CONFIG.zoom_max_pixels // 2
    assert all(v.size[0] * v.size[1] <= per_box for v in result.views)  # a multi-zoom costs what one does
    with pytest.raises(ToolArgumentError, match="too many boxes \\(5\\)"):
        call("zoom_in_multi", bboxes=[[0, 0, 50, 50]] * 5)
    with pytest.raises(ToolArgumentError, match="non-empty list"):
        call("zoom_in_multi", bboxes=[])
    with pytest.raises(ToolArgumentError, match="bboxes\\[0\\]"):
        call("zoom_in_multi", bboxes=[7])


def test_rotate_flip_and_zoom_into_the_result():
    views = _views()
    turned = call("rotate", views, angle=90).views[0]
    assert turned.size == (150, 200)
    views.append(turned)
    (zoom,) = call("zoom_in", views, bbox_2d=[0, 0, 75, 100], image_index=1).views
    # top-left quarter of the turned view = top-right quarter of the source
    assert zoom.region == pytest.approx((400, 0, 800, 300))
    assert zoom.orientation == turned.orientation
    for bad in (45, 0, 360, "90"):
        with pytest.raises(ToolArgumentError, match="angle"):
            call("rotate", angle=bad)
    assert call("rotate", angle=-90).views[0].orientation.turns == 3
    flipped = call("flip", direction="vertical").views[0]
    assert flipped.orientation.mirrored
    with pytest.raises(ToolArgumentError, match="direction"):
        call("flip", direction="diagonal")


def test_adjust_window_needs_grayscale():
    view = call("adjust_window", center=40, width=80).views[0]
    assert view.window == (40.0, 80.0)
    assert "HU" in call("adjust_window", center=40, width=80).captions[0]
    with pytest.raises(ToolArgumentError, match="positive"):
        call("adjust_window", center=40, width=0)
    with pytest.raises(ToolArgumentError, match="colour image"):
        call("adjust_window", _views(channels=3), center=40, width=80)


def test_enhance_contrast():
    assert call("enhance_contrast").views[0].contrast == "stretch"
    assert call("enhance_contrast", method="equalize").views[0].contrast == "equalize"
    with pytest.raises(ToolArgumentError, match="method"):
        call("enhance_contrast", method="sharpen")


def test_unknown_or_disabled_tool():
    with pytest.raises(ToolArgumentError, match="unknown tool 'crop'"):
        call("crop")
    with pytest.raises(ToolArgumentError, match="unknown tool 'rotate'"):
        call("rotate", config=replace(CONFIG, tools=("zoom_in",)), angle=90)
