"""Time to accuracy on the real CIFAR-10 subset: exact vs each method, several seeds.

Each (method, seed) trains the same model with the same schedule; runs are grouped by seed so
machine drift hits every method alike (with ``--configs`` their order also rotates with the
seed, so no run is always the first). Prints a Markdown table (test accuracy mean ± std over
seeds, its difference to exact with the standard error of the per-seed differences, training
wall-clock, ratios to exact), writes JSON, and plots test accuracy against training wall-clock.

Two ways to name the runs:

- ``--configs``: ``lightning-approx`` YAML files (``examples/configs/*.yaml``, each method's
  recommended recipe, schedules included), run through the CLI; the exact baseline is the
  first config without its approximations, so every config must agree on everything else;
- ``--methods``: short specs with constant settings, run through ``examples/cifar10.py``;
- ``--merge``: one table (and plot) from saved ``--json`` files, each row keeping the ratios to
  the exact runs of its own file.

    python benchmarks/time_to_accuracy.py --seeds 0 1 2 \\
        --configs examples/configs/cifar10_resnet20_{crs,topk,forward_sampling}.yaml \\
        --json docs/bench/tta.json --plot docs/tta.png
    python benchmarks/time_to_accuracy.py --epochs 15 --seeds 0 1 2 --methods crs:sample_ratio=0.5 grad_prune
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import cifar10

from lightning_approx import cli
from lightning_approx.errors import ConfigError
from lightning_approx.runs import approx_callbacks, check_spec, config_label, recipe_callbacks, write_json
from lightning_approx.script_args import load_json, load_yaml, positive_int, script_main, seed_value
from lightning_approx.summary import RunResult

# Every run of a --configs comparison: quiet, nothing written, validation after every epoch
# (the accuracy curve); the seed is set per run.
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
         "--trainer.check_val_every_n_epoch", "1"]


def check_configs(configs: list[Path]) -> None:
    """Each config is a YAML file whose approximation callbacks build, names one table row, and
    the configs may differ only in their trainer callbacks: the exact baseline is built from the
    first one, so it must be every config's. All of it before the first run."""
    loaded = [load_yaml("--configs", path) for path in configs]  # every file parses, before anything else
    labels = [config_label(path) for path in configs]
    for path, label in zip(configs, labels, strict=True):
        if label == "exact" or labels.count(label) > 1:
            raise ConfigError("--configs", str(path), f"its row label {label!r} is taken (by the exact baseline, "
                              "which every comparison runs, or by another config)",
                              "drop the exact config, and give each config its own name")

    def rest(path: Path, cfg: object) -> dict:
        if not isinstance(cfg, dict):
            raise ConfigError("--configs", str(path), f"holds a YAML {type(cfg).__name__}, not a LightningCLI "
                              "config", "give a config such as examples/configs/cifar10_resnet20_crs.yaml")
        trainer = cfg.get("trainer")
        if isinstance(trainer, dict):
            trainer.pop("callbacks", None)
        return cfg

    first = rest(configs[0], loaded[0])
    for path, cfg in zip(configs[1:], loaded[1:], strict=True):
        if rest(path, cfg) != first:
            raise ConfigError("--configs", str(path), f"differs from {configs[0]} in more than trainer.callbacks, "
                              "so the exact baseline of the first config is not its baseline",
                              "compare configs that share model, data, optimizer and trainer settings")
    for path in configs:  # the approximations, which the exact baseline (run first) does not build
        try:
            recipe_callbacks(path, seed=0, required=False)
        except ConfigError as e:
            raise ConfigError("--configs", str(path), e.problem, e.fix) from e


def run_configs(configs: list[Path], seed: int, overrides: list[str]) -> list[RunResult]:
    """Exact (the first config without its approximations) and every config, from ``seed``.

    The order rotates with the seed (seed 0: exact first, seed 1: the first config first, ...),
    so no run always pays for being first (a cold page cache, a machine settling).
    """
    # LightningCLI saves each run's config.yaml into the run directory: a scratch one.
    with tempfile.TemporaryDirectory(prefix="time_to_accuracy_") as scratch:
        common = ["--seed_everything", str(seed), *QUIET, "--trainer.default_root_dir", scratch, *overrides]
        # --config first: what follows it overrides the config's own seed_everything
        runs = [("exact", ["--config", str(configs[0]), *common, "--exact", "true"])]
        runs += [(config_label(path), ["--config", str(path), *common]) for path in configs]
        start = seed % len(runs)
        results = {}
        for label, args in runs[start:] + runs[:start]:
            (result,) = cli.build(["fit", *args]).results
            results[label] = dataclasses.replace(result, name=label)
    return [results[label] for label, _ in runs]


def method_argv(method: str | None, seed: int, args: argparse.Namespace) -> list[str]:
    """``examples/cifar10.py``'s arguments for one run: exact for ``None``, else ``--method method``."""
    return ["approx" if method else "exact", "--epochs", str(args.epochs), "--model", args.model,
            "--batch-size", str(args.batch_size), "--seed", str(seed), "--val-every", "1",
            *(["--method", method] if method else []), *args.overrides]


