"""Image tools: schemas in OpenAI "tools" form, argument checks, and execution.

Tools are pure image operations on the images in an episode's context (image 0 is
the first input image; each new image takes the next index). They return new
`View`s, not pixels: rendering is batched across calls and episodes by
`views.render_views`. Bad arguments raise `ToolArgumentError` whose message is
written for the model and comes back to it as the observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from ..kernels.sizing import smart_resize
from .config import EnvConfig
from .protocol import ToolCall
from .views import Box, View

class ToolArgumentError(ValueError):
    """Arguments a tool cannot run with; the message is shown to the model."""


@dataclass(frozen=True)
class ToolResult:
    name: str
    parent: int  # index of the image the tool worked on
    views: tuple[View, ...]  # the new images, in order
    captions: tuple[str, ...]  # how each new image was made
    notes: tuple[str, ...] = ()  # e.g. a box clipped to the image


# --------------------------------------------------------------------------- schemas

_IMAGE_INDEX = {
    "type": "integer",
    "minimum": 0,
    "description": "Which image to work on: 0 is the first input image, tool outputs take the next indexes. Default 0.",
}


def _bbox_schema(coordinates: str) -> dict:
    where = (
        "in pixels of that image as you see it"
        if coordinates == "pixel"
        else "normalized to 0-1000 on both axes of that image"
    )
    return {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 4,
        "maxItems": 4,
        "description": f"[x1, y1, x2, y2]: left, top, right, bottom {where}.",
    }


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def tool_schemas(config: EnvConfig) -> list[dict]:
    """The enabled tools in OpenAI tools form, for prompts and chat templates."""
    bbox = _bbox_schema(config.coordinates)
    label = {"type": "string", "description": "Optional name of what is in the box."}
    schemas = {
        "zoom_in": _function(
            "zoom_in",
            "Zoom into a region of an image to see it at higher resolution.",
            {"bbox_2d": bbox, "label": label, "image_index": _IMAGE_INDEX},
            ["bbox_2d"],
        ),
        "zoom_in_multi": _function(
            "zoom_in_multi",
            f"Zoom into up to {config.max_boxes} regions of one image at once; each becomes a new image.",
            {
                "bboxes": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": config.max_boxes,
                    "items": {
                        "type": "object",
                        "properties": {"bbox_2d": bbox, "label": label},
                        "required": ["bbox_2d"],
                    },
                },
                "image_index": _IMAGE_INDEX,
            },
            ["bboxes"],
        ),
        "rotate": _function(
            "rotate",
            "Rotate an image counterclockwise by 90, 180 or 270 degrees.",
            {"angle": {"type": "integer", "enum": [90, 180, 270]}, "image_index": _IMAGE_INDEX},
            ["angle"],
        ),
        "flip": _function(
            "flip",
            "Mirror an image horizontally (left-right) or vertically (top-bottom).",
            {"direction": {"type": "string", "enum": ["horizontal", "vertical"]}, "image_index": _IMAGE_INDEX},
            ["direction"],
        ),
        "adjust_window": _function(
            "adjust_window",
            "Re-window a grayscale image (CT, MR, X-ray): show intensities from center - width/2 "
            "(black) to center + width/2 (white), in the image's units (Hounsfield units for CT).",
            {
                "center": {"type": "number", "description": "Window center (level)."},
                "width": {"type": "number", "exclusiveMinimum": 0, "description": "Window width."},
                "image_index": _IMAGE_INDEX,
            },
            ["center", "width"],
        ),
        "enhance_contrast": _function(
            "enhance_contrast",
            "Enhance the contrast of an image: 'stretch' maps its 0.5-99.5 percentile range to full "
            "brightness; 'equalize' equalizes its histogram.",
            {"method": {"type": "string", "enum": ["stretch", "equalize"]}, "image_index": _IMAGE_INDEX},
            [],
        ),
    }
    return [schemas[name] for name in config.tools]


# --------------------------------------------------------------------------- argument checks


def _check_keys(args: dict, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ToolArgumentError(f"unknown argument(s) {unknown}; this tool takes {sorted(allowed)}")
    missing = sorted(required - set(args))
    if missing:
        raise ToolArgumentError(f"missing required argument(s) {missing}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ToolArgumentError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _image_index(args: dict, views: Sequence[View]) -> int:
    index = args.get("image_index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ToolArgumentError(f"image_index must be an integer, got {index!r}")
    if not 0 <= index < len(views):
        raise ToolArgumentError(f"image_index {index} does not exist: images 0 to {len(views) - 1} are available")
    return index


def _shown_box(raw: Any, view: View, index: int, config: EnvConfig) -> tuple[Box, str | None]:
    """A model box in shown pixels, clipped to the image; errors say what is wrong."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise ToolArgumentError(f"bbox_2d must be a list of 4 numbers [x1, y1, x2, y2], got {raw!r}")
    x1, y1, x2, y2 = (_number(v, f"bbox_2d[{i}]") for i, v in enumerate(raw))
    w, h = view.size
    if config.coordinates == "normalized":
        x1, x2, y1, y2 = x1 * w / 1000, x2 * w / 1000, y1 * h / 1000, y2 * h / 1000
    if x2 <= x1 or y2 <= y1:
        raise ToolArgumentError(f"box {list(raw)} is inverted or empty: need x1 < x2 and y1 < y2")
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        limits = f"0..{w} (x) and 0..{h} (y)" if config.coordinates == "pixel" else "0..1000 on both axes"
        raise ToolArgumentError(f"box {list(raw)} lies outside image {index} ({w}x{h} pixels): use coordinates within {limits}")
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h)))
    side = min(clipped[2] - clipped[0], clipped[3] - clipped[1])
    if side < config.min_box_size:
        raise ToolArgumentError(
            f"box {list(raw)} is too small ({side:.1f} pixels on its short side in image {index}); "
            f"the smallest zoom is {config.min_box_size:g} pixels on each side"
        )
    note = f"box {list(raw)} was clipped to image {index}" if clipped != (x1, y1, x2, y2) else None
    return clipped, note


