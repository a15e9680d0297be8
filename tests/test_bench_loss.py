"""`medvistagym bench loss` on a small shape: both methods in the table and the JSON, and the
fused loss's peak memory below the naive one's (a vocab of 50k makes the logits dominate)."""

import argparse
import json

from medvistagym.bench import loss


def test_bench_loss_table_and_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    loss.add_arguments(parser)
    out = tmp_path / "loss.json"
    argv = ["--tokens", "256", "--hidden", "32", "--vocab", "50000", "--chunk-size", "32", "--json", str(out)]
    assert loss.run(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "naive torch (full logits)" in printed and "ours: fused_grpo_loss [torch]" in printed
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"naive", "fused"} and all("error" not in row for row in rows.values())
    # The naive loss holds several 256 x 50k fp32 tensors (49 MiB each), ours 32-row chunks.
    assert rows["naive"]["peak_mib"] > 100
    assert rows["fused"]["peak_mib"] < 0.5 * rows["naive"]["peak_mib"]
    assert rows["fused"]["peak_vs_naive"] == rows["fused"]["peak_mib"] / rows["naive"]["peak_mib"]
