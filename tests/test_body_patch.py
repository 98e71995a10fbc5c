"""patch_body on tiny random-weight models: same loss and gradients as the unpatched model, clean unpatch.

The QLoRA model is a 2-layer LlamaForCausalLM (hidden 64, vocab 300, Llama-3 rope scaling) saved with
random weights and reloaded in 4-bit nf4 with double quantization (bitsandbytes' CPU backend), with
peft LoRA (random A and B) on every linear layer of the body.
"""
import tempfile

import pytest
import torch

from dpo_fast.ops.backend import use_backend
from dpo_fast.ops.offload_checkpoint import offloaded_checkpoint
from dpo_fast.patching.body import patch_body, unpatch_body
from dpo_fast.patching.checkpointing import unwrapped

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 300
ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


# Gradients of a patched model against the unpatched one, both fp32 (the same math rounded two ways), worst
# parameter's relative error: over 200 seeds for each of test_checkpointing's 2-layer LoRA llama, qwen2 and
# qwen3 models, median 2e-6 to 2.6e-6, max 1.9e-5; the unpatched fp32 model against float64 reached 2.6e-5
# itself, so that is fp32 rounding, not the patch (a wrong patch is off by 1e-2 or more). 2.6x margin.
FP32_GRAD_TOL = 5e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                       rope_parameters=dict(ROPE_LLAMA3), **kw)


@pytest.fixture(scope="module")
def qlora_dir():
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(_llama_config()).save_pretrained(d)
        yield d


def _qlora_model(path, dtype, device):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map={"": device})
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora).train()


