"""Data-parallel and sharded training on 2 CPU processes (torchrun, gloo).

compute_dpo_loss under DDP and FSDP2: each rank takes half of the pairs; the wrappers average the
gradients, so every rank must end with the gradients of one process on the whole batch. A DDP model's
bare `.module` keeps per-rank gradients: that must not pass silently (a warning names the fix).

`dpo-fast train` / `sft` under torchrun at --batch-size b must be the one-process run at 2b: the same
pairs in the same global batches, the same losses and the same adapter (within 1e-4), metrics.jsonl
written once; also with --fsdp, gradient accumulation, an uneven last batch, evaluation, precomputed
references, Ctrl-C and resume. TRL's DPOTrainer with enable() must equal TRL without it under DDP.

A torchrun launch costs tens of seconds of start-up on a 2-core machine, so there are two: `dpo-fast
train` itself (`ga_runs`), and one worker launch that runs every other case in the same two processes
(`worker_runs`, tests/multiproc/train_worker.py); the tests read what they wrote.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import dpo_fast
from dpo_fast.cli import main as cli_main
from dpo_fast.demo_task import demo_tokenizer, make_preference_dataset, tiny_llama_config
from dpo_fast.train import distributed
from dpo_fast.train.distributed import Parallel, loss_scale
from dpo_fast.train.logging import read_metrics
from multiproc.common import make_batch, make_model

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(*args: str, nproc: int = 2, timeout: int = 900) -> str:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node N ARGS`; returns its output. On a
    timeout the workers are sent SIGABRT first, so that their Python tracebacks (faulthandler) show the hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in workers:
            os.kill(int(pid), signal.SIGABRT)
        out, err = proc.communicate(timeout=120)
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{out[-3000:]}\n{err[-20000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return out + err


def run_workers(script: str, *args: str, nproc: int = 2, timeout: int = 900) -> str:
    return torchrun(os.path.join(HERE, "multiproc", script), *args, nproc=nproc, timeout=timeout)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------ compute_dpo_loss
def single_process_grads() -> dict:
    model = make_model()
    dpo_fast.patch(model)
    loss, _ = dpo_fast.compute_dpo_loss(model, make_batch(), beta=0.1)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_grads()


@pytest.fixture(scope="module")
def wrapped_runs(worker_runs):
    """compute_dpo_loss's per-rank losses and gradients from the worker launch (see `worker_runs`)."""
    return worker_runs[0] / "wrapped"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_wrapped_model_gradients_equal_one_process(mode, reference, wrapped_runs):
    ranks = [torch.load(wrapped_runs / f"{mode}_rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert got["grads"].keys() == reference.keys(), sorted(set(got["grads"]) ^ set(reference))
        worst = max(rel(got["grads"][n], reference[n]) for n in reference)
        assert worst < 1e-5, (mode, worst)
        assert not any("not wrapped" in w for w in got["warnings"])


def test_bare_module_under_ddp_warns(reference, wrapped_runs):
    ranks = [torch.load(wrapped_runs / f"inner_rank{r}.pt") for r in range(2)]
    for got in ranks:
        assert any("not wrapped for data parallelism" in w and ".module" in w for w in got["warnings"])
    # and indeed the ranks' gradients differ (each is its own half's)
    name = next(iter(reference))
    assert rel(ranks[0]["grads"][name], ranks[1]["grads"][name]) > 1e-3


# ------------------------------------------------------------------------------------ dpo-fast train
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A tiny local checkpoint and preference files: `ga` (26 rows: 21 train, 5 eval) and `uneven` (9 rows).

    With 2 processes x 2 pairs, `ga`'s 21 training pairs make global batches 4,4,4,4,4,1: the last of each
    epoch leaves process 1 an empty share, and so do `uneven`'s 9 (4,4,1)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cli")
    tok = demo_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok), hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=2,
                                                               num_key_value_heads=2))
    model.save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    seed = int(torch.randint(0, 10_000, ()))
    for name, n in (("ga", 26), ("uneven", 9)):
        rows = make_preference_dataset(n, seed=seed + n)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root, seed


def common_args(root, data: str, out: str, *extra: str) -> list:
    return ["--model", str(root / "ckpt"), "--data", str(root / f"{data}.jsonl"), "--output", str(out),
            "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--no-plot", "--max-length", "64",
            "--optimizer", "adamw", *extra]


