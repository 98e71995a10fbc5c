"""A seed for code under test that takes one (data generators, the trainer), drawn from torch's RNG.

conftest.py seeds torch per test, so these seeds are fresh per test and reproducible from
DPO_FAST_TEST_SEED when debugging.
"""
import torch


def fresh_seed() -> int:
    return int(torch.randint(0, 2**30, ()).item())
