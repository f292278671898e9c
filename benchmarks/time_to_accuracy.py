"""Time to accuracy on the real CIFAR-10 subset: exact vs each method, several seeds.

Each (method, seed) trains the same model with the same schedule; runs are grouped by seed so
machine drift hits every method alike. Prints a Markdown table (test accuracy mean ± std over
seeds, training wall-clock, ratios to exact), writes JSON, and plots test accuracy against
training wall-clock.

    python benchmarks/time_to_accuracy.py --epochs 15 --seeds 0 1 2 \\
        --methods crs:sample_ratio=0.5 grad_prune --json docs/bench/tta.json --plot docs/tta.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import cifar10

from lightning_approx.summary import RunResult


def summarise(results: dict[str, list[RunResult]]) -> list[dict]:
    exact = results["exact"]
    base_wall = statistics.mean(r.wall_clock_s - 0 for r in exact)
    base_step = statistics.mean(r.step_time_s for r in exact)
    base_acc = statistics.mean(r.test_acc for r in exact)
    rows = []
    for name, runs in results.items():
        accs = [100 * r.test_acc for r in runs]
        train_s = [r.curve[-1][0] if r.curve else r.wall_clock_s for r in runs]
        rows.append({
            "run": name, "seeds": len(runs),
            "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_delta": statistics.mean(accs) - 100 * base_acc,
            "train_s": statistics.mean(train_s),
            "wall_ratio": statistics.mean(r.wall_clock_s for r in runs) / base_wall,
            "step_ratio": statistics.mean(r.step_time_s for r in runs) / base_step,
            "backward_work": statistics.mean(r.backward_work for r in runs),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | seeds | test acc (%) | Δ acc vs exact | training time (s) | wall / exact | step / exact "
             "| backward work |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seeds']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | "
                     f"{r['acc_delta']:+.2f} | {r['train_s']:.1f} | {r['wall_ratio']:.3f} | {r['step_ratio']:.3f} | "
                     f"{100 * r['backward_work']:.1f}% |")
    return "\n".join(lines)


def plot(results: dict[str, list[RunResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        curves = [r.curve for r in runs if r.curve]
        n = min(len(c) for c in curves)
        xs = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
        ys = [100 * statistics.mean(c[i][1] for c in curves) for i in range(n)]
        ax.plot(xs, ys, marker="o", markersize=3, label=name, linewidth=2 if name == "exact" else 1.2)
    ax.set_xlabel("training wall-clock (s, validation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["crs:sample_ratio=0.5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    results: dict[str, list[RunResult]] = {}
    for seed in args.seeds:
        for method in [None, *args.methods]:
            run_args = cifar10.parse_args(["approx" if method else "exact", "--epochs", str(args.epochs),
                                           "--model", args.model, "--batch-size", str(args.batch_size),
                                           "--seed", str(seed), "--val-every", "1"]
                                          + (["--method", method] if method else []))
            result = cifar10.train(run_args, method)
            results.setdefault(result.name, []).append(result)
            print(f"seed {seed} {result.name}: {100 * result.test_acc:.2f}% in {result.wall_clock_s:.1f}s",
                  file=sys.stderr, flush=True)
    rows = summarise(results)
    header = (f"CIFAR-10 subset, {args.model}, batch {args.batch_size}, {args.epochs} epochs, seeds {args.seeds}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today().isoformat()}")
    print(header)
    print(table(rows))
    out = {"header": header, "command": " ".join(sys.argv), "rows": rows,
           "runs": {k: [r.to_dict() for r in v] for k, v in results.items()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(results, args.plot, header)
    return out


if __name__ == "__main__":
    main()
