"""The memory-layout helpers give the plain ops' values in the input's layout."""

from __future__ import annotations

import pytest
import torch

from lightning_approx.ops.layout import batch_sum, channel_window, is_channels_last


@pytest.mark.parametrize("shape,channels_last", [((5, 3, 4, 6), False), ((5, 3, 4, 6), True), ((7, 9), False)],
                         ids=["nchw", "channels_last", "2d"])
def test_batch_sum_is_the_sum_over_the_batch_in_the_same_layout(shape, channels_last):
    t = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    total = batch_sum(t)
    torch.testing.assert_close(total, t.sum(0, keepdim=True))
    assert is_channels_last(total) == channels_last


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_channel_window_is_the_slices_concatenated(channels_last):
    t = torch.randn(2, 6, 3, 3)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    window = channel_window(t, (slice(4, 6), slice(0, 1)))
    torch.testing.assert_close(window, torch.cat([t[:, 4:6], t[:, :1]], 1))
    assert is_channels_last(window) == channels_last
