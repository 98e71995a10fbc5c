"""A seed for code under test that takes one (data generators, the trainer), drawn from torch's RNG.

conftest.py seeds torch per test from the test's node id and the run's base seed
(DPO_FAST_TEST_SEED, default 0), so these seeds differ between tests and are reproducible.
"""
import torch


def fresh_seed() -> int:
    return int(torch.randint(0, 2**30, ()).item())
