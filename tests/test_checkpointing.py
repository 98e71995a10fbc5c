"""The layers' checkpoint functions patch() sets (dpo_fast.patching.checkpointing), and the recompute tail skip.

In a recompute the patched down_proj runs its LoRA op with output=False. These tests check that the
gradients do not change (against the unpatched model, and the op against itself with output=True),
that the skip really happens once per layer and backward, under every way checkpointing gets
installed, and never where the output is read; and that offloaded checkpointing and the skip come back
when checkpointing is enabled again after patch().
"""
import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint

import dpo_fast.ops.offload_checkpoint as offload_module
import dpo_fast.patching.body as body
from dpo_fast.ops.offload_checkpoint import offloaded_checkpoint
from dpo_fast.ops.qlora_linear import lora_linear
from dpo_fast.patching.body import patch_body, unpatch_body
from dpo_fast.patching.checkpointing import TailSkippingCheckpoint, recomputing, unwrapped
from test_body_patch import (  # noqa: F401
    FP32_GRAD_TOL, VOCAB, _assert_close, _batch, _loss_and_grads, _qlora_model, qlora_dir)
from test_prefix_sharing import _lora_model

peft = pytest.importorskip("peft")
LAYERS = 2


def test_only_calls_after_the_first_are_recomputes():
    seen = []

    def layer(tag):
        seen.append((tag, recomputing()))
        if tag == "outer-recompute":  # a layer checkpoint that starts inside some outer recompute
            TailSkippingCheckpoint(lambda f, *a: (f(*a), f(*a)))(layer, "inner")
        return tag

    def twice(function, tag):  # a checkpoint: the forward, then the recompute
        function(tag)
        return function(tag.replace("forward", "recompute"))

    assert TailSkippingCheckpoint(twice)(layer, "outer-forward") == "outer-recompute"
    assert seen == [("outer-forward", False), ("outer-recompute", True), ("inner", False), ("inner", True)]
    assert not recomputing()
    wrapped = TailSkippingCheckpoint(offloaded_checkpoint)
    assert unwrapped(wrapped) is offloaded_checkpoint and unwrapped(offloaded_checkpoint) is offloaded_checkpoint


