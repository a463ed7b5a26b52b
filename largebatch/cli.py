"""The `largebatch` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError
from .data.folder import UnreadableImage
from .errors import UserError
from .models import MODEL_NAMES


def _number(text: str, kind: type, expected: str, ok, bound: str):
    """`text` as a `kind`, or an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text if kind is float else value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0, "positive")


def count_or_zero(text: str) -> int:
    return _number(text, int, "a whole number", lambda v: v >= 0, "0 or more")


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda v: 0 < v < float("inf"), "a positive number")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. 1,2,4."""
    return [positive_int(part) for part in text.split(",")]


def _train_overrides(args) -> list[str]:
    flags = [("data.path", args.data), ("data.stage_to", args.stage_to), ("data.strict", args.strict or None),
             ("train.epochs", args.epochs), ("train.steps", args.steps),
             ("train.global_batch", args.global_batch), ("train.micro_batch", args.micro_batch),
             ("model.name", args.model)]
    return [f"{k}={json.dumps(v)}" for k, v in flags if v is not None] + list(args.set or [])


def cmd_train(args) -> None:
    from . import checkpoint, dist
    from .config import build_config
    from .recipes import load_recipe
    from .train import train

    cfg = build_config(load_recipe(args.recipe), _train_overrides(args))
    out = Path(args.out or f"runs/{Path(args.recipe).stem}")
    if not args.resume and checkpoint.has_checkpoints(out / "checkpoints"):
        raise ConfigError(f"--out: {out} already holds a run with checkpoints; pass --resume to continue "
                          f"it, or choose another --out")
    try:
        train(cfg, out, resume=args.resume, allow_config_change=args.allow_config_change)
        dist.shutdown(together=True)
    finally:
        # Leave the process group before the interpreter exits: torn down by exit instead,
        # gloo's threads can abort the process after a finished run ("terminate called
        # without an active exception", seen with 4 processes on 2 busy cores).
        dist.shutdown()


def _eval_setup(state: dict, data: str | None):
    """Config, device, validation set and model for evaluating a saved state."""
    from . import checkpoint, dist
    from .config import Config, from_dict
    from .data import build_dataset
    from .models import build_model
    from .train import pick_device, prepare_process

    cfg = from_dict(Config, state["config"])
    if data is not None:
        cfg.data.path = data
    info = dist.from_env()
    device = pick_device(info)
    dist.init(device, info, cfg.dist.interface, cfg.dist.connect_timeout_s)
    prepare_process(cfg.train, info)
    val = build_dataset(cfg.data, "val", cfg.train.seed)
    trained_on = state.get("class_names")
    if trained_on is not None and list(val.class_names) != list(trained_on):
        differ = next((f"{a!r} vs {b!r}" for a, b in zip(trained_on, val.class_names) if a != b),
                      f"{len(trained_on)} vs {len(val.class_names)} classes")
        raise ConfigError(f"--data: the checkpoint was trained on other classes than {cfg.data.path or cfg.data.name} "
                          f"holds ({differ}); evaluate on data with the same class folders")
    model = build_model(cfg.model, val.channels, len(trained_on) if trained_on else val.num_classes).to(device)
    if not checkpoint.finite(state):
        raise checkpoint.CheckpointError("the checkpoint holds non-finite weights (its run diverged); "
                                         "evaluate an earlier checkpoint")
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
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(f"--data: {args.checkpoint} does not fit this data's model ({str(e).splitlines()[0]})") from None
    batch = args.batch or cfg.train.eval_batch
    result = evaluate(model, val, batch, device, default_workers(cfg.data, info.local_world_size, device),
                      bf16=cfg.train.bf16, channels_last=cfg.train.channels_last)
    _emit({"checkpoint": str(args.checkpoint), "step": state.get("step"), **result,
           "skipped_files": getattr(val, "skipped_files", [])}, None, info.is_main)
    dist.shutdown(together=True)


def cmd_ensemble(args) -> None:
    from . import checkpoint, dist
    from .data import default_workers
    from .ensemble import RunningEnsemble, evaluate_snapshots

    paths = [Path(p) for p in args.snapshots]
    cfg, device, info, val, model = _eval_setup(checkpoint.load(paths[-1]), args.data)
    members = RunningEnsemble(val, args.batch or cfg.train.eval_batch, device,
                              default_workers(cfg.data, info.local_world_size, device),
                              bf16=cfg.train.bf16, channels_last=cfg.train.channels_last)
    result = evaluate_snapshots(paths, model, members)
    if args.average:
        result["average"] = _average(paths, Path(args.average), args, cfg, device, info, val, model)
    _emit(result, args.out, info.is_main)
    dist.shutdown(together=True)


def _average(paths, dest: Path, args, cfg, device, info, val, model) -> dict:
    """The snapshots' weights averaged, BatchNorm recomputed, saved as a checkpoint and evaluated."""
    import time

    from . import checkpoint, dist
    from .averaging import average_states, recompute_bn
    from .data import build_dataset, default_workers
    from .evaluate import evaluate

    last: dict = {}

    def models():  # one snapshot in memory at a time
        for p in paths:
            last.clear()
            last.update(checkpoint.load(p))
            yield last["model"]
    model.load_state_dict(average_states(models()))
    # the statistics over the same forward batches (and BN groups) as in training
    used = recompute_bn(model, build_dataset(cfg.data, "train", cfg.train.seed),
                        cfg.train.micro_batch or cfg.train.global_batch, args.bn_samples, device,
                        bf16=cfg.train.bf16, channels_last=cfg.train.channels_last)
    saved = {k: v for k, v in last.items() if k not in ("optimizer", "model")}
    saved.update(model=model.state_dict(), averaged_from=[str(p) for p in paths], bn_samples=used)
    dist.on_main(lambda: checkpoint.atomic_save(saved, dest))
    t0 = time.perf_counter()
    workers = default_workers(cfg.data, info.local_world_size, device)
    r = evaluate(model, val, args.batch or cfg.train.eval_batch, device, workers,
                 bf16=cfg.train.bf16, channels_last=cfg.train.channels_last)
    return {"path": str(dest), "members": len(paths), "bn_samples": used, "top1": r["top1"], "top5": r["top5"],
            "forward_passes": 1, "seconds": time.perf_counter() - t0}


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
    if r["skipped_files"]:
        print(f"{len(r['skipped_files'])} unreadable files were left out: " + ", ".join(r["skipped_files"][:5]))
    _emit(r, args.out, True)


