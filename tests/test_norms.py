"""The single-pass norm helpers equal the straightforward reductions in every layout."""

from __future__ import annotations

import pytest
import torch

from lightning_approx.ops.norms import plane_sq_norms, sample_norms


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norms_match_reference(memory_format, dtype):
    t = torch.randn(5, 6, 7, 3).to(dtype).contiguous(memory_format=memory_format)
    ref = t.double()
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(sample_norms(t).double(), torch.linalg.vector_norm(ref, dim=(1, 2, 3)), **tol)
    torch.testing.assert_close(plane_sq_norms(t).double(), ref.square().sum((2, 3)), **tol)
    assert sample_norms(t).dtype == torch.promote_types(dtype, torch.float32)


def test_sample_norms_of_a_strided_view():
    t = torch.randn(4, 6, 5, 5)[:, ::2]
    torch.testing.assert_close(sample_norms(t), torch.linalg.vector_norm(t, dim=(1, 2, 3)))
