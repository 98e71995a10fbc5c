"""benchmarks/gpu_check.py on the CPU: the `kernels` selection it runs covers every kernel module and holds the
GPU-sized cases; each test outcome (pass, fail, error, skip, a module that fails to import) becomes a check in
its JSON and the exit code says so; its GPU-only timing runs at a toy size on the test device; and
scripts/gpu_session.sh, which calls it, parses, runs and reports a bad phase."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import benchmarks.gpu_check as gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_FIELDS = {"name", "status", "detail", "seconds"}
#: every module of dpo_fast/kernels -> the selected tests that compare it with a reference
KERNEL_TESTS = {
    "online_softmax": ("test_linear_log_probs.py::test_fp32_matches_float64", "test_fused_dpo.py::test_sigmoid_"),
    "logit_grad": ("test_linear_log_probs.py::test_fp32_matches_float64", "test_fused_dpo.py::test_sigmoid_"),
    "rms_norm": ("test_body_kernels.py::test_rms_norm_matches_llama_rms_norm",),
    "rope": ("test_body_kernels.py::test_rope_matches_apply_rotary_pos_emb",),
    "swiglu": ("test_body_kernels.py::test_swiglu_matches_silu_times_up",),
    "softcap": ("test_softcap_head.py::test_softcap_fp32_matches_float64",),
    "dequant_4bit": ("test_dequant_4bit.py::test_dequantize_4bit_is_bitwise_bitsandbytes",
                     "test_dequant_4bit.py::test_dequantize_4bit_is_bitwise_bitsandbytes_cuda_at_8b_shapes"),
}
#: the ops built on torch and those kernels, and whole patched models
OP_TESTS = ("test_linear_log_probs.py::test_low_precision_accuracy", "test_linear_log_probs.py::test_stats_match",
            "test_linear_log_probs.py::test_bf16_frozen_head_agrees_with_torch_backend_and_float64_rows",
            "test_fused_dpo.py::test_sigmoid_no_worse_than_unfused_in_the_same_dtype",
            "test_body_kernels.py::test_qlora_linear_matches_float64_reference",
            "test_body_kernels.py::test_qlora_group_matches_float64_reference",
            "test_body_kernels.py::test_offloaded_checkpoint_matches_plain_forward",
            "test_dequant_4bit.py::test_patched_qlora_linear_dequantizes_with_the_kernel",
            "test_body_patch.py::test_patched_qlora_llama_matches_unpatched",
            "test_prefix_sharing.py::test_qlora_4bit_shared_equals_unshared",
            "test_prefix_sharing.py::test_prefix_sharing_bf16_no_worse_than_unshared_bf16")
#: tests with GPU-sized cases (ids gpu-*, tests/gpu_cases.py) that only a CUDA run reaches
GPU_SIZED = ("test_fp32_matches_float64", "test_low_precision_accuracy", "test_stats_match_reference",
             "test_bf16_frozen_head_agrees", "test_sigmoid_no_worse_than_unfused", "test_rms_norm_matches",
             "test_rope_matches", "test_swiglu_matches", "test_qlora_linear_matches_float64",
             "test_qlora_group_matches_float64")


def _gpu_check(args, tmp_path):
    """Run the script in a subprocess; returns (exit code, stdout, its JSON report)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DPO_FAST_TEST_SEED", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args, "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, json.loads((out / gpu_check.JSON_NAME).read_text())