def train_records(out) -> list:
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def adapter(out) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter_model.safetensors"))


def adapter_rel_diff(a: dict, b: dict) -> float:
    """Max over tensors of max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30))
               for k in a)


def assert_same_run(two, one, *, steps, keys=("loss", "rewards/margins", "logps/chosen", "grad_norm",
                                              "logits/chosen", "entropy")) -> None:
    """Two runs with the same optimizer steps: each step logged once, the same per-step values, the same adapter."""
    recs2, recs1 = train_records(two), train_records(one)
    assert [r["step"] for r in recs2] == list(steps) == [r["step"] for r in recs1]
    for r2, r1 in zip(recs2, recs1):
        assert r2["epoch"] == r1["epoch"]
        for key in keys:
            if key in r1:
                assert abs(r2[key] - r1[key]) <= 1e-4 * max(1.0, abs(r1[key])), (r1["step"], key, r2[key], r1[key])
    assert adapter_rel_diff(adapter(two), adapter(one)) <= 1e-4


GA_ARGS = ("--grad-accum", "2", "--max-steps", "4", "--save-steps", "2", "--eval-fraction", "0.2",
           "--precompute-ref", "--scheduler", "linear", "--warmup-ratio", "0.25", "--seed")


@pytest.fixture(scope="module")
def ga_runs(cli_inputs, tmp_path_factory):
    """`dpo-fast train` with --grad-accum 2, eval, precomputed reference: 1 process at batch 4, and 2 processes
    at batch 2 under torchrun (its outputs kept in `two_done` before the resume test writes into `two`)."""
    root, seed = cli_inputs
    out = tmp_path_factory.mktemp("ga")
    assert cli_main(["train", *common_args(root, "ga", out / "one", "--batch-size", "4", *GA_ARGS, str(seed))]) == 0
    printed = torchrun("-m", "dpo_fast", "train",
                       *common_args(root, "ga", out / "two", "--batch-size", "2", *GA_ARGS, str(seed)))
    shutil.copytree(out / "two", out / "two_done")
    return out, printed


def test_train_on_two_processes_equals_one_process_at_twice_the_batch(ga_runs):
    out, printed = ga_runs
    assert "global batch: 2 pairs per micro-batch x 2 grad-accum x 2 processes = 8 pairs" in printed
    assert printed.count("dpo: 4 steps") == 1  # one process reports
    assert_same_run(out / "two_done", out / "one", steps=range(1, 5))
    evals = [(r2, r1) for r2, r1 in zip(read_metrics(out / "two_done" / "metrics.jsonl"),
                                        read_metrics(out / "one" / "metrics.jsonl")) if "eval_loss" in r1]
    assert len(evals) == 2  # before the first step and after the last
    for r2, r1 in evals:
        assert r2["step"] == r1["step"]
        for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
            assert abs(r2[key] - r1[key]) <= 1e-4 * max(1.0, abs(r1[key])), (key, r2[key], r1[key])
    # the reference log-probs were computed in shards and gathered in order: the one-process cache's values
    caches = [sorted((out / run / "ref_cache").iterdir()) for run in ("two_done", "one")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and len(caches[0]) == 2
    for p2, p1 in zip(*caches):
        a, b = torch.load(p2), torch.load(p1)
        assert torch.allclose(a["chosen"], b["chosen"], rtol=1e-5, atol=1e-4)
        assert torch.allclose(a["rejected"], b["rejected"], rtol=1e-5, atol=1e-4)
    assert os.path.isfile(out / "two_done" / "checkpoint-2" / "trainer_state.pt")
    assert len(torch.load(out / "two_done" / "checkpoint-2" / "trainer_state.pt", weights_only=False)["rng_per_rank"]) == 2


def test_resume_on_two_processes_continues_the_run(ga_runs, worker_runs):
    """The 2-process run resumed from its step-2 checkpoint (in the worker launch): steps 3 and 4 again, equal
    to the uninterrupted run, each step logged once."""
    out, _ = ga_runs
    assert_same_run(out / "two", out / "two_done", steps=range(1, 5))
    assert_same_run(out / "two", out / "one", steps=range(1, 5))


UNEVEN_ARGS = ("--batch-size", "2", "--max-steps", "6", "--scheduler", "constant", "--warmup-ratio", "0", "--seed")


@pytest.fixture(scope="module")
def worker_runs(cli_inputs, ga_runs, tmp_path_factory):
    """One torchrun launch of tests/multiproc/train_worker.py: compute_dpo_loss under DDP / FSDP2 / a bare
    .module; the `ga` run resumed from its step-2 checkpoint; on `uneven` (9 pairs: global batches 4, 4, 1)
    a DDP `train`, the same with --fsdp, the same interrupted by Ctrl-C on process 1 then resumed, an `sft`,
    a 4-bit --fsdp `train`, the 4-bit sharded load's packed weights; TRL's DPOTrainer with and without
    enable(). Returns (out dir, seed)."""
    root, seed = cli_inputs
    ga_out, _ = ga_runs
    out = tmp_path_factory.mktemp("many")
    for sub in ("wrapped", "trl"):
        (out / sub).mkdir()
    args = lambda name, *extra: common_args(root, "uneven", out / name, *UNEVEN_ARGS, str(seed), *extra)  # noqa: E731
    plan = [
        {"kind": "compute_loss", "modes": "ddp,fsdp2,inner", "out": str(out / "wrapped")},
        {"kind": "cli", "argv": ["train", *common_args(root, "ga", ga_out / "two", "--batch-size", "2", *GA_ARGS,
                                                      str(seed), "--resume", str(ga_out / "two" / "checkpoint-2"))]},
        {"kind": "cli", "argv": ["train", *args("ddp")]},
        {"kind": "cli", "argv": ["train", *args("fsdp"), "--fsdp"]},
        {"kind": "ctrl_c", "argv": ["train", *args("ctrl_c")], "at_call": 2},
        {"kind": "cli", "argv": ["sft", *args("sft", "--lr", "1e-2")]},
        {"kind": "cli", "argv": ["train", *common_args(root, "uneven", out / "fsdp4", "--batch-size", "2",
                                                      "--max-steps", "2", "--load-in-4bit", "--fsdp")]},
        {"kind": "packed", "model": str(root / "ckpt"), "out": str(out / "packed.pt")},
        {"kind": "syncs", "argv": ["train", *common_args(root, "uneven", out / "unused", "--batch-size", "1",
                                                        "--max-steps", "2")], "out": str(out / "syncs")},
        {"kind": "cli", "argv": ["train", *args("dropout", "--lora-dropout", "0.2", "--save-steps", "3")]},
        {"kind": "copy", "src": str(out / "dropout"), "dst": str(out / "dropout_done")},
        {"kind": "cli", "argv": ["train", *args("dropout", "--lora-dropout", "0.2", "--save-steps", "3", "--resume",
                                                str(out / "dropout" / "checkpoint-3"))]},
    ]
    if importlib.util.find_spec("trl") is not None:
        plan.append({"kind": "trl", "out": str(out / "trl")})
    (out / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    run_workers("train_worker.py", str(out / "plan.json"))
    return out, seed


@pytest.fixture(scope="module")
def uneven_one_process(cli_inputs, tmp_path_factory):
    """The 1-process runs at batch 4 that the 2-process runs of `worker_runs` must equal."""
    root, seed = cli_inputs
    out = tmp_path_factory.mktemp("one")
    common = lambda name, *extra: common_args(root, "uneven", out / name, *UNEVEN_ARGS, str(seed), *extra)  # noqa
    assert cli_main(["train", *common("train"), "--batch-size", "4"]) == 0
    assert cli_main(["sft", *common("sft", "--lr", "1e-2"), "--batch-size", "4"]) == 0
    return out


def test_uneven_global_batches_equal_one_process(worker_runs, uneven_one_process):
    """9 pairs in global batches of 4: the last micro-batch of each epoch has 1 pair, process 1's share is
    empty (it runs one pair at weight 0); the steps still equal one process's."""
    out, _ = worker_runs
    assert_same_run(out / "ddp", uneven_one_process / "train", steps=range(1, 7))


