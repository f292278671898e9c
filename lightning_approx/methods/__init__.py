"""The approximation methods, one family per module, and the registry that builds them."""

from lightning_approx.methods.base import Method
from lightning_approx.methods.batch_crs import BatchCRS
from lightning_approx.methods.forward_sampling import ForwardSampling
from lightning_approx.methods.grad_prune import GradPrune
from lightning_approx.methods.patch_grad import PatchGrad
from lightning_approx.methods.pipeline import Pipeline
from lightning_approx.methods.registry import METHODS, build_method, parse_spec, register, spec_label
from lightning_approx.methods.relu_mask import ReluMask
from lightning_approx.methods.sampling import CRS, BernoulliCRS, TopK

__all__ = [
    "CRS",
    "METHODS",
    "BatchCRS",
    "BernoulliCRS",
    "ForwardSampling",
    "GradPrune",
    "Method",
    "PatchGrad",
    "Pipeline",
    "ReluMask",
    "TopK",
    "build_method",
    "parse_spec",
    "register",
    "spec_label",
]