def _batch(device, bsz=2, seq=13):
    ids = torch.randint(0, VOCAB, (bsz, seq), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _graph_counts(loss: torch.Tensor) -> dict:
    """How many autograd nodes of each type produced `loss`."""
    seen, stack, counts = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
        stack.extend(n for n, _ in node.next_functions)
    return counts


def _graph_ops(loss: torch.Tensor) -> set:
    """Names of the autograd nodes that produced `loss` (to see which kernels really ran)."""
    return set(_graph_counts(loss))


def _assert_close(got, want, tol):
    loss_g, grads_g = got
    loss_w, grads_w = want
    assert rel(loss_g, loss_w) < tol
    assert grads_g.keys() == grads_w.keys()
    worst = max(rel(grads_g[n], grads_w[n]) for n in grads_w)
    assert worst < tol, worst


@pytest.mark.kernels
@pytest.mark.parametrize("backend,checkpointing", [
    ("torch", None), ("torch", "transformers"), ("torch", "offload"), ("triton", None), ("triton", "offload"),
])
def test_patched_qlora_llama_matches_unpatched(qlora_dir, backend, checkpointing, device):
    model = _qlora_model(qlora_dir, torch.float32, device)
    if checkpointing == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    keys = list(model.state_dict().keys())
    counts = patch_body(model, offload_checkpointing=checkpointing == "offload")
    assert counts["rms_norm"] == 5 and counts["rope"] == 2 and counts["swiglu"] == 2
    assert counts["qlora_linear"] == 14  # 7 projections x 2 layers
    assert counts["offload_checkpointing"] == (2 if checkpointing == "offload" else 0)
    if checkpointing == "offload":
        assert all(unwrapped(layer._gradient_checkpointing_func) is offloaded_checkpoint and layer.gradient_checkpointing
                   for layer in model.base_model.model.model.layers)
    with use_backend(backend):
        ops = _graph_ops(model(**batch).loss)
        got = _loss_and_grads(model, batch)
    if checkpointing == "offload":
        assert "_OffloadedCheckpointBackward" in ops
    elif checkpointing is None:  # the kernels really ran (no silent fallback to the original forwards)
        assert {"RMSNormFunctionBackward", "SwiGLUFunctionBackward", "LoRALinearFunctionBackward",
                "LoRAGroupFunctionBackward"} <= ops
        # in place on a view, autograd wraps the custom backward in CopySlices
        assert ("CopySlices" if backend == "triton" else "RoPEFunctionBackward") in ops
    _assert_close(got, want, 1e-5)
    assert list(model.state_dict().keys()) == keys
    unpatch_body(model)
    _assert_close(_loss_and_grads(model, batch), want, 1e-6)


def test_patched_qlora_llama_bf16(qlora_dir, device):
    model = _qlora_model(qlora_dir, torch.bfloat16, device)
    # fp32 truth: the same nf4 codes, with every float parameter (LoRA, norms, embeddings) copied from
    # the bf16 model, so the only difference left is the compute precision
    truth = _qlora_model(qlora_dir, torch.float32, device)
    src = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in truth.named_parameters():
            if p.dtype.is_floating_point and n in src and src[n].shape == p.shape:
                p.copy_(src[n].float())
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    ref = _loss_and_grads(truth, batch)
    patch_body(model)
    got = _loss_and_grads(model, batch)
    assert rel(got[0], want[0]) < 1e-2 and rel(got[0], ref[0]) < 1e-2
    # LoRA grads after two bf16 layers, as one vector: two bf16 implementations differ from each other by
    # about as much as each differs from the fp32 truth (1.5e-2 .. 6e-2 here), so judge the patched one
    # against the truth, next to the unpatched one's error (seen: ratio 0.6 .. 1.2 over 25 models)
    names = sorted(want[1])
    flat = lambda g: torch.cat([g[n].float().flatten() for n in names])  # noqa: E731
    err_patched, err_unpatched = rel(flat(got[1]), flat(ref[1])), rel(flat(want[1]), flat(ref[1]))
    assert err_patched < 1e-1 and err_patched <= 1.5 * err_unpatched, (err_patched, err_unpatched)
    unpatch_body(model)


def test_patched_qlora_llama_under_autocast(qlora_dir, device):
    """bf16 autocast (HF/TRL bf16=True, dpo_fast's trainer on a GPU): the fused QLoRA linear still runs, in
    the autocast dtype, and its error against the fp32 model is that of peft + bitsandbytes under autocast."""
    model = _qlora_model(qlora_dir, torch.float32, device)
    batch = _batch(device)
    truth = _loss_and_grads(model, batch)
    dtypes = []  # what a 4-bit LoRA projection hands on: bitsandbytes casts back to the input's dtype
    model.base_model.model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        want = _loss_and_grads(model, batch)
        patch_body(model)
        ops = _graph_ops(model(**batch).loss)
        got = _loss_and_grads(model, batch)
    assert "LoRALinearFunctionBackward" in ops  # no silent fallback to peft under autocast
    assert len(set(dtypes)) == 1, dtypes  # the same dtype flow as peft's
    names = sorted(truth[1])
    flat = lambda g: torch.cat([g[n].float().flatten() for n in names])  # noqa: E731
    err_patched, err_unpatched = rel(flat(got[1]), flat(truth[1])), rel(flat(want[1]), flat(truth[1]))
    # over 240 seeds (CPU) both errors averaged 0.017; a single draw's ratio reached 1.9 there, and 2.5 once in
    # pytest (0.052 vs 0.021, the 1.5x + 1e-2 bound used before then failed): bf16 noise on a tiny model
    assert err_patched < 1e-1 and err_patched <= 2 * err_unpatched + 2e-2, (err_patched, err_unpatched)
    assert rel(got[0], truth[0]) < 1e-2
    assert all(g.dtype == torch.float32 for g in got[1].values())  # LoRA grads in the adapters' dtype
    unpatch_body(model)


def test_sibling_projections_run_as_one_op(qlora_dir, device):
    """q/k/v and gate/up run as one grouped op per layer, o/down on their own, with the unpatched model's
    loss and grads; a sibling called with another input, or with LoRA dropout on, runs on its own."""
    from dpo_fast.ops.qlora_linear import lora_linear

    model = _qlora_model(qlora_dir, torch.float32, device)
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    patch_body(model)
    counts = _graph_counts(model(**batch).loss)
    assert counts["LoRAGroupFunctionBackward"] == 4 and counts["LoRALinearFunctionBackward"] == 4  # 2 layers
    _assert_close(_loss_and_grads(model, batch), want, 1e-5)

    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features, device=device)
    other = x + 1.0
    q = attn.q_proj(x)                         # runs q, k and v for x
    k_other = attn.k_proj(other)               # not the grouped input: computed on its own
    k = attn.k_proj(x)                         # the grouped result for x
    for got, inp, layer in ((q, x, attn.q_proj), (k_other, other, attn.k_proj), (k, x, attn.k_proj)):
        want_y = lora_linear(inp, layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                             layer.scaling["default"])
        assert rel(got, want_y) < 1e-6

    for module in model.modules():           # LoRA dropout (own mask per projection): each on its own
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    counts = _graph_counts(model(**batch).loss)
    assert "LoRAGroupFunctionBackward" not in counts and counts["LoRALinearFunctionBackward"] == 14
    model.eval()                             # dropout off again: grouped again
    assert _graph_counts(model(**batch).loss)["LoRAGroupFunctionBackward"] == 4


