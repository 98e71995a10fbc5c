"""compute_dpo_loss: agreement with a materialized-logits float64 reference, reference semantics,
memory on a 128k vocabulary, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import dpo_fast.patching as P
from dpo_fast.dpo import compute_dpo_loss
from dpo_fast.forward import token_log_probs
from dpo_fast.patching.reference import reference_model

import rss_probe  # noqa: E402  (tests/ is on sys.path under pytest)

V, D = 197, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(vocab: int = V, hidden: int = D) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def qlora(init_lora_weights=False):
    with tempfile.TemporaryDirectory() as tmp:
        tiny().save_pretrained(tmp)
        base = LlamaForCausalLM.from_pretrained(
            tmp, device_map="cpu", dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                           lora_dropout=0.0, init_lora_weights=init_lora_weights))


def pref_batch(pairs: int = 3, length: int = 15, vocab: int = V, empty_row: bool = False):
    """TRL layout: [chosen; rejected], prompt then completion, right padding."""
    rows = 2 * pairs
    ids = torch.randint(0, vocab, (rows, length))
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    for r in range(rows):
        prompt = int(torch.randint(2, 6, ()))
        end = length - int(torch.randint(0, 4, ()))
        attn[r, end:] = 0
        comp[r, prompt:end] = 1
    if empty_row:
        comp[1] = 0
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def reference_sequence_logps(model, batch):
    """Materialized logits, float64 log_softmax + gather, masked sums: [chosen], [rejected]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tok = lp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    seq = (tok * batch["completion_mask"][:, 1:]).sum(1)
    return seq.chunk(2)


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("patched", [True, False])
def test_matches_materialized_float64_reference(patched):
    model = qlora()
    model.train()
    batch = pref_batch(empty_row=True)
    beta = 0.3
    # reference: unpatched model, materialized logits, float64 math; reference pass with adapters disabled
    c, r = reference_sequence_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        rc, rr = reference_sequence_logps(model, batch)
    h = (c - rc) - (r - rr)
    exp_loss = -F.logsigmoid(beta * h).mean()
    exp_loss.backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    exp_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    exp_metrics = {"rewards/chosen": beta * (c - rc), "rewards/rejected": beta * (r - rr),
                   "rewards/accuracies": ((c - rc) > (r - rr)).double(), "rewards/margins": beta * h,
                   "logps/chosen": c, "logps/rejected": r}

    if patched:
        P.patch(model, body=False)
    with pytest.warns(UserWarning, match="no completion token"):
        loss, metrics = compute_dpo_loss(model, batch, beta=beta)
    loss.backward()
    assert torch.isfinite(loss) and loss.dim() == 0
    assert rel(loss.detach(), exp_loss.detach()) < 1e-4
    assert set(exp_metrics) <= set(metrics)
    for key, val in exp_metrics.items():
        assert abs(metrics[key] - val.mean().item()) <= 1e-4 * max(1.0, abs(val.mean().item())), key
    for p, e in zip(lora, exp_grads):
        assert torch.isfinite(p.grad).all() and rel(p.grad, e) < 1e-4


def test_precomputed_reference_and_loss_options_pass_through():
    model = tiny()  # bare model: a reference pass would need ref_model, so the batch's values must be used
    batch = pref_batch()
    c, r = reference_sequence_logps(model, batch)
    batch["ref_chosen_logps"] = c.detach().float() + torch.randn(3)
    batch["ref_rejected_logps"] = r.detach().float() + torch.randn(3)
    lengths = batch["completion_mask"][:, 1:].sum(1).double()
    lc, lr = lengths.chunk(2)
    loss, _ = compute_dpo_loss(model, batch, beta=0.2, loss_type="ipo", average_log_prob=False)
    ipo = ((c - batch["ref_chosen_logps"].double()) / lc - (r - batch["ref_rejected_logps"].double()) / lr
           - 1 / (2 * 0.2)) ** 2
    assert rel(loss.detach(), ipo.mean().detach()) < 1e-4
    loss, metrics = compute_dpo_loss(model, batch, beta=0.2, label_smoothing=0.1, loss_type="robust")
    assert torch.isfinite(loss)
    avg_loss, avg_metrics = compute_dpo_loss(model, batch, average_log_prob=True)
    assert abs(avg_metrics["logps/chosen"] - (c / lc).mean().item()) < 1e-4 * abs((c / lc).mean().item()) + 1e-6


def test_separate_ref_model():
    policy, ref = tiny(), tiny()
    batch = pref_batch()
    loss, metrics = compute_dpo_loss(policy, batch, ref_model=ref, beta=0.5)
    c, r = reference_sequence_logps(policy, batch)
    rc, rr = reference_sequence_logps(ref, batch)
    assert abs(metrics["rewards/chosen"] - (0.5 * (c - rc)).mean().item()) < 1e-4
    assert rel(loss.detach(), (-F.logsigmoid(0.5 * ((c - rc) - (r - rr)))).mean().detach()) < 1e-4


