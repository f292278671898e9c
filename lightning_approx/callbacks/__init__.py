"""Lightning callbacks: when to patch, when to move the schedules, what to log and save."""

from lightning_approx.callbacks.approx_backward import ApproxBackward
from lightning_approx.callbacks.kernel_rescaling import KernelRescaling

__all__ = ["ApproxBackward", "KernelRescaling"]