def check_methods(args: argparse.Namespace) -> None:
    """Before the first run: the example takes every run's arguments (``--set`` included), and
    every method builds, so no comparison stops at a method after its exact runs."""
    for method in [None, *args.methods]:
        flags = cifar10.parse_args(method_argv(method, args.seeds[0], args))  # a bad --set flag exits here
        if flags.limit_eval_batches == 0:
            raise ConfigError("--set", " ".join(args.overrides), "--limit-eval-batches 0 leaves the runs without the "
                              "test accuracy this benchmark compares", "drop it, or give a count such as 2")
        if method is None:
            continue
        if method.endswith((".yaml", ".yml")):
            approx_callbacks(method, args.seeds[0])  # its errors name the file and the entry
        else:
            check_spec("--methods", method)


def run_methods(methods: list[str], seed: int, args: argparse.Namespace) -> list[RunResult]:
    """Exact, then every short spec, through ``examples/cifar10.py`` from ``seed``; ``args.overrides``
    (``--set``) are that script's flags, added to every run."""
    results = []
    for method in [None, *methods]:
        (result,) = cifar10.main(method_argv(method, seed, args))
        results.append(result)
    return results


def train_s(r: RunResult) -> float:
    """Training wall-clock of a run: the fit's, less its validation loops."""
    return r.curve[-1][0] if r.curve else r.wall_clock_s


