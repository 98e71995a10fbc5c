"""The fused head with final-logit softcapping (``c * tanh(z / c)``) vs float64 autograd; tied head weights.

Triton kernels run under the interpreter on CPU (compiled on a GPU); the torch mirror on the CPU.
Each reference materializes the logits in float64, caps them, and takes log_softmax + gather.
"""
from contextlib import nullcontext

import pytest
import torch

from dpo_fast import linear_log_probs
from dpo_fast.ops.backend import use_backend
from dpo_fast.ops.linear_log_probs import chunking, compacted_log_probs, linear_log_probs_with_stats
from head_checks import assert_head_matches

pytestmark = pytest.mark.kernels
BACKENDS = ["torch", "triton"]
IGNORE = -100


def _dev(backend: str, device: str) -> str:
    return device if backend == "triton" else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def _cap(z: torch.Tensor, c) -> torch.Tensor:
    return c * torch.tanh(z / c) if c else z


def _make(shape, d, vocab, logit_scale, trainable, with_bias, device="cpu"):
    """Random fp32 inputs whose logits have standard deviation ~ logit_scale; labels with ignored
    positions, the first and last vocabulary ids, and (for 2-d shapes) an all-ignored row."""
    hidden = torch.randn(*shape, d)
    weight = torch.randn(vocab, d) * (logit_scale / d**0.5)
    bias = torch.randn(vocab) * (0.3 * logit_scale) if with_bias else None
    labels = torch.randint(0, vocab, shape)
    flat = labels.view(-1)
    flat[torch.rand(flat.shape) < 0.25] = IGNORE
    flat[0] = 0
    flat[-1] = vocab - 1
    if len(shape) == 2:
        labels[1, :] = IGNORE
    hidden = hidden.to(device).requires_grad_()
    weight = weight.to(device).requires_grad_(trainable)
    bias = bias.to(device).requires_grad_(trainable) if with_bias else None
    return hidden, weight, bias, labels.to(device)


