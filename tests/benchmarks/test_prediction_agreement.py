"""benchmarks/prediction_agreement.py: the agreement statistics on hand-made predictions, and the
command end to end on two real checkpoints."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from tests.conftest import CIFAR_SUBSET, load_script


@pytest.fixture(scope="module")
def agreement_script():
    return load_script("benchmarks", "prediction_agreement")


def test_agreement_counts_the_images_only_one_model_gets_right(agreement_script):
    labels = torch.tensor([0, 1, 2, 3])
    a = torch.tensor([0, 1, 0, 0])  # right on images 0 and 1
    b = torch.tensor([0, 0, 2, 0])  # right on images 0 and 2
    r = agreement_script.agreement(a, b, labels)
    assert (r["acc_a"], r["acc_b"]) == (50.0, 50.0)
    assert (r["right_only_a"], r["right_only_b"]) == (25.0, 25.0)
    assert r["predictions_differ"] == 50.0  # images 1 and 2; on image 3 both say 0
    assert r["delta_sd_from_test_set"] == pytest.approx(100 * math.sqrt(0.5 / 4))
    same = agreement_script.agreement(a, a, labels)
    assert same["predictions_differ"] == 0 and same["delta_sd_from_test_set"] == 0


def _checkpoint(tmp_path, seed: int):
    pl.seed_everything(seed)
    model = ImageClassifier("resnet20", lr=0.05)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(model, CIFAR10DataModule(CIFAR_SUBSET, batch_size=8))
    path = tmp_path / f"seed{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_command_reads_pairs_of_checkpoints(agreement_script, tmp_path, capsys):
    a, b = _checkpoint(tmp_path, 0), _checkpoint(tmp_path, 1)
    out = agreement_script.main(["--checkpoints", str(a), str(b), str(a), str(a), "--json", str(tmp_path / "ag.json")])
    first, same = out["pairs"]
    assert first["images"] == 932  # the subset's test split
    assert first["predictions_differ"] > 0
    assert same["acc_a"] == same["acc_b"] == first["acc_a"] and same["predictions_differ"] == 0
    assert json.loads((tmp_path / "ag.json").read_text())["pairs"] == out["pairs"]
    assert f"| {a} | {b} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        agreement_script.main(["--checkpoints", str(a)])
