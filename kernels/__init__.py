"""Triton kernels of ptune-rt, installed as ``ptune_rt.kernels``.

Each module holds the ``@triton.jit`` kernels of one fused op, the list of shipped
launch configurations, and thin launch wrappers (tensors in, tensors out). Nothing
here knows about ``nn.Module``, autograd or transformers.
"""
