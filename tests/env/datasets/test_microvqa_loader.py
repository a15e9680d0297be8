from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.task import AnswerType

SECOND_SHARD = "train-00001-of-00002.parquet"


def micro_row(key_question: int, hf_image, **fields: Any) -> dict[str, Any]:
    """A row as in jmhb/microvqa's parquet (a subset of its columns plus the ones loaded)."""
    row = {
        "key_question": key_question,
        "key_image": 7,
        "images_list": [hf_image("a.png", (200, 0, 0)), hf_image("b.png", (0, 0, 200))],
        "question": " A fluorescence image of HeLa cells shows punctate staining. Which organelle is labelled? ",
        "choices": [" Mitochondria ", "Golgi apparatus", "Endoplasmic reticulum", "Nucleus"],
        "correct_index": 2,
        "correct_answer": "Endoplasmic reticulum",
        "task": 1,
        "task_str": "expert_visual_understanding",
        "image_caption": "HeLa cells, anti-calnexin",
        "images_source": "in-house",
        "key_person": 3,
    }
    return row | fields


@pytest.fixture
def root(tmp_path: Path, write_parquet, hf_image) -> Path:
    # the first release: one split named "train" that is the benchmark's test set
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", [micro_row(101, hf_image)])
    write_parquet(tmp_path / "data" / SECOND_SHARD, [micro_row(102, hf_image, correct_index=0)])
    return tmp_path


def test_test_reads_the_single_train_split(root: Path, image_size) -> None:
    first, second = load_tasks("microvqa", "test", data_root=root)

    assert (first.id, first.dataset, first.split) == ("101", "microvqa", "test")
    assert first.answer_type is AnswerType.MULTIPLE_CHOICE
    assert first.question == "A fluorescence image of HeLa cells shows punctate staining. Which organelle is labelled?"
    assert first.choices == ("Mitochondria", "Golgi apparatus", "Endoplasmic reticulum", "Nucleus")
    assert (first.answer, first.answer_text) == ("C", "Endoplasmic reticulum")
    assert [ref.name for ref in first.images] == ["a.png", "b.png"]
    assert all(image_size(ref) == (8, 8) for ref in first.images)
    assert first.metadata == {
        "key_question": 101,
        "key_image": 7,
        "task": 1,
        "task_str": "expert_visual_understanding",
        "image_caption": "HeLa cells, anti-calnexin",
        "images_source": "in-house",
    }
    assert type(first.metadata["task"]) is int
    assert (second.id, second.answer) == ("102", "A")


def test_train_reads_the_same_file(root: Path) -> None:
    tasks = load_tasks("microvqa", "train", data_root=root)
    assert [(t.id, t.split) for t in tasks] == [("101", "train"), ("102", "train")]


def test_a_test_file_is_preferred(root: Path, write_parquet, hf_image) -> None:
    write_parquet(root / "test.parquet", [micro_row(900, hf_image, correct_index=3)])
    (task,) = load_tasks("microvqa", "test", data_root=root)
    assert (task.id, task.answer) == ("900", "D")


def test_rows_without_key_question_get_content_ids(tmp_path: Path, write_parquet, hf_image) -> None:
    rows = [micro_row(1, hf_image), micro_row(2, hf_image, question="Which stain was used?")]
    for row in rows:
        del row["key_question"]
    write_parquet(tmp_path / "test.parquet", rows)
    first = [t.id for t in load_tasks("microvqa", "test", data_root=tmp_path)]
    assert len(set(first)) == 2 and first == [t.id for t in load_tasks("microvqa", "test", data_root=tmp_path)]


def test_correct_index_out_of_range(root: Path, write_parquet, hf_image) -> None:
    write_parquet(root / "data" / SECOND_SHARD, [micro_row(102, hf_image, correct_index=4)])
    message = r"train-00001-of-00002\.parquet: row 0: correct_index 4 is not an index into its 4 choices"
    with pytest.raises(DatasetError, match=message):
        load_tasks("microvqa", "test", data_root=root)


def test_single_choice_is_rejected(root: Path, write_parquet, hf_image) -> None:
    write_parquet(root / "data" / SECOND_SHARD, [micro_row(102, hf_image, choices=["Nucleus"], correct_index=0)])
    with pytest.raises(DatasetError, match="multiple-choice needs at least 2 choices"):
        load_tasks("microvqa", "test", data_root=root)


def test_null_image_is_rejected(root: Path, write_parquet, hf_image) -> None:
    write_parquet(root / "data" / SECOND_SHARD, [micro_row(102, hf_image, images_list=[hf_image(), None])])
    with pytest.raises(DatasetError, match=r"row 0: images_list\[1\]: null image"):
        load_tasks("microvqa", "test", data_root=root)


def test_missing_column_is_named(root: Path, write_parquet, hf_image) -> None:
    row = micro_row(102, hf_image)
    del row["choices"]
    write_parquet(root / "data" / SECOND_SHARD, [row])
    with pytest.raises(DatasetError, match=r"train-00001-of-00002\.parquet: missing columns \['choices'\]"):
        load_tasks("microvqa", "test", data_root=root)


def test_no_parquet_names_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data/train-\*\.parquet: no parquet file .*single split is 'train'"):
        load_tasks("microvqa", "test", data_root=tmp_path)


def test_unknown_split(root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'validation'; valid splits: test, train"):
        load_tasks("microvqa", "validation", data_root=root)
