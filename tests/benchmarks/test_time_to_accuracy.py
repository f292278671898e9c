"""benchmarks/time_to_accuracy.py: a --configs comparison end to end on tiny runs, its table,
JSON and plot, and the check that every config shares the exact baseline."""

from __future__ import annotations

import json

import pytest

from lightning_approx.errors import ConfigError
from tests.conftest import CIFAR_SUBSET, REPO, load_script

CONFIGS = REPO / "examples" / "configs"
TINY = ["--set", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--data.init_args.data_dir", str(CIFAR_SUBSET), "--data.init_args.batch_size", "16"]


@pytest.fixture(scope="module")
def tta():
    return load_script("benchmarks", "time_to_accuracy")


def test_configs_run_exact_then_each_recipe_per_seed(tta, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything Lightning writes by default lands here
    configs = [CONFIGS / "cifar10_resnet20_crs.yaml", CONFIGS / "cifar10_resnet20_relu_mask.yaml"]
    out = tta.main(["--seeds", "0", "1", "--configs", *map(str, configs), "--json", str(tmp_path / "tta.json"),
                    "--plot", str(tmp_path / "tta.png"), *TINY])
    assert [r["run"] for r in out["rows"]] == ["exact", "crs", "relu_mask"]
    assert all(r["seeds"] == 2 for r in out["rows"])
    runs = out["runs"]
    # Validation after every epoch gives the accuracy-against-time curve; time only goes forward.
    for r in (run for name in runs for run in runs[name]):
        assert r["epochs"] == 2 and len(r["curve"]) == 2 and r["curve"][0][0] < r["curve"][1][0]
    # The exact baseline computes everything; crs's schedule starts exact and lowers the ratio.
    assert out["rows"][0]["backward_work"] == 1.0 and out["rows"][1]["backward_work"] < 1.0
    # relu_mask is exact: the same accuracy as the exact run for every seed.
    assert [r["test_acc"] for r in runs["relu_mask"]] == [r["test_acc"] for r in runs["exact"]]
    saved = json.loads((tmp_path / "tta.json").read_text())
    assert saved["rows"] == out["rows"] and "malloc_env" in saved
    assert (tmp_path / "tta.png").stat().st_size > 0
    assert "| crs | 2 |" in capsys.readouterr().out


def test_configs_that_differ_beyond_callbacks_are_refused(tta, tmp_path):
    other = tmp_path / "cifar10_resnet20_other.yaml"
    text = (CONFIGS / "cifar10_resnet20_crs.yaml").read_text()
    assert "max_epochs: 8" in text
    other.write_text(text.replace("max_epochs: 8", "max_epochs: 9"))
    with pytest.raises(ConfigError, match=r"differs from .* in more than trainer\.callbacks"):
        tta.main(["--seeds", "0", "--configs", str(CONFIGS / "cifar10_resnet20_crs.yaml"), str(other)])


def test_the_exact_config_is_refused_as_a_recipe(tta):
    with pytest.raises(ConfigError, match="row label 'exact' is taken"):
        tta.main(["--seeds", "0", "--configs", str(CONFIGS / "cifar10_resnet20_exact.yaml")])


def test_methods_run_exact_then_each_spec_through_the_example(tta, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tta.main(["--seeds", "0", "--methods", "crs:sample_ratio=0.5", "--epochs", "2", "--batch-size", "16",
                    "--set", "--data-dir", str(CIFAR_SUBSET), "--limit-train-batches", "2",
                    "--limit-eval-batches", "1"])
    assert [r["run"] for r in out["rows"]] == ["exact", "crs:sample_ratio=0.5"]
    exact, crs = (out["runs"][name][0] for name in ("exact", "crs:sample_ratio=0.5"))
    assert exact["epochs"] == crs["epochs"] == 2 and len(crs["curve"]) == 2  # validated after every epoch
    assert out["rows"][0]["backward_work"] == 1.0 and out["rows"][1]["backward_work"] < 1.0


def test_set_does_not_apply_to_merge(tta, tmp_path):
    with pytest.raises(SystemExit):
        tta.main(["--merge", str(tmp_path / "a.json"), "--set", "--trainer.max_epochs", "1"])


def _saved(path, header, runs):
    def result(name, acc, train_s, step_s):
        return {"name": name, "epochs": 2, "wall_clock_s": train_s + 1.0, "step_time_s": step_s, "test_acc": acc,
                "backward_work": 1.0 if name == "exact" else 0.5, "curve": [[train_s / 2, acc / 2], [train_s, acc]],
                "images_per_s": 100.0}
    path.write_text(json.dumps({"header": header, "runs": {
        name: [result(name, *r) for r in rs] for name, rs in runs.items()}}))
    return path


def test_merge_keeps_each_files_ratios_to_its_own_exact_runs(tta, tmp_path, capsys):
    a = _saved(tmp_path / "a.json", "A", {"exact": [(0.5, 10.0, 0.1), (0.6, 10.0, 0.1)],
                                          "crs": [(0.5, 9.0, 0.09), (0.55, 9.0, 0.09)]})
    # B ran on a machine twice as slow: its ratios still compare it with its own exact runs.
    b = _saved(tmp_path / "b.json", "B", {"exact": [(0.5, 20.0, 0.2), (0.6, 20.0, 0.2)],
                                          "grad_prune": [(0.5, 30.0, 0.3), (0.6, 30.0, 0.3)]})
    out = tta.main(["--merge", str(a), str(b), "--plot", str(tmp_path / "merged.png")])
    rows = {r["run"]: r for r in out["rows"]}
    assert list(rows) == ["exact", "crs", "grad_prune"]
    assert rows["crs"]["train_ratio"] == pytest.approx(0.9) and rows["crs"]["acc_delta"] == pytest.approx(-2.5)
    assert rows["crs"]["meets"] is False  # faster, but 2.5 points below exact
    # Per seed crs is 0 and 5 points below exact: the paired standard error of the mean is 2.5.
    assert rows["crs"]["acc_delta_se"] == pytest.approx(2.5) and rows["exact"]["acc_delta_se"] is None
    assert rows["grad_prune"]["train_ratio"] == pytest.approx(1.5) and rows["grad_prune"]["meets"] is False
    assert rows["exact"]["train_s"] == pytest.approx(10.0)
    printed = capsys.readouterr().out
    assert "b.json: exact test acc 50.00, 60.00 %, training 20.0 s" in printed
    assert "| -2.50 (2.50) |" in printed
    assert (tmp_path / "merged.png").stat().st_size > 0


def test_merge_refuses_a_run_in_two_files(tta, tmp_path):
    a = _saved(tmp_path / "a.json", "A", {"exact": [(0.5, 10.0, 0.1)], "crs": [(0.5, 9.0, 0.09)]})
    b = _saved(tmp_path / "b.json", "B", {"exact": [(0.5, 10.0, 0.1)], "crs": [(0.5, 9.0, 0.09)]})
    with pytest.raises(SystemExit, match="run 'crs' is in more than one file"):
        tta.main(["--merge", str(a), str(b)])
