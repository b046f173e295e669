"""Fast kernels and their pure-PyTorch references.

Layout: each op has a reference (the spec, plain PyTorch, runs anywhere), optionally a Triton version under
``kernels/triton/``, and a dispatcher that picks one at call time (never at import time): Triton on CUDA
tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (how CI checks the kernels), the reference otherwise.
Kernels never import model code.
"""