def test_selection_covers_every_kernel_module_and_the_gpu_sized_cases(tmp_path):
    rc, out, report = _gpu_check(["--collect-only"], tmp_path)
    assert rc == 0, out[-4000:]
    assert "gpu_check: mode tiny-cpu-interpreter" in out and "torch " + torch.__version__ in out
    assert report["mode"] == "tiny-cpu-interpreter" and report["collect_only"] is True
    assert report["environment"]["triton_interpret"] == "1" and isinstance(report["seed"], int)
    assert report["checks"] == [] and report["summary"]["ok"] and report["timing"]["status"] == "skipped"
    tests = report["selection"]["tests"]
    assert report["selection"]["collected"] == len(tests) == len(set(tests)) > 300
    kernel_dir = os.path.join(ROOT, "dpo_fast", "kernels")
    modules = {f[:-3] for f in os.listdir(kernel_dir) if f.endswith(".py") and f != "__init__.py"}
    assert modules == set(KERNEL_TESTS), "a kernel module without tests in the selection (add it to KERNEL_TESTS)"
    for module, names in list(KERNEL_TESTS.items()) + [("ops", OP_TESTS)]:
        for name in names:
            assert any(t.startswith("tests/" + name) for t in tests), (module, name)
    for name in GPU_SIZED:
        assert any(name in t and "gpu-" in t for t in tests), name
    files = {t.split("::")[0] for t in tests}
    assert files == {"tests/test_linear_log_probs.py", "tests/test_fused_dpo.py", "tests/test_body_kernels.py",
                     "tests/test_dequant_4bit.py", "tests/test_body_patch.py", "tests/test_prefix_sharing.py",
                     "tests/test_softcap_head.py"}


FAKE_TESTS = '''
import pytest

pytestmark = pytest.mark.kernels


def test_passes():
    assert 1 + 1 == 2


def test_fails():
    err = 0.5
    assert err < 1e-5, "relative error too large"


def test_skips():
    pytest.skip("needs a CUDA device")


@pytest.fixture
def broken():
    raise RuntimeError("the fixture broke")


def test_errors(broken):
    pass
'''


def test_every_outcome_is_a_check_and_a_failure_fails_the_run(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_fake_kernels.py").write_text(FAKE_TESTS)
    (tests / "test_unmarked.py").write_text("def test_not_selected():\n    assert False\n")
    (tests / "test_cannot_import.py").write_text("import pytest\nimport no_such_module_here\n")
    rc, out, report = _gpu_check(["--tests", str(tests)], tmp_path)
    assert rc == 1, out[-4000:]
    checks = report["checks"]
    assert all(set(c) == CHECK_FIELDS for c in checks)
    by = {c["name"].split("::")[-1]: c for c in checks if not c["name"].startswith("collecting")}
    assert set(by) == {"test_passes", "test_fails", "test_skips", "test_errors"}
    assert by["test_passes"]["status"] == "pass" and by["test_passes"]["seconds"] >= 0
    assert by["test_fails"]["status"] == "fail" and "relative error too large" in by["test_fails"]["detail"]
    assert by["test_skips"]["status"] == "skipped" and "needs a CUDA device" in by["test_skips"]["detail"]
    assert by["test_errors"]["status"] == "error" and "the fixture broke" in by["test_errors"]["detail"]
    [collect] = [c for c in checks if c["name"].startswith("collecting")]
    assert collect["status"] == "error" and "test_cannot_import.py" in collect["name"]
    assert "no_such_module_here" in collect["detail"]
    assert report["selection"]["collected"] == 4
    assert report["summary"] == {"pass": 1, "fail": 1, "error": 2, "skipped": 1, "total": 5, "ok": False}
    assert "FAILED: " in out and "test_fails" in out

    rc, out, report = _gpu_check(["--tests", str(tests / "test_fake_kernels.py"), "-k", "passes or skips"], tmp_path)
    assert rc == 0, out[-4000:]
    assert [(c["name"].split("::")[-1], c["status"]) for c in report["checks"]] == \
        [("test_passes", "pass"), ("test_skips", "skipped")]

    rc, out, report = _gpu_check(["--tests", str(tests / "test_unmarked.py")], tmp_path)
    assert rc == 1 and report["selection"]["collected"] == 0
    assert [c["name"] for c in report["checks"]] == ["selection"] and "no test is marked" in report["checks"][0]["detail"]


def test_head_timing_runs_at_toy_size(device, monkeypatch, tmp_path):
    """The GPU-only timing (dpo_fast vs TRL's chunked head vs the naive head, and the speed target) at a toy
    size on the test device, so a slip in it never costs GPU time."""
    monkeypatch.setattr(gpu_check, "HEAD_D", 16)
    monkeypatch.setattr(gpu_check, "HEAD_V", 300)
    monkeypatch.setattr(gpu_check, "HEAD_N", 80)
    rec = gpu_check.Recorder(str(tmp_path), {}, log=lambda s: None)
    rec.run("realistic head timing", gpu_check.time_realistic_head, torch.device(device), warmup=0, repeats=1)
    assert rec.checks == [], [(c.name, c.status, c.detail) for c in rec.checks]
    timing = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())["timing"]
    cells = {c["method"]: c for c in timing["cells"]}
    assert set(cells) == {"dpo_fast", "trl", "naive"}
    assert cells["dpo_fast"]["status"] == "ok" and cells["dpo_fast"]["median_ms"] > 0
    assert cells["naive"]["status"] == "ok"
    try:
        import trl.kernels  # noqa: F401
    except Exception:
        assert cells["trl"]["status"] == "skipped" and timing["target"]["met"] is None
    else:
        assert cells["trl"]["status"] == "ok"
        target = timing["target"]
        assert target["speedup_vs_trl"] == pytest.approx(cells["trl"]["median_ms"] / cells["dpo_fast"]["median_ms"])
        assert isinstance(target["met"], bool)


