"""The approximation methods, one family per module, and the registry that builds them."""

from lightning_approx.methods.base import Method
from lightning_approx.methods.pipeline import Pipeline
from lightning_approx.methods.registry import METHODS, build_method, parse_spec, register, spec_label
from lightning_approx.methods.sampling import CRS, BernoulliCRS, TopK

__all__ = ["CRS", "BernoulliCRS", "TopK", "METHODS", "Method", "Pipeline", "build_method", "parse_spec", "register", "spec_label"]
