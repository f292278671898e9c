"""benchmarks/forward_breakdown.py: it times every piece of forward_sampling's sampled forward
per layer width, and puts the functions it wraps back."""

from __future__ import annotations

import pytest

import lightning_approx.methods.forward_sampling as forward_sampling
from lightning_approx.ops.conv import ConvGeometry
from tests.conftest import load_script


@pytest.fixture(scope="module")
def breakdown():
    return load_script("benchmarks", "forward_breakdown")


def test_every_piece_is_timed_per_width_and_the_wrappers_are_removed(breakdown, capsys):
    before = [forward_sampling.kops.plane_sq_norms, forward_sampling.select_channels, ConvGeometry.forward,
              forward_sampling.ForwardSampling.conv2d_forward]
    result = breakdown.main(["--batch-size", "8", "--steps", "2", "--warmup", "1"])
    pieces = result["pieces_s"]
    for width in (16, 32, 64):
        for piece in ("exact conv forward", "channel scores (norms of x and W)", "gather of the kept channels of x",
                      "selection", "conv on the kept channels"):
            assert pieces[f"{width}/{piece}"] > 0, (width, piece)
        whole = pieces[f"{width}/{breakdown.WHOLE}"]
        assert whole >= sum(v for k, v in pieces.items() if k.startswith(f"{width}/") and k != f"{width}/"
                            f"{breakdown.WHOLE}" and "exact" not in k)  # the pieces run inside it
    assert [forward_sampling.kops.plane_sq_norms, forward_sampling.select_channels, ConvGeometry.forward,
            forward_sampling.ForwardSampling.conv2d_forward] == before
    assert "whole forward, exact" in capsys.readouterr().out


def test_another_method_is_refused(breakdown):
    with pytest.raises(SystemExit, match="times the pieces of forward_sampling"):
        breakdown.main(["--variant", "crs", "--steps", "1"])
