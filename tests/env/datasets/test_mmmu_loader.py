from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medvistagym.env.datasets import DatasetError, load_tasks
from medvistagym.env.datasets.mmmu import SUBJECTS
from medvistagym.env.task import AnswerType

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 90, 90)


def mmmu_row(row_id: str, hf_image, images: dict[int, tuple] | None = None, **fields: Any) -> dict[str, Any]:
    """A row as in MMMU/MMMU's parquet files; `images` maps image number to colour."""
    images = {1: RED} if images is None else images
    cells = {f"image_{n}": hf_image(f"{row_id}_{n}.png", images[n]) if n in images else None for n in range(1, 8)}
    row = {
        "id": row_id,
        "question": "Which finding is shown in <image 1>?",
        "options": "['Necrosis', 'Fibrosis', 'Edema']",
        "explanation": "",
        **cells,
        "img_type": "['Microscopic Images']",
        "answer": "B",
        "topic_difficulty": "Medium",
        "question_type": "multiple-choice",
        "subfield": "Pathology",
    }
    return row | fields


@pytest.fixture
def write_mmmu(write_parquet, hf_image):
    """Writes one parquet per subject for `split`; `rows` overrides a subject's rows."""

    def write(base: Path, split: str = "validation", rows: dict[str, list[dict[str, Any]]] | None = None) -> Path:
        for subject in SUBJECTS:
            subject_rows = (rows or {}).get(subject) or [mmmu_row(f"{split}_{subject}_1", hf_image)]
            write_parquet(base / subject / f"{split}-00000-of-00001.parquet", subject_rows)
        return base

    return write


def test_every_subject_is_loaded(tmp_path: Path, write_mmmu, image_size) -> None:
    tasks = load_tasks("mmmu-med", "validation", data_root=write_mmmu(tmp_path))

    assert [t.id for t in tasks] == [f"validation_{s}_1" for s in SUBJECTS]
    task = tasks[0]
    assert (task.dataset, task.split, task.answer_type) == ("mmmu-med", "validation", AnswerType.MULTIPLE_CHOICE)
    assert task.choices == ("Necrosis", "Fibrosis", "Edema") and task.answer == "B"
    assert task.metadata == {
        "subject": "Basic_Medical_Science",
        "subfield": "Pathology",
        "img_type": "['Microscopic Images']",
        "topic_difficulty": "Medium",
        "question_type": "multiple-choice",
        "original_image_numbers": (1,),
    }
    assert task.images[0].name == "validation_Basic_Medical_Science_1_1.png" and image_size(task.images[0]) == (8, 8)


def test_images_follow_first_citation_and_tokens_are_renumbered(tmp_path: Path, write_mmmu, hf_image) -> None:
    row = mmmu_row(
        "validation_Clinical_Medicine_7",
        hf_image,
        images={1: RED, 2: GREEN, 3: BLUE, 4: GREY},
        question="Compare <image 2> with <image 1>; then look at <image 2> again.",
        options="['<image 3>', ' Infarct ', 'Both <image 1> and <image 3>']",
        answer="A",
    )
    write_mmmu(tmp_path, rows={"Clinical_Medicine": [row]})
    (task,) = [t for t in load_tasks("mmmu-med", "val", data_root=tmp_path) if t.id == row["id"]]

    # cited order 2, 1, 3, then the uncited image_4
    assert [ref.data for ref in task.images] == [row[f"image_{n}"]["bytes"] for n in (2, 1, 3, 4)]
    assert task.metadata["original_image_numbers"] == (2, 1, 3, 4)
    assert task.question == "Compare <image 1> with <image 2>; then look at <image 1> again."
    assert task.choices == ("<image 3>", "Infarct", "Both <image 2> and <image 3>")
    assert task.answer_text == "<image 3>"


