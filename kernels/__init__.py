"""Fused Triton kernels (installed as mscl_stream.kernels), each beside its torch reference."""