def cmd_bench(args) -> None:
    from .bench import bench, plot
    r = bench(args.model, args.batch, args.steps, args.warmup, args.repeats, args.dtype, args.threads, args.procs,
              args.image_size, args.channels_last, args.mode, compile=args.compile,
              keep_freed_memory=not args.system_malloc, bn_group_size=args.bn_group_size,
              deterministic=not args.nondeterministic)
    print(f"{r['model']} {r['dtype']}, batch {r['batch_per_process']} per process ({r['mode']} scaling):")
    for run, s in zip(r["runs"], r["scaling"]):
        b = run["breakdown"]
        print(f"  {run['procs']} x {run['threads_per_proc']} threads: {run['images_per_sec']:.2f} "
              f"± {run['images_per_sec_spread']:.2f} images/s, efficiency {s['efficiency']:.3f}; step "
              f"{b['step']:.3f} s = data {b['data']:.3f} + forward {b['forward']:.3f} + backward "
              f"{b['backward']:.3f} + exposed comm {b['comm_exposed']:.3f} + optimizer {b['optimizer']:.3f}")
        if "matmul_gflops" in run:
            m = run["matmul_gflops"]
            print(f"    {run['flops_per_image'] / 1e9:.2f} GFLOP per image: {run['achieved_gflops']:.0f} GFLOP/s, "
                  f"{100 * run['share_of_matmul']:.0f} % of this process's {r['dtype']} matrix-product rate "
                  f"(bf16 {m['bf16']:.0f}, fp32 {m['fp32']:.0f} GFLOP/s)")
        if "allreduce" in run:
            a = run["allreduce"]
            print(f"    all-reduce over {a['procs']} processes: alpha {a['alpha'] * 1e6:.1f} us, "
                  f"beta {1 / max(a['beta'], 1e-30) / 1e9:.2f} GB/s")
    if args.plot:
        plot(r, Path(args.plot))
    _emit(r, args.out, True)


