"""benchmarks/step_time.py: every variant is timed in every round, in a shuffled order, and the
table, per-layer breakdown and JSON come out."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def step_time():
    return load_script("benchmarks", "step_time")


def test_rounds_shuffle_the_order_and_keep_every_variant(step_time):
    keys = ["exact", "a", "b", "c"]
    orders = step_time.round_orders(keys, 40)
    assert all(sorted(order) == sorted(keys) for order in orders)
    assert {order[0] for order in orders} == set(keys)  # every variant sometimes runs first
    assert orders == step_time.round_orders(keys, 40)  # seeded: the same run is the same order


def test_one_command_gives_table_layers_and_json(step_time, tmp_path, capsys):
    out = tmp_path / "st.json"
    result = step_time.main(["--variants", "crs:sample_ratio=0.5", "crs:sample_ratio=1.0", "--batch-size", "8",
                             "--steps", "2", "--warmup", "1", "--layer-steps", "1", "--threads",
                             str(torch.get_num_threads()), "--json", str(out)])
    medians = result["medians"]
    assert set(medians) == {"exact", "crs:sample_ratio=0.5", "crs:sample_ratio=1.0"}
    assert medians["exact"]["work"] == 1.0 and medians["crs:sample_ratio=1.0"]["work"] == 1.0
    assert 0 < medians["crs:sample_ratio=0.5"]["work"] <= 0.5 + 1e-9
    assert "layer1.0.conv1" in result["layers"]["crs:sample_ratio=0.5"]
    # The stem's input needs no gradient, so no interval holds its weight-gradient product.
    assert result["layers"]["exact"]["conv1"]["backward"] is None
    assert result["layers"]["exact"]["layer1.0.conv1"]["backward"] > 0
    assert json.loads(out.read_text())["medians"].keys() == medians.keys()
    printed = capsys.readouterr().out
    assert "| crs:sample_ratio=0.5 |" in printed and "Per layer, crs:sample_ratio=0.5" in printed


def test_median_interval_uses_the_binomial_order_statistics(step_time):
    """For 20 values the 95% interval of the median is the 6th to the 15th smallest (coverage
    0.959); for 60 values the 22nd to the 39th."""
    assert step_time.median_ci([float(v) for v in range(1, 21)]) == (6.0, 15.0)
    assert step_time.median_ci([float(v) for v in range(1, 61)]) == (22.0, 39.0)
    with pytest.raises(ValueError, match="too few"):
        step_time.median_ci([1.0] * 5)


def test_paired_ratios_divide_within_each_round(step_time):
    times = {"exact": {"step": [1.0, 2.0] * 5}, "a": {"step": [0.5, 1.0] * 5}}
    paired = step_time.paired_ratios(times, "step")
    assert paired["a"] == {"median": 0.5, "ci_low": 0.5, "ci_high": 0.5}  # the drift cancels
    assert paired["exact"]["median"] == 1.0


def test_floor_counts_each_patched_layer_at_its_computed_fraction(step_time):
    """Exact step 100 ms, backward 60 ms; two patched layers (backward 20 and 10 ms, forward 8 and
    4 ms) computing half and a quarter of their work; the stem's untimed backward saves nothing."""
    layers = {"conv1": {"forward": 0.002, "backward": None}, "a": {"forward": 0.008, "backward": 0.020},
              "b": {"forward": 0.004, "backward": 0.010}}
    work = {"a": (50, 100), "b": (25, 100), "conv1": (0, 100)}
    saved_bwd = 0.020 * 0.5 + 0.010 * 0.75
    backward_only = step_time.floors(0.100, 0.060, layers, work, forward=False)
    assert backward_only["step"] == pytest.approx(1 - saved_bwd / 0.100)
    assert backward_only["backward"] == pytest.approx(1 - saved_bwd / 0.060)
    sampled_forward = step_time.floors(0.100, 0.060, layers, work, forward=True)
    assert sampled_forward["step"] == pytest.approx(1 - (saved_bwd + 0.008 * 0.5 + 0.004 * 0.75) / 0.100)
    assert sampled_forward["backward"] == backward_only["backward"]
    assert step_time.floors(0.100, 0.060, layers, {"a": (100, 100)}, forward=True)["step"] == 1.0


def test_floors_come_with_the_layer_rounds(step_time, capsys):
    result = step_time.main(["--variants", "crs:sample_ratio=0.5", "forward_sampling", "--batch-size", "4",
                             "--steps", "2", "--warmup", "0", "--layer-steps", "1", "--threads",
                             str(torch.get_num_threads())])
    assert set(result["floors"]) == {"crs:sample_ratio=0.5", "forward_sampling"}
    for floor in result["floors"].values():
        # Below 1 whenever a patched layer computes less than its exact work. The lower end is not
        # asserted: at batch 4 and two steps, the hook-timed layers can outlast the step's median
        # backward, and the floor formula is checked exactly by the test above.
        assert math.isfinite(floor["step"]) and math.isfinite(floor["backward"])
        assert floor["step"] < 1 and floor["backward"] < 1
    assert "step saving realized" in capsys.readouterr().out
    assert "malloc_env" in result
    no_layers = step_time.main(["--variants", "crs", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                                "--layer-steps", "0"])
    assert no_layers["floors"] == {}


def test_blocks_run_consecutive_steps_and_count_page_faults(step_time):
    result = step_time.main(["--variants", "crs:sample_ratio=0.5", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                             "--block", "3", "--layer-steps", "0"])
    assert result["block"] == 3
    for rounds in result["rounds"].values():
        assert len(rounds["step"]) == 2 * 3  # every step of every timed block
    assert all(m["faults"] >= 0 for m in result["medians"].values())
