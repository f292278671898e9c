"""How the dense conv products scale with what a sampling method hands them: fewer input
channels, fewer output channels, or fewer samples.

Every sampling method here ends in the same three dense products on smaller tensors: the
forward conv, its input gradient (backward-data) and its weight gradient (backward-weights). A
method's step time can only shrink as far as these do. For each distinct Conv2d shape of the
model this times the three products in isolation (oneDNN on a CPU, cuDNN on a GPU) at full size
and with ``--fraction`` of the input channels (``forward_sampling``'s window), of the output
channels (``crs``'s input-gradient window) and of the batch (``crs``'s weight-gradient window,
``batch_crs``), and prints each as a ratio to the full product. Interleaved, median of
``--reps`` calls; the tensors are made dense beforehand, so no copy is timed.

    python benchmarks/conv_channels.py --channels-last
    python benchmarks/conv_channels.py --model vgg19_bn --fraction 0.25 --json out.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from lightning_approx.models import MODELS, build_model
from lightning_approx.ops.conv import ConvGeometry
from lightning_approx.runs import write_json
from lightning_approx.script_args import check_device, non_negative_int, positive_int, script_main

_aten = torch.ops.aten
PRODUCTS = ("forward", "input_grad", "weight_grad")
CUTS = ("full", "in_channels", "out_channels", "batch")


def conv_shapes(model: nn.Module, batch: int, image_size: int, device: torch.device) -> list[dict]:
    """The distinct (input shape, conv) pairs of the model's Conv2d layers, in order, with the
    names of the layers that share each."""
    shapes: dict[tuple, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def record(mod, args, _out, name=name):
                key = (tuple(args[0].shape), tuple(mod.weight.shape), mod.stride, mod.padding, mod.dilation,
                       mod.groups)
                shapes.setdefault(key, {"module": mod, "x_shape": tuple(args[0].shape), "layers": []})
                shapes[key]["layers"].append(name)
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(torch.randn(batch, 3, image_size, image_size, device=device))
    for hook in hooks:
        hook.remove()
    return list(shapes.values())


def _operands(conv: nn.Conv2d, x_shape: tuple, cut: str, fraction: float, fmt: torch.memory_format,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense x, weight and dy of the product with ``cut`` reduced to ``fraction`` (at least 1)."""
    n, cin, h, w = x_shape
    cout, cin_g, kh, kw = conv.weight.shape
    groups = conv.groups
    if cut == "batch":
        n = max(1, round(n * fraction))
    elif cut == "in_channels":
        cin_g = max(1, round(cin_g * fraction))
        cin = cin_g * groups
    elif cut == "out_channels":
        cout = max(groups, round(cout * fraction) // groups * groups)
    x = torch.randn(n, cin, h, w, device=device).contiguous(memory_format=fmt)
    weight = torch.randn(cout, cin_g, kh, kw, device=device).contiguous(memory_format=fmt)
    geom = ConvGeometry.of(conv)
    dy = torch.randn_like(geom.forward(x, weight, None)).contiguous(memory_format=fmt)
    return x, weight, dy


def _product(conv: nn.Conv2d, which: str, x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
    geom = ConvGeometry.of(conv)
    if which == "forward":
        return lambda: geom.forward(x, weight, None)
    mask = (True, False, False) if which == "input_grad" else (False, True, False)
    return lambda: _aten.convolution_backward(dy, x, weight, None, geom.stride, geom.padding, geom.dilation, False,
                                              (0, 0), geom.groups, mask)


def time_shape(shape: dict, fraction: float, reps: int, warmup: int, fmt: torch.memory_format,
               device: torch.device) -> dict[str, dict[str, float]]:
    """Median milliseconds of every (product, cut) of one conv shape, interleaved call by call."""
    conv = shape["module"]
    calls = {}
    for cut in CUTS:
        x, weight, dy = _operands(conv, shape["x_shape"], cut, fraction, fmt, device)
        for which in PRODUCTS:
            calls[(which, cut)] = _product(conv, which, x, weight, dy)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for i in range(warmup + reps):
        for key, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {which: {cut: statistics.median(times[(which, cut)]) * 1e3 for cut in CUTS} for which in PRODUCTS}


def table(result: dict) -> str:
    f = result["fraction"]
    lines = [f"{result['model']}, batch {result['batch_size']}, {result['memory_format']}, {result['device']}, "
             f"{result['threads']} threads, torch {result['torch']}, median of {result['reps']} calls; "
             f"ratios: the product on {f:g} of the input channels / output channels / batch over the full one",
             "| layers | x shape | weight | product | full (ms) | in channels | out channels | batch |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["shapes"]:
        layers = row["layers"][0] + (f" (+{len(row['layers']) - 1})" if len(row["layers"]) > 1 else "")
        for which in PRODUCTS:
            ms = row["ms"][which]
            ratios = " | ".join(f"{ms[cut] / ms['full']:.2f}" for cut in CUTS[1:])
            shapes = f"{row['x_shape']} | {row['weight_shape']}"
            lines.append(f"| {layers} | {shapes} | {which} | {ms['full']:.2f} | {ratios} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--fraction", type=float, default=0.5, help="share of the channels / batch kept, in (0, 1)")
    p.add_argument("--reps", type=positive_int, default=30)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not 0 < args.fraction < 1:
        p.error(f"--fraction {args.fraction}: give the share of channels kept, in (0, 1), e.g. 0.5")
    device = check_device("--device", args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args.model, num_classes=args.num_classes).to(device)
    rows = []
    for shape in conv_shapes(model, args.batch_size, args.image_size, device):
        conv = shape["module"]
        rows.append({"layers": shape["layers"], "x_shape": list(shape["x_shape"]),
                     "weight_shape": list(conv.weight.shape), "stride": list(conv.stride),
                     "ms": time_shape(shape, args.fraction, args.reps, args.warmup, fmt, device)})
    result = {"benchmark": "conv_channels", "model": args.model, "batch_size": args.batch_size,
              "image_size": args.image_size, "fraction": args.fraction,
              "memory_format": "channels_last" if args.channels_last else "contiguous", "device": str(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps,
              "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "command": "python benchmarks/conv_channels.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "shapes": rows}
    print(table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