def _plan_inputs(args):
    from . import plan
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    if bench:
        compute = plan.Compute.from_bench(bench, args.procs_per_node)
    elif args.node_images_per_sec:
        compute = plan.Compute.from_node_throughput(args.node_images_per_sec, args.procs_per_node)
    else:
        raise ConfigError("plan: give --bench FILE (from `largebatch bench`) or --node-images-per-sec")
    if args.interconnect:
        net = plan.Network.named(args.interconnect)
    else:
        measured = [r["allreduce"] for r in (bench or {}).get("runs", []) if "allreduce" in r]
        if not measured:
            raise ConfigError("plan: give --interconnect NAME, or a --bench file with a multi-process run "
                              f"(its all-reduce microbenchmark); interconnects: {', '.join(plan.INTERCONNECTS)}")
        a = measured[-1]
        net = plan.Network(a["alpha"], a["beta"], a["alpha"], a["beta"])
    if args.gradient_bytes:
        grad = args.gradient_bytes
    elif bench:
        grad = bench["runs"][0]["parameters"] * args.bytes_per_param
    else:
        from .config import ModelConfig
        from .models import build_model
        model = build_model(ModelConfig(name=args.model, bn_group_size=0), 3, 1000)
        grad = sum(p.numel() for p in model.parameters()) * args.bytes_per_param
    return compute, net, grad


def _plan_statistics(args):
    """--noise-scale: a number, or a run directory whose summary.json measured one (its
    mean over the run's second half, else its run mean; the last smoothed value is
    the least steady of the three); --reference-batch: where --epochs reach the target
    (default: that run's global batch)."""
    from . import plan
    if args.noise_scale is None:
        return None
    reference = args.reference_batch
    try:
        value = float(args.noise_scale)
    except ValueError:
        path = Path(args.noise_scale) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"plan: --noise-scale {args.noise_scale}: neither a number nor a run directory "
                              f"with a summary.json")
        summary = json.loads(path.read_text())
        value = summary.get("noise_scale_late") or summary.get("noise_scale")
        if not value or value <= 0:
            raise ConfigError(f"plan: {path} has no gradient noise scale ({summary.get('noise_scale_note', 'none')})")
        reference = reference or summary.get("global_batch")
    if value <= 0:
        raise ConfigError(f"plan: --noise-scale must be positive, not {args.noise_scale}")
    if not reference:
        raise ConfigError("plan: --noise-scale needs --reference-batch, the global batch at which --epochs reach "
                          "the target")
    return plan.Statistics(value, reference)


