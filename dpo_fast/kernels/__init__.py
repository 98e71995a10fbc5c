"""Triton kernels, one small file per kernel with its launcher.

Only kernels live here; the autograd functions built on them are in `dpo_fast.ops`.
Importing this package does not import triton: each kernel module does, on first use.
"""
