"""The one record every dataset loader produces: a medical VQA task."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

LETTERS = string.ascii_uppercase


class AnswerType(str, Enum):
    CLOSED = "closed"  # yes / no
    OPEN = "open"  # free text
    MULTIPLE_CHOICE = "multiple_choice"  # one letter out of `choices`


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a file on disk or bytes embedded in a data file.

    `frame` selects a slice of a volume (NIfTI) or a frame of a multi-frame DICOM.
    """

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    frame: int | None = None
    name: str | None = None  # file name hint for the format when only `data` is set

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of `path` or `data`")

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        path = Path(self.path)  # type: ignore[arg-type]
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()

    @property
    def suffix(self) -> str:
        name = self.path or self.name or ""
        lower = name.lower()
        for double in (".nii.gz",):
            if lower.endswith(double):
                return double
        return Path(lower).suffix

    def describe(self) -> str:
        return self.path or self.name or f"<{len(self.data or b'')} embedded bytes>"


@dataclass(frozen=True)
class Region:
    """An annotated region in source-pixel coordinates of `task.images[image_index]`."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    image_index: int = 0
    label: str = ""


@dataclass(frozen=True)
class Task:
    id: str
    dataset: str
    split: str
    images: tuple[ImageRef, ...]
    question: str
    answer: str  # multiple-choice: the gold letter ("A", "B", ...)
    answer_type: AnswerType
    choices: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type is AnswerType.MULTIPLE_CHOICE:
            if len(self.choices) < 2:
                raise ValueError(f"task {self.id}: multiple-choice needs at least 2 choices")
            if self.answer not in LETTERS[: len(self.choices)]:
                raise ValueError(
                    f"task {self.id}: answer {self.answer!r} is not a letter for {len(self.choices)} choices"
                )

    @property
    def answer_text(self) -> str:
        """The gold answer as text (the option's text for multiple-choice)."""
        if self.answer_type is AnswerType.MULTIPLE_CHOICE:
            return self.choices[LETTERS.index(self.answer)]
        return self.answer

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices)]


def stable_id(*parts: object) -> str:
    """A short deterministic id from the fields that identify an item."""
    digest = hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()
    return digest[:12]
