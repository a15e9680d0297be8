"""Builders for small data files in the formats the benchmarks' authors release."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medvistagym.env.task import ImageRef

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def encode_image(color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    """A real 8x8 image; different colours give different bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def write_image() -> Callable[..., bytes]:
    """Writes an image file (format from the suffix) and returns its bytes."""

    def write(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
        data = encode_image(color, _FORMATS[path.suffix.lower()])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    return write


@pytest.fixture
def hf_image() -> Callable[..., dict[str, Any]]:
    """An image cell as HF `datasets` stores it in parquet."""

    def make(name: str = "image.png", color: tuple[int, int, int] = (200, 30, 30)) -> dict[str, Any]:
        return {"bytes": encode_image(color, _FORMATS[Path(name).suffix.lower()]), "path": name}

    return make


@pytest.fixture
def write_parquet() -> Callable[[Path, list[dict[str, Any]]], Path]:
    def write(path: Path, rows: list[dict[str, Any]]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    return write


@pytest.fixture
def write_json() -> Callable[[Path, Any], Path]:
    def write(path: Path, value: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    return write


@pytest.fixture
def image_size() -> Callable[[ImageRef], tuple[int, int]]:
    """Decodes an ImageRef, proving its bytes are a readable image."""

    def size(ref: ImageRef) -> tuple[int, int]:
        with Image.open(io.BytesIO(ref.read_bytes())) as image:
            image.load()
            return image.size

    return size