def zoom_grid(view: View, box: Box, max_pixels: int, config: EnvConfig) -> tuple[int, int]:
    """Output (w, h) of a zoom: the region magnified to fill `max_pixels`, at most
    `max_upscale` times its source resolution, rounded to the patch factor."""
    x1, y1, x2, y2 = view.to_source(box)  # the grid runs along source axes, whatever the orientation
    src_w, src_h = x2 - x1, y2 - y1
    scale = min(math.sqrt(max_pixels / (src_w * src_h)), config.max_upscale)
    h, w = smart_resize(src_h * scale, src_w * scale, config.patch_factor, config.image_min_pixels, max_pixels)
    return (w, h)


# --------------------------------------------------------------------------- tools


def _zoom(views: Sequence[View], index: int, items: list[tuple[Any, str]], config: EnvConfig, name: str) -> ToolResult:
    view = views[index]
    budget = max(config.zoom_max_pixels // len(items), config.image_min_pixels)  # a multi-zoom costs what one does
    new, captions, notes = [], [], []
    for raw, label in items:
        box, note = _shown_box(raw, view, index, config)
        grid = zoom_grid(view, box, budget, config)
        new.append(view.zoom(box, grid))
        shown = [round(v, 1) for v in box]
        captions.append(f"zoom of image {index} at {shown}" + (f" ({label})" if label else ""))
        if note:
            notes.append(note)
    return ToolResult(name, index, tuple(new), tuple(captions), tuple(notes))


def _label(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ToolArgumentError(f"label must be a string, got {value!r}")
    return value.strip()[:80]


def zoom_in(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"bbox_2d", "label", "image_index"}, {"bbox_2d"})
    index = _image_index(args, views)
    return _zoom(views, index, [(args["bbox_2d"], _label(args.get("label")))], config, "zoom_in")


def zoom_in_multi(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"bboxes", "image_index"}, {"bboxes"})
    index = _image_index(args, views)
    boxes = args["bboxes"]
    if not isinstance(boxes, list) or not boxes:
        raise ToolArgumentError('bboxes must be a non-empty list of {"bbox_2d": [x1, y1, x2, y2], "label": ...}')
    if len(boxes) > config.max_boxes:
        raise ToolArgumentError(f"too many boxes ({len(boxes)}): at most {config.max_boxes} per call")
    items = []
    for i, item in enumerate(boxes):
        if isinstance(item, dict):
            _check_keys(item, {"bbox_2d", "label"}, {"bbox_2d"})
            items.append((item["bbox_2d"], _label(item.get("label"))))
        elif isinstance(item, list):  # a bare [x1, y1, x2, y2] is unambiguous: accept it
            items.append((item, ""))
        else:
            raise ToolArgumentError(f"bboxes[{i}] must be an object with bbox_2d, got {item!r}")
    return _zoom(views, index, items, config, "zoom_in_multi")


