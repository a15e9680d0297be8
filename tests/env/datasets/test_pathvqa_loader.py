from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.task import AnswerType


@pytest.fixture
def parquet_root(tmp_path: Path, write_parquet, hf_image) -> Path:
    for split, answer in (("train", "yes"), ("validation", "No"), ("test", "hemorrhage")):
        write_parquet(
            tmp_path / "data" / f"{split}-00000-of-00001.parquet",
            [{"image": hf_image(f"{split}.jpg"), "question": f" What is present in {split}? ", "answer": answer}],
        )
    return tmp_path


@pytest.mark.parametrize(
    ("name", "split", "answer", "answer_type"),
    [
        ("train", "train", "yes", AnswerType.CLOSED),
        ("validation", "validation", "No", AnswerType.CLOSED),  # yes/no whatever the case
        ("val", "validation", "No", AnswerType.CLOSED),
        ("test", "test", "hemorrhage", AnswerType.OPEN),
    ],
)
def test_parquet_splits(
    parquet_root: Path, image_size, name: str, split: str, answer: str, answer_type: AnswerType
) -> None:
    (task,) = load_tasks("path-vqa", name, data_root=parquet_root)
    assert (task.dataset, task.split, task.answer, task.answer_type) == ("pathvqa", split, answer, answer_type)
    assert task.question == f"What is present in {split}?"
    assert task.images[0].name == f"{split}.jpg" and image_size(task.images[0]) == (8, 8)


def write_pickle(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(value))
    return path


@pytest.fixture
def pickle_root(tmp_path: Path, write_image) -> Path:
    write_pickle(
        tmp_path / "qas" / "train" / "train_qa.pkl",
        [
            {"image": "train_0422", "question": "Does this image show hemorrhage?", "answer": "yes"},
            {"image": "train_0423", "question": "What have lost their nuclei?", "answer": "neutrophils"},
        ],
    )
    write_pickle(
        tmp_path / "qas" / "val" / "val_qa.pkl",
        [{"image": "val_0261", "question": "Is this fibrosis?", "answer": "no"}],
    )
    write_image(tmp_path / "images" / "train" / "train_0422.jpg")
    write_image(tmp_path / "images" / "train" / "train_0423.png", color=(9, 9, 9))
    write_image(tmp_path / "images" / "val" / "val_0261.jpg")
    return tmp_path


def test_pickle_layout(pickle_root: Path, image_size) -> None:
    closed, open_ = load_tasks("pathvqa", "train", data_root=pickle_root)

    assert (closed.answer, closed.answer_type, closed.split) == ("yes", AnswerType.CLOSED, "train")
    assert closed.images[0].path == str(pickle_root / "images" / "train" / "train_0422.jpg")
    assert (open_.answer, open_.answer_type) == ("neutrophils", AnswerType.OPEN)
    assert open_.images[0].path.endswith("train_0423.png")  # .png when there is no .jpg
    assert image_size(open_.images[0]) == (8, 8)
    assert open_.metadata == {"image": "train_0423", "question_type": "open"}
    assert closed.id != open_.id


def test_pickle_validation_lives_under_val(pickle_root: Path) -> None:
    (task,) = load_tasks("pathvqa", "validation", data_root=pickle_root)
    assert (task.split, task.answer) == ("validation", "no")


def test_pickle_wins_over_parquet(pickle_root: Path, write_parquet, hf_image) -> None:
    write_parquet(pickle_root / "data" / "train-0.parquet", [{"image": hf_image(), "question": "q?", "answer": "no"}])
    assert len(load_tasks("pathvqa", "train", data_root=pickle_root)) == 2


class _Payload:
    """What a tampered pickle does: name a callable for the unpickler to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_naming_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_pickle(tmp_path / "qas" / "test" / "test_qa.pkl", [_Payload(marker)])
    with pytest.raises(DatasetError, match=r"test_qa\.pkl: not a loadable pickle \(refusing to load .*mkdir"):
        load_tasks("pathvqa", "test", data_root=tmp_path)
    assert not marker.exists()


def test_pickle_of_the_wrong_shape(tmp_path: Path) -> None:
    write_pickle(tmp_path / "qas" / "test" / "test_qa.pkl", {"image": "test_0001"})
    with pytest.raises(DatasetError, match=r"test_qa\.pkl: expected a pickled list"):
        load_tasks("pathvqa", "test", data_root=tmp_path)
    write_pickle(tmp_path / "qas" / "test" / "test_qa.pkl", [{"image": "test_0001", "question": "q?"}])
    with pytest.raises(DatasetError, match=r"test_qa\.pkl: record 0: missing keys \['answer'\]"):
        load_tasks("pathvqa", "test", data_root=tmp_path)


def test_corrupt_pickle_is_named(tmp_path: Path) -> None:
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DatasetError, match=r"test_qa\.pkl: not a loadable pickle"):
        load_tasks("pathvqa", "test", data_root=tmp_path)


def test_pickle_missing_image_names_record_and_paths(pickle_root: Path) -> None:
    (pickle_root / "images" / "train" / "train_0423.png").unlink()
    message = r"record 1 \(image 'train_0423'\): image file .*train_0423\.jpg or .*train_0423\.png not found"
    with pytest.raises(DatasetError, match=message):
        load_tasks("pathvqa", "train", data_root=pickle_root)


def test_nothing_released_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data/test-\*\.parquet: no parquet file .*qas/<split>/<split>_qa\.pkl"):
        load_tasks("pathvqa", "test", data_root=tmp_path)


def test_parquet_missing_column_is_named(tmp_path: Path, write_parquet, hf_image) -> None:
    write_parquet(tmp_path / "data" / "test-0.parquet", [{"img": hf_image(), "question": "q?", "answer": "no"}])
    with pytest.raises(DatasetError, match=r"test-0\.parquet: missing columns \['image'\]"):
        load_tasks("pathvqa", "test", data_root=tmp_path)


def test_unreadable_parquet_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-0.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match=r"test-0\.parquet: not a readable parquet file"):
        load_tasks("pathvqa", "test", data_root=tmp_path)


def test_unknown_split(parquet_root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'dev'; valid splits: test, train, validation"):
        load_tasks("pathvqa", "dev", data_root=parquet_root)
