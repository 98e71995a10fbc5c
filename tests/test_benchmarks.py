"""The benchmark suite runs on CPU with tiny shapes, writes its table, JSON and plots, and survives
unavailable methods and out-of-memory cells. (Speed and memory numbers themselves are GPU facts; the
CPU run only proves the machinery works and its numbers are finite.)"""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_FIELDS = {"level", "case", "method", "tokens", "status", "median_ms", "tokens_per_s", "peak_extra_mb",
               "peak_total_mb", "ratio_time", "ratio_memory", "note", "params"}
ENV_FIELDS = {"date", "command", "device", "gpu", "driver", "torch", "triton", "transformers", "peft", "trl",
              "bitsandbytes", "cuda", "python"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_ok_cell(cell):
    for key in ("median_ms", "tokens_per_s", "peak_extra_mb"):
        v = cell[key]
        assert v is not None and math.isfinite(v) and v >= 0, (cell["case"], cell["method"], key, v)
    assert cell["median_ms"] > 0 and cell["tokens"] > 0
    assert cell["tokens_per_s"] == pytest.approx(cell["tokens"] / (cell["median_ms"] / 1e3), rel=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the --quick GPU preset takes minutes; run it by hand")
def test_quick_suite_on_cpu(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert "NOT GPU numbers" in stdout and "need a GPU" in stdout
    assert "median ms" in stdout and "tokens/s" in stdout and "peak extra MB" in stdout and "x time" in stdout

    report = json.loads((out / "results.json").read_text())
    assert report["gpu_numbers"] is False and "need a GPU" in report["notice"]
    assert ENV_FIELDS <= set(report["environment"])
    assert report["environment"]["torch"] == torch.__version__
    assert "--quick" in report["environment"]["command"]
    cells = report["cells"]
    assert cells and all(set(c) == CELL_FIELDS for c in cells)
    for c in cells:
        if c["status"] == "ok":
            _assert_ok_cell(c)
        else:
            assert c["median_ms"] is None and c["peak_extra_mb"] is None
    ok = {(c["level"], c["case"].split()[1] if c["level"] == "head" else "step", c["method"])
          for c in cells if c["status"] == "ok"}
    # the three levels ran, the baseline and dpo_fast were measured at each
    for key in [("head", "logps", "naive"), ("head", "logps", "dpo_fast"), ("head", "dpo", "naive"),
                ("step", "step", "naive"), ("step", "step", "dpo_fast")]:
        assert key in ok, key
    # ratios: dpo_fast is 1 against itself; every ok baseline has a finite positive ratio
    for c in cells:
        if c["status"] == "ok" and any(d["method"] == "dpo_fast" and d["status"] == "ok" and d["case"] == c["case"]
                                       for d in cells):
            assert math.isfinite(c["ratio_time"]) and c["ratio_time"] > 0
            if c["method"] == "dpo_fast":
                assert c["ratio_time"] == pytest.approx(1.0) and c["ratio_memory"] == pytest.approx(1.0)
    # a materialized [N, V] fp32 log-softmax is in the naive head's peak (the meter sees real allocations)
    for c in cells:
        if c["level"] == "head" and c["method"] == "naive" and c["params"]["kind"] == "logps" and c["status"] == "ok":
            assert c["peak_extra_mb"] * 2**20 >= c["tokens"] * c["params"]["vocab"] * 4
    # methods that cannot run here are reported as skipped with a reason, never as errors
    assert all(c["note"] for c in cells if c["status"] == "skipped")
    assert not [c for c in cells if c["status"] == "error"], [c for c in cells if c["status"] == "error"]

    fit = report["fit"]
    assert {r["method"] for r in fit} >= {"naive", "dpo_fast"}
    for r in fit:
        assert r["status"] == "ok" and r["simulated"] is True and r["probes"] >= 1
        assert r["best"] is not None and r["best"] % 256 == 0 and 256 <= r["best"] <= r["limit"]

    assert report["plots"]
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    assert any(n.startswith("fit_") for n in report["plots"]) and any(n.startswith("head_") for n in report["plots"])


def _run_head(tmp_path, methods, tokens=("64", "96")):
    from benchmarks import suite

    return suite.run(["--level", "head", "--kinds", "logps", "--modes", "frozen", "--tokens", *tokens,
                      "--warmup", "0", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path),
                      "--methods", *methods], log=lambda s: None)


def test_unavailable_method_is_skipped(tmp_path, monkeypatch):
    from benchmarks import methods_head as mh

    ghost = mh.HeadMethod("ghost", ("logps",), mh._needs("no_such_module_for_dpo_fast_bench"),
                          mh._per_token_step(mh._naive_logps))
    monkeypatch.setitem(mh.HEAD_REGISTRY, ("logps", "ghost"), ghost)
    report = _run_head(tmp_path, ["naive", "ghost", "dpo_fast"])
    by = {(c["case"], c["method"]): c for c in report["cells"]}
    assert len(by) == 6
    for case in {c["case"] for c in report["cells"]}:
        assert by[(case, "ghost")]["status"] == "skipped"
        assert "not importable" in by[(case, "ghost")]["note"]
        for m in ("naive", "dpo_fast"):
            assert by[(case, m)]["status"] == "ok"
            _assert_ok_cell(by[(case, m)])


def test_oom_cell_is_recorded_and_run_goes_on(tmp_path, monkeypatch):
    from benchmarks import methods_head as mh

    calls = []

    def build(kind, inp):
        def step():
            calls.append(inp.hidden.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        return step

    monkeypatch.setitem(mh.HEAD_REGISTRY, ("logps", "hog"), mh.HeadMethod("hog", ("logps",), lambda d: None, build))
    # hog is registered last: in each case it runs after dpo_fast; the second case must still be measured
    report = _run_head(tmp_path, ["dpo_fast", "hog"])
    hog = [c for c in report["cells"] if c["method"] == "hog"]
    assert [c["status"] for c in hog] == ["OOM", "OOM"] and sorted(set(calls)) == [64, 96]
    assert all(c["median_ms"] is None and c["peak_extra_mb"] is None for c in hog)
    ours = [c for c in report["cells"] if c["method"] == "dpo_fast"]
    assert [c["status"] for c in ours] == ["ok", "ok"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert [c["status"] for c in data["cells"] if c["method"] == "hog"] == ["OOM", "OOM"]


def test_step_level_oom_and_other_errors_are_cells(tmp_path, monkeypatch):
    from benchmarks import methods_step as ms
    from benchmarks import suite

    def oom_make(model, batch, opt):
        def step():
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return step

    def broken_make(model, batch, opt):
        raise KeyError("boom")

    monkeypatch.setitem(ms.STEP_REGISTRY, "hog", ms.StepMethod("hog", lambda d: None, ms._no_patch, oom_make))
    monkeypatch.setitem(ms.STEP_REGISTRY, "broken", ms.StepMethod("broken", lambda d: None, ms._no_patch, broken_make))
    report = suite.run(["--level", "step", "--step-sizes", "1x16", "--device", "cpu", "--out", str(tmp_path),
                        "--methods", "hog", "broken", "naive"], log=lambda s: None)
    status = {c["method"]: c for c in report["cells"]}
    assert status["hog"]["status"] == "OOM"
    assert status["broken"]["status"] == "error" and "KeyError" in status["broken"]["note"]
    assert status["naive"]["status"] == "ok"
    _assert_ok_cell(status["naive"])


def test_largest_fitting_search():
    from benchmarks.fit import largest_fitting

    for _ in range(20):
        unit = random.choice([1, 256])
        limit = unit * random.randint(1, 200)
        threshold = random.randint(0, limit + 3 * unit)
        probed = []

        def fits(n):
            probed.append(n)
            return n <= threshold

        best, probes = largest_fitting(fits, unit, unit, limit)
        expect = min(limit, threshold // unit * unit)
        assert best == (expect if expect >= unit else None)
        assert probes == len(probed) and all(p % unit == 0 and unit <= p <= limit for p in probed)
        assert probes <= 2 * math.ceil(math.log2(limit // unit + 1)) + 2
    with pytest.raises(ValueError):
        largest_fitting(lambda n: True, 100, 256, 1024)


def test_allocation_meter_counts_fresh_storage_and_enforces_cap():
    from benchmarks.common import AllocationMeter

    meter = AllocationMeter()
    with meter:
        a = torch.empty(1000, 250)  # 1,000,000 bytes
        v = a.view(-1)[:10]  # views allocate nothing
        a.add_(1.0)  # in place: nothing new
        del a, v
        b = torch.empty(500, 250)
        c = b * 2  # 500,000 bytes while b is alive
        del b, c
    assert meter.peak == 1_000_000
    assert meter.live == 0

    capped = AllocationMeter(cap=300_000)
    with pytest.raises(torch.OutOfMemoryError):
        with capped:
            x = torch.ones(200, 250)  # 200,000 bytes: fits
            y = x + 1  # 400,000: over the cap
            del x, y


def test_bad_arguments_are_rejected(tmp_path, capsys):
    from benchmarks import suite

    assert suite.main(["--level", "head", "--methods", "nosuch", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.build_parser().parse_args(["--pairs-seq", "4by2"])
    with pytest.raises(SystemExit):
        suite.build_parser().parse_args(["--shapes", "gpt-5"])


def test_qlora_step_model_trains_lora_weights():
    """The 4-bit build path (bitsandbytes' CPU backend here, CUDA on a GPU) gives peft QLoRA layers, and
    one step of each available method moves the LoRA weights (gradients flow through the loss path)."""
    from benchmarks import methods_step as ms
    from benchmarks.models import get_model

    pytest.importorskip("bitsandbytes")
    peft_bnb = pytest.importorskip("peft.tuners.lora.bnb")
    model = ms.build_model(get_model("tiny"), torch.device("cpu"), torch.bfloat16, quantize=True, lora_r=4)
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    assert isinstance(layer, peft_bnb.Linear4bit)
    batch = ms.make_batch(get_model("tiny").vocab_size, 1, 24, torch.device("cpu"))
    for name in ("naive", "dpo_fast"):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ms.run_one(model, ms.STEP_REGISTRY[name], batch)
        after = dict(model.named_parameters())
        moved = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
        assert moved and all(torch.isfinite(after[n]).all() for n in before), name
        assert all(after[n].grad is None for n in before)  # the step leaves no gradients behind


def test_step_level_runs_every_body_group_in_4bit(tmp_path):
    """The step comparison (benchmarks/step.py's methods) at the tiny shape through bitsandbytes' CPU
    4-bit backend: every method is measured with finite numbers and ratios to the unpatched baseline,
    each dpo_fast group really swapped its modules, and a memory cap turns into fits / OOM per method."""
    pytest.importorskip("bitsandbytes")
    from benchmarks import methods_step as ms
    from benchmarks import suite
    from benchmarks.step import STEP_SHAPES, step_argv

    argv = step_argv([])
    assert argv[:2] == ["--level", "step"] and set(STEP_SHAPES) <= set(argv)
    assert set(ms.BODY_STEP_METHODS) <= set(argv) and "2x2048" in argv
    assert "dpo_fast_rope" not in step_argv(["--methods", "naive"])
    group_methods = {name for name, _ in ms.BODY_GROUPS} | {"dpo_fast_all"}
    assert not group_methods & set(ms.QUICK_STEP_METHODS)  # --quick keeps its budget

    common = ["--level", "step", "--step-sizes", "1x16", "--quantize", "--device", "cpu", "--step-warmup", "0",
              "--step-repeats", "1", "--methods", *ms.BODY_STEP_METHODS]
    report = suite.run(common + ["--out", str(tmp_path / "a")], log=lambda s: None)
    cells = {c["method"]: c for c in report["cells"]}
    expected = [m for m in ms.BODY_STEP_METHODS if ms.STEP_REGISTRY[m].unavailable(torch.device("cpu")) is None]
    assert {"naive", "dpo_fast", "dpo_fast_all"} <= set(expected)
    for name in expected:
        assert cells[name]["status"] == "ok", (name, cells[name]["note"])
        _assert_ok_cell(cells[name])
        assert cells[name]["params"]["quantized_4bit"] is True
        spec = ms.METHODS[name]
        if spec.loss == "dpo_fast":  # the cell records what patch_report says was applied: the table's row
            assert cells[name]["params"]["body"] == (spec.body.as_dict() if spec.body else False), name
    for name, switch in ms.BODY_GROUPS:
        counts = cells[name]["params"]["patched_modules"]
        # the recompute tail skip (one per decoder layer) and the nf4 dequantize (one per 4-bit base) come with
        # the QLoRA linear
        with_it = {switch, "recompute_tail_skip", "nf4_dequant"} if switch == "qlora_linear" else {switch}
        assert counts[switch] > 0 and all((v > 0) == (k in with_it) for k, v in counts.items()), (name, counts)
    assert all(v > 0 for v in cells["dpo_fast_all"]["params"]["patched_modules"].values())
    rows = {r["method"]: r for r in report["step_vs_baseline"]}
    base = rows["naive"]["baseline"]
    assert base in ("trl", "naive") and rows[base]["time_vs_base"] == pytest.approx(1.0)
    for name in expected:
        r = rows[name]
        assert math.isfinite(r["time_vs_base"]) and r["time_vs_base"] > 0
        assert r["time_vs_base"] == pytest.approx(cells[name]["median_ms"] / cells[base]["median_ms"])

    capped = ["--methods", "naive", "dpo_fast_all"]
    for cap, status, note in (("0.000001", "OOM", "does not fit"), ("1", "ok", "fits")):
        rep = suite.run(common[:-len(ms.BODY_STEP_METHODS) - 1] + capped + ["--cap-gb", cap, "--out",
                        str(tmp_path / cap)], log=lambda s: None)
        assert [(c["method"], c["status"]) for c in rep["cells"]] == [("naive", status), ("dpo_fast_all", status)]
        assert all(note in c["note"] and "cap" in c["case"] for c in rep["cells"])
    with pytest.raises(ValueError, match="--cap-gb"):
        suite.run(common + ["--cap-gb", "-1", "--out", str(tmp_path / "bad")], log=lambda s: None)


def test_every_step_method_gives_the_unpatched_lora_update_in_4bit(one_torch_thread):
    """One step of each step-comparison method on the same 4-bit tiny QLoRA model, from the same weights,
    with plain SGD (lr 1: the update is the gradient): every LoRA A and B moves, by the same amount as
    the unpatched naive step (so each group's kernels are in the measured step and compute the same
    DPO gradient), and the model is unpatched again afterwards."""
    pytest.importorskip("bitsandbytes")
    from benchmarks import methods_step as ms
    from benchmarks.models import get_model
    from dpo_fast.patching import is_patched

    shape = get_model("tiny")
    model = ms.build_model(shape, torch.device("cpu"), torch.float32, quantize=True, lora_r=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    with torch.no_grad():  # peft starts B at zero, which leaves A without gradient: give B values
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    batch = ms.make_batch(shape.vocab_size, 1, 13, torch.device("cpu"))
    extra = ("dpo_fast_all_unshared", "dpo_fast_all_no_tail_skip", "dpo_fast_no_checkpointing")
    names = [m for m in ms.BODY_STEP_METHODS + extra if ms.STEP_REGISTRY[m].unavailable(torch.device("cpu")) is None]
    layers = model.get_base_model().model.layers
    updates = {}
    for name in names:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(start[n])
        method = ms.STEP_REGISTRY[name]
        opt = torch.optim.SGD(list(trainable.values()), lr=1.0)
        with method.install(model):
            method.make(model, batch, opt)()
        assert not is_patched(model), name
        assert all(layer.gradient_checkpointing for layer in layers), name  # restored after every method
        updates[name] = {n: start[n] - p.detach() for n, p in trainable.items()}
        for n, u in updates[name].items():
            assert torch.isfinite(u).all() and u.abs().max() > 0, (name, n)
    ref = updates["naive"]
    for name in names:
        for n, u in updates[name].items():
            scale = ref[n].abs().max()
            torch.testing.assert_close(u, ref[n], rtol=2e-3, atol=2e-3 * float(scale), msg=lambda m: f"{name} {n}: {m}")


def test_headline_plot_from_a_step_results_json(tmp_path):
    """The README's headline figure is drawn from a step run's results.json, ratios to the first method."""
    from benchmarks.plots import headline_main

    rows = [dict(case="m step 2x8", method=m, status="ok", median_ms=t, peak_total_mb=tot, peak_extra_mb=ex)
            for m, t, tot, ex in (("trl", 10.0, 100.0, 50.0), ("dpo_fast", 6.0, 80.0, 30.0),
                                  ("dpo_fast_all", 5.0, 70.0, 20.0))]
    rows.append(dict(case="m step 2x8", method="naive", status="oom"))
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"environment": {"gpu": "X", "torch": "2", "date": "2026-01-01"},
                               "step_vs_baseline": rows}))
    out = tmp_path / "h.png"
    assert headline_main([str(res), str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit, match="no step_vs_baseline rows"):
        headline_main([str(res), str(out), "--case", "other"])
    with pytest.raises(ValueError, match="at least two"):
        headline_main([str(res), str(out), "--methods", "trl", "naive"])


def test_memory_cap_on_cuda_resolves_a_bare_cuda_device(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction wants an index: a bare "cuda" device must become the
    current device (this broke every capped step cell on the first H200 run)."""
    from types import SimpleNamespace

    from benchmarks import common

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=64 << 30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def set_fraction(fraction, device):
        if not isinstance(device, int) and torch.device(device).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append((fraction, device))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    with common.memory_cap(torch.device("cuda"), 16 << 30):
        pass
    assert [c[0] for c in calls] == [0.25, 1.0]
    assert all(torch.device(c[1]) == torch.device("cuda", 0) for c in calls)
    with pytest.raises(ValueError, match="exceeds the GPU"):
        with common.memory_cap(torch.device("cuda:0"), 65 << 30):
            pass


@pytest.mark.parametrize("name,billions", [("llama-3.1-8b", 8.03), ("gemma-2-9b", 9.24), ("gemma-3-12b", 11.77),
                                           ("phi-3-mini", 3.82)])
def test_model_shapes_are_the_public_models(name, billions):
    """Each benchmark shape builds its family's transformers model (on the meta device, no memory) with the
    public model's parameter count (Gemma 3 12B: its language model), and params() counts the same; the
    benchmark's LoRA targets are that model's linear layers."""
    from transformers import AutoModelForCausalLM

    from benchmarks.gemm_flops import scaled
    from benchmarks.models import get_model

    shape = get_model(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    real = sum(p.numel() for p in model.parameters())
    assert abs(real / 1e9 - billions) < 0.01 and abs(shape.params() - real) < 1e-4 * real
    linears = {n.rsplit(".", 1)[-1] for n, m in model.model.layers[0].named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert linears == set(shape.lora_targets)
    small = scaled(shape, 8, 2).config()  # what gemm_flops builds: 1/8 of the width, the same head size
    assert small.hidden_size == shape.hidden_size // 8 and small.num_hidden_layers == 2
    assert getattr(small, "head_dim", None) in (None, shape.head_size)