@pytest.mark.parametrize("dtype,p", [(torch.float64, 0.0), (torch.float64, 0.3), (torch.bfloat16, 0.0)])
def test_lora_linear_without_output_back_propagates_the_same(dtype, p):
    n, d_in, d_out, r = 37, 24, 19, 5
    base = torch.nn.Linear(d_in, d_out, bias=True).to(dtype).requires_grad_(False)
    x = torch.randn(3, n, d_in, dtype=dtype)
    a = torch.randn(r, d_in, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    b = torch.randn(d_out, r, dtype=a.dtype)
    mask = torch.rand(x.shape) >= p if p else None
    dy = torch.randn(3, n, d_out, dtype=dtype)
    grads = []
    for output in (True, False):
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        y = lora_linear(xs, base, as_, bs, 2.0, dropout_p=p, mask=mask, output=output)
        assert y.shape == (3, n, d_out) and y.dtype == dtype
        y.backward(dy)
        grads.append([xs.grad, as_.grad, bs.grad])
    for with_output, without in zip(*grads):
        assert torch.equal(with_output, without)


def _count_parked(monkeypatch) -> list:
    """The shapes of the tensors offloaded checkpointing parks, in order; the extra ones (a layer's mid residual,
    parked beside its input) as ("mid", shape)."""
    parked = []
    real_add = offload_module._Parked.add

    def counting_add(self, t):
        parked.append(("mid", t.shape) if self.host else t.shape)
        real_add(self, t)

    monkeypatch.setattr(offload_module._Parked, "add", counting_add)
    return parked


def _count_tail_skips(monkeypatch) -> dict:
    """Count the patched LoRA ops run with and without their output (body's lora_linear calls)."""
    counts = {True: 0, False: 0}

    def counting(*args, output=True, **kwargs):
        counts[output] += 1
        return lora_linear(*args, output=output, **kwargs)

    monkeypatch.setattr(body, "lora_linear", counting)
    return counts


CHECKPOINTING = ["non-reentrant", "reentrant", "offload", "enabled after patch"]


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
def test_qlora_llama_recompute_skips_down_proj_and_matches(qlora_dir, checkpointing, device, monkeypatch):
    model = _qlora_model(qlora_dir, torch.float32, device)
    enable = lambda: model.gradient_checkpointing_enable(  # noqa: E731
        gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    enable()
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    layers = model.base_model.model.model.layers
    original = layers[0]._gradient_checkpointing_func
    if checkpointing == "enabled after patch":
        model.gradient_checkpointing_disable()
    patch_body(model, offload_checkpointing=checkpointing == "offload")
    if checkpointing == "enabled after patch":
        enable()  # a new function on every layer; the patched model's next call wraps it again
        model(input_ids=batch["input_ids"][:, :2])
    assert all(isinstance(layer._gradient_checkpointing_func, TailSkippingCheckpoint) for layer in layers)
    counts = _count_tail_skips(monkeypatch)
    got = _loss_and_grads(model, batch)
    # forward: 2 single ops (o, down) per layer, q/k/v and gate/up grouped; the recompute: o in full (without
    # its output when offloading parked the mid residual), down without its output
    offload = checkpointing == "offload"
    assert counts == ({True: 2 * LAYERS, False: 2 * LAYERS} if offload else {True: 3 * LAYERS, False: LAYERS}), counts
    _assert_close(got, want, 1e-5)
    unpatch_body(model)
    if checkpointing in ("non-reentrant", "reentrant"):
        assert layers[0]._gradient_checkpointing_func is original
    else:
        assert not isinstance(layers[0]._gradient_checkpointing_func, TailSkippingCheckpoint)


def _family_model(family: str):
    """test_prefix_sharing's tiny peft LoRA model of `family`, with test_body_patch's vocabulary (for _batch)."""
    return _lora_model(family, vocab_size=VOCAB, num_hidden_layers=LAYERS)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family_recomputes_exactly(family, offload, device, monkeypatch):
    """Each supported decoder layer feeds down_proj's output only to its residual add, and o_proj's only to the
    mid residual that offloading parks: skipping them is exact."""
    model = _family_model(family).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    patch_body(model, offload_checkpointing=offload)
    counts = _count_tail_skips(monkeypatch)
    _assert_close(_loss_and_grads(model, batch), want, FP32_GRAD_TOL)
    assert counts[False] == LAYERS * (2 if offload else 1)


def test_park_returns_the_forward_tensor_in_the_recompute(device):
    """A tensor a layer parks in its offloaded forward comes back, bitwise, in its recompute (here the
    recompute would compute another value), and the gradient reaches what the recompute computed."""
    from dpo_fast.ops.offload_checkpoint import park, parked
    from dpo_fast.patching.checkpointing import mid_residual

    weight = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    calls, seen = [], []

    def layer(x):
        calls.append(parked())
        mid = x * weight + 0.5 * len(calls)  # a different value in the recompute
        used = mid_residual(mid)
        seen.append(used.detach().clone())
        return (used * used).sum(-1)

    assert park(torch.ones(2)) is False and parked() is None  # outside an offloaded forward: nothing parked
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    offloaded_checkpoint(layer, x).sum().backward()
    assert calls[0] is None and calls[1] is not None and torch.equal(seen[1], seen[0])
    mid = x * weight + 0.5
    torch.testing.assert_close(weight.grad, (2 * mid * x).sum(0), rtol=1e-12, atol=1e-12)
    assert parked() is None


def test_offload_without_the_norm_kernel_keeps_o_proj(device, monkeypatch):
    """The mid residual is parked by dpo_fast's post-attention norm: with rms_norm=False nothing is parked
    beside the layer inputs and the recompute runs o_proj in full."""
    model = _family_model("llama").to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    patch_body(model, rms_norm=False, offload_checkpointing=True)
    parked = _count_parked(monkeypatch)
    counts = _count_tail_skips(monkeypatch)
    _assert_close(_loss_and_grads(model, batch), want, FP32_GRAD_TOL)
    assert counts == {True: 3 * LAYERS, False: LAYERS} and len(parked) == LAYERS
    assert not any(p[0] == "mid" for p in parked)


def test_no_skip_without_checkpointing_or_inside_an_outer_checkpoint(qlora_dir, device, monkeypatch):
    """Without layer checkpointing nothing is skipped; with an outer checkpoint around all the layers too,
    the layers' own forwards run in the outer recompute and their outputs are used: still exact."""
    model = _qlora_model(qlora_dir, torch.float32, device)
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    patch_body(model)
    counts = _count_tail_skips(monkeypatch)
    _assert_close(_loss_and_grads(model, batch), want, 1e-5)
    assert counts[False] == 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    loss = torch_checkpoint.checkpoint(lambda ids, m, lab: model(input_ids=ids, attention_mask=m, labels=lab).loss,
                                       batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       use_reentrant=False)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    _assert_close((loss.detach(), got), want, 1e-5)


def test_switched_off_nothing_is_wrapped_or_skipped(device, monkeypatch):
    model = _family_model("llama").to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(device)
    want = _loss_and_grads(model, batch)
    counts = patch_body(model, recompute_tail_skip=False)
    assert counts["recompute_tail_skip"] == 0 and counts["qlora_linear"] == 7 * LAYERS
    layers = model.base_model.model.model.layers
    assert not any(isinstance(layer._gradient_checkpointing_func, TailSkippingCheckpoint) for layer in layers)
    skips = _count_tail_skips(monkeypatch)
    _assert_close(_loss_and_grads(model, batch), want, FP32_GRAD_TOL)
    assert skips == {True: 4 * LAYERS, False: 0}  # o and down, in forward and in the recompute


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("precision", ["bf16 weights", "fp32 under bf16 autocast"])
def test_skip_gives_bitwise_the_same_gradients_as_no_skip(precision, offload, device, monkeypatch):
    """Only the unread outputs are skipped: with and without the skip, every gradient is bitwise the same."""
    import copy

    model = _family_model("llama").to(device)
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    patch_body(model, offload_checkpointing=offload)
    patch_body(twin, offload_checkpointing=offload, recompute_tail_skip=False)
    batch = _batch(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "bf16 weights")
    skips = _count_tail_skips(monkeypatch)
    with autocast:
        loss, grads = _loss_and_grads(model, batch)
    assert skips[False] == LAYERS * (2 if offload else 1)
    with autocast:
        twin_loss, twin_grads = _loss_and_grads(twin, batch)
    assert torch.equal(loss, twin_loss)
    assert grads.keys() == twin_grads.keys() and all(torch.equal(grads[n], twin_grads[n]) for n in grads)


def test_offload_and_skip_come_back_after_checkpointing_is_enabled_again(qlora_dir, device, monkeypatch):
    """gradient_checkpointing_enable() after patch(offload_checkpointing=True) (a trainer starting, TRL's
    reference pass) puts transformers' function on every layer; the next call of the patched model puts
    back the offloaded one, wrapped, and the step offloads and skips; unpatch restores the original settings."""
    from dpo_fast.patching import patch, unpatch

    model = _qlora_model(qlora_dir, torch.float32, device)
    batch = _batch(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want = _loss_and_grads(model, batch)
    model.gradient_checkpointing_disable()
    layers = model.base_model.model.model.layers
    before = [dict(layer.__dict__) for layer in layers]
    patch(model, offload_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not any(unwrapped(layer._gradient_checkpointing_func) is offloaded_checkpoint for layer in layers)
    model(input_ids=batch["input_ids"][:, :3])
    for layer in layers:
        func = layer._gradient_checkpointing_func
        assert isinstance(func, TailSkippingCheckpoint) and func.inner is offloaded_checkpoint
    parked = _count_parked(monkeypatch)
    skips = _count_tail_skips(monkeypatch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # once more
    _assert_close(_loss_and_grads(model, batch), want, 1e-5)
    assert [p[0] == "mid" for p in parked] == [False, True] * LAYERS and skips[False] == 2 * LAYERS
    unpatch(model)
    assert [layer.__dict__.keys() for layer in layers] == [b.keys() for b in before]
    assert not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("offload", [False, True])
def test_skip_with_lora_dropout_gives_bitwise_the_same_gradients(offload, device, monkeypatch):
    """With LoRA dropout the skipped projections still draw their masks (the recompute replays the forward's
    RNG), so the gradients stay bitwise those of the recompute without the skip."""
    import copy

    model = _family_model("llama").to(device)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    patch_body(model, offload_checkpointing=offload)
    patch_body(twin, offload_checkpointing=offload, recompute_tail_skip=False)
    batch = _batch(device)
    skips = _count_tail_skips(monkeypatch)
    torch.manual_seed(3)
    loss, grads = _loss_and_grads(model, batch)
    assert skips[False] == LAYERS * (2 if offload else 1)
    torch.manual_seed(3)
    twin_loss, twin_grads = _loss_and_grads(twin, batch)
    assert torch.equal(loss, twin_loss)
    assert grads.keys() == twin_grads.keys() and all(torch.equal(grads[n], twin_grads[n]) for n in grads)