def test_unpatch_restores_everything(qlora_dir, device):
    import transformers.models.llama.modeling_llama as modeling_llama

    model = _qlora_model(qlora_dir, torch.float32, device)
    original_rope = modeling_llama.apply_rotary_pos_emb
    layers = model.base_model.model.model.layers
    before = {id(m): dict(m.__dict__) for m in model.modules()}
    patch_body(model, offload_checkpointing=True)
    assert modeling_llama.apply_rotary_pos_emb._dpo_fast_original is getattr(original_rope, "_dpo_fast_original",
                                                                             original_rope)
    assert "forward" in layers[0].mlp.__dict__ and "forward" in layers[0].self_attn.q_proj.__dict__
    patch_body(model, rms_norm=False, offload_checkpointing=True)  # re-patching replaces the old patch
    assert "forward" not in layers[0].input_layernorm.__dict__
    unpatch_body(model)
    assert modeling_llama.apply_rotary_pos_emb is original_rope  # the original, unless another model is patched
    for m in model.modules():
        assert m.__dict__.keys() == before[id(m)].keys(), type(m).__name__
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert "_gradient_checkpointing_func" not in layers[0].__dict__


def test_switches_and_fallbacks(qlora_dir, device):
    model = _qlora_model(qlora_dir, torch.float32, device)
    counts = patch_body(model, rms_norm=False, rope=False, swiglu=False)
    assert counts == {"rms_norm": 0, "rope": 0, "swiglu": 0, "qlora_linear": 14, "nf4_dequant": 14,
                      "offload_checkpointing": 0, "prefix_sharing": 0, "recompute_tail_skip": 2}
    batch = _batch(device)
    # disabled adapters (DPO's reference pass) go through peft's own forward
    with torch.no_grad():
        with model.disable_adapter():
            patched_ref = model(**batch).logits
        unpatch_body(model)
        with model.disable_adapter():
            ref = model(**batch).logits
            ref_patched_after = model(**batch).logits
    assert rel(patched_ref, ref) < 1e-6 and rel(ref_patched_after, ref) < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patched_full_precision_model_matches(family, device):
    """A bare (no peft) model with trainable norms: RMSNorm weight gradients go through the kernel."""
    if family == "llama":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(_llama_config())
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             vocab_size=VOCAB, max_position_embeddings=64))
    model = model.to(device).train()
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data.normal_(1.0, 0.2)  # non-trivial norm weights
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    counts = patch_body(model)
    n_norms = 5 if family == "llama" else 9  # qwen3 adds q_norm and k_norm per layer
    assert counts["rms_norm"] == n_norms and counts["rope"] == 2 and counts["swiglu"] == 2
    assert counts["qlora_linear"] == 0
    with use_backend("triton"):
        _assert_close(_loss_and_grads(model, batch), want, 1e-5)
    unpatch_body(model)


def test_patch_body_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        patch_body(object())
