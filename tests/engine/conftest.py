"""Tasks over real images that ship in packages (a head CT, a pathology slide)."""

import os

import pytest
import skimage.data
from pydicom.data import get_testdata_file

from medvistagym.env.task import AnswerType, ImageRef, Region, Task

CT = get_testdata_file("693_UNCR.dcm")
IHC = os.path.join(os.path.dirname(skimage.data.__file__), "ihc.png")


@pytest.fixture(scope="session")
def tasks() -> list[Task]:
    ct, ihc = ImageRef(path=CT), ImageRef(path=IHC)
    lesion = Region((200.0, 220.0, 260.0, 280.0), 0, "lesion")
    return [
        Task("ct-closed", "test", "test", (ct,), "Is there a lesion?", "yes", AnswerType.CLOSED, regions=(lesion,)),
        Task("ihc-mc", "test", "test", (ihc,), "Which stain?", "B", AnswerType.MULTIPLE_CHOICE,
             choices=("H&E", "IHC", "PAS", "Gram")),
        Task("two-images", "test", "test", (ct, ihc), "Compare <image 1> and <image 2>.", "no", AnswerType.CLOSED),
    ]
