"""benchmarks/conv_channels.py: it times the three dense products of every distinct conv shape at
full size and on the cut operands, and the cut operands really are smaller."""

from __future__ import annotations

import json

import pytest
from torch import nn

from tests.conftest import load_script


@pytest.fixture(scope="module")
def conv_channels():
    return load_script("benchmarks", "conv_channels")


def test_every_shape_and_product_is_timed(conv_channels, tmp_path, capsys):
    out = tmp_path / "conv.json"
    result = conv_channels.main(["--batch-size", "4", "--reps", "2", "--warmup", "1", "--channels-last",
                                 "--json", str(out)])
    # ResNet-20: the stem, then per stage the plain 3x3 shape, and the strided first conv of stages 2 and 3.
    assert [row["layers"][0] for row in result["shapes"]] == [
        "conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    assert len(result["shapes"][1]["layers"]) == 6
    for row in result["shapes"]:
        for which in conv_channels.PRODUCTS:
            assert all(row["ms"][which][cut] > 0 for cut in conv_channels.CUTS)
    assert json.loads(out.read_text())["fraction"] == 0.5
    assert "| layer1.0.conv1 (+5) |" in capsys.readouterr().out


@pytest.mark.parametrize("cut,expected", [("in_channels", ((4, 8, 5, 5), (16, 4, 3, 3), (4, 16, 5, 5))),
                                          ("out_channels", ((4, 16, 5, 5), (8, 8, 3, 3), (4, 8, 5, 5))),
                                          ("batch", ((2, 16, 5, 5), (16, 8, 3, 3), (2, 16, 5, 5)))])
def test_operands_are_cut_along_one_dimension(conv_channels, cut, expected):
    import torch

    conv = nn.Conv2d(16, 16, 3, padding=1, groups=2)
    operands = conv_channels._operands(conv, (4, 16, 5, 5), cut, 0.5, torch.contiguous_format, torch.device("cpu"))
    assert tuple(tuple(t.shape) for t in operands) == expected


def test_fraction_outside_zero_one_is_refused(conv_channels):
    with pytest.raises(SystemExit):
        conv_channels.main(["--fraction", "1.0"])
