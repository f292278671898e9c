"""Gradient noise: how far each method's gradient is from the exact gradient of the same batch,
next to the noise SGD already has.

A sampled backward adds noise on top of the minibatch noise; whether training tolerates it
depends on how the two compare. On one real CIFAR-10 batch, after a short exact warm-up so the
network is past its initialisation, this measures for every variant the relative error
``||g - G|| / ||G||`` and the cosine of its gradient ``g`` against the exact gradient ``G``
(over every parameter, median of ``--draws`` draws), and the error of the mean of the draws,
which shrinks as ``1/sqrt(draws)`` for an unbiased method and stays put for a biased one. Two
references carry no method at all: the exact gradient of a random half of the batch, and the
exact gradient of another batch (what SGD's own step-to-step noise is).

What the noise does to training: with ``--growth-steps N`` every variant (and exact) then
trains its own copy of the warmed-up network for N more steps on the same batches, and the
table adds the conv weights' norm against exact's (the whole network, and the layer that grew
most) and the mean loss of the last 10 steps. Behind batch norm a conv's output does not depend
on its weight's norm, but its effective learning rate falls as 1/norm^2, so weights inflated by
noisy steps stop learning.

    python benchmarks/gradient_noise.py --variants crs crs:grads=weight topk bernoulli_crs \\
        forward_sampling grad_prune patch_grad --json docs/bench/gradient_noise.json
    python benchmarks/gradient_noise.py --variants crs batch_crs --growth-steps 80
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
from torch import nn

from lightning_approx import approximate
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.methods import parse_spec
from lightning_approx.models import MODELS, build_model
from lightning_approx.ops.fidelity import fidelity
from lightning_approx.runs import check_spec, write_json
from lightning_approx.script_args import non_negative_int, positive_int, script_main, seed_value

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"
HALF_BATCH, OTHER_BATCH = "exact, half of the batch", "exact, another batch"


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every parameter's gradient of the cross-entropy on (x, y), flattened into one vector."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def endless(data: CIFAR10DataModule):
    """Augmented, normalised training batches, epoch after epoch."""
    while True:
        for batch in data.train_dataloader():
            yield data.transform_batch(batch, train=True)


def summary(draws: list[torch.Tensor], exact: torch.Tensor) -> dict[str, float]:
    scores = [fidelity(g, exact) for g in draws]
    return {"rel_err": statistics.median(s["rel_err"] for s in scores),
            "cos": statistics.median(s["cos"] for s in scores),
            "mean_rel_err": fidelity(torch.stack(draws).mean(0), exact)["rel_err"]}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    data = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, seed=args.seed)
    data.setup("fit")
    batches = endless(data)
    model = build_model(args.model, num_classes=10)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(args.train_steps):  # past the initialisation, where gradients are unusually aligned
        x, y = next(batches)
        gradient(model, x, y)
        optimizer.step()
    # BN's running statistics do not enter a training-mode forward, so repeated passes see one network
    x, y = next(batches)
    exact = gradient(model, x, y)
    rows = {}
    halves = []
    for _ in range(args.draws):
        keep = torch.randperm(len(x))[: len(x) // 2]
        halves.append(gradient(model, x[keep], y[keep]))
    rows[HALF_BATCH] = summary(halves, exact)
    rows[OTHER_BATCH] = summary([gradient(model, *next(batches)) for _ in range(args.draws)], exact)
    for spec in args.variants:
        approx = copy.deepcopy(model)
        approximate(approx, parse_spec(spec), seed=args.seed)
        rows[spec] = summary([gradient(approx, x, y) for _ in range(args.draws)], exact)
    if args.growth_steps:
        for name, row in weight_growth(model, args).items():
            rows.setdefault(name, {}).update(row)
    return {"benchmark": "gradient_noise", "model": args.model, "batch_size": args.batch_size,
            "train_steps": args.train_steps, "draws": args.draws, "seed": args.seed, "growth_steps": args.growth_steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]), "rows": rows}


def weight_growth(model: nn.Module, args: argparse.Namespace) -> dict[str, dict[str, float | str]]:
    """Trains a copy of ``model`` per variant for ``args.growth_steps`` steps on the same batches;
    each variant's conv weight norms against exact's, and its loss."""
    norms, losses = {}, {}
    for spec in ["exact", *args.variants]:
        net = copy.deepcopy(model)
        if spec != "exact":
            approximate(net, parse_spec(spec), seed=args.seed)
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        data = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, seed=args.seed + 1)
        data.setup("fit")
        batches, tail = endless(data), []
        for _ in range(args.growth_steps):
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            tail = [*tail[-9:], loss.item()]
        norms[spec] = {n: p.detach().norm().item() for n, p in net.named_parameters() if p.dim() == 4}
        losses[spec] = statistics.mean(tail)
    exact = norms["exact"]
    total = math.sqrt(sum(v * v for v in exact.values()))
    rows: dict[str, dict[str, float | str]] = {}
    for spec, layer_norms in norms.items():
        ratios = {n: v / exact[n] for n, v in layer_norms.items()}
        worst = max(ratios, key=ratios.get)
        rows[spec] = {
            "loss": losses[spec], "weight_norm_ratio": math.sqrt(sum(v * v for v in layer_norms.values())) / total,
            "max_layer_ratio": ratios[worst], "max_layer": worst}
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


def table(result: dict) -> str:
    lines = [f"gradient noise, {result['model']}, batch {result['batch_size']}, after {result['train_steps']} exact "
             f"steps, {result['draws']} draws", "",
             "| gradient | rel. error (median) | cosine (median) | rel. error of the mean of the draws |"
             + (" conv weight norm / exact | largest layer / exact | loss, last 10 steps |"
                if result.get("growth_steps") else ""),
             "|---|---|---|---|" + ("---|---|---|" if result.get("growth_steps") else "")]
    for name, row in result["rows"].items():
        cells = [_cell(row, "rel_err", ".3f"), _cell(row, "cos", ".3f"), _cell(row, "mean_rel_err", ".3f")]
        if result.get("growth_steps"):
            largest = f"{row['max_layer_ratio']:.2f} ({row['max_layer']})" if "max_layer" in row else ""
            cells += [_cell(row, "weight_norm_ratio", ".2f"), largest, _cell(row, "loss", ".3f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["crs", "crs:grads=weight", "topk", "bernoulli_crs",
                                                          "forward_sampling", "grad_prune", "patch_grad"],
                        help="method specs, as step_time.py takes them (crs:sample_ratio=0.25, relu_mask+crs)")
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--train-steps", type=non_negative_int, default=80, help="exact SGD steps before measuring")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--growth-steps", type=non_negative_int, default=0,
                        help="then train every variant this many steps and compare weight norms (0: skip)")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(f"--draws {args.draws}: the medians and the mean of the draws need at least 2; give --draws 2 "
                     "or more")
    for spec in args.variants:  # before the exact warm-up, not after it
        check_spec("--variants", spec)
    result = run(args)
    print(table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
