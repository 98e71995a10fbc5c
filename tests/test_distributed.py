"""compute_dpo_loss under data-parallel wrappers, on 2 CPU processes (torchrun, gloo).

Each rank takes half of the pairs; DDP and FSDP2 average the gradients, so every rank must end with
the gradients of one process on the whole batch. A DDP model's bare `.module` keeps per-rank
gradients: that must not pass silently (a warning names the fix).
"""
import os
import subprocess
import sys

import pytest
import torch

import dpo_fast
from multiproc.common import make_batch, make_model

HERE = os.path.dirname(os.path.abspath(__file__))


def run_workers(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE,
                                                                              os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "multiproc", script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def single_process_grads() -> dict:
    model = make_model()
    dpo_fast.patch(model)
    loss, _ = dpo_fast.compute_dpo_loss(model, make_batch(), beta=0.1)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_grads()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_wrapped_model_gradients_equal_one_process(mode, reference, tmp_path):
    run_workers("compute_loss_worker.py", mode, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["grads"].keys() == reference.keys(), sorted(set(got["grads"]) ^ set(reference))
        worst = max(rel(got["grads"][n], reference[n]) for n in reference)
        assert worst < 1e-5, (mode, worst)
        assert not any("not wrapped" in w for w in got["warnings"])


def test_bare_module_under_ddp_warns(reference, tmp_path):
    run_workers("compute_loss_worker.py", "inner", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert any("not wrapped for data parallelism" in w and ".module" in w for w in got["warnings"])
    # and indeed the ranks' gradients differ (each is its own half's)
    name = next(iter(reference))
    assert rel(ranks[0]["grads"][name], ranks[1]["grads"][name]) > 1e-3
