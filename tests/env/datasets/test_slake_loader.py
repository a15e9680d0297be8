from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.task import AnswerType


def slake_record(qid: int, **fields: Any) -> dict[str, Any]:
    """A record as in SLAKE 1.0's JSON files."""
    record = {
        "img_id": 0,
        "img_name": "xmlab0/source.jpg",
        "question": "  What modality is used to take this image? ",
        "answer": "MRI",
        "q_lang": "en",
        "location": "Abdomen",
        "modality": "MRI",
        "answer_type": "OPEN",
        "base_type": "vqa",
        "content_type": "Modality",
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }
    return record | fields


@pytest.fixture
def root(tmp_path: Path, write_json, write_image) -> Path:
    write_image(tmp_path / "imgs" / "xmlab0" / "source.jpg")
    write_image(tmp_path / "imgs" / "xmlab1" / "source.jpg", color=(10, 200, 10))
    write_json(
        tmp_path / "train.json",
        [
            slake_record(0),
            slake_record(1, q_lang="zh", question="这张图片是用什么方式拍摄的?", answer="核磁共振"),
            slake_record(
                2,
                img_name="xmlab1/source.jpg",
                question="Does the picture contain liver?",
                answer="Yes",
                answer_type="CLOSED",
                modality="CT",
                location="Chest",
                content_type="Organ",
            ),
        ],
    )
    write_json(tmp_path / "validate.json", [slake_record(10), slake_record(11, q_lang="zh")])
    write_json(tmp_path / "test.json", [slake_record(20)])
    return tmp_path


def test_train_keeps_english_records_with_their_fields(root: Path, image_size) -> None:
    tasks = load_tasks("slake", "train", data_root=root)

    assert [t.id for t in tasks] == ["0", "2"]  # the Chinese record (qid 1) is dropped
    open_task, closed_task = tasks
    assert open_task.dataset == "slake" and open_task.split == "train"
    assert open_task.question == "What modality is used to take this image?"
    assert (open_task.answer, open_task.answer_type) == ("MRI", AnswerType.OPEN)
    assert (closed_task.answer, closed_task.answer_type) == ("Yes", AnswerType.CLOSED)
    assert closed_task.metadata == {
        "qid": 2,
        "modality": "CT",
        "organ": "Chest",
        "content_type": "Organ",
        "question_type": "closed",
    }
    assert open_task.metadata["question_type"] == "open"
    assert closed_task.images[0].path == str(root / "imgs" / "xmlab1" / "source.jpg")
    assert image_size(closed_task.images[0]) == (8, 8)


@pytest.mark.parametrize("name", ["validation", "val", "validate", "Validation"])
def test_validation_names_read_validate_json(root: Path, name: str) -> None:
    tasks = load_tasks("slake", name, data_root=root)
    assert [(t.id, t.split) for t in tasks] == [("10", "validation")]


def test_validation_json_is_accepted_when_validate_json_is_absent(root: Path) -> None:
    (root / "validate.json").rename(root / "validation.json")
    assert [t.id for t in load_tasks("slake", "val", data_root=root)] == ["10"]


def test_unknown_split_lists_the_valid_ones(root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'dev'; valid splits: test, train, validation"):
        load_tasks("slake", "dev", data_root=root)


def test_missing_file_is_named(root: Path) -> None:
    (root / "test.json").unlink()
    with pytest.raises(DatasetError, match=r"test\.json: file not found"):
        load_tasks("slake", "test", data_root=root)


def test_malformed_json_is_named(root: Path) -> None:
    (root / "test.json").write_text('[{"qid": 1,', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"test\.json: not valid JSON"):
        load_tasks("slake", "test", data_root=root)


def test_json_that_is_not_a_list_is_rejected(root: Path, write_json) -> None:
    write_json(root / "test.json", {"questions": []})
    with pytest.raises(DatasetError, match=r"test\.json: expected a JSON list"):
        load_tasks("slake", "test", data_root=root)


def test_missing_key_is_named(root: Path, write_json) -> None:
    record = slake_record(20)
    del record["answer"]
    write_json(root / "test.json", [record])
    with pytest.raises(DatasetError, match=r"test\.json: record 0: missing keys \['answer'\]"):
        load_tasks("slake", "test", data_root=root)


def test_missing_image_names_record_and_path(root: Path, write_json) -> None:
    write_json(root / "test.json", [slake_record(20, img_name="xmlab9/source.jpg")])
    message = r"test\.json: record 0 \(qid 20\): image file .*xmlab9/source\.jpg not found"
    with pytest.raises(DatasetError, match=message):
        load_tasks("slake", "test", data_root=root)


def test_unknown_answer_type_is_rejected(root: Path, write_json) -> None:
    write_json(root / "test.json", [slake_record(20, answer_type="MAYBE")])
    with pytest.raises(DatasetError, match="answer_type 'MAYBE'"):
        load_tasks("slake", "test", data_root=root)
