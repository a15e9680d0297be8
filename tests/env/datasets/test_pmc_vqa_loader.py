from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.task import AnswerType


def pmc_row(figure: str, **fields: Any) -> dict[str, Any]:
    """A row as in PMC-VQA's CSVs (the README's sample row)."""
    row = {
        "Figure_path": figure,
        "Question": "What is the uptake pattern in the breast? ",
        "Answer": "Focal uptake pattern",
        "Choice A": " A:Diffuse uptake pattern",
        "Choice B": " B:Focal uptake pattern",
        "Choice C": " C:No uptake pattern",
        "Choice D": " D:Cannot determine from the information given",
        "Answer_label": "B",
    }
    return row | fields


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def root(tmp_path: Path, write_image) -> Path:
    write_image(tmp_path / "images" / "PMC1064097_F1.jpg")
    write_image(tmp_path / "images" / "PMC8253867_Fig2_41.jpg", color=(0, 90, 0))
    write_csv(
        tmp_path / "train.csv",
        [
            # some copies carry index/split columns beside the released ones
            pmc_row("PMC1064097_F1.jpg") | {"index": 0, "split": "train"},
            pmc_row(
                "PMC8253867_Fig2_41.jpg",
                Question="Which imaging modality was used?",
                Answer="CT",
                **{"Choice A": "A: CT", "Choice B": "B: MRI", "Choice C": "T: tumour, N: nodes"},
                **{"Choice D": "D:PET, with contrast"},
                Answer_label="A",
            )
            | {"index": 1, "split": "train"},
        ],
    )
    write_csv(tmp_path / "test.csv", [pmc_row("PMC1064097_F1.jpg", Answer_label="C")])
    return tmp_path


def test_rows_become_multiple_choice_tasks(root: Path, image_size) -> None:
    uptake, modality = load_tasks("pmc-vqa", "train", data_root=root)

    assert (uptake.dataset, uptake.split, uptake.answer_type) == ("pmc-vqa", "train", AnswerType.MULTIPLE_CHOICE)
    assert uptake.question == "What is the uptake pattern in the breast?"
    assert uptake.choices == (
        "Diffuse uptake pattern",
        "Focal uptake pattern",
        "No uptake pattern",
        "Cannot determine from the information given",
    )
    assert uptake.answer == "B" and uptake.answer_text == "Focal uptake pattern"
    assert uptake.metadata == {"figure_path": "PMC1064097_F1.jpg", "answer_text": "Focal uptake pattern"}
    assert uptake.images[0].path == str(root / "images" / "PMC1064097_F1.jpg")
    assert image_size(uptake.images[0]) == (8, 8)
    # "A: CT" loses its prefix; "T: ..." under Choice C starts with another letter and is content
    assert modality.choices == ("CT", "MRI", "T: tumour, N: nodes", "PET, with contrast")
    assert (modality.answer, modality.answer_text) == ("A", "CT")
    assert uptake.id != modality.id


def test_same_item_in_two_splits_keeps_its_id(root: Path) -> None:
    (train_task, _) = load_tasks("pmc-vqa", "train", data_root=root)
    (test_task,) = load_tasks("pmc-vqa", "test", data_root=root)
    assert test_task.id == train_task.id and test_task.split == "test" and test_task.answer == "C"


def test_test_clean_with_figures_folder(root: Path) -> None:
    (root / "images").rename(root / "figures")
    write_csv(root / "test_clean.csv", [pmc_row("PMC1064097_F1.jpg", Answer_label="D")])
    (task,) = load_tasks("pmcvqa", "test_clean", data_root=root)
    assert (task.split, task.answer) == ("test_clean", "D")
    assert task.images[0].path == str(root / "figures" / "PMC1064097_F1.jpg")


def test_bad_answer_label_names_file_and_row(root: Path) -> None:
    write_csv(root / "test.csv", [pmc_row("PMC1064097_F1.jpg"), pmc_row("PMC1064097_F1.jpg", Answer_label="E")])
    message = r"test\.csv: row 1: Answer_label: answer 'E' is not one of the letters A, B, C, D"
    with pytest.raises(DatasetError, match=message):
        load_tasks("pmc-vqa", "test", data_root=root)


def test_missing_column_is_named(root: Path) -> None:
    row = pmc_row("PMC1064097_F1.jpg")
    del row["Choice D"]
    write_csv(root / "test.csv", [row])
    with pytest.raises(DatasetError, match=r"test\.csv: missing columns \['Choice D'\]"):
        load_tasks("pmc-vqa", "test", data_root=root)


def test_missing_image_names_row_and_path(root: Path) -> None:
    write_csv(root / "test.csv", [pmc_row("PMC0000000_F9.jpg")])
    with pytest.raises(DatasetError, match=r"test\.csv: row 0: image file .*PMC0000000_F9\.jpg not found"):
        load_tasks("pmc-vqa", "test", data_root=root)


def test_missing_csv_and_image_folder(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"test_clean\.csv: file not found"):
        load_tasks("pmc-vqa", "test_clean", data_root=root)
    (root / "images").rename(root / "imgs")
    with pytest.raises(DatasetError, match=r"images: folder not found \(also tried \['figures'\]\)"):
        load_tasks("pmc-vqa", "test", data_root=root)


def test_empty_question_is_rejected(root: Path) -> None:
    write_csv(root / "test.csv", [pmc_row("PMC1064097_F1.jpg", Question="  ")])
    with pytest.raises(DatasetError, match=r"test\.csv: row 0: empty question"):
        load_tasks("pmc-vqa", "test", data_root=root)


def test_unknown_split(root: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'validation'; valid splits: test, test_clean, train"):
        load_tasks("pmc-vqa", "validation", data_root=root)
