"""`largebatch compare RUN...`: several runs side by side, a table of their summaries
and, with --plot, their curves (loss, test top-1, LR, images/s) over epochs."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def load_run(path: Path) -> dict:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"compare: {path} is not a run directory (no metrics.jsonl)")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
    evals = [x for x in lines if x.get("eval")]
    return {"name": str(path), "summary": summary, "evals": evals,
            "train": [x for x in lines if "loss" in x and not x.get("eval")]}


def table(runs: list[dict]) -> str:
    head = ["run", "state", "epochs", "steps", "global batch", "top-1 %", "top-5 %", "images/s", "B_noise", "wall s"]
    rows = []
    for r in runs:
        s, last = r["summary"], (r["evals"][-1] if r["evals"] else {})
        done = s is not None
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        top1 = s["top1"] if done else last.get("top1")
        top5 = s["top5"] if done else last.get("top5")
        rows.append([r["name"], "finished" if done else "unfinished",
                     fmt(s["epochs"] if done else (r["train"][-1]["epoch"] if r["train"] else None), ".2f"),
                     fmt(s["steps"] if done else (r["train"][-1]["step"] if r["train"] else None), "d"),
                     fmt(s["global_batch"] if done else (r["train"][-1].get("global_batch") if r["train"] else None), ""),
                     fmt(None if top1 is None else 100 * top1, ".2f"), fmt(None if top5 is None else 100 * top5, ".2f"),
                     fmt(s["images_per_sec"] if done else None, ".1f"),
                     fmt(s.get("noise_scale") if done else (r["train"][-1].get("noise_scale") if r["train"] else None), ".0f"),
                     fmt(s["wall_seconds"] if done else None, ".0f")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [(axes[0, 0], "train", "loss", "training loss", True), (axes[0, 1], "evals", "top1", "test top-1", False),
              (axes[1, 0], "train", "lr", "learning rate", False), (axes[1, 1], "train", "images_per_sec", "images/s", False)]
    for ax, source, key, title, log in panels:
        for r in runs:
            pts = [(x["epoch"], x[key] * (100 if key == "top1" else 1)) for x in r[source] if x.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if source == "evals" else None, label=Path(r["name"]).name)
        ax.set_title(title + (" (%)" if key == "top1" else ""))
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
