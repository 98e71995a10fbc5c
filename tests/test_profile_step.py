"""benchmarks/profile_step.py: the step profiler and the nf4 dequantize/GEMM split run end to end on the
CPU (tiny model, aten op times) so the GPU session's profile phase cannot rot."""
import json

import pytest
import torch

from benchmarks import profile_step


@pytest.mark.parametrize("name, cat", [
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*)", "nf4 dequantize"),
    ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT", "gemm"),
    ("_swiglu_fwd_kernel", "dpo_fast triton"),
    ("_online_softmax_tile_kernel", "dpo_fast triton"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "attention"),
    ("Memcpy HtoD (Pinned -> Device)", "copy / offload"),
    ("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>", "other"),
])
def test_kernel_categories(name, cat):
    assert profile_step.category(name) == cat


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in; on a GPU run the script itself")
def test_profile_step_on_cpu_writes_a_breakdown(tmp_path, one_torch_thread):
    assert profile_step.main(["--methods", "trl", "dpo_fast", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["shape"] == "tiny" and report["environment"]["device"]
    assert [m["method"] for m in report["methods"]] == ["trl", "dpo_fast"]
    for m in report["methods"]:
        assert "error" not in m, m
        assert m["wall_ms"] > 0 and m["kernel_ms"] > 0
        assert sum(m["categories"].values()) == pytest.approx(m["kernel_ms"], rel=1e-6)
        assert m["top"] and all(k["ms"] >= 0 and k["calls"] >= 1 for k in m["top"])
        assert any(k["category"] == "gemm" for k in m["top"]), m["top"]  # the step's matmuls are seen
    floor = report["issue_floor"]
    assert floor["layers"] == 2 and set(floor["step_ms"]) == {"trl", "dpo_fast"}, floor
    assert all(ms > 0 for ms in floor["step_ms"].values()) and "errors" not in floor


def test_narrow_keeps_depth_vocabulary_and_gqa():
    from benchmarks.models import get_model

    big = get_model("llama-3.1-8b")
    small = profile_step.narrow(big)
    assert (small.num_hidden_layers, small.vocab_size, small.tie_word_embeddings) == (32, big.vocab_size, False)
    assert (small.hidden_size, small.intermediate_size) == (256, 512)
    assert (small.num_attention_heads, small.num_key_value_heads) == (4, 1)  # 64-wide heads, GQA 4:1 as 32:8
    small.config()  # a valid transformers config
    assert profile_step.narrow(get_model("tiny")).hidden_size == 64  # never wider than the shape itself


def test_nf4_split_times_dequantize_and_gemm(one_torch_thread):
    pytest.importorskip("bitsandbytes")
    rows = profile_step.nf4_split("tiny", 32, torch.device("cpu"), torch.float32, repeats=2)
    assert [r["proj"] for r in rows] == ["q/o_proj", "k/v_proj", "gate/up_proj", "down_proj"]
    for r in rows:
        assert r["dequant_ms"] > 0 and r["gemm_ms"] > 0 and r["dequant_then_gemm_ms"] > 0
        assert r["dequant_triton_ms"] > 0  # the interpreter here (conftest sets TRITON_INTERPRET=1)
        assert 0 < r["dequant_share"]
        assert r["weight_dtype"] == "torch.float32"
        assert r["lora_after_ms"] > 0 and r["lora_first_ms"] > 0


def test_gpu_idle_merges_overlapping_kernels_and_buckets_gaps():
    kernels = [(0.0, 100.0, "a"), (50.0, 120.0, "b"),       # overlap (two streams): busy 0..120
               (125.0, 200.0, "c"),                          # 5 us gap
               (250.0, 300.0, "d"),                          # 50 us gap
               (2300.0, 2400.0, "e")]                        # 2 ms gap
    idle = profile_step.gpu_idle(kernels)
    assert idle["span_ms"] == pytest.approx(2.4)
    assert idle["busy_ms"] == pytest.approx((120 + 75 + 50 + 100) / 1e3)
    assert idle["idle_ms"] == pytest.approx(2.4 - 0.345)
    assert idle["buckets"]["<10us"] == {"count": 1, "ms": pytest.approx(0.005)}
    assert idle["buckets"]["10-100us"]["count"] == 1 and idle["buckets"][">=1ms"]["count"] == 1
    assert idle["buckets"]["0.1-1ms"]["count"] == 0
    biggest = idle["top"][0]
    assert biggest["ms"] == pytest.approx(2.0) and biggest["at_ms"] == pytest.approx(0.3)
    assert (biggest["before"], biggest["after"]) == ("d", "e")
    assert idle["top"][-1]["before"] == "b"  # the 5 us gap follows the kernel that ended last (b, not a)
    assert profile_step.gpu_idle([]) == dict(span_ms=0.0, busy_ms=0.0, idle_ms=0.0, buckets={}, top=[])


def test_runtime_calls_counts_syncs_and_allocations():
    class Evt:
        def __init__(self, name, us):
            self.name = name
            self.time_range = type("R", (), {"elapsed_us": lambda self, us=us: us})()

    events = [Evt("cudaStreamSynchronize", 300), Evt("cudaStreamSynchronize", 100), Evt("cudaMalloc", 2000),
              Evt("cudaMemcpyAsync", 5), Evt("aten::mm", 50), Evt("cudaLaunchKernel", 3)]
    calls = profile_step.runtime_calls(events)
    assert calls["cudaStreamSynchronize"] == {"count": 2, "ms": pytest.approx(0.4)}
    assert calls["cudaMalloc"] == {"count": 1, "ms": pytest.approx(2.0)}
    assert calls["cudaMemcpyAsync"]["count"] == 1 and calls["cudaLaunchKernel"]["count"] == 1
    assert "aten::mm" not in calls


def test_device_activity_skips_cpu_ops_and_user_annotation_ranges():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    class Evt:
        def __init__(self, device_type, annotation=False):
            self.device_type, self.is_user_annotation = device_type, annotation

    assert profile_step.is_device_activity(Evt(cuda))
    assert not profile_step.is_device_activity(Evt(cpu))
    assert not profile_step.is_device_activity(Evt(cuda, annotation=True))  # e.g. Optimizer.step#AdamW.step
