"""dpo_fast.patch / unpatch / add_reference_adapter on tiny random Llama-family models (CPU)."""
from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import dpo_fast.patching as P
from dpo_fast.patching.reference import reference_model
from dpo_fast.patching.support import UnsupportedModelError

V, D, T = 211, 48, 13  # odd sizes on purpose
_ARCH = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny(arch: str = "llama", dtype: torch.dtype = torch.float32, vocab: int = V) -> torch.nn.Module:
    cfg_cls, model_cls = _ARCH[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=D, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False)
    return model_cls(cfg).to(dtype).eval()


def quantized(tmpdir: str, bits: str) -> torch.nn.Module:
    tiny().save_pretrained(tmpdir)
    if bits == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bits.split("-")[0],
                               bnb_4bit_use_double_quant=bits.endswith("-dq"), bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(tmpdir, quantization_config=q, device_map="cpu", dtype=torch.float32)


def batch(rows: int = 3, length: int = T, vocab: int = V):
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones_like(ids)
    mask[-1, -4:] = 0  # right padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 3] = -100  # prompt
    labels[0] = -100  # a row with nothing to score
    return ids, mask, labels


def reference_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 log_softmax + gather of the shifted labels, 0 where the label is -100."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    y = labels[:, 1:]
    return lp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1).masked_fill(y == -100, 0.0)


@pytest.mark.parametrize("arch", list(_ARCH))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_logits_and_fused_log_probs(arch, dtype):
    model = tiny(arch, dtype)
    ids, mask, labels = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    assert P.patch(model, body=False) is model and P.is_patched(model)
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)  # the plain call runs the original forward, unchanged
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    expected = reference_log_probs(before, labels)
    assert out.log_probs.shape == (ids.shape[0], ids.shape[1] - 1) and out.log_probs.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all()
    assert (out.log_probs[labels[:, 1:] == -100] == 0).all()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    err = (out.log_probs.double() - expected).norm() / expected.norm()
    assert err < tol, err
    n = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss.double(), -expected.sum() / n, rtol=tol, atol=tol)


