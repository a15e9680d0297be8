"""PNG plots of the benches' JSON: written by `--json` beside the file, re-rendered by
`medvistagym bench plot`, each a readable image (not blank) for rollout, kernels and loss."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from medvistagym.bench import kernels, loss, rollout
from medvistagym.bench.plots import plot_json
from medvistagym.cli import main


def _check_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        assert np.asarray(image.convert("L"), dtype=float).var() > 0


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _rollout_json(path):
    def result(method, in_flight, per_s):
        cpu_us = {"engine": 300.0, "tokenizer": 140.0, "env": 230.0, "sim": 160.0}
        return rollout.Result(method, in_flight, episodes=2 * in_flight, turns=4 * in_flight, tokens=400 * in_flight,
                              wall_s=2 * in_flight / per_s, cpu_us=cpu_us, statuses={"ok": 2 * in_flight})

    results = {"sim": [result("ours (async engine)", 1024, 117.5), result("baseline (turn-batched)", 1024, 51.2)],
               "scaling": [result("ours (async engine)", n, rate) for n, rate in ((256, 24.6), (4096, 74.4))]}
    path.write_text(json.dumps(rollout.to_json(results)))
    return path


def test_rollout_json_plots_compare_and_scaling(tmp_path):
    pngs = plot_json(_rollout_json(tmp_path / "rollout.json"))
    assert [p.name for p in pngs] == ["rollout-compare.png", "rollout-scaling.png"]
    for png in pngs:
        _check_png(png)


def test_kernels_json_writes_its_plot(tmp_path, monkeypatch, capsys):
    # The rows bench_kernels returns, without timing them (the table's own numbers).
    rows = [{"method": method, "output": output, "zooms": 64, "ms_per_call": ms, "zooms_per_s": 64e3 / ms,
             "vs_peers": 873.4 / ms, "gb_per_s": None, "copy_share": None}
            for method, output, ms in (("peers: PIL crop, JPEG round trip, HF processor", "patches", 873.4),
                                       ("ours: crop_patchify [cpu]", "patches", 51.9),
                                       ("ours: crop_resize [cpu]", "images", 30.1))]
    monkeypatch.setattr(kernels, "bench_kernels", lambda *args: rows)
    out = tmp_path / "kernels.json"
    assert _run(kernels, ["--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == rows
    _check_png(tmp_path / "kernels-zooms.png")
    assert "kernels-zooms.png" in capsys.readouterr().out


def test_loss_bench_json_writes_its_plot(tmp_path):
    out = tmp_path / "loss.json"
    assert _run(loss, ["--tokens", "64", "--hidden", "32", "--vocab", "1000", "--json", str(out)]) == 0
    assert {row["method"] for row in json.loads(out.read_text())["rows"]} == {"naive", "fused"}
    _check_png(tmp_path / "loss-memory-time.png")


def test_bench_plot_rerenders_saved_json(tmp_path, capsys):
    first = _rollout_json(tmp_path / "a.json")
    second = _rollout_json(tmp_path / "b.json")
    assert main(["bench", "plot", str(first), str(second)]) == 0
    for name in ("a-compare", "a-scaling", "b-compare", "b-scaling"):
        _check_png(tmp_path / f"{name}.png")
    assert "a-scaling.png" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["not json", '{"something": "else"}'])
def test_bench_plot_refuses_other_files(tmp_path, capsys, text):
    other = tmp_path / "other.json"
    other.write_text(text)
    assert main(["bench", "plot", str(other)]) == 2
    assert "other.json" in capsys.readouterr().err