def test_a_crashing_timing_is_an_error_check(tmp_path):
    rec = gpu_check.Recorder(str(tmp_path), {}, log=lambda s: None)
    rec.run("realistic head timing", lambda r: 1 / 0)
    report = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert report["checks"][0]["status"] == "error" and "ZeroDivisionError" in report["checks"][0]["detail"]
    assert report["summary"] == {"pass": 0, "fail": 0, "error": 1, "skipped": 0, "total": 1, "ok": False}


def test_help_and_bad_repeats(capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--collect-only" in text and "--tiny" in text and "Llama-3-8B" in text
    assert gpu_check.main(["--repeats", "0"]) == 2


def test_gpu_session_script_runs_and_reports_a_bad_phase(tmp_path):
    """scripts/gpu_session.sh parses, runs its set-up here (no wheels, no GPU) and fails loudly on a bad phase;
    the documented device command fits the tool's 2000-character limit; its check phase runs gpu_check and its
    tests phase leaves the kernels selection to it."""
    script = os.path.join(ROOT, "scripts", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert 'run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)' in text
    assert "--target /tmp/site .whl/*.whl" in text and "pip download" in text and "bitsandbytes==0.50.2" in text
    assert "python3 -m benchmarks.gpu_check --out" in text and '-m "not kernels"' in text
    env = dict(os.environ, OUT=str(tmp_path), GPU_SESSION_BUDGET="120")
    proc = subprocess.run(["bash", script, "no-such-phase"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    log = (tmp_path / "session.log").read_text()
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "unknown phase 'no-such-phase'" in log and "DONE with problems" in log
    assert "torch          " + torch.__version__ in log  # the environment block ran


def test_gpu_session_phase_comes_back_as_one_archive(tmp_path):
    """A step phase of scripts/gpu_session.sh (tiny CPU shapes here) leaves only session.log and its .tgz in $OUT
    (at most 8 files come back from the device), and the archive holds the run's results.json and plot."""
    import tarfile

    script = os.path.join(ROOT, "scripts", "gpu_session.sh")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_SESSION_BUDGET="300", GPU_SESSION_NO_WHEELS="1",
               GPU_SESSION_STAGE=str(tmp_path / "stage"))
    proc = subprocess.run(["bash", script, "step8bcap"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert sorted(p.name for p in out.iterdir()) == ["session.log", "step_8b_cap16.tgz"]
    with tarfile.open(out / "step_8b_cap16.tgz") as tar:
        names = tar.getnames()
        assert "step_8b_cap16/results.json" in names and any(n.endswith(".png") for n in names)
        results = json.load(tar.extractfile("step_8b_cap16/results.json"))
    assert results["settings"]["cap_gb"] == 16.0 and results["cells"]
