"""benchmarks/gpu_check.py: the whole script runs (tiny shapes, Triton interpreter, in a subprocess) with every
check passing and a complete JSON; its GPU-only realistic-shape code runs at toy sizes on the test device; a
failing or crashing check is recorded, the others still run, and the exit code says so."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import benchmarks.gpu_check as gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_FIELDS = {"name", "status", "rel_err", "tol", "detail", "seconds"}
# every kernel path the script must cover, as name prefixes
GROUPS = ("linear_log_probs[triton] frozen nobias float32", "linear_log_probs[triton] frozen bias float32",
          "linear_log_probs[triton] trainable nobias float32", "linear_log_probs[triton] trainable bias float32",
          "linear_log_probs[triton] frozen nobias bfloat16", "linear_log_probs[triton] trainable bias bfloat16",
          "linear_log_probs_with_stats[triton]", "fused_linear_dpo_loss[triton] sigmoid frozen float32",
          "fused_linear_dpo_loss[triton] sigmoid trainable float32", "fused_linear_dpo_loss[triton] sigmoid frozen "
          "bfloat16", "rms_norm[triton] float32", "rms_norm[triton] bfloat16", "apply_rope[triton] float32",
          "apply_rope[triton] bfloat16", "swiglu[triton] float32", "swiglu[triton] bfloat16",
          "lora_linear linear float32", "lora_linear linear bfloat16", "lora_linear nf4-dq float32",
          "lora_linear nf4-dq bfloat16", "lora_linear_group linear float32", "lora_linear_group linear bfloat16",
          "lora_linear_group nf4-dq float32", "lora_linear_group nf4-dq bfloat16")


def test_tiny_run_passes_every_check_and_writes_complete_json(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    assert "gpu_check: mode tiny-cpu-interpreter" in proc.stdout and "torch " + torch.__version__ in proc.stdout
    report = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert report["mode"] == "tiny-cpu-interpreter" and report["environment"]["torch"] == torch.__version__
    assert report["environment"]["triton_interpret"] == "1" and isinstance(report["seed"], int)
    assert report["timing"]["status"] == "skipped" and report["wall_seconds"] > 0
    checks = report["checks"]
    assert len(checks) > 100 and all(set(c) == CHECK_FIELDS for c in checks)
    names = [c["name"] for c in checks]
    assert len(set(names)) == len(names), "check names must be unique"
    for group in GROUPS:
        got = [c for c in checks if c["name"].startswith(group)]
        assert got, group
        assert any(c["status"] == "pass" for c in got), group
    for c in checks:
        assert c["status"] in ("pass", "skipped"), c
        if c["status"] == "pass":
            assert math.isfinite(c["rel_err"]) and 0 <= c["rel_err"] <= c["tol"], c
            assert c["seconds"] is not None and c["seconds"] >= 0
        else:
            assert c["detail"], c  # a skip always says why
    # forward and backward were both compared, for the head with its weight and bias gradients
    for suffix in ("/logp", "/grad_h", "/grad_w", "/grad_b", "/entropy", "/argmax", "/loss", "/grad_x", "/grad_gate",
                   "/grad_q", "/grad_A", " is 0 where ignored"):
        assert any(n.endswith(suffix) for n in names), suffix
    tol = {c["name"]: c["tol"] for c in checks if c["status"] == "pass"}
    assert tol["linear_log_probs[triton] frozen nobias float32 N=3x23 d=72 V=1013 chunks=16x300/logp"] == 1e-5
    assert tol["linear_log_probs[triton] frozen nobias bfloat16 N=3x23 d=72 V=1013 chunks=16x300/grad_h"] == 1e-2
    s = report["summary"]
    assert s["ok"] and s["fail"] == s["error"] == 0 and s["pass"] + s["skipped"] == s["total"] == len(checks)


def test_realistic_shape_code_runs_at_toy_size(device, monkeypatch, tmp_path):
    """The GPU-only part (triton vs torch backend vs float64 rows, then the timed comparison with TRL and the
    naive head), at a toy size on the test device, so a slip in it never costs GPU time."""
    monkeypatch.setattr(gpu_check, "REAL_D", 16)
    monkeypatch.setattr(gpu_check, "REAL_V", 300)
    monkeypatch.setattr(gpu_check, "REAL_N", 80)
    rec = gpu_check.Recorder(str(tmp_path), {}, log=lambda s: None)
    dev = torch.device(device)
    rec.run("realistic head correctness", gpu_check.check_realistic_head, dev)
    rec.run("realistic head timing", gpu_check.time_realistic_head, dev, warmup=0, repeats=1)
    assert [c.status for c in rec.checks] == ["pass"] * 6, [(c.name, c.status, c.detail) for c in rec.checks]
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


def test_a_failing_or_crashing_check_is_recorded_and_the_rest_still_run(monkeypatch, tmp_path):
    def fake_checks(rec, dev, sizes):
        rec.compare("nan output", torch.tensor([float("nan"), 1.0]), torch.ones(2), 1e-5)
        rec.run("crashing group", lambda r: 1 / 0)
        rec.compare("fine", torch.ones(3), torch.ones(3), 1e-5)
        rec.exact("zeros", torch.tensor([0.0, 2.0]), torch.zeros(2))

    monkeypatch.setattr(gpu_check, "run_checks", fake_checks)
    assert gpu_check.main(["--out", str(tmp_path), "--no-timing"]) == 1
    report = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    by = {c["name"]: c for c in report["checks"]}
    assert by["nan output"]["status"] == "fail" and by["nan output"]["rel_err"] == math.inf
    assert by["crashing group"]["status"] == "error" and "ZeroDivisionError" in by["crashing group"]["detail"]
    assert by["fine"]["status"] == "pass" and by["fine"]["rel_err"] == 0.0
    assert by["zeros"]["status"] == "fail" and by["zeros"]["rel_err"] == 1
    assert report["summary"] == {"pass": 1, "fail": 2, "error": 1, "skipped": 0, "total": 4, "ok": False}


def test_all_passing_exits_zero_and_bad_repeats_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "run_checks", lambda rec, dev, sizes: rec.skip("optional", "not installed"))
    assert gpu_check.main(["--out", str(tmp_path), "--no-timing"]) == 0
    assert gpu_check.main(["--out", str(tmp_path), "--repeats", "0"]) == 2


def test_gpu_session_script_runs_and_reports_a_bad_phase(tmp_path):
    """scripts/gpu_session.sh parses, runs its set-up here (no wheels, no GPU) and fails loudly on a bad phase;
    the documented device command fits the tool's 2000-character limit."""
    script = os.path.join(ROOT, "scripts", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert 'run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)' in text
    assert "--target /tmp/site .whl/*.whl" in text and "pip download" in text and "bitsandbytes==0.50.2" in text
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
