from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.task import AnswerType

PUBLIC_JSON = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"


def rad_record(qid: Any, phrase_type: str, **fields: Any) -> dict[str, Any]:
    """A record as in the OSF release's `VQA_RAD Dataset Public.json`."""
    record = {
        "qid": qid,
        "image_name": "synpic54610.jpg",
        "image_case_url": "https://medpix.nlm.nih.gov/case?id=48e1dd0e-8552-46ad-a354-5eb55be86de6",
        "image_organ": "HEAD",
        "answer": "Yes",
        "answer_type": "CLOSED",
        "question_type": "PRES",
        "question": "Are regions of the brain infarcted?",
        "phrase_type": phrase_type,
        "qid_linked_id": "03f451ca-de62-4617-9679-e836026a7642",
    }
    return record | fields


@pytest.fixture
def json_root(tmp_path: Path, write_json, write_image) -> Path:
    write_image(tmp_path / IMAGE_FOLDER / "synpic54610.jpg")
    write_image(tmp_path / IMAGE_FOLDER / "synpic29265.jpg", color=(0, 0, 250))
    write_json(
        tmp_path / PUBLIC_JSON,
        [
            rad_record(1, "freeform"),
            rad_record(2, "para", answer_type="CLOSED ", question=" Is there an infarct in the brain? "),
            rad_record(
                3,
                "test_freeform",
                image_name="synpic29265.jpg",
                image_organ="CHEST",
                question="How many lesions are there?",
                answer=3,
                answer_type="OPEN",
                question_type="COUNT",
            ),
            rad_record(4, "test_para", answer="left lung", answer_type=" open", question="Where is the lesion?"),
        ],
    )
    return tmp_path


def test_json_train_is_everything_but_the_test_phrase_types(json_root: Path) -> None:
    tasks = load_tasks("vqa-rad", "train", data_root=json_root)
    assert [t.id for t in tasks] == ["1", "2"]
    assert all(t.answer_type is AnswerType.CLOSED and t.split == "train" for t in tasks)
    assert tasks[1].question == "Is there an infarct in the brain?"


def test_json_test_split_with_its_fields(json_root: Path, image_size) -> None:
    count, where = load_tasks("vqa-rad", "test", data_root=json_root)

    assert (count.id, count.dataset, count.split) == ("3", "vqa-rad", "test")
    assert (count.answer, count.answer_type) == ("3", AnswerType.OPEN)  # a JSON number, stringified
    assert count.metadata == {
        "qid": 3,
        "organ": "CHEST",
        "content_type": "COUNT",
        "phrase_type": "test_freeform",
        "question_type": "open",
    }
    assert count.images[0].path == str(json_root / IMAGE_FOLDER / "synpic29265.jpg")
    assert image_size(count.images[0]) == (8, 8)
    assert (where.answer, where.answer_type) == ("left lung", AnswerType.OPEN)


def test_json_alternative_names_and_image_folder(json_root: Path) -> None:
    (json_root / PUBLIC_JSON).rename(json_root / "VQA_RAD_Dataset_Public.json")
    (json_root / IMAGE_FOLDER).rename(json_root / "images")
    tasks = load_tasks("vqarad", "test", data_root=json_root)
    assert tasks[0].images[0].path == str(json_root / "images" / "synpic29265.jpg")


def test_json_layout_wins_over_parquet(json_root: Path, write_parquet, hf_image) -> None:
    row = {"image": hf_image(), "question": "q?", "answer": "no"}
    write_parquet(json_root / "data" / "test-00000-of-00001.parquet", [row])
    assert [t.id for t in load_tasks("vqa-rad", "test", data_root=json_root)] == ["3", "4"]


@pytest.fixture
def parquet_root(tmp_path: Path, write_parquet, hf_image) -> Path:
    write_parquet(
        tmp_path / "data" / "train-00000-of-00001-a1b2c3.parquet",
        [
            {"image": hf_image("a.jpg"), "question": "are regions of the brain infarcted?", "answer": "yes"},
            {"image": hf_image("b.png", color=(1, 2, 3)), "question": "where is the lesion? ", "answer": "right lung"},
            {"image": hf_image("a.jpg"), "question": "are regions of the brain infarcted?", "answer": "yes"},
        ],
    )
    return tmp_path


