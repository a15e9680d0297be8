"""Checkpoints: weights HF `from_pretrained` loads, plus what an exact resume needs.

    runs/train/checkpoints/step-000008/
        model/          config.json, model.safetensors, tokenizer and processor files
        trainer.pt      optimizer, LR schedule, step counters, RNG states, data cursor, ...
    runs/train/checkpoints/latest   name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and `latest` is
rewritten last, so a run killed while saving resumes from the previous checkpoint.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Files beside the weights that make the folder a loadable model (tokenizer, chat template,
# image processor, generation config).
MODEL_SIDE_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "preprocessor_config.json", "generation_config.json")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, name: str, module: torch.nn.Module, source: Path, state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint `name` under `root` (weights from `module`, side files from the model
    folder `source`), point `latest` at it, and keep only the newest `keep`."""
    root = Path(root)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    module.save_pretrained(tmp / "model", safe_serialization=True)
    for file in MODEL_SIDE_FILES:
        if (source / file).is_file() and not (tmp / "model" / file).exists():
            shutil.copyfile(source / file, tmp / "model" / file)
    torch.save({**state, "rng": rng_state()}, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(name)
    (root / "latest.tmp").replace(root / "latest")
    _prune(root, keep)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer.pt").is_file() else None


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`, RNG states restored as a side effect."""
    state = torch.load(path / "trainer.pt", weights_only=False)  # our own file: optimizer state and RNG objects
    set_rng_state(state["rng"])
    return state


def _prune(root: Path, keep: int) -> None:
    checkpoints = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
