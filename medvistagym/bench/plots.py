"""PNG plots of the JSON files that `medvistagym bench rollout | kernels | loss --json FILE` write.

`plot_json(path)` tells the bench from the JSON's shape and writes `<stem>-<name>.png` beside it:
- rollout: `compare` (trajectories/s, ours vs the turn-batched baseline, ratio annotated) and
  `scaling` (throughput vs episodes in flight, and CPU per episode-turn by part);
- kernels: `zooms` (zooms/s per method and back end, speed-up over the peers' path annotated);
- loss: `memory-time` (peak and working memory, log scale; forward + backward time).
Figures are built on matplotlib's `Figure` directly, not pyplot: no display, no global state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure

OURS, PEER = "tab:blue", "tab:gray"
CPU_PARTS = {"engine": ("engine (ours)", "tab:blue"), "tokenizer": ("tokenizer", "tab:orange"),
             "env": ("environment steps", "tab:green"), "sim": ("simulated server (not ours)", "tab:gray"),
             "consumer": ("consumer (the trainer's)", "tab:purple")}
ROLLOUT_TITLES = {"sim": "simulated server, long-tail turns", "transformers": "tiny Qwen2.5-VL, transformers back end"}


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _count(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# --------------------------------------------------------------------------- rollout


def rollout_figures(data: dict[str, list[dict]]) -> dict[str, Figure]:
    figures = {}
    compared = [k for k in ROLLOUT_TITLES if k in data]
    if compared:
        figures["compare"] = _rollout_compare(data, compared)
    if data.get("scaling"):
        figures["scaling"] = _rollout_scaling(data["scaling"])
    return figures


def _rollout_compare(data: dict[str, list[dict]], keys: list[str]) -> Figure:
    fig, axes = _figure(4.5 * len(keys), 4.2, len(keys))
    for ax, key in zip(axes, keys):
        ours, base = data[key]
        rates = [ours["per_s"], base["per_s"]]
        bars = ax.bar(["ours\n(async engine)", "baseline\n(turn-batched)"], rates, color=[OURS, PEER], width=0.6)
        ax.bar_label(bars, [f"{r:.1f}" for r in rates], padding=2)
        ratio = ours["per_s"] / base["per_s"] if base["per_s"] else 0.0
        ax.annotate(f"{ratio:.2f}x baseline", (0, ours["per_s"]), xytext=(0, 18), textcoords="offset points",
                    ha="center", fontweight="bold")
        ax.set_ylim(0, max(rates) * 1.3)
        ax.set_ylabel("trajectories / s (higher is better)")
        ax.set_title(f"{ROLLOUT_TITLES[key]}\n{_count(ours['in_flight'])} in flight, {ours['episodes']} episodes each",
                     fontsize=10)
    fig.suptitle("bench rollout: same turns, only the scheduling differs")
    return fig


def _rollout_scaling(rows: list[dict]) -> Figure:
    fig, (rate, cpu) = _figure(11, 4.4, 2)
    levels = [r["in_flight"] for r in rows]
    tokens = rate.twinx()  # tokens/s is ~200x trajectories/s: its own axis
    rate.plot(levels, [r["per_s"] for r in rows], "o-", color=OURS, label="trajectories / s")
    tokens.plot(levels, [r["tokens"] / r["wall_s"] for r in rows], "s--", color="tab:orange",
                label="sampled tokens / s")
    for n, r in zip(levels, rows):
        rate.annotate(f"{r['per_s']:.1f}", (n, r["per_s"]), xytext=(0, -14), textcoords="offset points", ha="center",
                      color=OURS, fontsize=8)
    rate.set_xscale("log", base=2)
    rate.set_xticks(levels, [_count(n) for n in levels])
    rate.set_xlabel("episodes in flight (log scale)")
    rate.set_ylabel("trajectories / s", color=OURS)
    tokens.set_ylabel("sampled tokens / s", color="tab:orange")
    rate.set_ylim(bottom=0)
    tokens.set_ylim(bottom=0)
    rate.legend(handles=rate.lines + tokens.lines, loc="lower right")
    rate.set_title("throughput over the whole run", fontsize=10)
    bottom = [0.0] * len(rows)
    x = [_count(n) for n in levels]
    for part, (label, color) in CPU_PARTS.items():
        values = [r["cpu_us"].get(part, 0.0) for r in rows]
        cpu.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        cpu.annotate(f"{total:.0f}", (i, total), xytext=(0, 2), textcoords="offset points", ha="center")
    cpu.set_ylim(0, max(bottom) * 1.35)
    cpu.set_xlabel("episodes in flight")
    cpu.set_ylabel("event-loop CPU µs per episode-turn")
    cpu.legend(loc="upper left", ncols=2, fontsize=8)
    cpu.set_title("CPU per episode-turn, by part (image rendering apart)", fontsize=10)
    fig.suptitle("bench rollout: one engine, simulated fleet of 16 servers (4096 slots)")
    return fig


# --------------------------------------------------------------------------- kernels


def kernels_figures(data: dict) -> dict[str, Figure]:
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    zooms = sorted({r["zooms"] for r in rows})
    height = 0.8 / len(zooms)
    fig, (ax,) = _figure(10, 1.0 + 0.32 * len(methods) * len(zooms) + 0.6)
    for j, n in enumerate(zooms):
        by_method = {r["method"]: r for r in rows if r["zooms"] == n}
        ys = [i + (j - (len(zooms) - 1) / 2) * height for i, m in enumerate(methods) if m in by_method]
        picked = [by_method[m] for m in methods if m in by_method]
        bars = ax.barh(ys, [r["zooms_per_s"] for r in picked], height=height * 0.9, color=f"C{j}",
                       label=f"{n} zooms per call")
        ax.bar_label(bars, [_vs_peers(r) for r in picked], padding=3, fontsize=8)
    ax.set_yticks(range(len(methods)), [_kernel_label(m, rows) for m in methods], fontsize=8)
    ax.invert_yaxis()  # rows in the table's order, top to bottom
    ax.margins(x=0.12)
    ax.set_xlabel("zooms / s (higher is better); labels: zooms/s, speed-up over the peers' path")
    ax.legend(loc="lower right")
    out = "x".join(str(s) for s in data.get("out_size", ()))
    ax.set_title(f"bench kernels: zooms to {out} {data.get('preset', '')} images / patches, "
                 f"{data.get('torch_threads', '?')} torch threads, median of {data.get('repeats', '?')}", fontsize=10)
    return {"zooms": fig}


def _kernel_label(method: str, rows: list[dict]) -> str:
    output = next(r["output"] for r in rows if r["method"] == method)
    return f"{method}\n→ {output}"


def _vs_peers(row: dict) -> str:
    rate = f"{row['zooms_per_s']:.0f}"
    return rate if row["vs_peers"] is None else f"{rate}  ({row['vs_peers']:.1f}x)"


# --------------------------------------------------------------------------- loss


def loss_figures(data: dict) -> dict[str, Figure]:
    rows = [r for r in data["rows"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    fig, (memory, speed) = _figure(11, 4.6, 2)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        mine = {r["tokens"]: r for r in rows if r["method"] == method}
        xs = [t + (i - (len(methods) - 1) / 2) * width for t, n in enumerate(tokens) if n in mine]
        picked = [mine[n] for n in tokens if n in mine]
        color = OURS if method == "fused" else f"C{i + 1}"
        label = picked[0]["label"]
        peak = memory.bar([x - width / 4 for x in xs], [r["peak_mib"] for r in picked], width / 2, color=color,
                          label=f"{label}, peak")
        working = memory.bar([x + width / 4 for x in xs], [r["peak_mib"] - r["grads_mib"] for r in picked], width / 2,
                             color=color, alpha=0.45, hatch="//", label=f"{label}, working (peak - grads)")
        memory.bar_label(peak, [_mib(r["peak_mib"], r.get("peak_vs_naive")) for r in picked], fontsize=8)
        memory.bar_label(working, [_mib(r["peak_mib"] - r["grads_mib"], r.get("working_vs_naive")) for r in picked],
                         fontsize=8)
        bars = speed.bar(xs, [r["ms"] / 1e3 for r in picked], width * 0.9, color=color, label=label)
        speed.bar_label(bars, [_speed(r) for r in picked], fontsize=8)
    for ax in (memory, speed):
        ax.set_xticks(range(len(tokens)), [f"{n:,}" for n in tokens])
        ax.set_xlabel("packed tokens per call")
    memory.set_yscale("log")
    memory.set_ylim(top=max(r["peak_mib"] for r in rows) * 6)  # room for the labels on a log axis
    memory.set_ylabel("MiB beyond the inputs (log scale, lower is better)")
    memory.set_title("peak memory, and working memory without the gradients\n(labels: MiB, ratio to naive)",
                     fontsize=10)
    speed.margins(y=0.15)
    speed.set_ylabel("forward + backward, s (lower is better)")
    speed.set_title("time (labels: s, speed vs naive)", fontsize=10)
    fig.legend(handles=memory.containers, loc="outside lower center", ncols=len(methods), fontsize=8)
    fig.suptitle(f"bench loss: GRPO loss, H {data['hidden']}, V {data['vocab']:,}, {data['dtype']}, {data['device']}, "
                 f"median of {data['repeat']}")
    return {"memory-time": fig}


def _mib(value: float, ratio: float | None) -> str:
    return f"{value:,.0f}" if ratio is None else f"{value:,.0f}\n{ratio:.3g}x"


def _speed(row: dict) -> str:
    seconds = f"{row['ms'] / 1e3:.3g} s"
    return f"{seconds}\n{row['speed_vs_naive']:.2f}x" if "speed_vs_naive" in row else seconds


# --------------------------------------------------------------------------- any bench's JSON


def _plotter(data: object) -> Callable[[dict], dict[str, Figure]]:
    """The figures of the bench that wrote `data`, told from its shape."""
    if isinstance(data, dict):
        rows = data.get("rows")
        if isinstance(rows, list) and rows and "zooms_per_s" in rows[0]:
            return kernels_figures
        if isinstance(rows, list) and rows and {"method", "tokens"} <= rows[0].keys():
            return loss_figures
        if data and set(data) <= {*ROLLOUT_TITLES, "scaling"}:
            return rollout_figures
    raise ValueError("not a JSON file that `medvistagym bench rollout | kernels | loss --json` wrote")


def plot_json(path: str | Path) -> list[Path]:
    """Renders the plots of a bench's JSON file to `<stem>-<name>.png` beside it; returns their paths."""
    path = Path(path)
    data = json.loads(path.read_text())
    written = []
    for name, fig in _plotter(data)(data).items():
        written.append(path.with_name(f"{path.stem}-{name}.png"))
        fig.savefig(written[-1], dpi=120)
    return written