def _ref_and_policy_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    args = (batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        policy = token_log_probs(model, *args)
        with reference_model(model) as ref:
            reference = token_log_probs(ref, *args)
    return policy, reference


def test_fresh_adapter_reference_is_frozen_base():
    model = P.patch(qlora(init_lora_weights=True), body=False)
    model.train()
    batch = pref_batch()
    policy0, ref0 = _ref_and_policy_logps(model, batch)
    torch.testing.assert_close(policy0, ref0, rtol=0, atol=1e-6)  # fresh LoRA: policy == base
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA B starts at zero: the first step only moves B
        loss, _ = compute_dpo_loss(model, batch, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy1, ref1 = _ref_and_policy_logps(model, batch)
    assert torch.equal(ref0, ref1)  # the reference does not move
    assert (policy1 - policy0).abs().max() > 1e-4  # the policy does


@pytest.mark.parametrize("qlora_linear", [True, False])
def test_reference_pass_bypasses_patched_lora_without_peft_toggling(qlora_linear, monkeypatch):
    """With every LoRA layer patched, the adapters-disabled reference runs through a context variable
    (peft's disable_adapter, which walks and reports every layer, is not called) and gives peft's numbers;
    with unpatched LoRA layers it goes through peft. Either way the policy is unchanged afterwards."""
    from peft import PeftModel

    model = qlora()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = pref_batch()
    want_loss, _ = compute_dpo_loss(model, batch)  # unpatched: peft's disable_adapter
    _, want_ref = _ref_and_policy_logps(model, batch)
    P.patch(model, qlora_linear=qlora_linear)
    calls = []
    original = PeftModel.disable_adapter
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: calls.append(1) or original(self))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    loss, _ = compute_dpo_loss(model, batch)
    _, ref = _ref_and_policy_logps(model, batch)
    assert len(calls) == (0 if qlora_linear else 2)
    assert rel(loss.detach(), want_loss.detach()) < 1e-6 and rel(ref, want_ref) < 1e-6
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(m.gradient_checkpointing for m in model.base_model.model.model.layers)
    assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_ref_adapter_is_the_starting_adapter():
    model = P.patch(qlora(init_lora_weights=False), body=False)
    model.train()
    batch = pref_batch()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    args = (batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        start = token_log_probs(model, *args)
        with model.disable_adapter():
            base = token_log_probs(model, *args)
    P.add_reference_adapter(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = compute_dpo_loss(model, batch, beta=1.0)
    loss.backward()
    opt.step()
    policy, reference = _ref_and_policy_logps(model, batch)
    torch.testing.assert_close(reference, start, rtol=0, atol=1e-5)
    assert (reference - base).abs().max() > 1e-3  # not the base model
    assert (policy - start).abs().max() > 1e-4  # the policy moved
    loss_ref_named, _ = compute_dpo_loss(model, batch, ref_adapter_name="ref")
    loss_default, _ = compute_dpo_loss(model, batch)
    assert torch.equal(loss_ref_named, loss_default)


def test_bad_input():
    model = tiny()
    good = pref_batch(pairs=2)
    with pytest.raises(ValueError, match="even"):
        compute_dpo_loss(model, {k: v[:3] for k, v in good.items()}, ref_model=tiny())
    with pytest.raises(ValueError, match="completion_mask"):
        compute_dpo_loss(model, {**good, "completion_mask": good["completion_mask"][:, :-1]}, ref_model=tiny())
    with pytest.raises(ValueError, match="attention_mask"):
        compute_dpo_loss(model, {**good, "attention_mask": good["attention_mask"][:2]}, ref_model=tiny())
    with pytest.raises(ValueError, match="completion_mask"):
        compute_dpo_loss(model, {"input_ids": good["input_ids"]}, ref_model=tiny())
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        compute_dpo_loss(model, {**good, "ref_chosen_logps": torch.zeros(3), "ref_rejected_logps": torch.zeros(2)})
    with pytest.raises(ValueError, match="ref_model"):
        compute_dpo_loss(model, good)  # bare policy, no reference given
    with pytest.raises(TypeError, match="batch"):
        compute_dpo_loss(model, [1, 2])
    for bad in (V, -3):  # token ids outside the vocabulary: named, with the value and the vocabulary size
        ids = good["input_ids"].clone()
        ids[1, 4] = bad
        with pytest.raises(ValueError, match=rf"input_ids'\] holds token id {bad}, outside .*\[0, {V}\)"):
            compute_dpo_loss(model, {**good, "input_ids": ids}, ref_model=tiny())
    from dpo_fast.patching.support import UnsupportedModelError
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="supports"):
        compute_dpo_loss(gpt2, good, ref_model=gpt2)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    import rss_probe
    from transformers import LlamaConfig, LlamaForCausalLM
    from dpo_fast.dpo import compute_dpo_loss
    torch.manual_seed(0)
    V, pairs, T = 128256, 2, 256
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    policy.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, V, (2 * pairs, T))
    comp = torch.ones_like(ids); comp[:, :32] = 0
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=comp)
    def small(t):  # warm-up on a small batch: one-off library initialisation is not the step's memory
        return {{k: v[:, :t] for k, v in t_batch.items()}}
    t_batch = batch
    warm, _ = compute_dpo_loss(policy, small(40), ref_model=ref)
    warm.backward()
    policy.zero_grad(set_to_none=False)
    before = rss_probe.start()
    loss, metrics = compute_dpo_loss(policy, batch, ref_model=ref)
    loss.backward()
    peak = rss_probe.peak()
    print(json.dumps(dict(before=before, peak=peak, tokens=ids.numel(), vocab=V, loss=loss.item())))
""")


def test_memory_far_below_logits_on_128k_vocab():
    script = _MEMORY_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = {**os.environ, **rss_probe.ENV, "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    logits_bytes = res["tokens"] * res["vocab"] * 4  # one fp32 copy of the logits: ~525 MB
    extra = res["peak"] - res["before"]
    assert res["loss"] == res["loss"]  # not NaN
    # the materialized path needs the logits plus their log_softmax (>= 2 copies); we need < 1/3 of one
    assert extra < logits_bytes / 3, (extra, logits_bytes)