def _reference(hidden, weight, bias, labels, softcap):
    """float64 autograd on the CPU: logits, cap, log_softmax, gather; also returns the capped logits."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_(weight.requires_grad)
    b = bias.detach().cpu().double().requires_grad_(bias.requires_grad) if bias is not None else None
    labels = labels.cpu()
    zc = _cap(h @ w.t() + (b if b is not None else 0), softcap)
    logp = torch.log_softmax(zc, -1)
    mask = labels != IGNORE
    out = torch.where(mask, logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    return out, (h, w, b), zc, mask


# Tolerances from the largest relative errors measured over 200 seeds per case on the torch mirror
# and 25 under the Triton interpreter (the same distribution): log-probs and statistics <= 2.5e-7,
# gradients <= 1.7e-6 (the c = 2.5 large-logit case), tied <= 5.4e-7, saturated <= 1.0e-6.
# Confident tokens, 3000 seeds: grad_h <= 5.9e-6 (the conditioning of the inputs: plain fp32
# autograd is no better), |log p_y error| <= 2.3e-6 (a few ulp of lse ~ c).
TOL = 1e-5
CONF_TOL = 2e-5
LOGP_ABS = 6e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "shape,d,vocab,chunks,softcap,scale",
    [((3, 23), 72, 1013, (16, 300), 5.0, 6.0), ((37,), 40, 517, (8, 128), 2.5, 10.0),
     ((2, 9), 33, 1013, None, 30.0, 20.0)],
    ids=["odd3d-c5", "odd1d-c2.5-large", "default-chunks-c30"],
)
def test_softcap_fp32_matches_float64(backend, trainable, with_bias, shape, d, vocab, chunks, softcap, scale, device):
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _make(shape, d, vocab, scale, trainable, with_bias, device=dev)
    grad_out = torch.randn(shape)
    with use_backend(backend), (chunking(*chunks) if chunks else nullcontext()):
        out = linear_log_probs(hidden, weight, labels, bias=bias, softcap=softcap)
        (out * grad_out.to(dev)).sum().backward()
    ref, (h64, w64, b64), _, mask = _reference(hidden, weight, bias, labels, softcap)
    (ref * grad_out).sum().backward()
    assert_head_matches(out, ref, mask, hidden, weight, bias, (h64, w64, b64), trainable=trainable,
                        with_bias=with_bias, tol=TOL)


def test_softcap_changes_the_answer():
    """Control for the tests above: at these scales the cap is far from the identity."""
    hidden, weight, bias, labels = _make((37,), 40, 517, 10.0, False, True)
    capped = _reference(hidden, weight, bias, labels, 2.5)[0]
    plain = _reference(hidden, weight, bias, labels, None)[0]
    assert _rel(plain, capped) > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_stats_match_reference(backend, device):
    """entropy, mean_logit, log_sum_p2 over the capped logits; argmax of the (equally ordered) logits."""
    shape, d, vocab, softcap = (2, 17), 40, 777, 4.0
    hidden, weight, bias, labels = _make(shape, d, vocab, 8.0, False, True, device=_dev(backend, device))
    with use_backend(backend), chunking(8, 200):
        out, stats = linear_log_probs_with_stats(hidden, weight, labels, bias=bias, stats=True, softcap=softcap)
    stats = {k: v.cpu() for k, v in stats.items()}
    ref, _, zc, mask = _reference(hidden, weight, bias, labels, softcap)
    logp = torch.log_softmax(zc, -1)
    p = logp.exp()
    zero = torch.zeros((), dtype=torch.float64)
    assert _rel(out, ref) < TOL
    assert _rel(stats["entropy"], torch.where(mask, -(p * logp).sum(-1), zero)) < TOL
    assert _rel(stats["mean_logit"], torch.where(mask, zc.mean(-1), zero)) < TOL
    assert _rel(stats["log_sum_p2"], torch.where(mask, torch.log((p * p).sum(-1)), zero)) < TOL
    assert torch.equal(stats["argmax"][mask], zc.argmax(-1)[mask])
    assert (stats["argmax"][~mask] == 0).all()


def _confident_inputs(softcap, label_at, n=24, d0=16, vocab=401):
    """Confident tokens with logits far beyond the cap: the label's at ``label_at * c``, the others
    ~ N(-2.5c, (0.6c)^2), mostly capped near -c. Token t's label gets its own coordinate d0 + t
    (distinct labels, including the first and last ids), so the others stay independent of it.
    The bias is a constant -2.5c: a no-op for a plain softmax, not for a capped one."""
    labels = torch.cat([torch.tensor([0]), torch.randperm(vocab - 2)[: n - 2] + 1, torch.tensor([vocab - 1])])
    weight = torch.cat([torch.randn(vocab, d0) * (0.6 * softcap / d0**0.5), torch.zeros(vocab, n)], 1)
    weight[labels, d0 + torch.arange(n)] = 1.0
    bias = torch.full((vocab,), -2.5 * softcap)
    hidden = torch.cat([torch.randn(n, d0), torch.zeros(n, n)], 1)
    base = (hidden[:, :d0] * weight[labels, :d0]).sum(-1)
    hidden[torch.arange(n), d0 + torch.arange(n)] = (label_at + 2.5) * softcap - base
    return hidden, weight, bias, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_at", [5.0, 0.7], ids=["saturated-label", "unsaturated-label"])
def test_softcap_large_logits_confident_tokens(backend, label_at, device):
    """Frozen head, |z| >> c and p_y -> 1. Saturated label: its slope 1 - tanh^2 is ~2e-4 (kept
    accurate by the exp(-2|z/c|) form). Unsaturated label: its column dominates the gradient, and
    1 - p_y ~ 5e-5 must come from the excluded-label sum; materialized fp32 autograd, which takes
    1 - exp(logp_y), is typically 1e-4 off here. (The trainable two-pass form takes it that way too.)"""
    softcap = 10.0
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _confident_inputs(softcap, label_at)
    hidden = hidden.to(dev).requires_grad_()
    weight, bias, labels = weight.to(dev), bias.to(dev), labels.to(dev)
    g = torch.randn(labels.shape)
    with use_backend(backend), chunking(8, 100):
        out = linear_log_probs(hidden, weight, labels, bias=bias, softcap=softcap)
        (out * g.to(dev)).sum().backward()
    ref, (h64, w64, b64), _, _ = _reference(hidden, weight, bias, labels, softcap)
    (ref * g).sum().backward()
    z64 = h64.detach() @ w64.t() + b64
    assert (z64.gather(1, labels.cpu()[:, None]) - label_at * softcap).abs().max() < 1e-3
    assert (z64.abs() > 2 * softcap).float().mean() > 0.5  # most logits are far past the cap
    assert ref.median() > -1e-3  # confident tokens
    # log p_y ~ -1e-5 is label_logit - lse with both ~ c: a few ulp of c, as for the plain head
    assert _abs(out, ref) < LOGP_ABS
    assert _rel(hidden.grad, h64.grad) < CONF_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_softcap_saturated_logits(backend, trainable, device):
    """Every logit ~6c from 0: every slope 1 - tanh^2 is ~1e-5 and the gradients are made of them
    alone. From exp(-2|z/c|) they keep fp32 accuracy; 1 - t*t from a rounded t would be ~1e-3 off."""
    softcap, n, d, vocab = 2.0, 30, 24, 301
    dev = _dev(backend, device)
    hidden = torch.randn(n, d).to(dev).requires_grad_()
    weight = (torch.randn(vocab, d) * (0.5 * softcap / d**0.5)).to(dev).requires_grad_(trainable)
    bias = (torch.randn(vocab).sign() * 6 * softcap + torch.randn(vocab) * 0.5 * softcap).to(dev).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (n,))
    labels[0], labels[-1], labels[5] = 0, vocab - 1, IGNORE
    labels = labels.to(dev)
    g = torch.randn(n)
    with use_backend(backend), chunking(8, 64):
        out = linear_log_probs(hidden, weight, labels, bias=bias, softcap=softcap)
        (out * g.to(dev)).sum().backward()
    ref, (h64, w64, b64), _, _ = _reference(hidden, weight, bias, labels, softcap)
    (ref * g).sum().backward()
    z64 = h64.detach() @ w64.detach().t() + b64.detach()
    assert (z64.abs() > 4 * softcap).float().mean() > 0.95
    assert _rel(out, ref) < TOL
    assert _rel(hidden.grad, h64.grad) < TOL
    if trainable:
        assert _rel(weight.grad, w64.grad) < TOL
        assert _rel(bias.grad, b64.grad) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_off_is_the_plain_head(backend, device):
    """softcap None and 0 are the same (bitwise) plain head; a huge cap approaches it (at c = 1e5 the cap moves
    these logits by ~1e-9 relative, below fp32's resolution, so it may even be bitwise equal: that the cap is
    applied at all is test_softcap_changes_the_answer's and the float64 tests' job)."""
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _make((3, 11), 24, 300, 3.0, False, True, device=dev)
    with use_backend(backend), torch.no_grad():
        plain = linear_log_probs(hidden, weight, labels, bias=bias)
        zero = linear_log_probs(hidden, weight, labels, bias=bias, softcap=0)
        none = linear_log_probs(hidden, weight, labels, bias=bias, softcap=None)
        huge = linear_log_probs(hidden, weight, labels, bias=bias, softcap=1e5)
    assert torch.equal(plain, zero) and torch.equal(plain, none)
    assert _rel(huge, plain) < 1e-5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "30", True, torch.tensor(30.0)])
def test_bad_softcap_is_named(bad):
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        linear_log_probs(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 2, 3]), softcap=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_nan_propagates_per_token(backend, device):
    """A NaN hidden row at a scored position: NaN for that token only, as with materialized logits."""
    dev = _dev(backend, device)
    hidden, weight, _, labels = _make((13,), 16, 90, 6.0, False, False, device=dev)
    labels[3], labels[5] = 7, IGNORE
    with torch.no_grad():
        hidden[3, 2] = float("nan")
        hidden[5, 0] = float("nan")
    with use_backend(backend):
        out = linear_log_probs(hidden, weight, labels, softcap=2.0)
        out.sum().backward()
    ref = _reference(hidden, weight, None, labels, 2.0)[0]
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref)) and torch.isnan(ref[3]) and ref[5] == 0
    keep = torch.arange(13) != 3
    assert _rel(out.cpu()[keep], ref[keep]) < TOL
    assert torch.isnan(hidden.grad[3]).all() and torch.isfinite(hidden.grad[keep.to(dev)]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "capped"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_tied_embedding_and_head(backend, softcap, trainable, device):
    """One Parameter is both the input embedding and the head weight. Trainable: its gradient is the
    sum over both uses; frozen: the gradient reaches the layer between them through the one-pass
    backward. Both against float64 autograd of the same graph."""
    dev = _dev(backend, device)
    vocab, d, rows, t = 211, 24, 3, 17
    table = torch.randn(vocab, d) * (6.0 / d**0.5)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d) / d**0.5
    ids = torch.randint(0, vocab, (rows, t))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    labels[1, :5] = IGNORE
    g = torch.randn(rows, t)

    def run(tbl, mx, ids_, labels_, grad_out, reference):
        emb = torch.nn.Embedding(vocab, d, dtype=tbl.dtype, device=tbl.device)
        with torch.no_grad():
            emb.weight.copy_(tbl)
        emb.weight.requires_grad_(trainable)
        hidden = torch.tanh(emb(ids_) @ mx)  # the head below reuses emb.weight itself: tied
        if reference:
            zc = _cap(hidden @ emb.weight.t(), softcap)
            lp = torch.log_softmax(zc, -1).gather(-1, labels_.clamp_min(0)[..., None]).squeeze(-1)
            out = torch.where(labels_ != IGNORE, lp, 0.0)
        else:
            with use_backend(backend), chunking(16, 64):
                out = linear_log_probs(hidden, emb.weight, labels_, softcap=softcap)
        (out * grad_out).sum().backward()
        return out, emb.weight

    mx = mix.clone().to(dev).requires_grad_()
    out, w = run(table.to(dev), mx, ids.to(dev), labels.to(dev), g.to(dev), False)
    mx64 = mix.double().requires_grad_()
    ref, w64 = run(table.double(), mx64, ids, labels, g.double(), True)
    assert _rel(out, ref) < TOL
    assert _rel(mx.grad, mx64.grad) < TOL
    if trainable:
        assert _rel(w.grad, w64.grad) < TOL
        # both uses contribute: the head-only gradient alone is far from the total
        head_only = table.double().requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(ids, table.double()) @ mix.double())
        lp = torch.log_softmax(_cap(hidden @ head_only.t(), softcap), -1).gather(-1, labels.clamp_min(0)[..., None])
        (torch.where(labels != IGNORE, lp.squeeze(-1), 0.0) * g.double()).sum().backward()
        assert _rel(head_only.grad, w64.grad) > 0.05
    else:
        assert w.grad is None


def test_compacted_log_probs_takes_softcap():
    hidden, weight, bias, labels = _make((2, 7), 16, 120, 8.0, False, True)
    with torch.no_grad():
        logp, idx, _ = compacted_log_probs(hidden, weight, labels, bias=bias, softcap=3.0)
    ref = _reference(hidden, weight, bias, labels, 3.0)[0]
    assert _rel(logp, ref.view(-1)[idx]) < TOL
