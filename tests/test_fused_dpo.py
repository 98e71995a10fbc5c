"""fused_linear_dpo_loss vs the unfused float64 path (materialized logits, log_softmax, gather, sum, loss).

The op runs on the `device` fixture for the triton backend (compiled on a GPU, the interpreter on CPU)
and on the CPU for the torch backend; the float64 references are always computed on the CPU. Cases marked
gpu-* run only on CUDA (tests/gpu_cases.py).
"""
import math

import pytest
import torch

from dpo_fast import dpo_loss, fused_linear_dpo_loss
from dpo_fast.ops.backend import use_backend
from dpo_fast.ops.linear_log_probs import chunking
from gpu_cases import gpu_case

pytestmark = pytest.mark.kernels


def _dev(backend: str, device: str) -> str:
    """Where the op's inputs live: the test device for Triton, the CPU for the torch mirror."""
    return device if backend == "triton" else "cpu"


def _rel(a, b):
    a, b = (torch.as_tensor(x).detach().cpu().to(torch.float64) for x in (a, b))
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _batch(b, t, d, vocab, *, trainable=False, lengths=None, device="cpu"):
    """Inputs drawn on the CPU (same draws on every device), then moved to `device` as leaves."""
    hidden = torch.randn(2 * b, t, d)
    weight = torch.randn(vocab, d) / d**0.5 * 2
    labels = torch.randint(0, vocab, (2 * b, t))
    prompt = torch.randint(1, t // 2, (2 * b,))
    prompt[b:] = prompt[:b]  # chosen and rejected share the prompt
    for r in range(2 * b):
        end = t if lengths is None else min(t, int(prompt[r]) + lengths[r])
        labels[r, : prompt[r]] = -100
        labels[r, end:] = -100
    labels[0, -1] = vocab - 1 if labels[0, -1] != -100 else -100
    return hidden.to(device).requires_grad_(), weight.to(device).requires_grad_(trainable), labels.to(device)


def _unfused(hidden, weight, labels, ref_hidden, *, average=False, softcap=None):
    """float64 on the CPU: per-row masked sums of log_softmax-gathered label log-probs, policy and reference
    (logits capped to softcap * tanh(z / softcap) first when softcap is given)."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_(weight.requires_grad)
    labels, ref_hidden = labels.cpu(), ref_hidden.detach().cpu()
    mask = labels != -100

    def seq(hh, ww):
        z = hh @ ww.t()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        lp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        lp = torch.where(mask, lp, 0.0)
        s = lp.sum(1)
        return (s / mask.sum(1).clamp(min=1) if average else s), z

    pol, z = seq(h, w)
    with torch.no_grad():
        ref, _ = seq(ref_hidden.double(), weight.detach().cpu().double())
    return pol, ref, z, mask, h, w


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_sigmoid_matches_unfused(backend, trainable, device):
    b, t, d, vocab, beta = 3, 13, 24, 301, 0.3
    hidden, weight, labels = _batch(b, t, d, vocab, trainable=trainable, device=_dev(backend, device))
    ref_hidden = hidden.detach() + 0.1 * torch.randn_like(hidden)
    with use_backend(backend), chunking(16, 128):
        loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, beta=beta)
        loss.backward()
    pol, ref, z, mask, h, w = _unfused(hidden, weight, labels, ref_hidden)
    logits = beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
    ref_loss = -torch.nn.functional.logsigmoid(logits).mean()
    ref_loss.backward()
    assert _rel(loss, ref_loss) < 1e-5
    assert _rel(hidden.grad, h.grad) < 1e-5
    if trainable:
        assert _rel(weight.grad, w.grad) < 1e-5
    cr, rr = beta * (pol[:b] - ref[:b]), beta * (pol[b:] - ref[b:])
    expect = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(), "rewards/margins": (cr - rr).mean(),
        "logps/chosen": pol[:b].mean(), "logps/rejected": pol[b:].mean(),
        "logits/chosen": z[:b][mask[:b]].mean(), "logits/rejected": z[b:][mask[b:]].mean(),
    }
    p = torch.softmax(z, -1)
    expect["entropy"] = (-(p * p.log()).sum(-1))[mask].mean()
    expect["mean_token_accuracy"] = (z.argmax(-1) == labels.cpu())[mask].double().mean()
    for k, v in expect.items():
        assert math.isclose(metrics[k], v.item(), rel_tol=1e-4, abs_tol=1e-5), (k, metrics[k], v.item())


@pytest.mark.parametrize("dtype,trainable,size", [
    pytest.param(torch.bfloat16, False, (2, 13, 24, 301), id="bf16-frozen"),
    pytest.param(torch.bfloat16, True, (2, 13, 24, 301), id="bf16-trainable"),
    gpu_case(torch.float32, False, (4, 97, 136, 5000 + 11), id="fp32-frozen"),
    gpu_case(torch.float32, True, (4, 97, 136, 5000 + 11), id="fp32-trainable"),
    gpu_case(torch.bfloat16, False, (4, 97, 136, 5000 + 11), id="bf16-frozen"),
])
def test_sigmoid_no_worse_than_unfused_in_the_same_dtype(dtype, trainable, size, device):
    """Low precision, and fp32 at sizes where rounding adds up: a sequence log-prob sums ~100 terms of
    magnitude ~8, so the unfused path in the same dtype on the same device already loses ~1e-5 relative on
    the margin and ~3e-5 on grad_h in fp32 (measured on an H200 and on the CPU). The fused path may be at
    most twice that error against float64, and never needs to beat 1e-5 (fp32) / 1e-2 (bf16)."""
    b, t, d, vocab = size
    beta, floor = 0.3, {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    hidden, weight, labels = _batch(b, t, d, vocab)
    hidden, weight = hidden.detach().to(dtype), weight.detach().to(dtype)
    labels[-1] = -100  # one rejected completion entirely masked
    ref_hidden = (hidden.float() + 0.1 * torch.randn(hidden.shape)).to(dtype)

    def leaves(dev):
        return hidden.to(dev).clone().requires_grad_(), weight.to(dev).clone().requires_grad_(trainable)

    def unfused(hh, ww, rh, lab):  # materialized logits in the inputs' dtype, log-softmax in fp32 (or float64)
        def seq(x, wt):
            z = x @ wt.t()
            lp = torch.log_softmax(z if z.dtype == torch.float64 else z.float(), -1)
            return torch.where(lab != -100, lp.gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1), 0.0).sum(1)

        pol = seq(hh, ww)
        with torch.no_grad():
            ref = seq(rh, ww.detach())
        margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
        return -torch.nn.functional.logsigmoid(beta * margin).mean(), beta * (pol[:b] - ref[:b]).mean()

    h, w = leaves(device)
    with use_backend("triton"):
        loss, metrics = fused_linear_dpo_loss(h, w, labels.to(device), ref_hidden=ref_hidden.to(device), beta=beta)
        loss.backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_(trainable)
    ref_loss, ref_chosen = unfused(h64, w64, ref_hidden.double(), labels)
    ref_loss.backward()
    hb, wb = leaves(device)
    base_loss, base_chosen = unfused(hb, wb, ref_hidden.to(device), labels.to(device))
    base_loss.backward()
    got = {"loss": _rel(loss, ref_loss), "grad_h": _rel(h.grad, h64.grad),
           "rewards/chosen": abs(metrics["rewards/chosen"] - ref_chosen.item())}
    base = {"loss": _rel(base_loss, ref_loss), "grad_h": _rel(hb.grad, h64.grad),
            "rewards/chosen": abs(base_chosen.item() - ref_chosen.item())}
    if trainable:
        got["grad_w"], base["grad_w"] = _rel(w.grad, w64.grad), _rel(wb.grad, w64.grad)
    for key, err in got.items():
        scale = max(1.0, abs(ref_chosen.item())) if key == "rewards/chosen" else 1.0  # an absolute difference
        assert err <= max(floor * scale, 2 * base[key]), (key, err, base[key])
    assert (h.grad[-1] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
        dict(loss_type="ipo"),
        dict(loss_type="sigmoid", average_log_prob=True),
        dict(loss_type="hinge", label_smoothing=0.0),
        dict(loss_type="sigmoid", use_weighting=True),
    ],
    ids=["mpo", "ipo", "average", "hinge", "wpo"],
)
def test_loss_options_match_unfused(backend, opts, device):
    b, t, d, vocab, beta = 2, 11, 16, 257, 0.2
    dev = _dev(backend, device)
    hidden, weight, labels = _batch(b, t, d, vocab, device=dev)
    ref_c, ref_r = torch.randn(b) - 20, torch.randn(b) - 20
    opts = dict(opts)
    with use_backend(backend), chunking(8, 100):
        loss, metrics = fused_linear_dpo_loss(
            hidden, weight, labels, ref_chosen_logps=ref_c.to(dev), ref_rejected_logps=ref_r.to(dev), beta=beta,
            **opts,
        )
        loss.backward()
    average = opts.pop("average_log_prob", False)
    use_weighting = opts.pop("use_weighting", False)
    pol, _, z, mask, h, _ = _unfused(hidden, weight, labels, hidden.detach(), average=average)
    lengths = mask.sum(1)
    types = opts["loss_type"] if isinstance(opts["loss_type"], list) else [opts["loss_type"]]
    kwargs = {}
    if "sft" in types:
        kwargs["chosen_nll"] = -pol[:b].sum() / lengths[:b].sum()
    if use_weighting:
        logp = torch.log_softmax(z, -1)
        tok = logp.gather(-1, labels.cpu().clamp_min(0)[..., None]).squeeze(-1)
        lsp2 = torch.logsumexp(2 * logp, -1)
        w_seq = torch.exp(torch.where(mask, tok - lsp2, 0.0).sum(1) / lengths).detach()
        kwargs["sample_weights"] = w_seq[:b] * w_seq[b:]
    ref_losses, _, _ = dpo_loss(
        pol[:b], pol[b:], ref_c.double(), ref_r.double(), beta=beta,
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], **opts, **kwargs,
    )
    ref_loss = ref_losses.mean()
    ref_loss.backward()
    # hinge / ipo losses can sit near their kink or minimum, where the loss is a small difference of
    # O(beta * |logps|) terms: judge it relative to that scale (the log-probs carry fp32 rounding).
    scale = max(abs(ref_loss.item()), beta * pol.detach().abs().max().item())
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * scale
    assert _rel(hidden.grad, h.grad) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_softcap_matches_unfused(backend, trainable, device):
    """softcap=c (Gemma 2's final_logit_softcapping) caps the policy's and the on-the-fly reference's logits:
    loss, gradients and the logit metrics are those of the capped logits (|z| reaches ~3c here)."""
    b, t, d, vocab, beta, cap = 3, 13, 24, 301, 0.3, 2.5
    hidden, weight, labels = _batch(b, t, d, vocab, trainable=trainable, device=_dev(backend, device))
    with torch.no_grad():
        hidden.mul_(2.0)
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    with use_backend(backend), chunking(16, 128):
        loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, beta=beta, softcap=cap)
        loss.backward()
    pol, ref, z, mask, h, w = _unfused(hidden, weight, labels, ref_hidden, softcap=cap)
    assert (z.abs() > 0.9 * cap).any()  # the cap really bends these logits
    ref_loss = -torch.nn.functional.logsigmoid(beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))).mean()
    ref_loss.backward()
    assert _rel(loss, ref_loss) < 1e-5
    assert _rel(hidden.grad, h.grad) < 1e-5
    if trainable:
        assert _rel(weight.grad, w.grad) < 1e-5
    p = torch.softmax(z, -1)
    expect = {"logps/chosen": pol[:b].mean(), "logps/rejected": pol[b:].mean(),
              "rewards/margins": beta * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:])).mean(),
              "logits/chosen": z[:b][mask[:b]].mean(), "logits/rejected": z[b:][mask[b:]].mean(),
              "entropy": (-(p * p.log()).sum(-1))[mask].mean()}
    for k, v in expect.items():
        assert math.isclose(metrics[k], v.item(), rel_tol=1e-4, abs_tol=1e-5), (k, metrics[k], v.item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo"])
def test_average_log_prob_length_normalising_types_divide_once(backend, loss_type, device):
    """average_log_prob=True gives per-token means; ipo / sigmoid_norm / simpo use them as TRL's formulas do,
    without dividing by the completion length again (float64 reference written from the formulas)."""
    b, t, d, vocab, beta, gamma = 3, 23, 16, 211, 0.3, 0.5
    # completions of very different lengths (1 to 14 tokens): a second division would change every pair
    hidden, weight, labels = _batch(b, t, d, vocab, lengths=[14, 1, 6, 2, 13, 9], device=_dev(backend, device))
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    with use_backend(backend), chunking(8, 64):
        loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, beta=beta,
                                              loss_type=loss_type, average_log_prob=True, simpo_gamma=gamma)
        loss.backward()
    pol, ref, _, mask, h, _ = _unfused(hidden, weight, labels, ref_hidden, average=True)  # per-token means
    lengths = mask.sum(1)
    assert lengths.min() == 1 and lengths.max() >= 9
    pc, pr, rc, rr = pol[:b], pol[b:], ref[:b], ref[b:]
    if loss_type == "ipo":  # TRL: (h - 1 / (2 beta))^2 with h the difference of mean log-ratios
        losses = (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2
        rewards = beta * (pc - rc), beta * (pr - rr)
    elif loss_type == "sigmoid_norm":  # -log sigmoid(beta * h), h of mean log-ratios
        losses = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr)))
        rewards = beta * (pc - rc), beta * (pr - rr)
    else:  # SimPO (reference-free): -log sigmoid(beta * (mean logp_c - mean logp_r) - gamma)
        losses = -torch.nn.functional.logsigmoid(beta * (pc - pr) - gamma)
        rewards = beta * pc, beta * pr
    want = losses.mean()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    assert _rel(hidden.grad, h.grad) < 1e-5
    assert math.isclose(metrics["rewards/chosen"], rewards[0].mean().item(), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(metrics["rewards/rejected"], rewards[1].mean().item(), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(metrics["logps/chosen"], pc.mean().item(), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_degenerate_batches(backend, device):
    """A pair whose completion is fully masked, very long next to very short completions."""
    b, t, d, vocab = 3, 40, 16, 200
    hidden, weight, labels = _batch(b, t, d, vocab, lengths=[37, 1, 20, 1, 37, 0], device=_dev(backend, device))
    labels[b + 2] = -100  # rejected completion of pair 2 entirely masked
    with use_backend(backend), chunking(32, 64):
        loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=hidden.detach(), beta=0.1)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert (hidden.grad[b + 2] == 0).all()
    # with the reference equal to the policy, every reward is 0 and the loss is log 2
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def test_single_pair_and_reference_free():
    hidden, weight, labels = _batch(1, 9, 16, 128)
    loss, metrics = fused_linear_dpo_loss(hidden, weight, labels, loss_type="simpo", beta=2.0)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "logps/rejected", "entropy"}


@pytest.mark.parametrize(
    "change,words",
    [
        (dict(labels=torch.zeros(3, 9, dtype=torch.long)), "even"),
        (dict(hidden=torch.randn(2, 8, 16)), "hidden must be"),
        (dict(ref_chosen_logps=torch.zeros(1)), "both"),
        (dict(), "reference log-probs are missing"),
        (dict(ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1), loss_type="nope"), "unknown loss type"),
    ],
)
def test_bad_input(change, words):
    hidden, weight, labels = _batch(1, 9, 16, 128)
    args = dict(hidden=hidden, weight=weight, labels=labels)
    for k in ("hidden", "labels"):
        if k in change:
            args[k] = change.pop(k)
    with pytest.raises(ValueError, match=words):
        fused_linear_dpo_loss(args["hidden"], args["weight"], args["labels"], **change)
