"""Where a sampled forward's time goes: ``forward_sampling``'s channel scores, selection, channel
gather and the conv on the kept channels, per layer width, against the exact layers' forward.

Trains an exact copy and a ``forward_sampling`` copy of the same model on the same batch,
interleaved, and times (a) the forward of the exact copy's Conv2d layers that the other copy samples, through
module hooks, and
(b) the pieces of every sampled conv forward, by wrapping the functions
:mod:`lightning_approx.methods.forward_sampling` calls. Layers are grouped by their output
channels (ResNet-20: 16, 32, 64, one group per stage). Milliseconds per step, median over steps.

A diagnostic like ``backward_breakdown.py``: the timers cost a few microseconds per call, and
``step_time.py`` measures step times.

    python benchmarks/forward_breakdown.py --channels-last
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

import lightning_approx.methods.forward_sampling as forward_sampling
from lightning_approx import approximate
from lightning_approx.methods import parse_spec
from lightning_approx.models import MODELS, build_model
from lightning_approx.ops.conv import ConvGeometry
from lightning_approx.runs import write_json
from lightning_approx.script_args import non_negative_int, positive_int, script_main

# (namespace, attribute, piece): the calls of ForwardSampling.conv2d_forward, as its module sees them.
PIECES = [
    (forward_sampling.kops, "plane_sq_norms", "channel scores (norms of x and W)"),
    (forward_sampling, "select_channels", "gather of the kept channels of x"),
    (forward_sampling, "topk_select", "selection"),
    (forward_sampling, "crs_sample", "selection"),
    (ConvGeometry, "forward", "conv on the kept channels"),
]
WHOLE = "sampled conv forward (all of the above and more)"


@contextlib.contextmanager
def timed(into: dict[tuple[int, str], float]) -> Iterator[None]:
    """Wraps the :data:`PIECES` and ``ForwardSampling.conv2d_forward`` with timers that add to
    ``into[(output channels of the layer, piece)]``."""
    width = {"now": 0}
    originals = [(ns, attr, ns.__dict__[attr]) for ns, attr, _ in PIECES]
    method = forward_sampling.ForwardSampling
    whole = method.__dict__["conv2d_forward"]

    def wrap(fn, piece, sets_width=False):
        def timed_fn(*args, **kwargs):
            if sets_width:
                width["now"] = args[3].shape[0]  # (self, site, x, weight, bias)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[(width["now"], piece)] += time.perf_counter() - t0
        return timed_fn

    for (ns, attr, piece), (_, _, fn) in zip(PIECES, originals, strict=True):
        setattr(ns, attr, wrap(fn, piece))
    method.conv2d_forward = wrap(whole, WHOLE, sets_width=True)
    try:
        yield
    finally:
        for ns, attr, fn in originals:
            setattr(ns, attr, fn)
        method.conv2d_forward = whole


class ConvForwardTimer:
    """Adds the forward seconds of the Conv2d layers named in ``names`` to
    ``into[(output channels, "exact conv forward")]``."""

    def __init__(self, model: nn.Module, names: set[str], into: dict[tuple[int, str], float]) -> None:
        self._t0 = 0.0
        self.handles = []
        for name, module in model.named_modules():
            if name in names and isinstance(module, nn.Conv2d):
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(self._stop(module.out_channels, into)))

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, width: int, into: dict[tuple[int, str], float]):
        def hook(*_):
            into[(width, "exact conv forward")] += time.perf_counter() - self._t0
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run(args: argparse.Namespace) -> dict:
    configs = parse_spec(args.variant)
    if [c["name"] for c in configs] != ["forward_sampling"]:
        raise SystemExit(f"forward_breakdown: --variant {args.variant!r}: times the pieces of forward_sampling; "
                         "fix: give e.g. forward_sampling:sample_ratio=0.5 (backward_breakdown.py times crs)")
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    exact = build_model(args.model, num_classes=10).to(memory_format=memory_format)
    approx = copy.deepcopy(exact)
    sampled = set(approximate(approx, configs, seed=0))  # the exact copy's same layers are timed
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    forward: dict[str, list[float]] = {"exact": [], "approx": []}
    per_step: list[dict[tuple[int, str], float]] = []
    for step in range(args.warmup + args.steps):
        pieces: dict[tuple[int, str], float] = defaultdict(float)
        for key, model in (("exact", exact), ("approx", approx)):
            timer = ConvForwardTimer(model, sampled, pieces) if key == "exact" else None
            with timed(pieces) if key == "approx" else contextlib.nullcontext():
                t0 = time.perf_counter()
                loss = loss_fn(model(x), y)
                seconds = time.perf_counter() - t0
            if timer is not None:
                timer.remove()
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step >= args.warmup:
                forward[key].append(seconds)
        if step >= args.warmup:
            per_step.append(dict(pieces))
    keys = sorted({k for s in per_step for k in s})
    medians = {f"{width}/{piece}": statistics.median(s.get((width, piece), 0.0) for s in per_step)
               for width, piece in keys}
    return {
        "benchmark": "forward_breakdown", "model": args.model, "variant": args.variant,
        "batch_size": args.batch_size, "memory_format": "channels_last" if args.channels_last else "contiguous",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
        "steps": args.steps, "command": " ".join(["python", *sys.argv]),
        "forward_exact_s": statistics.median(forward["exact"]),
        "forward_approx_s": statistics.median(forward["approx"]), "pieces_s": medians,
    }


def table(result: dict) -> str:
    """One row per piece, one column per layer width (output channels)."""
    by_width: dict[int, dict[str, float]] = defaultdict(dict)
    for key, seconds in result["pieces_s"].items():
        width, piece = key.split("/", 1)
        by_width[int(width)][piece] = seconds
    widths = sorted(by_width)
    rows = ["exact conv forward", *dict.fromkeys(p for _, _, p in PIECES), WHOLE]
    lines = ["| piece (ms / step) | " + " | ".join(f"{w}-channel layers" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for piece in rows:
        if any(piece in by_width[w] for w in widths):
            lines.append(f"| {piece} | " + " | ".join(f"{1e3 * by_width[w].get(piece, 0.0):.1f}" for w in widths)
                         + " |")
    approx, exact = result["forward_approx_s"], result["forward_exact_s"]
    lines.append(f"| **whole forward, {result['variant']}** | {1e3 * approx:.1f} ({approx / exact:.3f}x) |"
                 + " |" * (len(widths) - 1))
    lines.append(f"| **whole forward, exact** | {1e3 * exact:.1f} |" + " |" * (len(widths) - 1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="forward_sampling", help="forward_sampling, with settings")
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
