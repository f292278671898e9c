"""ApproxDDPStrategy on 2 CPU processes (gloo), launched by Lightning from a script.

Each fixture runs one list of small fits (``ddp_fits.py``; both ranks share one process
group) and the tests compare what the ranks saved: parameters identical on both ranks for
every method; the exact settings equal plain DDP bit for bit; the bytes all-reduced per
step counted, logged and smaller by the expected fraction; resumed fits equal uninterrupted
ones.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.logs import read_metrics_csv
from tests.strategies.ddp_fits import Net

SCRIPT = Path(__file__).with_name("ddp_fits.py")
FLOAT_BYTES = 4
STEPS = 8  # 2 epochs of 4 batches per rank

FS_WEIGHT = {"name": "forward_sampling", "sample_ratio": 0.5, "rank_by": "weight"}  # topk: k distinct channels
FS_WEIGHT_CRS = {**FS_WEIGHT, "selection": "crs"}  # random: ranks agree through the shared stream
FS_WEIGHT_ACTIVATION = {"name": "forward_sampling", "sample_ratio": 0.5}
SAMPLED = {"comm": "sampled", "comm_ratio": 0.5, "block_size": 8}


def launch(runs: list[dict], out: Path) -> dict[str, list[dict]]:
    """Runs the fits on 2 processes; returns each run's saved results, by rank."""
    (out / "spec.json").write_text(json.dumps(runs))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parents[2]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out / "spec.json"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"ddp_fits.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {run["name"]: [torch.load(out / f"{run['name']}.rank{r}.pt", weights_only=False) for r in (0, 1)]
            for run in runs}


def logged(out: Path, name: str) -> dict[str, list[float]]:
    return read_metrics_csv(out / name / "metrics.csv")


