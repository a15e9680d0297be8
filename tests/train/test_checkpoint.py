import random

import torch
from transformers import AutoModelForImageTextToText

from medvistagym.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from medvistagym.train.config import TrainConfig
from medvistagym.train.trainer import GRPOTrainer


def test_checkpoints_load_in_hf_and_restore_optimizer_and_rng(tmp_path, groups):
    trainer = GRPOTrainer(TrainConfig(micro_batch_tokens=4096))
    trainer.train_step(groups, version=0)
    root = tmp_path / "ckpt"
    random.seed(7)
    torch.manual_seed(7)
    for step in (1, 2, 3):
        save_checkpoint(root, f"step-{step:06d}", trainer.model.module, trainer.model.path,
                        {"trainer": trainer.state_dict(), "cursor": step}, keep=2)
    expected = (random.random(), torch.rand(3))
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000003"]
    path = latest_checkpoint(root)
    assert path.name == "step-000003"

    loaded = AutoModelForImageTextToText.from_pretrained(path / "model")
    for name, tensor in trainer.model.module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert (path / "model" / "tokenizer.json").is_file() and (path / "model" / "chat_template.jinja").is_file()

    state = load_state(path)  # restores the RNG as it was when saved
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])
    assert state["cursor"] == 3
    fresh = GRPOTrainer(TrainConfig(micro_batch_tokens=4096), model=None)
    fresh.load_state_dict(state["trainer"])
    assert fresh.step == 1 and fresh.updates == 1
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and all(torch.isfinite(m).all() for m in moments)


def test_no_checkpoint_and_an_interrupted_save(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".step-000004.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "latest").write_text("step-000004")
    assert latest_checkpoint(tmp_path) is None