def test_fsdp_train_equals_one_process(worker_runs, uneven_one_process):
    out, _ = worker_runs
    assert_same_run(out / "fsdp", uneven_one_process / "train", steps=range(1, 7))
    state = torch.load(out / "fsdp" / "checkpoint-6" / "trainer_state.pt", weights_only=False)
    assert state["state"]["world_size"] == 2 and state["optimizer"]["state"]  # gathered whole, by name


def test_sft_on_two_processes_equals_one_process(worker_runs, uneven_one_process):
    """The SFT loss is a mean over tokens: each process's share is weighted by its tokens, not its pairs."""
    out, _ = worker_runs
    assert_same_run(out / "sft", uneven_one_process / "sft", steps=range(1, 7), keys=("loss", "logps/chosen",
                                                                                       "grad_norm", "num_tokens"))


def test_ctrl_c_on_one_process_stops_all_and_resume_finishes(worker_runs, uneven_one_process):
    """SIGINT reaches process 1 only, during step 2: both processes stop after step 2, one checkpoint is
    written, and the resumed run ends where an uninterrupted one does."""
    out, _ = worker_runs
    report = json.loads((out / "ctrl_c" / "ctrl_c.json").read_text())
    assert report == {"stop_step": 2, "interrupted": True, "resumed_exit": 0}
    assert sorted(p.name for p in (out / "ctrl_c").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]
    assert_same_run(out / "ctrl_c", uneven_one_process / "train", steps=range(1, 7))