def test_open_questions_keep_their_raw_answer(tmp_path: Path, write_mmmu, hf_image) -> None:
    rows = [
        mmmu_row("dev_Pharmacy_1", hf_image, options="[]", answer="['24/7', '3.429']", question_type="open"),
        mmmu_row("dev_Pharmacy_2", hf_image, options="[]", answer=" 0.5 mg ", question_type="open"),
    ]
    write_mmmu(tmp_path, split="dev", rows={"Pharmacy": rows})
    listed, plain = [t for t in load_tasks("mmmu", "dev", data_root=tmp_path) if t.id.startswith("dev_Pharmacy")]

    assert (listed.answer_type, listed.answer, listed.choices) == (AnswerType.OPEN, "24/7", ())
    assert listed.metadata["raw_answer"] == "['24/7', '3.429']"
    assert listed.metadata["accepted_answers"] == ("24/7", "3.429")
    assert (plain.answer, plain.metadata["accepted_answers"]) == ("0.5 mg", ("0.5 mg",))
    assert listed.split == "dev"


def test_subject_folders_may_sit_in_an_mmmu_snapshot_folder(tmp_path: Path, write_mmmu) -> None:
    write_mmmu(tmp_path / "MMMU", split="dev")
    tasks = load_tasks("mmmu-med", "dev", data_root=tmp_path)
    assert [t.metadata["subject"] for t in tasks] == list(SUBJECTS)


def test_withheld_test_answers_are_reported(tmp_path: Path, write_mmmu, hf_image) -> None:
    rows = {s: [mmmu_row(f"test_{s}_1", hf_image, answer="?")] for s in SUBJECTS}
    write_mmmu(tmp_path, split="test", rows=rows)
    with pytest.raises(DatasetError, match=r"row 0 \(id test_Basic_Medical_Science_1\): answer withheld \('\?'\)"):
        load_tasks("mmmu-med", "test", data_root=tmp_path)


def test_missing_subject_names_the_expected_file(tmp_path: Path, write_mmmu) -> None:
    write_mmmu(tmp_path)
    (tmp_path / "Public_Health" / "validation-00000-of-00001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"Public_Health/validation-\*\.parquet: no parquet file"):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_malformed_options_are_named(tmp_path: Path, write_mmmu, hf_image) -> None:
    write_mmmu(tmp_path, rows={"Pharmacy": [mmmu_row("validation_Pharmacy_3", hf_image, options="['Aspirin', ")]})
    message = r"Pharmacy/validation-00000-of-00001\.parquet: row 0 \(id validation_Pharmacy_3\): options .* Python list"
    with pytest.raises(DatasetError, match=message):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_options_are_parsed_not_evaluated(tmp_path: Path, write_mmmu, hf_image) -> None:
    code = "__import__('os').getcwd()"
    write_mmmu(tmp_path, rows={"Pharmacy": [mmmu_row("validation_Pharmacy_4", hf_image, options=code)]})
    with pytest.raises(DatasetError, match="is not a Python list literal"):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_citing_an_empty_image_is_rejected(tmp_path: Path, write_mmmu, hf_image) -> None:
    row = mmmu_row("validation_Clinical_Medicine_5", hf_image, question="Compare <image 1> and <image 2>.")
    write_mmmu(tmp_path, rows={"Clinical_Medicine": [row]})
    with pytest.raises(DatasetError, match=r"cites <image 2> but image_2 is empty"):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_answer_letter_beyond_the_options(tmp_path: Path, write_mmmu, hf_image) -> None:
    write_mmmu(tmp_path, rows={"Public_Health": [mmmu_row("validation_Public_Health_2", hf_image, answer="D")]})
    with pytest.raises(DatasetError, match=r"answer 'D' is not one of the letters A, B, C"):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_missing_column_is_named(tmp_path: Path, write_mmmu, hf_image) -> None:
    row = mmmu_row("validation_Pharmacy_1", hf_image)
    del row["subfield"]
    write_mmmu(tmp_path, rows={"Pharmacy": [row]})
    message = r"Pharmacy/validation-00000-of-00001\.parquet: missing columns \['subfield'\]"
    with pytest.raises(DatasetError, match=message):
        load_tasks("mmmu-med", "validation", data_root=tmp_path)


def test_unknown_split(tmp_path: Path, write_mmmu) -> None:
    with pytest.raises(DatasetError, match="unknown split 'train'; valid splits: dev, test, validation"):
        load_tasks("mmmu-med", "train", data_root=write_mmmu(tmp_path))
