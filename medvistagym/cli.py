"""The `medvistagym` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .bench import decode as bench_decode
from .bench import kernels as bench_kernels
from .bench import loss as bench_loss
from .bench import plot as bench_plot
from .bench import policy as bench_policy
from .bench import rollout as bench_rollout
from .view import cli as view_cli


def _cmd_data(args: argparse.Namespace) -> int:
    from .env.datasets import load_tasks
    from .env.datasets.mini import build, default_root

    if args.data_command == "build-mini":
        root = Path(args.root) if args.root else default_root()
        build(root, seed=args.seed)
        manifest = json.loads((root / "manifest.json").read_text())
        print(f"built medvista-mini v{manifest['version']} in {root}: "
              + ", ".join(f"{n} {split} tasks" for split, n in manifest["tasks"].items())
              + f", {len(manifest['files'])} files")
        return 0
    tasks = load_tasks(args.dataset, args.split, args.data_root)
    print(f"{args.dataset} / {args.split}: {len(tasks)} tasks, "
          f"{len({ref for t in tasks for ref in t.images})} image references")
    for field in ("answer_type",):
        print(f"  by {field}: " + ", ".join(f"{k}={v}" for k, v in sorted(Counter(getattr(t, field).value for t in tasks).items())))
    kinds = Counter(str(t.metadata.get("question_kind") or t.metadata.get("modality") or "-") for t in tasks)
    print("  by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .env.config import EnvConfig
    from .env.datasets import load_tasks
    from .env.evaluation import evaluate, print_report
    from .env.experts import build_expert

    config = load_config(EnvConfig, args.config, args.overrides)
    tasks = load_tasks(args.dataset, args.split, args.data_root)
    if args.limit:
        tasks = tasks[: args.limit]
    if args.policy in ("oracle", "random"):
        results = evaluate(tasks, build_expert(args.policy, tasks, args.seed), config, render=not args.no_render)
    else:
        results = _eval_model(args, tasks, config)
    print_report(results, f"{args.dataset} / {args.split} / {args.policy}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            for r in results:
                out.write(json.dumps(r.__dict__) + "\n")
    return 0


def _eval_model(args: argparse.Namespace, tasks: list, env_config) -> list:
    """A model through the rollout engine, greedy, one episode per task."""
    from .engine import EngineConfig, run
    from .policy import build_policy
    from .train.evaluate import episode_results, rollout_eval

    async def main() -> list:
        policy = build_policy(args.policy, model=args.model)
        try:
            engine = EngineConfig(max_new_tokens=args.max_new_tokens)
            return episode_results(tasks, await rollout_eval(policy, tasks, env_config, engine))
        finally:
            await policy.close()

    return run(main())


def _cmd_rollout(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import EngineConfig, RolloutEngine, run
    from .engine.rollout import rollout_to_parquet
    from .env.config import EnvConfig
    from .env.datasets import load_tasks
    from .policy import build_policy

    env_overrides = [o[4:] for o in args.overrides if o.startswith("env.")]
    engine_overrides = [o for o in args.overrides if not o.startswith("env.")]
    env_config = load_config(EnvConfig, None, env_overrides)
    engine_config = load_config(EngineConfig, args.config, engine_overrides)
    tasks = load_tasks(args.dataset, args.split, args.data_root)
    if args.limit:
        tasks = tasks[: args.limit]
    kwargs = {"model": args.model} if args.policy == "transformers" else {}

    async def main() -> dict:
        policy = build_policy(args.policy, **kwargs)
        try:
            engine = RolloutEngine(policy, env_config, engine_config)
            return await rollout_to_parquet(engine, tasks, args.output, tensorboard=args.tensorboard)
        finally:
            await policy.close()

    snap = run(main())
    statuses = ", ".join(f"{k[7:]}={v}" for k, v in snap.items() if k.startswith("status/"))
    print(f"{snap['episodes/finished']} episodes ({statuses}) in {snap['elapsed_s']:.1f} s, "
          f"{snap['tokens/per_s']:.0f} tokens/s -> {args.output}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.config import TrainConfig
    from .train.loop import train

    config = load_config(TrainConfig, args.config, args.overrides)
    train(config, resume=args.resume)
    return 0


BENCHES = (
    ("kernels", bench_kernels, "zooms to images / Qwen patches: ours vs the peers' PIL+JPEG+HF path"),
    ("decode", bench_decode, "decoding JPEGs into the image store: DALI batch vs PIL"),
    ("policy", bench_policy, "transformers back end tokens/s: continuous batching vs HF generate"),
    ("rollout", bench_rollout, "rollout engine vs the turn-batched loop; scaling with episodes in flight"),
    ("loss", bench_loss, "GRPO loss fwd+bwd: fused vs naive full logits (vs Liger on CUDA)"),
    ("plot", bench_plot, "PNG plots from the JSON files the benches write (--json)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvistagym", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build or inspect data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    build = data_commands.add_parser("build-mini", help="build the built-in medvista-mini set")
    build.add_argument("--root", help="output folder (default: the cache, $MEDVISTAGYM_CACHE)")
    build.add_argument("--seed", type=int, default=0)
    info = data_commands.add_parser("info", help="load a data set and count its tasks")
    info.add_argument("--dataset", required=True)
    info.add_argument("--split", default="test")
    info.add_argument("--data-root")
    data.set_defaults(func=_cmd_data)

    ev = commands.add_parser("eval", help="evaluate a policy on a benchmark with its official metric")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--data-root")
    ev.add_argument("--policy", default="oracle", choices=["oracle", "random", "transformers", "vllm"],
                    help="a scripted expert, or a model (--model) through the rollout engine, greedy")
    ev.add_argument("--model", default="qwen2.5-vl-tiny",
                    help="transformers / vllm: a model directory (e.g. a checkpoint's model/) or preset")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="per turn, for models")
    ev.add_argument("--limit", type=int, default=0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--config", help="YAML file of EnvConfig fields")
    ev.add_argument("--no-render", action="store_true", help="skip rendering images (scripted policies do not look)")
    ev.add_argument("--output", help="write per-episode results as JSON lines")
    ev.add_argument("overrides", nargs="*", help="EnvConfig overrides, key=value")
    ev.set_defaults(func=_cmd_eval)

    ro = commands.add_parser("rollout", help="run the rollout engine over a data set, trajectories to Parquet")
    ro.add_argument("--dataset", default="medvista-mini")
    ro.add_argument("--split", default="train")
    ro.add_argument("--data-root")
    ro.add_argument("--policy", default="sim", choices=["sim", "transformers"])
    ro.add_argument("--model", default="qwen2.5-vl-tiny", help="transformers: a model preset or directory")
    ro.add_argument("--limit", type=int, default=0)
    ro.add_argument("--output", default="runs/rollout.parquet")
    ro.add_argument("--tensorboard", help="write metrics to this TensorBoard log directory")
    ro.add_argument("--config", help="EngineConfig YAML")
    ro.add_argument("overrides", nargs="*", help="EngineConfig key=value; env.key=value for EnvConfig")
    ro.set_defaults(func=_cmd_rollout)

    tr = commands.add_parser("train", help="the main job: GRPO training (the CPU demo with no arguments)")
    tr.add_argument("--config", help="YAML preset (see configs/)")
    tr.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    tr.add_argument("overrides", nargs="*", help="TrainConfig key=value, dotted for sections (optim.lr=1e-6)")
    tr.set_defaults(func=_cmd_train)

    view = commands.add_parser("view", help="trajectories (Parquet) to one self-contained HTML report")
    view_cli.add_arguments(view)
    view.set_defaults(func=view_cli.run)

    bench = commands.add_parser("bench", help="benchmark tables")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, module, help_text in BENCHES:
        sub = benches.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .env.datasets import DatasetError

    try:
        return args.func(args)
    except (DatasetError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
