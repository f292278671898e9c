"""Where a sampled backward's time goes: norms, pair selection, gathers and the two products.

Trains an exact copy and a copy under one column-row-sampling variant (``crs``,
``bernoulli_crs`` or ``topk``) of the same model on the same batch, interleaved, and times the
pieces of the sampled conv / linear backwards by wrapping the functions the method calls
(:mod:`lightning_approx.methods.sampling`'s products, gathers, norms and selection) with
timers. Prints milliseconds per step for each piece, the sampled layers' whole backward, the
whole backward of both copies, and the rest (batch norm, ReLU, additions).

A diagnostic, not a step time: the timers add a few microseconds per call, and each piece is
timed on its inputs as they come (in cache or not), which is the point. ``step_time.py``
measures step times.

    python benchmarks/backward_breakdown.py --variant crs:sample_ratio=0.25 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch
from torch import nn

import lightning_approx.layers as layers
import lightning_approx.methods.sampling as sampling
from lightning_approx import approximate
from lightning_approx.methods import parse_spec
from lightning_approx.models import MODELS, build_model
from lightning_approx.runs import write_json
from lightning_approx.script_args import non_negative_int, positive_int, script_main

# (namespace, attribute, piece): the calls of CRS's backward, as its module sees them.
PIECES = [
    (sampling, "conv2d_grad_weight", "weight-gradient product"),
    (sampling, "conv2d_grad_input", "input-gradient product"),
    (sampling.kops, "gather_scale", "gathers (and scaling)"),
    (sampling.kops, "sample_norms", "norms of x / W"),
    (sampling.kops, "plane_sq_norms", "norms of dy"),
    (sampling, "crs_sample", "pair selection"),
    (sampling, "bernoulli_sample", "pair selection"),
    (sampling, "topk_select", "pair selection"),
]
FAMILY = ("crs", "bernoulli_crs", "topk")


@contextlib.contextmanager
def timed(into: dict[str, float]) -> Iterator[None]:
    """Wraps every :data:`PIECES` function, and the approximate layers' backward, with a timer."""
    originals = [(ns, attr, getattr(ns, attr)) for ns, attr, _ in PIECES]

    def wrap(fn, piece):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[piece] += time.perf_counter() - t0
        return timed_fn

    for (ns, attr, piece), (_, _, fn) in zip(PIECES, originals, strict=True):
        setattr(ns, attr, wrap(fn, piece))
    functions = (layers._Conv2dFunction, layers._LinearFunction)
    backwards = [fn.backward for fn in functions]
    for fn, backward in zip(functions, backwards, strict=True):
        fn.backward = staticmethod(wrap(backward, "sampled layers' backward (all of the above and more)"))
    try:
        yield
    finally:
        for ns, attr, fn in originals:
            setattr(ns, attr, fn)
        for fn, backward in zip(functions, backwards, strict=True):
            fn.backward = staticmethod(backward)


def run(args: argparse.Namespace) -> dict:
    configs = parse_spec(args.variant)
    names = [c["name"] for c in configs]
    if len(names) != 1 or names[0] not in FAMILY:
        raise SystemExit(f"backward_breakdown: --variant {args.variant!r}: times the pieces of one of {FAMILY}; "
                         "fix: give e.g. crs:sample_ratio=0.25 (step_time.py times every method)")
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    exact = build_model(args.model, num_classes=10).to(memory_format=memory_format)
    approx = copy.deepcopy(exact)
    approximate(approx, configs, seed=0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    pieces: dict[str, float] = defaultdict(float)
    backward: dict[str, list[float]] = {"exact": [], "approx": []}
    per_step: list[dict[str, float]] = []
    for step in range(args.warmup + args.steps):
        for key, model in (("exact", exact), ("approx", approx)):
            loss = loss_fn(model(x), y)
            pieces.clear()
            with timed(pieces) if key == "approx" else contextlib.nullcontext():
                t0 = time.perf_counter()
                loss.backward()
                seconds = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                backward[key].append(seconds)
                if key == "approx":
                    per_step.append(dict(pieces))
    medians = {piece: statistics.median(s.get(piece, 0.0) for s in per_step) for piece in per_step[0]}
    return {
        "benchmark": "backward_breakdown", "model": args.model, "variant": args.variant,
        "batch_size": args.batch_size, "memory_format": "channels_last" if args.channels_last else "contiguous",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
        "steps": args.steps, "command": " ".join(["python", *sys.argv]),
        "backward_exact_s": statistics.median(backward["exact"]),
        "backward_approx_s": statistics.median(backward["approx"]), "pieces_s": medians,
    }


def table(result: dict) -> str:
    lines = ["| piece | ms / step |", "|---|---|"]
    layer_total = "sampled layers' backward (all of the above and more)"
    for piece, seconds in sorted(result["pieces_s"].items(), key=lambda kv: kv[0] == layer_total):
        lines.append(f"| {piece} | {1e3 * seconds:.1f} |")
    approx, exact = result["backward_approx_s"], result["backward_exact_s"]
    lines.append(f"| rest of the backward (batch norm, ReLU, additions, autograd) | "
                 f"{1e3 * (approx - result['pieces_s'].get(layer_total, 0.0)):.1f} |")
    lines.append(f"| **whole backward, {result['variant']}** | {1e3 * approx:.1f} |")
    lines.append(f"| **whole backward, exact** | {1e3 * exact:.1f} ({approx / exact:.3f}x) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="crs:sample_ratio=0.25", help="one of crs, bernoulli_crs, topk, with settings")
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(f"{args.model}, batch {args.batch_size}, {result['memory_format']}, {result['threads']} threads, "
          f"median of {args.steps} steps, {result['date']}")
    print(table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