def test_parquet_layout_types_answers_by_yes_no(parquet_root: Path, image_size) -> None:
    tasks = load_tasks("vqa-rad", "train", data_root=parquet_root)

    assert [(t.answer, t.answer_type) for t in tasks] == [
        ("yes", AnswerType.CLOSED),
        ("right lung", AnswerType.OPEN),
        ("yes", AnswerType.CLOSED),
    ]
    assert tasks[1].question == "where is the lesion?"
    assert tasks[1].images[0].data is not None and tasks[1].images[0].name == "b.png"
    assert image_size(tasks[1].images[0]) == (8, 8)
    assert tasks[0].metadata == {"question_type": "closed"}
    # the release repeats an item verbatim: ids stay unique and are stable across loads
    assert tasks[2].id == f"{tasks[0].id}#2"
    assert [t.id for t in load_tasks("vqa-rad", "train", data_root=parquet_root)] == [t.id for t in tasks]


def test_parquet_files_directly_in_root(tmp_path: Path, write_parquet, hf_image) -> None:
    row = {"image": hf_image(), "question": "is this a ct?", "answer": "no"}
    write_parquet(tmp_path / "test-00000-of-00001.parquet", [row])
    (task,) = load_tasks("vqa-rad", "test", data_root=tmp_path)
    assert (task.split, task.answer_type) == ("test", AnswerType.CLOSED)


def test_nothing_released_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data/test-\*\.parquet: no parquet file .*VQA_RAD Dataset Public\.json"):
        load_tasks("vqa-rad", "test", data_root=tmp_path)


def test_parquet_missing_column_is_named(tmp_path: Path, write_parquet, hf_image) -> None:
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [{"image": hf_image(), "question": "q?"}])
    with pytest.raises(DatasetError, match=r"test-00000-of-00001\.parquet: missing columns \['answer'\]"):
        load_tasks("vqa-rad", "test", data_root=tmp_path)


def test_parquet_row_without_image_bytes_is_named(tmp_path: Path, write_parquet) -> None:
    write_parquet(tmp_path / "data" / "test-0.parquet", [{"image": "synpic1.jpg", "question": "q?", "answer": "no"}])
    with pytest.raises(DatasetError, match=r"test-0\.parquet: row 0: expected an image cell"):
        load_tasks("vqa-rad", "test", data_root=tmp_path)


def test_json_missing_image_names_record_and_path(json_root: Path) -> None:
    (json_root / IMAGE_FOLDER / "synpic29265.jpg").unlink()
    message = r"Public\.json: record 2 \(qid 3\): image file .*synpic29265\.jpg not found"
    with pytest.raises(DatasetError, match=message):
        load_tasks("vqa-rad", "test", data_root=json_root)


def test_json_missing_image_folder_is_named(json_root: Path) -> None:
    (json_root / IMAGE_FOLDER).rename(json_root / "pictures")
    with pytest.raises(DatasetError, match="VQA_RAD Image Folder: folder not found"):
        load_tasks("vqa-rad", "train", data_root=json_root)


def test_json_bad_answer_type_and_missing_key(json_root: Path, write_json) -> None:
    write_json(json_root / PUBLIC_JSON, [rad_record(1, "freeform", answer_type="YES/NO")])
    with pytest.raises(DatasetError, match=r"record 0 \(qid 1\): answer_type 'YES/NO'"):
        load_tasks("vqa-rad", "train", data_root=json_root)
    record = rad_record(1, "freeform")
    del record["phrase_type"]
    write_json(json_root / PUBLIC_JSON, [record])
    with pytest.raises(DatasetError, match=r"Public\.json: record 0: missing keys \['phrase_type'\]"):
        load_tasks("vqa-rad", "train", data_root=json_root)


def test_malformed_json_is_named(json_root: Path) -> None:
    (json_root / PUBLIC_JSON).write_text("qid,question\n1,x\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"VQA_RAD Dataset Public\.json: not valid JSON"):
        load_tasks("vqa-rad", "test", data_root=json_root)


def test_unknown_split(json_root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'validation'; valid splits: test, train"):
        load_tasks("vqa-rad", "validation", data_root=json_root)
