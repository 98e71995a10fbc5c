"""GPU-sized cases of the kernel tests: compiled kernels at real model shapes, run only where CUDA is.

Under the Triton interpreter these shapes would take minutes; on a GPU they are where tiling, masking
and accumulation bugs show that tiny shapes can hide. Same test body, same tolerance as the tiny cases.
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="a GPU-sized case: runs on CUDA only")


def gpu_case(*values, id: str):
    """A parametrize entry that runs only on CUDA."""
    return pytest.param(*values, id=f"gpu-{id}", marks=cuda_only)
