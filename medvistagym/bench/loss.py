"""`medvistagym bench loss`: the fused GRPO loss against the naive one and Liger-Kernel's.

Workload: N packed tokens in sequences of 512, final hidden states [N, H] and an LM head [V, H]
(Qwen2.5-VL: H 2048 for 3B, 3584 for 7B; V 151,936), both trained. The loss is on-policy DAPO
at token level with every token in the loss and a nonzero advantage: the worst case for ours,
which skips tokens outside the mask and rows without gradient. Methods:
- naive torch: `grpo_loss_reference` (full fp32 logits, log_softmax, gather).
- ours: `fused_grpo_loss` (its Triton kernels on CUDA, its torch path on CPU).
- Liger-Kernel's `LigerFusedLinearGRPOLoss` (chunked, torch.compile), when installed, on CUDA.
Measured: forward + backward, median of `repeat` calls after a first call; peak memory of the
first call beyond the inputs, on CUDA from torch.cuda.max_memory_allocated, on CPU in a fresh
process per method: VmHWM (reset through /proc/self/clear_refs) minus the RSS once the inputs
exist. RSS counts pages as they are touched, so a zero-filled buffer that a method writes only
sparsely (the naive loss's one-hot gradient) counts for less than on CUDA. Peaks include the
gradients of hidden and weight, which every method allocates ("grads"); "working" is the peak
without them (a lower bound on the naive loss's working memory: its forward holds two [N, V]
fp32 tensors at once, its peak comes in the backward, next to the weight's gradient).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medvistagym.kernels.grpo_loss import fused_grpo_loss, grpo_loss_reference

from .results import save as save_results

SEQ_LEN = 512
LABELS = {"naive": "naive torch (full logits)", "fused": "ours: fused_grpo_loss", "liger": "Liger FusedLinearGRPOLoss"}


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    device: str
    chunk_size: int | None = None
    seed: int = 0

    @property
    def seq_len(self) -> int:
        return min(SEQ_LEN, self.tokens)

    @property
    def grads_mib(self) -> float:
        return (self.tokens + self.vocab) * self.hidden * getattr(torch, self.dtype).itemsize / 2**20


def make_inputs(shape: Shape) -> dict[str, torch.Tensor]:
    torch.manual_seed(shape.seed)
    kw = dict(device=shape.device, dtype=getattr(torch, shape.dtype))
    seq_ids = torch.arange(shape.tokens, device=shape.device) // shape.seq_len
    return dict(
        hidden=torch.randn(shape.tokens, shape.hidden, **kw).requires_grad_(),
        lm_head_weight=torch.randn(shape.vocab, shape.hidden, **kw).div_(shape.hidden**0.5).requires_grad_(),
        token_ids=torch.randint(0, shape.vocab, (shape.tokens,), device=shape.device),
        loss_mask=torch.ones(shape.tokens, dtype=torch.bool, device=shape.device),
        advantages=(torch.randn(int(seq_ids[-1]) + 1, device=shape.device).abs() + 0.1)[seq_ids],
        seq_ids=seq_ids,
    )


def loss_call(method: str, inputs: dict[str, torch.Tensor], shape: Shape) -> Callable[[], torch.Tensor]:
    if method == "naive":
        return lambda: grpo_loss_reference(**inputs)[0]
    if method == "fused":
        return lambda: fused_grpo_loss(**inputs, chunk_size=shape.chunk_size)[0]
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
    batch = (-1, shape.seq_len)
    x = inputs["hidden"].view(*batch, shape.hidden)
    ids, mask = inputs["token_ids"].view(batch), inputs["loss_mask"].view(batch).long()
    advantages = inputs["advantages"].view(batch)[:, 0]
    return lambda: liger(x, inputs["lm_head_weight"], ids, mask, advantages)[0]


def measure(method: str, shape: Shape, repeat: int) -> dict[str, float]:
    """{ms, peak_mib} of forward + backward, in this process."""
    inputs = make_inputs(shape)
    call = loss_call(method, inputs, shape)
    cuda = shape.device == "cuda"
    base = _reset_peak(cuda)
    _step(call, inputs, cuda)
    peak = _peak(cuda) - base
    times = [_step(call, inputs, cuda) for _ in range(repeat)]
    return {"ms": statistics.median(times), "peak_mib": peak / 2**20}


def measure_in_subprocess(method: str, shape: Shape, repeat: int) -> dict[str, float | str]:
    """`measure` in a fresh process, so that its peak RSS is this method's alone."""
    code = ("import json; from medvistagym.bench.loss import Shape, measure; "
            f"print(json.dumps(measure({method!r}, Shape(**{asdict(shape)!r}), {repeat})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        why = "killed (out of memory?)" if done.returncode < 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _step(call: Callable[[], torch.Tensor], inputs: dict[str, torch.Tensor], cuda: bool) -> float:
    for t in inputs.values():
        t.grad = None  # steady state: the optimizer has consumed the previous gradients
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    call().backward()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _reset_peak(cuda: bool) -> int:
    """Bytes in use now; the peak counter restarts from them."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _status_bytes("VmRSS")


def _peak(cuda: bool) -> int:
    return torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def methods_for(shape: Shape, skip_naive: bool) -> list[str]:
    methods = [] if skip_naive else ["naive"]
    methods.append("fused")
    if shape.device == "cuda" and shape.tokens % shape.seq_len == 0:
        if find_spec("liger_kernel") is None:
            Console().print("[yellow]liger-kernel is not installed: no Liger row (pip install liger-kernel)")
        else:
            methods.append("liger")
    return methods


def bench_loss(tokens: Sequence[int], hidden: int, vocab: int, dtype: str, repeat: int, chunk_size: int | None = None,
               skip_naive: bool = False, seed: int = 0) -> list[dict]:
    """One row per (tokens, method); ratios are against the naive loss of the same shape."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for n in tokens:
        shape = Shape(n, hidden, vocab, dtype, device, chunk_size, seed)
        for method in methods_for(shape, skip_naive):
            result = (measure if device == "cuda" else measure_in_subprocess)(method, shape, repeat)
            label = LABELS[method] + (f" [{_fused_backend(device)}]" if method == "fused" else "")
            rows.append({"method": method, "label": label, "tokens": n, "grads_mib": shape.grads_mib, **result})
        naive = next((r for r in rows if r["method"] == "naive" and r["tokens"] == n and "error" not in r), None)
        for row in rows:
            if row["tokens"] == n and naive is not None and "error" not in row:
                row["speed_vs_naive"] = naive["ms"] / row["ms"]
                row["peak_vs_naive"] = row["peak_mib"] / naive["peak_mib"]
                working = naive["peak_mib"] - naive["grads_mib"]
                row["working_vs_naive"] = (row["peak_mib"] - row["grads_mib"]) / working
    return rows


def _fused_backend(device: str) -> str:
    """The back end fused_grpo_loss's "auto" picks on this device."""
    if device != "cuda":
        return "torch"
    from medvistagym.kernels import grpo_loss_triton

    return "triton" if grpo_loss_triton.available() else "torch"


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    columns = ("method", "tokens", "ms fwd+bwd", "speed vs naive", "peak MiB", "peak / naive", "grads MiB",
               "working MiB", "working / naive")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        if "error" in row:
            table.add_row(escape(row["label"]), str(row["tokens"]), escape(row["error"]), *["-"] * (len(columns) - 3))
            continue
        table.add_row(
            escape(row["label"]), str(row["tokens"]), f"{row['ms']:.0f}", _ratio(row, "speed_vs_naive", "{:.2f}x"),
            f"{row['peak_mib']:.0f}", _ratio(row, "peak_vs_naive", "{:.3f}"), f"{row['grads_mib']:.0f}",
            f"{row['peak_mib'] - row['grads_mib']:.0f}", _ratio(row, "working_vs_naive", "{:.3f}"),
        )
    Console(width=max(Console().width, 150)).print(table)  # piped output would wrap at 80 columns


def _ratio(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="512,2048", help="packed tokens per call, comma-separated")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen2.5-VL-3B: 2048, 7B: 3584)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeat", type=int, help="timed calls after the first (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--chunk-size", type=int, help="ours: tokens per chunk of logits (default: automatic)")
    parser.add_argument("--skip-naive", action="store_true", help="no naive row (it needs several [N, V] fp32 tensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here, and their plots beside it (<stem>-memory-time.png)")


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    repeat = args.repeat if args.repeat is not None else (10 if cuda else 1)
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    rows = bench_loss(tokens, args.hidden, args.vocab, dtype, repeat, args.chunk_size, args.skip_naive, args.seed)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print_table(rows, f"GRPO loss forward + backward: H {args.hidden}, V {args.vocab}, {dtype}, {device}, "
                      f"sequences of {SEQ_LEN}, median of {repeat}; peaks beyond the inputs")
    if args.json:
        save_results(args.json, {"hidden": args.hidden, "vocab": args.vocab, "dtype": dtype, "device": device,
                                 "repeat": repeat, "rows": rows})
    return 0