def cmd_plan(args) -> None:
    from . import plan
    if (args.batch_per_proc is None) == (args.global_batch is None):
        raise ConfigError("plan: give exactly one of --batch-per-proc (weak scaling) and --global-batch")
    compute, net, grad = _plan_inputs(args)
    nodes = args.nodes
    algorithms = ["ring", "tree", "hierarchical"] if args.algorithm == "all" else [args.algorithm]
    stats = _plan_statistics(args)
    rows = {a: plan.rows_for(compute, net, grad, nodes, args.procs_per_node, args.batch_per_proc,
                             args.global_batch, args.epochs, args.dataset_size, a, args.bucket_mb, stats)
            for a in algorithms}
    print(f"gradients {grad / 1e6:.1f} MB; compute {compute.fwd_per_image + compute.bwd_per_image:.4f} s per "
          f"image per process; alpha {net.alpha * 1e6:.1f} us, {1 / net.beta / 1e9:.2f} GB/s between nodes")
    if stats:
        print(f"noise scale {stats.noise_scale:.0f}: {args.epochs:g} epochs at batch {stats.reference_batch} "
              f"become E(B) = E_min (1 + B / {stats.noise_scale:.0f}) at batch B")
    for a, rs in rows.items():
        print(f"{a}:\n  {'nodes':>6} {'procs':>6} {'batch':>7} {'step s':>8} {'exposed s':>9} {'images/s':>10} "
              f"{'eff':>6} {'time to train':>14}" + (f" {'epochs':>7} {'to target':>12}" if stats else ""))
        for r in rs:
            print(f"  {r['nodes']:>6} {r['procs']:>6} {r['global_batch']:>7} {r['step_seconds']:>8.3f} "
                  f"{r['exposed_comm_seconds']:>9.4f} {r['images_per_sec']:>10.1f} {r['efficiency']:>6.3f} "
                  f"{r['time_to_train_seconds'] / 60:>11.1f} min" +
                  (f" {r['epochs_to_target']:>7.1f} {r['time_to_target_seconds'] / 60:>8.1f} min" if stats else ""))
        if stats:
            best = plan.fastest_to_target(rs)
            print(f"  fastest to the target: {best['nodes']} nodes, global batch {best['global_batch']}, "
                  f"{best['epochs_to_target']:.1f} epochs, {best['time_to_target_seconds'] / 60:.1f} min")
            if r := plan.worth_its_nodes(rs, args.epochs):
                print(f"  worth its nodes (scaling x epochs efficiency >= 0.5) up to {r['nodes']} nodes, "
                      f"global batch {r['global_batch']}: {r['time_to_target_seconds'] / 60:.1f} min")
    result = {"assumptions": plan.__doc__, "gradient_bytes": grad, "compute": vars(compute), "network": vars(net),
              "statistics": vars(stats) if stats else None,
              "rows": rows[algorithms[-1]] if len(algorithms) == 1 else [r | {"algorithm": a}
                                                                       for a, rs in rows.items() for r in rs]}
    if args.deadline_minutes:
        if args.batch_per_proc is None:
            raise ConfigError("plan: --deadline-minutes searches node counts at a fixed --batch-per-proc")
        hit = plan.nodes_for_deadline(compute, net, grad, args.procs_per_node, args.batch_per_proc, args.epochs,
                                      args.dataset_size, args.deadline_minutes * 60, algorithms[-1], args.bucket_mb,
                                      stats=stats)
        result["deadline"] = hit
        seconds = hit and (hit["time_to_target_seconds"] if stats else hit["time_to_train_seconds"])
        print(f"deadline {args.deadline_minutes} min ({algorithms[-1]}): " +
              (f"{hit['nodes']} nodes, global batch {hit['global_batch']}, efficiency {hit['efficiency']:.3f}, "
               f"{seconds / 60:.1f} min" if hit else "not reachable at this batch per process"))
    if args.plot:
        plan.plot(rows, Path(args.plot), f"{args.epochs:g} epochs, {args.procs_per_node} procs/node")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def cmd_compare(args) -> None:
    from .compare import load_run, plot, table
    runs = [load_run(Path(p)) for p in args.runs]
    print(table(runs))
    if args.plot:
        plot(runs, Path(args.plot))
        print(f"wrote {args.plot}")


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
    length.add_argument("--epochs", type=positive_float, help="run length in epochs")
    length.add_argument("--steps", type=positive_int, help="run length in optimizer steps")
    t.add_argument("--global-batch", type=positive_int,
                   help="images per optimizer step over all processes (sets train.global_batch; the LR follows "
                        "the recipe's scaling rule)")
    t.add_argument("--micro-batch", type=positive_int,
                   help="per-process batch per forward pass; smaller than global / processes means gradient "
                        "accumulation")
    t.add_argument("--model", help=f"network (sets model.name): {', '.join(MODEL_NAMES)}")
    t.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: skip it, count it, report it)")
    t.add_argument("--stage-to", metavar="DIR", help="shards: copy them to this node-local directory first")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in OUT/checkpoints (starts fresh when there "
                        "is none); the config must match the run's, except run length, logging and layout")
    t.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changes to keys that change what is trained (recorded in run.json)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint; prints JSON with top1/top5")
    e.add_argument("--checkpoint", required=True, help="a checkpoint file, e.g. OUT/checkpoints/last.pt")
    e.add_argument("--data", help="dataset directory (default: the one the run used)")
    e.add_argument("--batch", type=positive_int, help="evaluation batch (default: the run's train.eval_batch)")
    e.set_defaults(func=cmd_eval)

    en = sub.add_parser("ensemble", help="evaluate snapshots alone and as ensembles of the last k; prints JSON")
    en.add_argument("snapshots", nargs="+", help="snapshot files, oldest first (e.g. OUT/snapshots/*.pt)")
    en.add_argument("--data", help="dataset directory (default: the one the run used)")
    en.add_argument("--batch", type=positive_int, help="evaluation batch (default: the run's train.eval_batch)")
    en.add_argument("--out", help="also write the JSON here")
    en.add_argument("--average", metavar="PATH",
                    help="also average the snapshots' weights into one model (BatchNorm statistics recomputed on "
                         "training data), save it here as a checkpoint and evaluate it")
    en.add_argument("--bn-samples", type=positive_int, default=10000,
                    help="training samples to recompute the averaged model's BatchNorm statistics on (default 10000)")
    en.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("slurm", help="write an sbatch script for N nodes x P processes per node")
    s.add_argument("--nodes", type=positive_int, required=True)
    s.add_argument("--procs-per-node", type=positive_int, default=2, help="2 = one per socket on a dual-socket node")
    s.add_argument("--threads", type=positive_int, required=True, help="threads (cores) per process")
    s.add_argument("--time", default="01:00:00", help="wall-time limit")
    s.add_argument("--out", required=True, help="run directory (shared file system)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--gpus-per-node", type=count_or_zero, default=0)
    s.add_argument("--signal-seconds", type=count_or_zero, default=300, help="SIGUSR1 this long before the limit")
    s.add_argument("--python", default="python", help="the Python that has largebatch installed")
    s.add_argument("--write", help="write the script here instead of printing it")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `largebatch train` arguments")
    s.set_defaults(func=cmd_slurm)

    pk = sub.add_parser("pack", help="pack an image tree (SRC/train, SRC/val) into tar shards")
    pk.add_argument("src")
    pk.add_argument("dst")
    pk.add_argument("--shard-size", default="1GB", help="shard size, e.g. 1GB, 256MB")
    pk.add_argument("--resize-shorter", type=count_or_zero, default=0,
                    help="re-encode every image with its shorter side at most this (0 = keep the files)")
    pk.add_argument("--workers", type=count_or_zero, default=0, help="decoding processes (0 = all cores)")
    pk.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    pk.set_defaults(func=cmd_pack)

    bd = sub.add_parser("bench-data", help="input pipeline images/s: folder, shards and torchvision's ImageFolder")
    bd.add_argument("src", help="image tree with SRC/train/CLASS/*.jpg")
    bd.add_argument("--workers", type=count_or_zero, default=1, help="loader worker processes (0 = in the main process)")
    bd.add_argument("--batch", type=positive_int, default=64)
    bd.add_argument("--images", type=count_or_zero, default=0, help="images per measurement (0 = the whole train split)")
    bd.add_argument("--repeats", type=positive_int, default=2)
    bd.add_argument("--image-size", type=positive_int, default=224)
    bd.add_argument("--shards", help="packed shards of SRC (default: pack SRC now, into a temporary folder)")
    bd.add_argument("--resize-shorter", type=count_or_zero, default=256, help="for the shards packed here")
    bd.add_argument("--out", help="write the JSON here")
    bd.set_defaults(func=cmd_bench_data)

    b = sub.add_parser("bench", help="training images/s, step breakdown and scaling on synthetic data")
    b.add_argument("--model", default="resnet50")
    b.add_argument("--batch", type=positive_int, default=16, help="images per process per step")
    b.add_argument("--steps", type=positive_int, default=5, help="measured steps per repeat")
    b.add_argument("--warmup", type=count_or_zero, default=2)
    b.add_argument("--repeats", type=positive_int, default=3)
    b.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    b.add_argument("--threads", type=count_or_zero, default=0, help="threads per process (0 = cores / processes)")
    b.add_argument("--procs", type=positive_ints, default=[1], help="process counts to sweep, e.g. 1,2")
    b.add_argument("--mode", choices=["weak", "strong"], default="weak",
                   help="weak: --batch per process; strong: global batch = batch x max(procs)")
    b.add_argument("--image-size", type=positive_int, default=224)
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the warmup steps include the compile time)")
    b.add_argument("--system-malloc", action="store_true",
                   help="leave malloc as the C library sets it (train.keep_freed_memory=false)")
    b.add_argument("--nondeterministic", action="store_true",
                   help="on a GPU, cuDNN's fastest algorithms, timed per shape (train.deterministic=false)")
    b.add_argument("--bn-group-size", type=count_or_zero,
                   help="samples per BN group (0 = the whole batch; default 32 where it divides the batch)")
    b.add_argument("--out", help="write the JSON here")
    b.add_argument("--plot", help="write a PNG here")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="predict step time, efficiency and time-to-train on N nodes")
    pl.add_argument("--bench", help="a `largebatch bench` JSON: compute per image, all-reduce alpha/beta")
    pl.add_argument("--node-images-per-sec", type=positive_float, help="training images/s of one node (instead of --bench)")
    pl.add_argument("--model", default="resnet50", help="for the gradient size when there is no --bench")
    pl.add_argument("--gradient-bytes", type=positive_float)
    pl.add_argument("--bytes-per-param", type=positive_int, default=4, help="4 = fp32 all-reduce, 2 = bf16")
    pl.add_argument("--interconnect", help="named network between nodes (default: the bench's measured one)")
    pl.add_argument("--algorithm", default="hierarchical", choices=["ring", "tree", "hierarchical", "all"])
    pl.add_argument("--nodes", type=positive_ints, default=[2 ** k for k in range(12)],
                    help="node counts, e.g. 1,2,4 (default: 1 to 2048 in powers of 2)")
    pl.add_argument("--procs-per-node", type=positive_int, default=1)
    pl.add_argument("--batch-per-proc", type=positive_float, help="weak scaling: images per process per step")
    pl.add_argument("--global-batch", type=positive_int, help="strong scaling: a fixed global batch")
    pl.add_argument("--epochs", type=positive_float, default=90)
    pl.add_argument("--dataset-size", type=positive_int, default=1281167, help="training images (ImageNet-1K)")
    pl.add_argument("--bucket-mb", type=positive_float, default=25.0)
    pl.add_argument("--deadline-minutes", type=positive_float, help="also find the fewest nodes that meet this")
    pl.add_argument("--noise-scale", help="gradient noise scale B_noise, or a run directory that measured one: "
                    "the epochs then grow with the batch, E(B) = E_min (1 + B / B_noise)")
    pl.add_argument("--reference-batch", type=positive_int, help="the global batch at which --epochs reach the target "
                    "(default: the --noise-scale run's)")
    pl.add_argument("--out", help="write the rows as JSON here")
    pl.add_argument("--plot", help="write a PNG over N here")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("compare", help="runs side by side: a table of their summaries, their curves with --plot")
    c.add_argument("runs", nargs="+", help="run directories (the --out of each run)")
    c.add_argument("--plot", help="write a PNG of loss, test top-1, LR and images/s over epochs here")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("recipes", help="list the recipes")
    r.set_defaults(func=cmd_recipes)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of errors too")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
        from . import dist
        dist.exit_after_group()
    except (UserError, FileNotFoundError, UnreadableImage) as e:
        if args.debug:
            raise
        print(f"largebatch: error: {_rank_prefix()}{e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\nlargebatch: {_rank_prefix()}interrupted; no checkpoint written now (the newest earlier one "
              f"stays: continue with --resume)", file=sys.stderr, flush=True)
        sys.exit(130)


def _rank_prefix() -> str:
    from . import dist
    info = dist.info()
    return f"rank {info.rank}: " if info.world_size > 1 else ""
