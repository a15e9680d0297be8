"""PathVQA (He et al., 2020) in either of the two forms it circulates in.

(a) The HF parquet copy (flaviagiammarino/path-vqa): `data/{train,validation,test}-*.parquet`
    with image, question and answer.
(b) The authors' pickled original: `qas/<split>/<split>_qa.pkl`, a list of
    {'image': 'train_0422', 'question': ..., 'answer': ...}, with images at
    `images/<split>/<image>.jpg` (the validation split is named `val` there).

(b) is used when its pickle exists for the split. Closed (yes/no) and open questions are told
apart by the answer, as neither form labels them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..task import ImageRef, Task, stable_id
from .base import (
    DatasetError,
    build_task,
    clean_text,
    image_file,
    parquet_shards,
    require_keys,
    resolve_split,
    with_unique_ids,
    yes_no_parquet_tasks,
    yes_no_type,
)

DATASET = "pathvqa"
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_PICKLE_SPLITS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
_IMAGE_SUFFIXES = (".jpg", ".png")
_EXPECTED_PICKLE = "a pickled list of {'image', 'question', 'answer'} records"


def load(root: Path, split: str) -> list[Task]:
    split = resolve_split(root, split, SPLITS)
    for name in _PICKLE_SPLITS[split]:
        pickle_path = root / "qas" / name / f"{name}_qa.pkl"
        if pickle_path.is_file():
            return with_unique_ids(_from_pickle(pickle_path, root / "images" / name, split))
    expected = f"the HF parquet copy (data/{split}-*.parquet) or the original release (qas/<split>/<split>_qa.pkl)"
    return with_unique_ids(yes_no_parquet_tasks(parquet_shards(root, split, expected), DATASET, split))


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickling can run any callable a pickle names; this one resolves no global but the
    builtin containers and scalars, so a tampered file fails instead of running code."""

    _ALLOWED = frozenset({"list", "dict", "tuple", "set", "frozenset", "str", "int", "float"})

    def find_class(self, module: str, name: str) -> Any:
        # `__builtin__` is how Python 2 pickles name the builtins module.
        if module in ("builtins", "__builtin__") and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def _read_pickle(path: Path) -> list[Any]:
    try:
        with path.open("rb") as handle:
            records = _PlainDataUnpickler(handle).load()
    except Exception as err:  # corrupt or refused pickles raise many types
        raise DatasetError(path, f"not a loadable pickle ({err}); expected {_EXPECTED_PICKLE}") from err
    if not isinstance(records, list):
        raise DatasetError(path, f"expected {_EXPECTED_PICKLE}, got {type(records).__name__}")
    return records


def _from_pickle(path: Path, image_dir: Path, split: str) -> list[Task]:
    tasks = []
    for index, record in enumerate(_read_pickle(path)):
        where = f"record {index}"
        require_keys(path, record, ("image", "question", "answer"), where)
        image = clean_text(record["image"])
        question, answer = clean_text(record["question"]), clean_text(record["answer"])
        answer_type = yes_no_type(answer)
        tasks.append(
            build_task(
                path,
                where,
                id=stable_id(image, question),
                dataset=DATASET,
                split=split,
                images=(_image(path, image_dir, image, f"{where} (image {image!r})"),),
                question=question,
                answer=answer,
                answer_type=answer_type,
                metadata={"image": image, "question_type": answer_type.value},
            )
        )
    return tasks


def _image(path: Path, image_dir: Path, image: str, where: str) -> ImageRef:
    for suffix in _IMAGE_SUFFIXES:
        candidate = image_dir / f"{image}{suffix}"
        if candidate.is_file():
            return image_file(path, candidate, where)
    tried = " or ".join(str(image_dir / f"{image}{suffix}") for suffix in _IMAGE_SUFFIXES)
    raise DatasetError(path, f"{where}: image file {tried} not found")
