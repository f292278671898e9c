"""benchmarks/backward_breakdown.py: it times every piece of a sampled backward, and puts the
functions it wraps back."""

from __future__ import annotations

import pytest

import lightning_approx.layers as layers
import lightning_approx.methods.sampling as sampling
from tests.conftest import load_script


@pytest.fixture(scope="module")
def breakdown():
    return load_script("benchmarks", "backward_breakdown")


def test_every_piece_is_timed_and_the_wrappers_are_removed(breakdown, capsys):
    before = [sampling.conv2d_grad_weight, sampling.kops.gather_scale, layers._Conv2dFunction.backward]
    result = breakdown.main(["--variant", "crs:sample_ratio=0.25", "--batch-size", "8", "--steps", "2",
                             "--warmup", "1"])
    pieces = result["pieces_s"]
    for piece in ("weight-gradient product", "input-gradient product", "gathers (and scaling)", "norms of x / W",
                  "norms of dy", "pair selection"):
        assert pieces[piece] > 0, piece
    total = "sampled layers' backward (all of the above and more)"
    assert pieces[total] >= sum(v for k, v in pieces.items() if k != total)  # the pieces run inside it
    assert [sampling.conv2d_grad_weight, sampling.kops.gather_scale, layers._Conv2dFunction.backward] == before
    assert "whole backward, exact" in capsys.readouterr().out


def test_a_method_outside_the_sampling_family_is_refused(breakdown):
    with pytest.raises(SystemExit, match="times the pieces of one of"):
        breakdown.main(["--variant", "grad_prune", "--steps", "1"])