def summarise(results: dict[str, list[RunResult]], tolerance: float = 1.0) -> list[dict]:
    """One row per run name: accuracy over seeds and time ratios to the ``"exact"`` runs.

    ``meets`` says whether the run is what the method promises: mean test accuracy within
    ``tolerance`` points of exact and less training wall-clock. ``acc_delta_se`` is the standard
    error of that mean difference from the per-seed differences (the runs pair with exact's seed by
    seed; ``None`` below two seeds). Read the verdict with it: on the CIFAR-10 subset two exact runs
    of one seed that differ only in rounding ended 2.3 points apart (SD over five seeds;
    docs/benchmarks.md).
    """
    exact = results["exact"]
    base_train = statistics.mean(map(train_s, exact))
    base_wall = statistics.mean(r.wall_clock_s for r in exact)
    base_step = statistics.mean(r.step_time_s for r in exact)
    base_acc = statistics.mean(100 * r.test_acc for r in exact)
    rows = []
    for name, runs in results.items():
        accs = [100 * r.test_acc for r in runs]
        delta = statistics.mean(accs) - base_acc
        se = None
        if name != "exact" and len(runs) == len(exact) > 1:
            paired = [a - 100 * e.test_acc for a, e in zip(accs, exact, strict=True)]
            se = statistics.stdev(paired) / math.sqrt(len(paired))
        train = statistics.mean(map(train_s, runs))
        train_ratio = train / base_train
        rows.append({
            "run": name, "seeds": len(runs),
            "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_delta": delta, "acc_delta_se": se,
            "train_s": train, "train_ratio": train_ratio,
            "wall_ratio": statistics.mean(r.wall_clock_s for r in runs) / base_wall,
            "step_ratio": statistics.mean(r.step_time_s for r in runs) / base_step,
            "backward_work": statistics.mean(r.backward_work for r in runs),
            "meets": None if name == "exact" else bool(delta >= -tolerance and train_ratio < 1.0),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | seeds | test acc (%) | Δ acc vs exact (paired SE) | training time (s) | training / exact "
             "| fit wall / exact | step / exact | backward work | within 1 point and faster |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        meets = {None: "-", True: "yes", False: "no"}[r["meets"]]
        se = r.get("acc_delta_se")  # absent from files written before it was added
        delta = f"{r['acc_delta']:+.2f}" + ("" if se is None else f" ({se:.2f})")
        lines.append(f"| {r['run']} | {r['seeds']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | "
                     f"{delta} | {r['train_s']:.1f} | {r['train_ratio']:.3f} | {r['wall_ratio']:.3f} | "
                     f"{r['step_ratio']:.3f} | {100 * r['backward_work']:.1f}% | {meets} |")
    return "\n".join(lines)


def load(path: Path) -> dict[str, list[RunResult]]:
    """The runs of a JSON file this script wrote.

    Raises:
        ConfigError: The file is missing or is not such a file (no header, no exact runs, runs
            without the fields of a :class:`RunResult`).
    """
    runs = load_json("--merge", path, keys=["header", "runs"])["runs"]
    fix = "give files this script wrote with --json"
    if not isinstance(runs, dict) or not isinstance(runs.get("exact"), list) or not runs["exact"]:
        raise ConfigError("--merge", str(path), "has no exact runs under 'runs'", fix)
    try:
        return {name: [RunResult(**{**r, "curve": [tuple(p) for p in r["curve"]]}) for r in rs]
                for name, rs in runs.items()}
    except (TypeError, KeyError) as e:
        raise ConfigError("--merge", str(path), f"has a run that is not a saved result ({e!r})", fix) from e


def merge(paths: list[Path]) -> tuple[list[dict], dict[str, list[RunResult]], list[str]]:
    """Rows, runs and notes of several saved comparisons (for example one command split in two).

    Each file's rows keep the ratios to its own exact runs (measured in the same process); the
    exact row and curve are the first file's. The notes give every file's exact runs, so a
    drift of the machine between the files shows.
    """
    rows: list[dict] = []
    results: dict[str, list[RunResult]] = {}
    notes = []
    loaded = [load(path) for path in paths]  # every file checked before anything is printed
    for i, (path, runs) in enumerate(zip(paths, loaded, strict=True)):
        exact = runs["exact"]
        notes.append(f"{path}: exact test acc {', '.join(f'{100 * r.test_acc:.2f}' for r in exact)} %, "
                     f"training {statistics.mean(map(train_s, exact)):.1f} s")
        for row in summarise(runs):
            if row["run"] == "exact" and i:
                continue
            if any(r["run"] == row["run"] for r in rows):
                raise SystemExit(f"time_to_accuracy: --merge: run {row['run']!r} is in more than one file; "
                                 "fix: merge files with different runs")
            rows.append(row)
        for name, rs in runs.items():
            if name != "exact" or not i:
                results[name] = rs
    return rows, results, notes


def plot(results: dict[str, list[RunResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for line, (name, runs) in enumerate(results.items()):
        curves = [r.curve for r in runs if r.curve]
        n = min(len(c) for c in curves)
        xs = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
        ys = [100 * statistics.mean(c[i][1] for c in curves) for i in range(n)]
        # dashed once the 10 default colours repeat, so every line stays distinguishable
        ax.plot(xs, ys, marker="o", markersize=3, label=name, linewidth=2 if name == "exact" else 1.2,
                linestyle="-" if line < 10 else "--")
    ax.set_xlabel("training wall-clock (s, validation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--configs", nargs="+", type=Path, help="lightning-approx YAML configs (recommended recipes)")
    which.add_argument("--methods", nargs="+", help="short specs with constant settings, e.g. crs:sample_ratio=0.5")
    which.add_argument("--merge", nargs="+", type=Path, help="print one table (and --plot) from saved --json files")
    p.add_argument("--set", nargs=argparse.REMAINDER, default=[], dest="overrides",
                   help="overrides for every run, last on the line: the CLI's for --configs (--set "
                        "--trainer.max_epochs 2), examples/cifar10.py's for --methods (--set --limit-train-batches 2)")
    p.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2])
    p.add_argument("--epochs", type=positive_int, default=15, help="(--methods) epochs; a config sets its own")
    p.add_argument("--model", default="resnet20", help="(--methods) the model; a config sets its own")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="(--methods) batch size; a config sets its own")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.overrides and args.merge:
        p.error("--set applies to runs, not to --merge")
    if args.merge:
        rows, results, notes = merge(args.merge)
        headers = [load_json("--merge", path, keys=["header"])["header"] for path in args.merge]
        header = headers[0] if len(headers) == 1 else "merged: " + "; ".join(headers)
        print(header, *notes, table(rows), sep="\n")
        if args.plot:
            plot(results, args.plot, header)
        return {"header": header, "notes": notes, "rows": rows}
    if args.configs:
        check_configs(args.configs)
    else:
        args.methods = args.methods or ["crs:sample_ratio=0.5"]
        check_methods(args)
    results: dict[str, list[RunResult]] = {}
    for seed in args.seeds:
        runs = run_configs(args.configs, seed, args.overrides) if args.configs else \
            run_methods(args.methods, seed, args)
        for result in runs:
            results.setdefault(result.name, []).append(result)
            print(f"seed {seed} {result.name}: {100 * result.test_acc:.2f}% in {result.wall_clock_s:.1f}s",
                  file=sys.stderr, flush=True)
    rows = summarise(results)
    if args.configs:
        cfg = OmegaConf.load(args.configs[0])
        what = (f"{cfg.model.model}, batch {cfg.data.init_args.batch_size}, "
                f"{results['exact'][0].epochs} epochs, recipes of {', '.join(map(str, args.configs))}")
    else:
        what = f"{args.model}, batch {args.batch_size}, {args.epochs} epochs"
    header = (f"CIFAR-10 subset, {what}, seeds {args.seeds}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today().isoformat()}")
    print(header)
    print(table(rows))
    out = {"header": header, "command": " ".join(sys.argv), "rows": rows,
           "runs": {k: [r.to_dict() for r in v] for k, v in results.items()},
           # glibc's allocator settings change the step time (docs/benchmarks.md): keep them with the result
           "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
    write_json(args.json, out)
    if args.plot:
        plot(results, args.plot, header)
    return out


if __name__ == "__main__":
    script_main(main)
