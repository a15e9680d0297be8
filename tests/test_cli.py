import json
import subprocess
import sys

from medvistagym.cli import main


def test_eval_prints_tables_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--dataset", "medvista-mini", "--policy", "oracle", "--limit", "10", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "by answer type" in printed and "by question kind" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["score"] == 1.0 for r in rows)


def test_eval_accepts_config_overrides(capsys):
    assert main(["eval", "--dataset", "medvista-mini", "--policy", "random", "--limit", "5", "--no-render", "max_turns=2"]) == 0
    assert main(["eval", "--dataset", "medvista-mini", "--limit", "1", "max_turn=2"]) == 2
    assert "unknown key 'max_turn'" in capsys.readouterr().err


def test_eval_runs_a_model_through_the_engine(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["eval", "--dataset", "medvista-mini", "--policy", "transformers", "--model", "qwen2.5-vl-tiny",
                 "--limit", "3", "--max-new-tokens", "8", "--output", str(out), "max_turns=2", "tools=[zoom_in]"]) == 0
    assert "by answer type" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["turns"] == 2 and r["status"] == "truncated" for r in rows)  # random weights


def test_data_info_and_missing_dataset_root(tmp_path, capsys):
    assert main(["data", "info", "--dataset", "medvista-mini", "--split", "test"]) == 0
    assert "110 tasks" in capsys.readouterr().out
    assert main(["data", "info", "--dataset", "slake", "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "data root of slake not found" in capsys.readouterr().err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "medvistagym.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "eval" in done.stdout


def test_benchmarks_print_their_tables(capsys):
    assert main(["bench", "kernels", "--zooms", "2", "--repeats", "1", "--backends", "torch", "--out-size", "56", "56"]) == 0
    printed = capsys.readouterr().out
    assert "peers: PIL crop, JPEG round trip, HF processor" in printed and "crop_patchify [torch]" in printed
    assert main(["bench", "decode", "--images", "2", "--repeats", "1"]) == 0
    assert "PIL, one by one" in capsys.readouterr().out
    assert main(["bench", "policy", "--concurrency", "2", "--new-tokens", "2", "--repeats", "1"]) == 0
    assert "HF generate, serial" in capsys.readouterr().out


def test_rollout_writes_parquet_and_tensorboard(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "r.parquet"
    args = ["rollout", "--limit", "2", "--output", str(out), "--tensorboard", str(tmp_path / "tb"), "group_size=2"]
    assert main(args) == 0
    assert "4 episodes (ok=4)" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    assert len(frame) == 4 and set(frame.status) == {"ok"} and (frame.model_tokens > 0).all()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_bench_rollout_prints_the_comparison_and_scaling_tables(tmp_path, capsys):
    import json

    out = tmp_path / "r.json"
    args = ["bench", "rollout", "--tasks", "4", "--group", "2", "--in-flight", "4", "--time-scale", "0",
            "--scaling", "8", "--rounds", "1", "--scaling-time-scale", "0", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ours (async engine)" in printed and "baseline (turn-batched)" in printed and "CPU us per episode-turn" in printed
    results = json.loads(out.read_text())
    ours, base = results["sim"]
    assert ours["episodes"] == base["episodes"] == 8 and ours["tokens"] == base["tokens"] > 0
    (level,) = results["scaling"]
    assert level["in_flight"] == 8 and level["episodes"] == 8 and level["cpu_us"]["engine"] > 0 and level["cpu_us"]["consumer"] > 0