def rotate(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"angle", "image_index"}, {"angle"})
    index = _image_index(args, views)
    angle = _number(args["angle"], "angle")
    if angle % 90 or angle % 360 == 0:
        raise ToolArgumentError(f"angle must be one of 90, 180, 270 (degrees counterclockwise), got {args['angle']!r}")
    turns = int(angle // 90) % 4
    view = views[index]
    new = replace(view, orientation=view.orientation.rotated(turns))
    return ToolResult("rotate", index, (new,), (f"image {index} rotated {turns * 90} degrees counterclockwise",))


def flip(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"direction", "image_index"}, {"direction"})
    index = _image_index(args, views)
    direction = args["direction"]
    if direction not in ("horizontal", "vertical"):
        raise ToolArgumentError(f"direction must be 'horizontal' or 'vertical', got {direction!r}")
    view = views[index]
    new = replace(view, orientation=view.orientation.flipped(direction))
    return ToolResult("flip", index, (new,), (f"image {index} flipped {direction}ly",))


def adjust_window(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"center", "width", "image_index"}, {"center", "width"})
    index = _image_index(args, views)
    center, width = _number(args["center"], "center"), _number(args["width"], "width")
    if width <= 0:
        raise ToolArgumentError(f"width must be positive, got {args['width']!r}")
    view = views[index]
    if view.image.channels != 1:
        raise ToolArgumentError(f"image {index} is a colour image; windowing applies to grayscale images (CT, MR, X-ray)")
    new = replace(view, window=(center, width), contrast=None)
    unit = " HU" if view.image.meta.get("Modality") == "CT" else ""
    return ToolResult("adjust_window", index, (new,), (f"image {index} windowed at center {center:g}{unit}, width {width:g}{unit}",))


def enhance_contrast(args: dict, views: Sequence[View], config: EnvConfig) -> ToolResult:
    _check_keys(args, {"method", "image_index"}, set())
    index = _image_index(args, views)
    method = args.get("method", "stretch")
    if method not in ("stretch", "equalize"):
        raise ToolArgumentError(f"method must be 'stretch' or 'equalize', got {method!r}")
    new = replace(views[index], contrast=method)
    return ToolResult("enhance_contrast", index, (new,), (f"image {index} with contrast enhanced ({method})",))


TOOLS: dict[str, Callable[[dict, Sequence[View], EnvConfig], ToolResult]] = {
    "zoom_in": zoom_in,
    "zoom_in_multi": zoom_in_multi,
    "rotate": rotate,
    "flip": flip,
    "adjust_window": adjust_window,
    "enhance_contrast": enhance_contrast,
}


def run_tool(call: ToolCall, views: Sequence[View], config: EnvConfig) -> ToolResult:
    """Execute one call; raises ToolArgumentError with a message for the model."""
    if call.name not in config.tools:
        raise ToolArgumentError(f"unknown tool {call.name!r}; available tools: {', '.join(config.tools)}")
    return TOOLS[call.name](call.arguments, views, config)