def test_shift_labels_extras_and_num_items():
    model = P.patch(tiny(), body=False, outputs=("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    ids, mask, labels = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shift, fused_lm_head=True, num_items_in_batch=7)
    assert out.log_probs.shape == ids.shape
    valid = shift != -100
    lp = torch.log_softmax(logits, -1)
    exp_lp = lp.gather(-1, shift.clamp(min=0)[..., None]).squeeze(-1) * valid
    torch.testing.assert_close(out.log_probs.double(), exp_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), -exp_lp.sum() / 7, rtol=1e-5, atol=1e-5)
    p = lp.exp()
    torch.testing.assert_close(out.entropy.double(), -(p * lp).sum(-1) * valid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mean_logits.double(), logits.mean(-1) * valid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), torch.log((p * p).sum(-1)) * valid,
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(out.is_top1, (logits.argmax(-1) == shift) & valid)
    assert torch.equal(out.label_mask, valid)


def test_generation_unchanged():
    model = tiny()
    ids = torch.randint(0, V, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    P.patch(model, body=False)
    after = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(before, after)


def test_patch_twice_and_unpatch():
    model = tiny()
    ids, mask, labels = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    P.patch(model, body=False)
    fwd = model.__dict__["forward"]
    first = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    P.patch(model, body=False, outputs=("entropy",))
    assert model.__dict__["forward"] is fwd  # not wrapped twice
    second = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert torch.equal(first, second.log_probs) and second.entropy is not None
    P.unpatch(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_dpo_fast_patch") and not P.is_patched(model)
    assert torch.equal(before, model(input_ids=ids, attention_mask=mask).logits)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert plain.logits is not None and getattr(plain, "log_probs", None) is None  # fused head gone
    P.unpatch(model)  # unpatching an unpatched model is a no-op


def test_patch_again_applies_its_options():
    """A second patch() applies its options on top of the ones in effect (never drops them silently);
    patch_report says what is in effect; body=False removes the body patch; unpatch undoes all of it."""
    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, mask, labels = batch(rows=4)
    want = model(input_ids=ids, attention_mask=mask).logits
    assert P.patch_report(model) is None
    P.patch(model)
    first = P.patch_report(model)
    assert first.body == P.BodyOptions() and first.counts["rms_norm"] == 5 and first.counts["prefix_sharing"] == 0
    P.patch(model, prefix_sharing=True, rms_norm=False)
    second = P.patch_report(model)
    assert second.body == P.BodyOptions(prefix_sharing=True, rms_norm=False)
    assert second.counts["rms_norm"] == 0 and second.counts["prefix_sharing"] == 2
    norm = model.get_base_model().model.norm
    assert "forward" not in norm.__dict__  # rms_norm really switched off
    P.patch(model, outputs=("entropy",))  # no option: the body stays as it is
    third = P.patch_report(model)
    assert third.body == second.body and third.outputs == ("log_probs", "entropy")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-4)
    P.patch(model, body=False)
    assert P.patch_report(model).body is None and P.patch_report(model).counts == {}
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rms_nrom'\]"):
        P.patch(model, rms_nrom=False)
    P.unpatch(model)
    assert P.patch_report(model) is None
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)


def test_unpatch_restores_an_earlier_instance_forward():
    model = tiny()
    calls = []
    original = model.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapped
    P.patch(model, body=False)
    ids, mask, _ = batch()
    model(input_ids=ids, attention_mask=mask)
    assert calls == [1]  # the plain path goes through the forward that was there before
    P.unpatch(model)
    assert model.__dict__["forward"] is wrapped


@pytest.mark.parametrize("bits", ["nf4-dq", "fp4", "8bit"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_fused_log_probs_and_lora_grads(bits, checkpointing):
    with tempfile.TemporaryDirectory() as tmp:
        base = quantized(tmp, bits)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask, labels = batch()
    lora = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)
    expected = reference_log_probs(model(input_ids=ids, attention_mask=mask).logits, labels)
    (expected * weights).sum().backward()
    exp_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    P.patch(model, body=False)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    (out.log_probs.double() * weights).sum().backward()
    err = (out.log_probs.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err
    for g, e in zip([p.grad for p in lora], exp_grads):
        assert torch.isfinite(g).all()
        assert (g.double() - e.double()).norm() <= 1e-4 * e.double().norm() + 1e-7


def test_unsupported_models_and_options():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        P.patch(gpt2)
    with pytest.raises(TypeError, match="model"):
        P.patch("not a model")
    with pytest.raises(TypeError, match="unknown option"):
        P.patch(tiny(), body=False, fused=True)
    with pytest.raises(ValueError, match="outputs"):
        P.patch(tiny(), body=False, outputs=("logits",))
    head_lora = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedModelError, match="lm_head"):
        P.patch(head_lora, body=False)
    model = tiny()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        P.patch(model, body=False)


def test_patch_with_body_option_keeps_logits():
    """Default options (body kernels too, when dpo_fast.patching.body exists) keep plain logits close."""
    model = tiny()
    ids, mask, labels = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P.patch(model)
    after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    P.unpatch(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_add_reference_adapter_is_a_frozen_copy():
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    P.add_reference_adapter(model)
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    params = dict(model.named_parameters())
    ref_names = [n for n in params if ".ref." in n]
    assert ref_names and all(not params[n].requires_grad for n in ref_names)
    for n in ref_names:
        src = params[n.replace(".ref.", ".default.")]
        assert torch.equal(params[n], src) and params[n].data_ptr() != src.data_ptr()
    base = sum(p.numel() for n, p in params.items() if "lora_" not in n)
    assert sum(params[n].numel() for n in ref_names) < 0.1 * base  # adapter-sized, not a second base
    with pytest.raises(ValueError, match="name"):
        P.add_reference_adapter(model)
    with pytest.raises(ValueError, match="source_adapter"):
        P.add_reference_adapter(model, source_adapter="nope", name="ref2")
    with pytest.raises(TypeError, match="PeftModel"):
        P.add_reference_adapter(tiny())


def test_reference_context_restores_state():
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                              lora_dropout=0.1))
    P.add_reference_adapter(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ckpt = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert ckpt
    with reference_model(model) as ref:
        assert ref is model and not torch.is_grad_enabled()
        assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert model.active_adapter == "ref"
        assert not any(m.gradient_checkpointing for m in ckpt)
    assert torch.is_grad_enabled() and all(m.training for m in model.modules())
    assert model.active_adapter == "default"
    assert all(m.gradient_checkpointing for m in ckpt)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="ref_adapter_name"):
        with reference_model(model, ref_adapter_name="missing"):
            pass
    with pytest.raises(ValueError, match="ref_model"):
        with reference_model(tiny()):
            pass
