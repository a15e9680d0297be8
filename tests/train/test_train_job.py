"""The training job end to end on medvista-mini with the tiny Qwen2.5-VL, kept small: warm
start, GRPO in sync and async modes, checkpoints, and a killed run resumed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForImageTextToText

from medvistagym.config import apply_overrides
from medvistagym.train.config import TrainConfig
from medvistagym.train.loop import overlap, train

SMALL = ["steps=2", "tasks_per_step=2", "engine.group_size=2", "engine.max_new_tokens=12", "warm_start.steps=2",
         "warm_start.tasks_per_step=2", "eval_limit=2", "checkpoint_every=1", "progress=false", "env.max_turns=2"]


def _config(tmp_path, *extra):
    return apply_overrides(TrainConfig(), [*SMALL, f"output_dir={tmp_path}", *extra])


def test_the_job_evaluates_warm_starts_trains_and_checkpoints(tmp_path):
    results = train(_config(tmp_path))
    assert list(results) == ["before", "warm_start", "after"]
    assert all(r["episodes"] == 2 for r in results.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: summary[k] for k in results} == results and summary["timeline"]["overlap_s"] == 0.0  # sync
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoints" / "step-000002" / "model")
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert [t["groups"] for t in timeline] == [["s0", "s1"], ["s2", "s3"]]
    names = {p.name for p in (tmp_path / "trajectories").iterdir()}
    assert {"eval-before.parquet", "eval-after.parquet", "eval-after.html", "train-from-000000.parquet"} <= names
    assert any((tmp_path / "tb").iterdir())


def test_async_mode_overlaps_rollout_with_training_within_max_staleness(tmp_path):
    # Random weights earn equal rewards: train on the uniform groups anyway, so training takes time.
    train(_config(tmp_path, "mode=async", "steps=3", "warm_start.steps=0", "max_staleness=1", "skip_uniform_groups=false"))
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert [t["groups"] for t in timeline] == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
    assert max(t["staleness_max"] for t in timeline) <= 1
    # Episodes of later steps ran while a step trained.
    measured = json.loads((tmp_path / "summary.json").read_text())["timeline"]
    assert measured == overlap(timeline) and 0 < measured["overlap_s"] <= measured["train_s"]


def test_a_killed_run_resumes_without_repeating_or_skipping_data(tmp_path):
    args = [*SMALL, "steps=3", "warm_start.steps=0", f"output_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "medvistagym.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.is_file() and latest.read_text() == "step-000001"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    results = train(_config(tmp_path, "steps=3", "warm_start.steps=0"), resume=True)
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    assert [t["groups"] for t in timeline] == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]
    assert "before" in results and "after" in results


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="sometimes")


@pytest.mark.parametrize("preset", ["qwen2.5-vl-7b-medvista.yaml", "qwen3-vl-8b-medvista.yaml"])
def test_gpu_presets_load(preset):
    from pathlib import Path

    from medvistagym.config import load_config

    config = load_config(TrainConfig, Path(__file__).parents[2] / "configs" / preset, ["steps=10"])
    assert config.policy == "vllm" and config.datasets == ("vqa-rad", "slake", "pathvqa") and config.steps == 10
    assert len(config.eval_datasets) == 6 and config.mode == "async" and config.engine.group_size == 8
    assert config.env.coordinates == ("normalized" if "qwen3" in preset else "pixel")


def test_overlap_is_the_union_of_later_episodes_within_training():
    timeline = [
        {"train": [10.0, 20.0], "episodes": [[0.0, 9.0]]},
        {"train": [30.0, 32.0], "episodes": [[5.0, 12.0], [11.0, 15.0], [18.0, 25.0], [21.0, 29.0]]},
        {"train": [40.0, 41.0], "episodes": [[31.0, 40.5]]},
    ]
    # Step 0 trains 10-20 while later episodes cover 10-15 and 18-20 (7 s; 21-29 is after it); step 1 trains 30-32
    # while step 2's episode covers 31-32 (1 s); step 2 has no later step.
    assert overlap(timeline) == {"train_s": 13.0, "overlap_s": 8.0, "overlap_fraction": 8.0 / 13.0}
