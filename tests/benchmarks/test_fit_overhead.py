"""benchmarks/fit_overhead.py: plain fits and fits with ApproxBackward alternate in one process,
and the table and JSON come out; a bad variant is refused before the first fit."""

from __future__ import annotations

import json

import pytest

from lightning_approx.script_args import script_main
from tests.conftest import load_script


@pytest.fixture(scope="module")
def fit_overhead():
    return load_script("benchmarks", "fit_overhead")


def test_one_command_times_every_variant_and_writes_json(fit_overhead, tmp_path, capsys):
    out = tmp_path / "fo.json"
    result = fit_overhead.main(["--variants", "crs:sample_ratio=1.0", "relu_mask", "--rounds", "1", "--warmup", "1",
                                "--limit-train-batches", "2", "--batch-size", "8", "--json", str(out)])
    assert set(result["rows"]) == {"exact", "crs:sample_ratio=1.0", "relu_mask"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())  # the warm-up is dropped
    assert result["rows"]["exact"]["ratio"] == 1.0
    assert json.loads(out.read_text())["rows"].keys() == result["rows"].keys()
    assert "| relu_mask |" in capsys.readouterr().out


def test_a_bad_variant_is_refused_before_any_fit(fit_overhead, capsys, monkeypatch):
    monkeypatch.setattr(fit_overhead, "fit_once", lambda *a: pytest.fail("a fit ran before the error was found"))
    with pytest.raises(SystemExit) as exit_:
        script_main(fit_overhead.main, ["--variants", "nosuch"])
    assert exit_.value.code == 2
    assert "--variants='nosuch'" in capsys.readouterr().err
