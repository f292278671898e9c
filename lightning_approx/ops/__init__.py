"""The approximate Conv2d / Linear operators: geometry, exact partial backwards, sampling
primitives, the autograd functions that run a method's backward, and work accounting."""
