"""benchmarks/gradient_noise.py: exact variants measure no noise, sampling ones do, and the SGD
references sit beside them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def noise():
    return load_script("benchmarks", "gradient_noise")


def test_exact_settings_measure_no_noise_and_sampling_does(noise, tmp_path, capsys):
    out = tmp_path / "noise.json"
    result = noise.main(["--variants", "relu_mask", "crs:sample_ratio=1.0", "crs:sample_ratio=0.25",
                         "--batch-size", "16", "--train-steps", "1", "--draws", "3", "--json", str(out)])
    rows = result["rows"]
    for exact in ("relu_mask", "crs:sample_ratio=1.0"):
        assert rows[exact]["rel_err"] < 1e-4 and rows[exact]["cos"] > 0.9999, exact
    sampled = rows["crs:sample_ratio=0.25"]
    assert sampled["rel_err"] > 0.01 and sampled["cos"] < 1.0
    for reference in (noise.HALF_BATCH, noise.OTHER_BATCH):
        assert rows[reference]["rel_err"] > 0.01
    assert json.loads(out.read_text())["rows"] == rows
    assert "| crs:sample_ratio=0.25 |" in capsys.readouterr().out


def test_fewer_than_two_draws_are_refused(noise):
    with pytest.raises(SystemExit):
        noise.main(["--draws", "1"])


def test_weight_growth_of_an_exact_setting_is_exact_growth(noise, capsys):
    """--growth-steps trains every variant on the same batches: at an exact setting the weights
    end where exact's do; a sampled variant's do not."""
    result = noise.main(["--variants", "crs:sample_ratio=1.0", "crs:sample_ratio=0.25", "--batch-size", "16",
                         "--train-steps", "0", "--draws", "2", "--growth-steps", "3"])
    rows = result["rows"]
    assert rows["exact"]["weight_norm_ratio"] == 1.0
    assert rows["crs:sample_ratio=1.0"]["weight_norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert rows["crs:sample_ratio=1.0"]["loss"] == pytest.approx(rows["exact"]["loss"], rel=1e-5)
    assert rows["crs:sample_ratio=0.25"]["max_layer_ratio"] != pytest.approx(1.0, abs=1e-6)
    assert "largest layer / exact" in capsys.readouterr().out