def test_gradient_accumulation_does_not_add_gradient_collectives(worker_runs):
    """2 optimizer steps at --grad-accum 1 and 2: DDP's bucket all-reduces and FSDP's reduce-scatters happen once
    per step either way (no_sync / set_requires_gradient_sync on the micro-batches before the last)."""
    counts = json.loads((worker_runs[0] / "syncs.json").read_text())
    assert counts["ddp_accum1"] > 0 and counts["fsdp_accum1"] > 0, counts
    assert counts["ddp_accum2"] == counts["ddp_accum1"] and counts["fsdp_accum2"] == counts["fsdp_accum1"], counts


def test_resume_restores_every_process_random_state(worker_runs):
    """With LoRA dropout each process draws its own masks: resumed from step 3, steps 4-6 equal the uninterrupted
    run only if every process gets its own random state back."""
    out, _ = worker_runs
    assert_same_run(out / "dropout", out / "dropout_done", steps=range(1, 7))


def test_fsdp_4bit_loads_the_same_packed_weights_and_trains(worker_runs, cli_inputs):
    """--fsdp --load-in-4bit: the sharded packed weights (bf16 storage, half per process) are bitwise those
    of the unsharded 4-bit load, and the first steps train from the reference (loss log 2)."""
    from dpo_fast.train.model_loading import load_base_model

    pytest.importorskip("bitsandbytes")
    out, _ = worker_runs
    root, _ = cli_inputs
    got = torch.load(out / "packed.pt")
    base = load_base_model(str(root / "ckpt"), load_in_4bit=True, device=torch.device("cpu"))
    layer = base.model.layers[0].self_attn.q_proj
    assert torch.equal(got["packed"].flatten(), layer.weight.data.view(torch.uint8).flatten())
    assert torch.equal(got["absmax"], layer.weight.quant_state.absmax)
    assert torch.equal(got["nested_absmax"], layer.weight.quant_state.state2.absmax)
    assert got["fused_op_serves_it"]  # dpo_fast's QLoRA op finds the layer's quantization state
    assert got["local_rows"] * 2 == got["rows"]
    records = train_records(out / "fsdp4")
    assert [r["step"] for r in records] == [1, 2] and abs(records[0]["loss"] - 0.6931472) < 1e-5
    assert os.path.isfile(out / "fsdp4" / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------ TRL under DDP
def test_trl_dpo_trainer_with_enable_under_ddp_equals_plain_trl(worker_runs):
    """TRL's DPOTrainer on 2 processes (accelerate's DDP), one step from the same copied-in weights: with
    enable() the logged step-1 metrics and the all-reduced LoRA gradients equal plain TRL's, on both ranks."""
    pytest.importorskip("trl")
    out = worker_runs[0] / "trl"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        plain, fast = got["plain"], got["fast"]
        assert plain["processes"] == fast["processes"] == 2
        assert plain["wrapper"] == fast["wrapper"] == "DistributedDataParallel"
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "logits/chosen", "logits/rejected", "entropy"):
            a, b = plain["log"][key], fast["log"][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (key, a, b)
        assert plain["grads"].keys() == fast["grads"].keys() and len(plain["grads"]) == 2 * 7 * 2
        worst = max(rel(fast["grads"][n], plain["grads"][n]) for n in plain["grads"])
        assert worst <= 1e-4, worst
    # DDP averaged the gradients: both ranks hold the same ones
    for name, g in ranks[0]["fast"]["grads"].items():
        assert torch.equal(g, ranks[1]["fast"]["grads"][name]), name


# ------------------------------------------------------------------------------------ one-process logic
def test_shares_cover_every_item_once_in_order():
    for world in (1, 2, 3, 4):
        for n in range(0, 11):
            shares = [Parallel(rank=r, world_size=world).share(list(range(n))) for r in range(world)]
            assert sum(shares, []) == list(range(n))
            sizes = [len(s) for s in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert Parallel(world_size=world).most_batches(n, 2) == max(-(-k // 2) for k in sizes)


def test_loss_scale_makes_the_average_of_processes_the_global_mean():
    """Per-pair losses split unevenly over 3 processes (one share empty): the average of the processes'
    scaled means is the mean over all pairs, in float64."""
    for _ in range(20):
        n = int(torch.randint(1, 9, ()))
        losses = torch.rand(n, dtype=torch.float64)
        world = 3
        total = 0.0
        for r in range(world):
            par = Parallel(rank=r, world_size=world)
            part = losses[par.share_bounds(n)[0]:par.share_bounds(n)[1]]
            mean = part.mean() if len(part) else torch.tensor(0.5, dtype=torch.float64)  # an empty share's dummy
            total += float(mean) * loss_scale(par, float(len(part)), float(n))
        assert abs(total / world - float(losses.mean())) < 1e-12


def reduce_over_two(share_a, share_b):
    """`reduce_micro_batches` of process 0 holding share_a while process 1 holds share_b (all-reduce = sum)."""
    sent = []

    class Record(Parallel):
        def all_sum(self, values):
            sent.append(list(values))
            return list(values)

    Record(rank=1, world_size=1).reduce_micro_batches([share_b])  # world 1: its count check passes alone
    peer = iter(sent)

    class Sum(Parallel):
        def all_sum(self, values):
            return [x + y for x, y in zip(values, next(peer))]

    return Sum(rank=0, world_size=2).reduce_micro_batches([share_a])


def test_micro_batch_metrics_are_weighted_like_one_process():
    """One micro-batch split over two processes: the pair metrics weighted by pairs, TRL's token metrics by
    their tokens, the loss by its weight (tokens for SFT), totals summed; an empty share counts for nothing."""
    a = ({"loss": 1.0, "rewards/margins": 2.0, "entropy": 3.0, "num_tokens": 7.0}, 3.0, 30.0, 40.0, {"entropy": 11.0})
    b = ({"loss": 4.0, "rewards/margins": 5.0, "entropy": 6.0, "num_tokens": 9.0}, 1.0, 10.0, 20.0, {"entropy": 5.0})
    [(merged, pairs)], tokens = reduce_over_two(a, b)
    assert pairs == 4.0 and tokens == 60.0
    assert merged["loss"] == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)
    assert merged["rewards/margins"] == pytest.approx((2.0 * 3 + 5.0 * 1) / 4)
    assert merged["entropy"] == pytest.approx((3.0 * 11 + 6.0 * 5) / 16)
    assert merged["num_tokens"] == 16.0
    empty = ({"loss": 9.0, "rewards/margins": 9.0, "entropy": 9.0, "num_tokens": 9.0}, 0.0, 0.0, 0.0, {"entropy": 0.0})
    [(alone, pairs)], tokens = reduce_over_two(a, empty)
    assert alone == {"loss": 1.0, "rewards/margins": 2.0, "entropy": 3.0, "num_tokens": 7.0} and pairs == 3.0


def test_metric_weights_count_scored_tokens():
    batch = make_batch()
    got = distributed.metric_weights(batch)
    scored = (batch["completion_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()).sum(1)
    half = scored.numel() // 2
    assert got["logits/chosen"] == float(scored[:half].sum()) and got["logits/rejected"] == float(scored[half:].sum())
    assert got["entropy"] == got["mean_token_accuracy"] == float(scored.sum())


def test_bad_multi_process_options_are_clear_errors(monkeypatch, tmp_path):
    from dpo_fast.train import DPOFastTrainer, TrainConfig

    with pytest.raises(ValueError, match="fsdp: sharding is implemented for LoRA"):
        TrainConfig(fsdp=True, use_lora=False)
    with pytest.raises(ValueError, match="merge: a sharded"):
        TrainConfig(fsdp=True, merge=True)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        DPOFastTrainer(TrainConfig(model="m", data=[{}], output=str(tmp_path), fsdp=True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="all 2 processes on one device"):
        distributed.init_parallel("cuda:0")