def assert_same_params(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


def sliced_bytes(ratio: float) -> int:
    """Bytes one rank all-reduces per step with comm="selected" when every layer of ``Net``
    runs forward_sampling on the same k = ceil(ratio * C_in / groups) channels per group:
    those weight slices, every bias whole, and one byte per input channel for the union."""
    net, total = Net(), 0
    for layer in (net.stem, net.conv2, net.conv3, net.fc):
        w = layer.weight
        k = math.ceil(ratio * w.shape[1])
        total += (w.numel() // w.shape[1] * k + layer.bias.numel()) * FLOAT_BYTES
        total += getattr(layer, "groups", 1) * w.shape[1]  # the channel mask, uint8
    return total


def sampled_bytes(ratio: float, block: int) -> int:
    """Bytes per step with comm="sampled": ceil(ratio * blocks) blocks of every parameter
    (``Net``'s parameters are whole blocks, or a single partial one that is always sent)."""
    total = 0
    for p in Net().parameters():
        blocks = math.ceil(p.numel() / block)
        kept = math.ceil(ratio * blocks)
        total += (p.numel() if kept == blocks else kept * block) * FLOAT_BYTES
    return total


DENSE_BYTES = sum(p.numel() for p in Net().parameters()) * FLOAT_BYTES


# --- every method: identical weights on both ranks -----------------------------------------------
METHOD_RUNS = [
    {"name": "crs", "method": {"name": "crs", "sample_ratio": 0.5}, "exclude": "auto"},
    {"name": "bernoulli_crs", "method": {"name": "bernoulli_crs", "sample_ratio": 0.5}, "exclude": "auto"},
    {"name": "topk", "method": {"name": "topk", "sample_ratio": 0.5}, "exclude": "auto"},
    {"name": "grad_prune", "method": "grad_prune", "exclude": "auto"},
    {"name": "patch_grad", "method": "patch_grad", "exclude": "auto"},
    {"name": "relu_mask+crs", "method": ["relu_mask", {"name": "crs", "sample_ratio": 0.5}], "exclude": "auto"},
    {"name": "forward_sampling", "method": FS_WEIGHT_ACTIVATION, "exclude": None},
    {"name": "forward_sampling_weight", "method": FS_WEIGHT, "exclude": None},
    {"name": "forward_sampling_weight_crs", "method": FS_WEIGHT_CRS, "exclude": None},
    {"name": "crs_sampled", "method": {"name": "crs", "sample_ratio": 0.5}, "exclude": "auto", "kwargs": SAMPLED},
    {"name": "crs_log_every_4", "method": {"name": "crs", "sample_ratio": 0.5}, "exclude": "auto", "log_every": 4},
    {"name": "fs_sampled", "method": FS_WEIGHT, "exclude": None, "kwargs": SAMPLED},
]


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    return out, launch(METHOD_RUNS, out)


@pytest.mark.parametrize("name", [run["name"] for run in METHOD_RUNS])
def test_every_method_ends_with_identical_weights_on_both_ranks(methods, name):
    _, results = methods
    rank0, rank1 = results[name]
    assert rank0["strategy"] == "ApproxDDPStrategy" and rank0["global_step"] == STEPS
    assert_same_params(rank0, rank1)
    assert rank0["totals"] == rank1["totals"] and rank0["totals"]["syncs"] == STEPS
    initial = dict(Net().named_parameters())  # the fits start from seed 0 too
    assert all(torch.isfinite(p).all() for p in rank0["params"].values())
    assert not torch.equal(rank0["params"]["conv3.weight"], initial["conv3.weight"].detach())


def test_auto_mode_slices_forward_sampling_and_leaves_other_methods_dense(methods):
    _, results = methods
    assert results["crs"][0]["comm_mode"] == "dense"
    assert results["forward_sampling"][0]["comm_mode"] == "selected"
    assert results["crs_sampled"][0]["comm_mode"] == "sampled"


def test_streams_are_per_rank_for_crs_and_shared_for_weight_ranked_forward_sampling(methods):
    _, results = methods
    crs0, crs1 = (r["seeds"] for r in results["crs"])
    assert crs0.keys() == {"conv2", "conv3"} and all(crs0[k] != crs1[k] for k in crs0)
    fs0, fs1 = (r["seeds"] for r in results["forward_sampling_weight_crs"])
    assert fs0.keys() == {"stem", "conv2", "conv3", "fc"} and fs0 == fs1
    wa0, wa1 = (r["seeds"] for r in results["forward_sampling"])
    assert all(wa0[k] != wa1[k] for k in wa0)  # ranked by activations too: per rank


def test_metrics_are_logged_on_the_logging_steps_and_bytes_counted_on_every_step(methods):
    out, results = methods
    assert results["crs_log_every_4"][0]["totals"] == results["crs"][0]["totals"]  # every sync counted
    metrics = logged(out, "crs_log_every_4")
    assert metrics["comm/bytes"] == [DENSE_BYTES] * (STEPS // 4)
    assert len(metrics["approx/backward_work"]) == STEPS // 4


def test_bytes_are_counted_logged_and_cut_by_the_expected_fraction(methods):
    out, results = methods
    expected = {"crs": DENSE_BYTES, "forward_sampling_weight": sliced_bytes(0.5),
                "crs_sampled": sampled_bytes(0.5, 8)}
    assert sliced_bytes(0.5) < 0.53 * DENSE_BYTES and sampled_bytes(0.5, 8) < 0.51 * DENSE_BYTES
    for name, per_step in expected.items():
        assert results[name][0]["totals"] == {"sent": STEPS * per_step, "dense": STEPS * DENSE_BYTES, "syncs": STEPS}
        metrics = logged(out, name)
        assert metrics["comm/bytes"] == [per_step] * STEPS, name
        assert metrics["comm/bytes_dense"] == [DENSE_BYTES] * STEPS
        assert metrics["comm/fraction"] == pytest.approx([per_step / DENSE_BYTES] * STEPS)
    # Ranked by activations, the ranks pick different channels: the union lies in between.
    union = results["forward_sampling"][0]["totals"]["sent"] / STEPS
    assert sliced_bytes(0.5) <= union < DENSE_BYTES
    # crs selection draws with replacement: at most k distinct channels, the same on both ranks
    assert 0.2 * DENSE_BYTES < results["forward_sampling_weight_crs"][0]["totals"]["sent"] / STEPS <= sliced_bytes(0.5)
    # Sampling what forward_sampling left: about half of the sliced payload.
    both = results["fs_sampled"][0]["totals"]["sent"] / STEPS
    assert 0.3 * sliced_bytes(0.5) < both < 0.7 * sliced_bytes(0.5)


# --- exactness: the exact settings are plain DDP, slicing is lossless -----------------------------
EXACT = {"name": "crs", "sample_ratio": 1.0}
EXACT_RUNS = [
    {"name": "ddp", "strategy": "ddp", "method": EXACT},
    {"name": "dense", "method": EXACT, "kwargs": {"comm": "dense"}},
    {"name": "registered", "strategy": "approx_ddp", "method": EXACT},
    {"name": "sampled_ratio_one", "method": EXACT, "kwargs": {**SAMPLED, "comm_ratio": 1.0}},
    {"name": "fs_dense", "method": FS_WEIGHT_CRS, "exclude": None, "kwargs": {"comm": "dense"}},
    {"name": "fs_selected", "method": FS_WEIGHT_CRS, "exclude": None, "kwargs": {"comm": "selected"}},
    {"name": "fs_acc_dense", "method": FS_WEIGHT_ACTIVATION, "exclude": None, "kwargs": {"comm": "dense"},
     "accumulate": 2},
    {"name": "fs_acc_selected", "method": FS_WEIGHT_ACTIVATION, "exclude": None, "kwargs": {"comm": "selected"},
     "accumulate": 2},
]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    out = tmp_path_factory.mktemp("exact")
    return out, launch(EXACT_RUNS, out)


def test_exact_settings_match_plain_ddp_bit_for_bit(exact):
    _, results = exact
    assert results["ddp"][0]["strategy"] == "DDPStrategy"
    assert results["registered"][0]["strategy"] == "ApproxDDPStrategy"
    for name in ("dense", "registered", "sampled_ratio_one"):
        for rank in (0, 1):
            assert_same_params(results[name][rank], results["ddp"][rank])
    assert results["sampled_ratio_one"][0]["totals"]["sent"] == results["dense"][0]["totals"]["dense"]


def test_selected_reduction_is_lossless(exact):
    _, results = exact
    for sliced, dense in (("fs_selected", "fs_dense"), ("fs_acc_selected", "fs_acc_dense")):
        for rank in (0, 1):
            assert_same_params(results[sliced][rank], results[dense][rank])
        assert results[sliced][0]["totals"]["sent"] < results[dense][0]["totals"]["sent"]


def test_accumulation_reduces_once_per_optimizer_step(exact):
    _, results = exact
    totals = results["fs_acc_selected"][0]["totals"]
    assert totals["syncs"] == STEPS // 2 and totals["dense"] == STEPS // 2 * DENSE_BYTES
    # micro-batches ranked by their own activations: the union over 2 batches and 2 ranks
    assert sliced_bytes(0.5) <= totals["sent"] / totals["syncs"] < DENSE_BYTES


# --- resume --------------------------------------------------------------------------------------
RESUME_RUNS = []
for prefix, method, kwargs, exclude in (("crs_sampled", {"name": "crs", "sample_ratio": 0.5}, SAMPLED, "auto"),
                                        ("fs_selected", FS_WEIGHT_CRS, {"comm": "selected"}, None)):
    RESUME_RUNS += [
        {"name": f"{prefix}_full", "method": method, "exclude": exclude, "kwargs": kwargs, "epochs": 2},
        {"name": f"{prefix}_half", "method": method, "exclude": exclude, "kwargs": kwargs, "epochs": 1},
        {"name": f"{prefix}_resumed", "method": method, "exclude": exclude, "kwargs": kwargs, "epochs": 2,
         "resume": f"{prefix}_half"},
    ]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    return out, launch(RESUME_RUNS, out)


@pytest.mark.parametrize("prefix", ["crs_sampled", "fs_selected"])
def test_resumed_fit_equals_the_uninterrupted_one(resumed, prefix):
    out, results = resumed
    full, half, again = results[f"{prefix}_full"], results[f"{prefix}_half"], results[f"{prefix}_resumed"]
    assert half[0]["global_step"] == STEPS // 2 and again[0]["global_step"] == STEPS
    assert not torch.equal(half[0]["params"]["conv3.weight"], full[0]["params"]["conv3.weight"])
    for rank in (0, 1):
        assert_same_params(again[rank], full[rank])
        assert again[rank]["totals"] == full[rank]["totals"]  # the byte totals resume too
    saved = torch.load(out / f"{prefix}_half.ckpt", weights_only=False)["approx_ddp"]
    assert saved["totals"] == half[0]["totals"] and saved["comm_mode"] == full[0]["comm_mode"]
