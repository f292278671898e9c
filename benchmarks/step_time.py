"""Training-step time, exact vs approximate, in one process.

Every variant trains its own copy of the same model on the same batch; the variants run
interleaved, one step each per round, in an order shuffled every round (seeded), so drifts in
machine load hit all of them alike and no variant always runs first or after the same other one. Each
step is split into forward, backward and optimizer time; the table reports medians over the
timed rounds and ratios to the plain ``nn`` layers ("exact"), and the fraction of the
backward multiply-accumulates computed. Because the machine's speed drifts during a run, it also
reports the paired ratio: in each round a variant's step over exact's step of the same round,
their median, and a distribution-free 95% confidence interval of that median (order statistics
of the rounds), so a target can be read as met, missed or not resolved by the run. After the
timed rounds, ``--layer-steps`` more rounds time every Conv2d / Linear of every variant with
module hooks (forward, and backward from the gradient reaching the layer's output to its input
gradient); the hooks cost time of their own, so those rounds are reported separately and never
mixed into the step times.

From those rounds it also reports each variant's floor: the step / exact it would reach if every
patched layer's products took exactly their computed fraction of exact's time (the backward
products, and the forward too for a method that samples the forward) and nothing else in the
step changed: batch norm, ReLU, the additions, the optimizer and the layers left exact. No
implementation of the method can beat its floor on this machine, so a target below it cannot
be met here; "saving realized" is the share of the floor's saving that the variant achieved.
The layers' hook-timed intervals include the hooks' own time, so the floor comes out a little
low (in the method's favour).

``--block N`` runs N consecutive steps of each variant per round, so that each also follows
itself, as in training; the paired ratio then pairs the k-th step of a block with exact's k-th.
The table also counts the minor page faults per step: the fresh pages the allocator got from the
system, which glibc's defaults make a cost of every large temporary.

    python benchmarks/step_time.py                                   # ResNet-20, batch 128, crs 0.5 / 0.25
    python benchmarks/step_time.py --variants all --json out.json    # every method, default and exact settings
    python benchmarks/step_time.py --variants crs:sample_ratio=0.5 --channels-last
    python benchmarks/step_time.py --json out.json --compare docs/bench/step_time_cpu.json
    python benchmarks/step_time.py --variants crs:probabilities=uniform --block 10 --steps 6
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from lightning_approx import approximate
from lightning_approx.errors import ConfigError
from lightning_approx.methods import parse_spec
from lightning_approx.models import MODELS, build_model
from lightning_approx.runs import check_spec, write_json
from lightning_approx.script_args import check_device, load_json, non_negative_int, positive_int, script_main
from lightning_approx.surgery import patched_sites

DEFAULT_VARIANTS = ["crs:sample_ratio=0.5", "crs:sample_ratio=0.25"]
# ``--variants all``: every method at its exact setting (where it has one), then at its
# default, then the settings the speed targets name.
ALL_VARIANTS = [
    "crs:sample_ratio=1.0", "bernoulli_crs:sample_ratio=1.0", "topk:sample_ratio=1.0",
    "forward_sampling:sample_ratio=1.0", "grad_prune:sparsity=0.0", "batch_crs:sample_ratio=1.0",
    "crs", "bernoulli_crs", "topk", "forward_sampling", "grad_prune", "patch_grad", "relu_mask", "batch_crs",
    "crs:sample_ratio=0.25", "crs:grads=weight", "relu_mask+crs", "batch_crs:sample_ratio=0.25",
    "crs:probabilities=uniform", "crs:sample_ratio=0.25,probabilities=uniform", "forward_sampling:selection=uniform",
    "crs:sample_ratio=0.111,probabilities=uniform,grads=weight,weight_window=pixel_grid",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerTimer:
    """Seconds of each Conv2d / Linear forward and backward, through module hooks.

    The backward of a layer runs from the full-backward pre-hook (the gradient of its output
    is ready) to the full-backward hook (the gradient of its input is done). For a layer whose
    input needs no gradient (the stem) that interval does not hold its weight-gradient product
    (torch fires the hook at once, or not at all), so its backward is reported as not timed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forward: dict[str, list[float]] = {}
        self.backward: dict[str, list[float]] = {}
        self._untimed: set[str] = set()  # layers whose input needs no gradient
        self._t0: dict[tuple[str, str], float] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self._handles += [
                    module.register_forward_pre_hook(self._start(name, "fwd")),
                    module.register_forward_hook(self._stop(name, "fwd", self.forward)),
                    module.register_full_backward_pre_hook(self._start(name, "bwd")),
                    module.register_full_backward_hook(self._stop(name, "bwd", self.backward)),
                ]

    def _start(self, name: str, part: str):
        def hook(_module, args, *_):
            if part == "fwd" and not (args and isinstance(args[0], torch.Tensor) and args[0].requires_grad):
                self._untimed.add(name)
            self._t0[(name, part)] = time.perf_counter()
        return hook

    def _stop(self, name: str, part: str, into: dict[str, list[float]]):
        def hook(*_):
            t0 = self._t0.pop((name, part), None)
            if t0 is not None:
                into.setdefault(name, []).append(time.perf_counter() - t0)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def medians(self) -> dict[str, dict[str, float]]:
        return {name: {"forward": statistics.median(ts),
                       "backward": statistics.median(self.backward[name])
                       if name in self.backward and name not in self._untimed else None}
                for name, ts in self.forward.items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn: nn.Module, device: torch.device) -> tuple[float, float, float, float]:
    """One step; returns its forward, backward, optimizer and computed-work fractions."""
    model.train()
    for site in patched_sites(model):
        site.work.reset()
    sync(device)
    t0 = time.perf_counter()
    loss = loss_fn(model(x), y)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    sites = patched_sites(model)
    exact = sum(s.work.exact for s in sites)
    work = sum(s.work.computed for s in sites) / exact if exact else 1.0
    return t1 - t0, t2 - t1, t3 - t2, work


def minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the allocator got from the
    system and the step then touched (glibc returns large freed blocks to the system by default)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_orders(keys: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of the variants in each round: a seeded shuffle per round, so whatever a
    position in the round or the step run just before costs (warm caches, the allocator's state)
    is shared out instead of always falling on the same variant."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        orders.append(order)
    return orders


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics ``j`` and
    ``m + 1 - j`` of the ``m`` values, with ``j`` the largest rank whose binomial(m, 1/2) tail
    keeps the coverage at least ``level``. Needs at least 6 values at 0.95."""
    m = len(values)
    tail = (1 - level) / 2
    j, cdf = 0, 0.0
    while True:  # P(Bin(m, 1/2) <= j) <= tail  <=>  rank j + 1 is a valid lower bound
        nxt = cdf + math.comb(m, j) / 2 ** m
        if nxt > tail:
            break
        cdf, j = nxt, j + 1
    if j == 0:
        raise ValueError(f"{m} values are too few for a {level:.0%} interval of the median; time more steps")
    ordered = sorted(values)
    return ordered[j - 1], ordered[m - j]


def paired_ratios(times: dict[str, dict[str, list[float]]], part: str) -> dict[str, dict[str, float]]:
    """Per-round ``part`` time of each variant over exact's in the same round: median and 95% CI."""
    exact = times["exact"][part]
    out = {}
    for key, rec in times.items():
        ratios = [v / e for v, e in zip(rec[part], exact, strict=True)]
        lo, hi = median_ci(ratios) if len(ratios) >= 6 else (float("nan"), float("nan"))
        out[key] = {"median": statistics.median(ratios), "ci_low": lo, "ci_high": hi}
    return out


def layer_work(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(computed, exact) backward MACs of each patched layer since its counter was last reset."""
    return {site.name: (site.work.computed, site.work.exact) for site in patched_sites(model)}


def samples_forward(model: nn.Module) -> bool:
    """Whether the model's patched layers replace the forward op (so the forward shrinks too)."""
    return any(site.pipeline.forward_method is not None for site in patched_sites(model))


def floors(step: float, backward: float, exact_layers: dict[str, dict[str, float | None]],
           work: dict[str, tuple[int, int]], forward: bool) -> dict[str, float]:
    """The step / exact and backward / exact a variant would reach if each patched layer's
    products took exactly their computed-work fraction of the exact layer's time.

    Args:
        step: Exact's median step (seconds, timed without hooks).
        backward: Exact's median backward.
        exact_layers: Exact's hook-timed ``{"forward", "backward"}`` seconds per layer.
        work: The variant's ``(computed, exact)`` backward MACs per patched layer.
        forward: Whether the variant's forward shrinks by the same fraction (a sampled forward).
    """
    saved_fwd = saved_bwd = 0.0
    for name, (computed, exact) in work.items():
        timed = exact_layers.get(name)
        if not exact or timed is None or timed["backward"] is None:
            continue  # a layer whose backward was not timed (the stem) counts as saving nothing
        unsaved = 1.0 - computed / exact
        saved_bwd += timed["backward"] * unsaved
        if forward:
            saved_fwd += timed["forward"] * unsaved
    return {"step": 1.0 - (saved_fwd + saved_bwd) / step, "backward": 1.0 - saved_bwd / backward}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    base = build_model(args.model, num_classes=args.num_classes).to(device, memory_format=memory_format)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    # Exact trains a deep copy too, so no variant runs on the model the others were copied from.
    variants = {"exact": (copy.deepcopy(base), None)}
    for spec in args.variants:
        model = copy.deepcopy(base)
        approximate(model, parse_spec(spec), seed=0)
        variants[spec] = (model, spec)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, (m, _) in variants.items()}
    times = {k: {"forward": [], "backward": [], "optimizer": [], "step": [], "work": [], "faults": []}
             for k in variants}
    work = {k: {} for k in variants}  # per patched layer: (computed, exact) MACs summed over the timed rounds
    loss_fn = nn.CrossEntropyLoss()
    for round_, order in enumerate(round_orders(list(variants), args.warmup + args.steps)):
        for key in order:
            model = variants[key][0]
            for _ in range(args.block):
                faults = minor_faults()
                fwd, bwd, opt, work_fraction = train_step(model, optimizers[key], x, y, loss_fn, device)
                faults = minor_faults() - faults
                if round_ < args.warmup:
                    continue
                rec = times[key]
                for part, value in (("forward", fwd), ("backward", bwd), ("optimizer", opt),
                                    ("step", fwd + bwd + opt), ("work", work_fraction), ("faults", faults)):
                    rec[part].append(value)
                for name, (computed, exact) in layer_work(model).items():
                    done = work[key].get(name, (0, 0))
                    work[key][name] = (done[0] + computed, done[1] + exact)
    layers = {}
    if args.layer_steps:
        timers = {key: LayerTimer(model) for key, (model, _) in variants.items()}
        for order in round_orders(list(variants), args.layer_steps, seed=1):
            for key in order:
                train_step(variants[key][0], optimizers[key], x, y, loss_fn, device)
        for key, timer in timers.items():
            timer.remove()
            layers[key] = timer.medians()
    medians = {k: {part: statistics.median(v) for part, v in rec.items()} for k, rec in times.items()}
    paired = {part: paired_ratios(times, part) for part in ("step", "backward")}
    variant_floors = {}
    if layers:
        ex = medians["exact"]
        variant_floors = {k: floors(ex["step"], ex["backward"], layers["exact"], work[k], samples_forward(m))
                          for k, (m, spec) in variants.items() if spec is not None}
    return {
        "benchmark": "step_time",
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
        "steps": args.steps, "warmup": args.warmup, "block": args.block, "layer_steps": args.layer_steps,
        "command": " ".join(["python", *sys.argv]), "medians": medians, "paired": paired,
        "rounds": {k: {part: rec[part] for part in ("forward", "backward", "step")} for k, rec in times.items()},
        "layers": layers, "floors": variant_floors,
        # glibc's allocator settings change what fresh temporaries cost (page faults): keep them with the result
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }


def table(result: dict, reference: dict | None = None) -> str:
    med = result["medians"]
    ex = med["exact"]
    paired = result.get("paired")  # absent from JSON saved before it existed

    def ci(part: str, key: str) -> str:
        r = paired[part][key]
        if math.isnan(r["ci_low"]):  # fewer than 6 rounds
            return f"{r['median']:.3f}"
        return f"{r['median']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    lines = ["| variant | forward (ms) | backward (ms) | step (ms) | fwd / exact | bwd / exact | step / exact "
             "| backward work | page faults / step |"
             + (" step / exact, paired [95% CI] | bwd / exact, paired [95% CI] |" if paired else "")
             + (" step vs saved |" if reference else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if paired else "") + ("---|" if reference else "")]
    for key, m in med.items():
        faults = f"{m['faults']:.0f}" if "faults" in m else "-"  # absent from JSON saved before it existed
        row = (f"| {key} | {1e3 * m['forward']:.1f} | {1e3 * m['backward']:.1f} | {1e3 * m['step']:.1f} | "
               f"{m['forward'] / ex['forward']:.3f} | {m['backward'] / ex['backward']:.3f} | "
               f"{m['step'] / ex['step']:.3f} | {100 * m['work']:.1f}% | {faults} |")
        if paired:
            row += f" {ci('step', key)} | {ci('backward', key)} |"
        if reference:
            ref = reference["medians"].get(key)
            row += f" {m['step'] / ref['step']:.3f} |" if ref else " - |"
        lines.append(row)
    return "\n".join(lines)


def floor_table(result: dict) -> str:
    """Each variant's floor (perfect scaling of its products) against its paired ratio."""
    lines = ["| variant | backward work | step floor | step / exact, paired | step saving realized "
             "| backward floor | bwd / exact, paired |", "|---|---|---|---|---|---|---|"]
    for key, floor in result["floors"].items():
        step = result["paired"]["step"][key]["median"]
        bwd = result["paired"]["backward"][key]["median"]
        realized = f"{(1 - step) / (1 - floor['step']):.0%}" if floor["step"] < 1 else "-"
        lines.append(f"| {key} | {100 * result['medians'][key]['work']:.1f}% | {floor['step']:.3f} | {step:.3f} | "
                     f"{realized} | {floor['backward']:.3f} | {bwd:.3f} |")
    return "\n".join(lines)


def layer_table(result: dict, variant: str) -> str:
    """Per-layer forward and backward of ``variant`` against exact (milliseconds, hook-timed)."""
    exact, approx = result["layers"]["exact"], result["layers"][variant]
    lines = [f"| layer | exact fwd | exact bwd | {variant} fwd | {variant} bwd | bwd / exact |",
             "|---|---|---|---|---|---|"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1e3 * v:.2f}"

    for name, ex in exact.items():
        ap = approx.get(name, {"forward": None, "backward": None})
        ratio = f"{ap['backward'] / ex['backward']:.2f}" if ap["backward"] and ex["backward"] else "-"
        lines.append(f"| {name} | {ms(ex['forward'])} | {ms(ex['backward'])} | {ms(ap['forward'])} | "
                     f"{ms(ap['backward'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                   help="method[:key=value,...], several joined by '+'; 'all': every method (exact and default "
                        "settings)")
    p.add_argument("--steps", type=positive_int, default=30, help="timed rounds (median over them)")
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--block", type=positive_int, default=1,
                   help="consecutive steps of one variant per round (1: every step interleaved; more: each "
                        "variant also runs after itself, as in training, and the allocator settles to its pattern)")
    p.add_argument("--layer-steps", type=non_negative_int, default=5,
                   help="extra hook-timed rounds for the per-layer table (0: none)")
    p.add_argument("--layers-of", nargs="*", default=None,
                   help="variants whose per-layer table is printed (default: the first approximate one)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(),
                   help="torch threads (default: all of the machine's)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--compare", type=Path, help="a saved result to compare step times against")
    args = p.parse_args(argv)
    if args.variants == ["all"]:
        args.variants = ALL_VARIANTS
    # Everything a finished run would need, checked before it starts.
    unknown = [v for v in args.layers_of or [] if v not in ["exact", *args.variants]]
    if unknown:
        p.error(f"argument --layers-of: {unknown} are not among the timed variants {['exact', *args.variants]}; "
                "name variants given to --variants (or exact)")
    for spec in args.variants:
        check_spec("--variants", spec)
    check_device("--device", args.device)
    reference = load_json("--compare", args.compare, keys=["medians"]) if args.compare else None
    if reference is not None and (not isinstance(reference["medians"], dict) or not all(
            isinstance(m, dict) and "step" in m for m in reference["medians"].values())):
        raise ConfigError("--compare", str(args.compare), "has no step time per variant (medians.<variant>.step)",
                          "give a file this script wrote with --json")
    torch.set_num_threads(args.threads)
    result = run(args)
    write_json(args.json, result)  # first: a failure while printing loses no measurement
    print(f"{result['model']}, batch {result['batch_size']}, {result['memory_format']}, {result['device']}, "
          f"{result['threads']} threads, "
          f"torch {result['torch']}, median of {result['steps']} steps after {result['warmup']} warm-up")
    print(table(result, reference))
    if result["floors"]:
        print("\nFloors: the ratios perfect scaling of each variant's products would give (hook-timed exact layers):")
        print(floor_table(result))
    if result["layers"]:
        for variant in args.layers_of if args.layers_of is not None else args.variants[:1]:
            print(f"\nPer layer, {variant} (median of {args.layer_steps} hook-timed rounds, ms):")
            print(layer_table(result, variant))
    return result


if __name__ == "__main__":
    script_main(main)
