"""The `largebatch` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError
from .data.folder import UnreadableImage


def _train_overrides(args) -> list[str]:
    flags = [("data.path", args.data), ("data.stage_to", args.stage_to), ("data.strict", args.strict or None),
             ("train.epochs", args.epochs), ("train.steps", args.steps),
             ("train.global_batch", args.global_batch), ("train.micro_batch", args.micro_batch),
             ("model.name", args.model)]
    return [f"{k}={json.dumps(v)}" for k, v in flags if v is not None] + list(args.set or [])


def cmd_train(args) -> None:
    from . import checkpoint
    from .config import build_config
    from .recipes import load_recipe
    from .train import train

    cfg = build_config(load_recipe(args.recipe), _train_overrides(args))
    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    if not args.resume and checkpoint.latest(out / "checkpoints") is not None:
        raise ConfigError(f"--out: {out} already holds a run with checkpoints; pass --resume to continue "
                          f"it, or choose another --out")
    train(cfg, out, resume=args.resume)


def _eval_setup(state: dict, data: str | None):
    """Config, device, validation set and model for evaluating a saved state."""
    from . import dist
    from .config import Config, from_dict
    from .data import build_dataset
    from .models import build_model
    from .train import pick_device, set_threads

    cfg = from_dict(Config, state["config"])
    if data is not None:
        cfg.data.path = data
    device = pick_device(dist.from_env())
    info = dist.init(device)
    set_threads(cfg.train.threads, info)
    val = build_dataset(cfg.data, "val", cfg.train.seed)
    model = build_model(cfg.model, val.channels, val.num_classes).to(device)
    return cfg, device, info, val, model


def _emit(result: dict, out: str | None, is_main: bool) -> None:
    if not is_main:
        return
    text = json.dumps(result, indent=2 if out else None)
    if out:
        Path(out).write_text(text + "\n")
    print(text)


def cmd_eval(args) -> None:
    from . import checkpoint, dist
    from .data import default_workers
    from .evaluate import evaluate

    state = checkpoint.load(Path(args.checkpoint))
    cfg, device, info, val, model = _eval_setup(state, args.data)
    model.load_state_dict(state["model"])
    batch = args.batch or cfg.train.eval_batch
    result = evaluate(model, val, batch, device, default_workers(cfg.data, info.local_world_size),
                      cfg.train.bf16, cfg.train.channels_last)
    _emit({"checkpoint": str(args.checkpoint), "step": state.get("step"), **result}, None, info.is_main)
    dist.shutdown()


def cmd_ensemble(args) -> None:
    from . import checkpoint, dist
    from .data import default_workers
    from .ensemble import RunningEnsemble, evaluate_snapshots

    paths = [Path(p) for p in args.snapshots]
    cfg, device, info, val, model = _eval_setup(checkpoint.load(paths[-1]), args.data)
    members = RunningEnsemble(val, args.batch or cfg.train.eval_batch, device,
                              default_workers(cfg.data, info.local_world_size), cfg.train.bf16,
                              cfg.train.channels_last)
    result = evaluate_snapshots(paths, model, members)
    _emit(result, args.out, info.is_main)
    dist.shutdown()


def cmd_pack(args) -> None:
    from .data.shards import pack, parse_size
    report = pack(Path(args.src), Path(args.dst), parse_size(args.shard_size), args.resize_shorter,
                  args.workers, args.strict)
    for split, r in report.items():
        print(f"{split}: {r['samples']} samples in {r['shards']} shards ({r['seconds']} s); "
              f"{len(r['skipped'])} unreadable files skipped")
        for line in r["skipped"][:20]:
            print(f"  skipped {line}")
    print(f"train with: largebatch train --set data.name=shards --data {args.dst} ...")


def cmd_bench_data(args) -> None:
    from .bench_data import bench_data
    r = bench_data(Path(args.src), args.workers, args.batch, args.images, args.repeats, args.image_size,
                   Path(args.shards) if args.shards else None, args.resize_shorter)
    for name in ("torchvision", "folder", "shards"):
        print(f"{name:>12}: {r[name + '_images_per_sec']:8.1f} images/s "
              f"({r[name + '_images_per_sec_per_worker']:.1f} per worker)")
    print(f"folder / torchvision = {r['folder_vs_torchvision']:.2f}, shards / torchvision = "
          f"{r['shards_vs_torchvision']:.2f}")
    _emit(r, args.out, True)


def cmd_recipes(args) -> None:
    from .recipes import describe, recipe_names
    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")


def cmd_slurm(args) -> None:
    from .slurm import sbatch_script
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if not any(a == "--recipe" for a in train_args):
        raise ConfigError("slurm: give the train arguments after --, e.g. -- --recipe sc18-run-a --data DIR")
    script = sbatch_script(train_args, args.nodes, args.procs_per_node, args.threads, args.time, args.out,
                           args.partition, args.account, args.gpus_per_node, args.signal_seconds, args.python)
    if args.write:
        Path(args.out).mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the script runs
        Path(args.write).write_text(script)
        print(f"wrote {args.write}: submit with `sbatch {args.write}`")
    else:
        print(script, end="")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largebatch", description="Large-minibatch synchronous SGD training.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("--recipe", required=True, help="recipe name (see `largebatch recipes`) or YAML path")
    t.add_argument("--data", help="dataset directory (sets data.path)")
    t.add_argument("--out", help="run directory (default runs/RECIPE)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="run length in epochs")
    length.add_argument("--steps", type=int, help="run length in optimizer steps")
    t.add_argument("--global-batch", type=int)
    t.add_argument("--micro-batch", type=int, help="per-process batch per forward pass")
    t.add_argument("--model")
    t.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, count it, report it)")
    t.add_argument("--stage-to", metavar="DIR", help="shards: copy them to this node-local directory first")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoints/last.pt (starts fresh when there is none)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint; prints JSON with top1/top5")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", help="dataset directory (default: the one the run used)")
    e.add_argument("--batch", type=int)
    e.set_defaults(func=cmd_eval)

    en = sub.add_parser("ensemble", help="evaluate snapshots alone and as ensembles of the last k; prints JSON")
    en.add_argument("snapshots", nargs="+", help="snapshot files, oldest first (e.g. OUT/snapshots/*.pt)")
    en.add_argument("--data", help="dataset directory (default: the one the run used)")
    en.add_argument("--batch", type=int)
    en.add_argument("--out", help="also write the JSON here")
    en.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("slurm", help="write an sbatch script for N nodes x P processes per node")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--procs-per-node", type=int, default=2, help="2 = one per socket on a dual-socket node")
    s.add_argument("--threads", type=int, required=True, help="threads (cores) per process")
    s.add_argument("--time", default="01:00:00", help="wall-time limit")
    s.add_argument("--out", required=True, help="run directory (shared file system)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--signal-seconds", type=int, default=300, help="SIGUSR1 this long before the limit")
    s.add_argument("--python", default="python", help="the Python that has largebatch installed")
    s.add_argument("--write", help="write the script here instead of printing it")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `largebatch train` arguments")
    s.set_defaults(func=cmd_slurm)

    pk = sub.add_parser("pack", help="pack an image tree (SRC/train, SRC/val) into tar shards")
    pk.add_argument("src")
    pk.add_argument("dst")
    pk.add_argument("--shard-size", default="1GB", help="shard size, e.g. 1GB, 256MB")
    pk.add_argument("--resize-shorter", type=int, default=0,
                    help="re-encode every image with its shorter side at most this (0 = keep the files)")
    pk.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    pk.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    pk.set_defaults(func=cmd_pack)

    bd = sub.add_parser("bench-data", help="input pipeline images/s: folder, shards and torchvision's ImageFolder")
    bd.add_argument("src", help="image tree with SRC/train/CLASS/*.jpg")
    bd.add_argument("--workers", type=int, default=1, help="loader worker processes (0 = in the main process)")
    bd.add_argument("--batch", type=int, default=64)
    bd.add_argument("--images", type=int, default=0, help="images per measurement (0 = the whole train split)")
    bd.add_argument("--repeats", type=int, default=2)
    bd.add_argument("--image-size", type=int, default=224)
    bd.add_argument("--shards", help="packed shards of SRC (default: pack SRC now, into a temporary folder)")
    bd.add_argument("--resize-shorter", type=int, default=256, help="for the shards packed here")
    bd.add_argument("--out", help="write the JSON here")
    bd.set_defaults(func=cmd_bench_data)

    r = sub.add_parser("recipes", help="list the recipes")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, UnreadableImage) as e:
        print(f"largebatch: error: {e}", file=sys.stderr)
        sys.exit(2)
