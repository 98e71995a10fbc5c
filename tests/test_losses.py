"""dpo_fast.losses against float64 references written here from the papers' / TRL's formulas,
and against TRL's own DPOTrainer loss when trl is installed."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_fast.losses import (
    LOSS_TYPES,
    BCORunningMean,
    dpo_loss,
    preference_metrics,
    reduce_sequence_logps,
    wpo_weights,
)

ALL_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo",
)
F_DIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHING_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")


# ----------------------------------------------------------------------------- float64 reference
def _ls(x):
    """log sigmoid(x) = -log(1 + exp(-x)), in float64 (the test inputs keep |x| far below 700)."""
    return -torch.log1p(torch.exp(-x))


def _sig(x):
    return torch.exp(_ls(x))


def ref_scores(logratio, kind, alpha):
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":  # f'(u) = 1 - 1/u
        u = torch.exp(logratio)
        return 1 - 1 / u
    if kind == "js_divergence":  # f'(u) = log(2u / (1 + u))
        u = torch.exp(logratio)
        return torch.log(2 * u / (1 + u))
    if alpha == 1.0:
        return logratio
    u = torch.exp(logratio)  # f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
    return (u ** (alpha - 1) - 1) / (alpha - 1)


def ref_loss(kind, c, r, rc, rr, lc, lr, *, beta, eps=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05,
             gamma=0.5, bco_delta=0.0, nll=None):
    """Straightforward float64 per-pair loss for one type (lengths lc/lr are token counts)."""
    cl, rl = c - rc, r - rr
    cs, rs = ref_scores(cl, fdiv, alpha), ref_scores(rl, fdiv, alpha)
    h = cs - rs
    z = beta * h
    if kind == "sigmoid":  # cDPO when eps > 0
        return -(1 - eps) * _ls(z) - eps * _ls(-z)
    if kind == "hinge":
        return torch.clamp(1 - z, min=0)
    if kind == "ipo":
        d = cs / torch.clamp(lc, min=1) - rs / torch.clamp(lr, min=1)
        return (d - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":  # KL(q || p), q = (sig(z), sig(-z)), p = (1-eps, eps)
        q1, q2 = _sig(z), _sig(-z)
        return q1 * (torch.log(q1) - math.log(1 - eps)) + q2 * (torch.log(q2) - math.log(eps))
    if kind == "nca_pair":
        return -_ls(beta * cl) - 0.5 * _ls(-beta * cl) - 0.5 * _ls(-beta * rl)
    if kind == "robust":
        return ((1 - eps) * -_ls(z) - eps * -_ls(-z)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -_ls(beta * cl - bco_delta) - _ls(-(beta * rl - bco_delta))
    if kind == "sppo_hard":
        return (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if kind == "aot":
        d = torch.sort(c - r).values - torch.sort(rc - rr).values
        return -(1 - eps) * _ls(beta * d) - eps * _ls(-beta * d)
    if kind == "aot_unpaired":
        d = torch.sort(cl).values - torch.sort(rl).values
        return -(1 - eps) * _ls(beta * d) - eps * _ls(-beta * d)
    if kind == "apo_zero":
        return (1 - _sig(beta * cl)) + _sig(beta * rl)
    if kind == "apo_down":
        return _sig(beta * cl) + (1 - _sig(beta * (cl - rl)))
    if kind == "discopop":
        g = _sig(z / tau)
        return (1 - g) * -_ls(z) + g * torch.exp(-z)
    if kind == "sft":
        if nll is not None:
            return nll * torch.ones_like(c)
        return -(c.sum() / torch.clamp(lc.sum(), min=1)) * torch.ones_like(c)
    if kind == "sigmoid_norm":
        d = cs / torch.clamp(lc, min=1) - rs / torch.clamp(lr, min=1)
        return -_ls(beta * d)
    if kind == "simpo":
        m = c / torch.clamp(lc, min=1) - r / torch.clamp(lr, min=1)
        zz = beta * m - gamma
        return -(1 - eps) * _ls(zz) - eps * _ls(-zz)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- inputs and comparison
def make_pairs(batch, *, spread=1.5, lengths=True):
    """fp32 random sequence log-probs; the float64 reference sees exactly the same values."""
    lc = torch.randint(0, 60, (batch,)).float()
    lr = torch.randint(0, 60, (batch,)).float()
    c = -(torch.rand(batch) * 40 + 1) * (lc > 0)
    r = -(torch.rand(batch) * 40 + 1) * (lr > 0)
    rc = c + torch.randn(batch) * spread
    rr = r + torch.randn(batch) * spread
    return c, r, rc, rr, lc, lr


def assert_close(actual, expected, rtol=1e-5):
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    atol = rtol * max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def check_against_reference(kinds, weights=None, batch=7, ref_free=False, **kw):
    """Values, rewards and gradients (w.r.t. chosen/rejected logps) of dpo_loss vs the float64 reference."""
    c, r, rc, rr, lc, lr = make_pairs(batch)
    ours_in = [t.clone().requires_grad_(True) for t in (c, r)]
    ref_in = [t.double().requires_grad_(True) for t in (c, r)]
    names = dict(
        beta="beta", eps="label_smoothing", fdiv="f_divergence_type", alpha="f_alpha_divergence_coef",
        tau="discopop_tau", gamma="simpo_gamma", bco_delta="bco_delta",
    )
    ours_kw = {names[k]: v for k, v in kw.items()}
    losses, cr, rj = dpo_loss(
        ours_in[0], ours_in[1], rc, rr, loss_type=kinds if len(kinds) > 1 else kinds[0], loss_weights=weights,
        chosen_lengths=lc.long(), rejected_lengths=lr.long(), reference_free=ref_free, **ours_kw,
    )
    zero = torch.zeros(batch, dtype=torch.float64)
    rc64, rr64 = (zero, zero) if ref_free else (rc.double(), rr.double())
    weights = weights or [1.0] * len(kinds)
    expected = sum(
        w * ref_loss(k, ref_in[0], ref_in[1], rc64, rr64, lc.double(), lr.double(), **kw)
        for k, w in zip(kinds, weights)
    )
    assert losses.shape == (batch,) and losses.dtype == torch.float32
    assert_close(losses.detach(), expected.detach())
    # rewards: beta * (logps - ref), detached
    beta = kw["beta"]
    assert not cr.requires_grad and not rj.requires_grad
    if tuple(kinds) == ("simpo",):
        assert_close(cr, beta * c.double() / lc.double().clamp(min=1))
    else:
        assert_close(cr, beta * (c.double() - rc64))
        assert_close(rj, beta * (r.double() - rr64))
    v = torch.randn(batch)
    g_ours = torch.autograd.grad((losses * v).sum(), ours_in, allow_unused=True)
    g_ref = torch.autograd.grad((expected * v.double()).sum(), ref_in, allow_unused=True)
    for go, gr in zip(g_ours, g_ref):
        go = torch.zeros(batch) if go is None else go
        gr = torch.zeros(batch, dtype=torch.float64) if gr is None else gr
        assert_close(go, gr)


# ----------------------------------------------------------------------------- loss values and gradients
def test_loss_types_table():
    assert set(LOSS_TYPES) == set(ALL_TYPES) and len(LOSS_TYPES) == len(ALL_TYPES)


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("batch", [1, 7])
def test_every_loss_type(kind, batch):
    eps = 1e-3 if kind == "exo_pair" else 0.0
    check_against_reference([kind], batch=batch, beta=float(torch.empty(()).uniform_(0.05, 0.5)), eps=eps)


@pytest.mark.parametrize("kind", SMOOTHING_TYPES)
def test_label_smoothing(kind):
    check_against_reference([kind], beta=0.2, eps=float(torch.empty(()).uniform_(0.01, 0.45)))


def test_cdpo_differs_from_plain_sigmoid():
    c, r, rc, rr, _, _ = make_pairs(5)
    plain = dpo_loss(c, r, rc, rr)[0]
    cdpo = dpo_loss(c, r, rc, rr, label_smoothing=0.2)[0]
    assert not torch.allclose(plain, cdpo)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "aot", "bco_pair", "apo_down", "sigmoid_norm"])
def test_reference_free(kind):
    check_against_reference([kind], ref_free=True, beta=0.1)


@pytest.mark.parametrize("fdiv", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("kind", F_DIV_TYPES)
def test_f_divergences(fdiv, kind):
    alpha = float(torch.empty(()).uniform_(0.2, 0.8))
    eps = 1e-3 if kind == "exo_pair" else 0.0
    check_against_reference([kind], batch=6, beta=0.3, fdiv=fdiv, alpha=alpha, eps=eps)


def test_alpha_divergence_at_one_is_reverse_kl():
    c, r, rc, rr, _, _ = make_pairs(4)
    a = dpo_loss(c, r, rc, rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)[0]
    b = dpo_loss(c, r, rc, rr)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kinds,weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
        (["ipo", "simpo", "hinge"], None),
        (["aot", "nca_pair", "discopop", "apo_zero"], [0.3, 1.7, 0.5, 2.0]),
    ],
)
def test_weighted_combinations(kinds, weights):
    check_against_reference(kinds, weights=weights, beta=0.15)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_simpo_gamma(gamma):
    check_against_reference(["simpo"], beta=2.0, gamma=gamma)


def test_discopop_tau_and_bco_delta():
    check_against_reference(["discopop"], beta=0.4, tau=float(torch.empty(()).uniform_(0.02, 0.5)))
    check_against_reference(["bco_pair"], beta=0.4, bco_delta=float(torch.randn(())))
    # a tensor delta works too
    c, r, rc, rr, _, _ = make_pairs(3)
    d = torch.randn(())
    torch.testing.assert_close(dpo_loss(c, r, rc, rr, loss_type="bco_pair", bco_delta=d)[0],
                               dpo_loss(c, r, rc, rr, loss_type="bco_pair", bco_delta=float(d))[0])


def test_sft_chosen_nll_and_sample_weights():
    c, r, rc, rr, lc, lr = make_pairs(5)
    nll = torch.rand(5)
    losses = dpo_loss(c, r, rc, rr, loss_type=["sigmoid", "sft"], chosen_nll=nll)[0]
    expected = ref_loss("sigmoid", *(t.double() for t in (c, r, rc, rr, lc, lr)), beta=0.1) + nll.double()
    assert_close(losses, expected)
    scalar = torch.rand(())
    losses = dpo_loss(c, r, loss_type="sft", chosen_nll=scalar)[0]
    assert_close(losses, scalar.double().expand(5))
    sw = torch.rand(5)
    weighted = dpo_loss(c, r, rc, rr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr, sample_weights=sw)[0]
    plain = ref_loss("ipo", *(t.double() for t in (c, r, rc, rr, lc, lr)), beta=0.1)
    assert_close(weighted, plain * sw.double())


def test_float64_inputs_stay_float64_and_bf16_is_upcast():
    c, r, rc, rr, _, _ = make_pairs(4)
    out = dpo_loss(c.double(), r.double(), rc.double(), rr.double())[0]
    assert out.dtype == torch.float64
    out = dpo_loss(c.bfloat16(), r.bfloat16(), rc.bfloat16(), rr.bfloat16())[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bco_running_mean():
    tracker = BCORunningMean()
    means = []
    for _ in range(4):
        a, b = torch.randn(3), torch.randn(3)
        means.append(float(torch.cat([a, b]).double().mean()))
        got = tracker.update(a, b)
        assert math.isclose(got, sum(means) / len(means), rel_tol=1e-6, abs_tol=1e-7)
    other = BCORunningMean()
    other.load_state_dict(tracker.state_dict())
    assert other.mean == tracker.mean and other.count == tracker.count
    with pytest.raises(ValueError, match="NaN"):
        tracker.update(torch.tensor([float("nan")]), torch.zeros(1))


# ----------------------------------------------------------------------------- per-token reductions
def make_tokens(batch, t):
    """[2B, T] token log-probs (garbage, even NaN, outside the mask) and a mask with odd cases."""
    logps = -torch.rand(2 * batch, t) * 5
    mask = torch.zeros(2 * batch, t, dtype=torch.long)
    for i in range(2 * batch):
        start = int(torch.randint(0, t, ()))
        stop = int(torch.randint(start, t + 1, ()))
        mask[i, start:stop] = 1
    mask[0] = 0  # an all-masked chosen row
    if batch > 1:
        mask[2 * batch - 1] = 1  # a full-length rejected row next to short ones
    logps = torch.where(mask.bool(), logps, torch.full_like(logps, float("nan")))
    return logps, mask


def ref_reduce(logps, mask, average, ld_alpha):
    rows, lengths = [], []
    n = logps.shape[0] // 2
    counts = [int(mask[i].sum()) for i in range(2 * n)]
    for i in range(2 * n):
        shared = min(counts[i % n], counts[i % n + n])
        total, k = 0.0, 0
        for t in range(logps.shape[1]):
            if mask[i, t]:
                k += 1
                w = 1.0 if (ld_alpha is None or k <= shared) else ld_alpha
                total += w * float(logps[i, t])
        if average:
            total = total / max(k, 1)
        rows.append(total)
        lengths.append(k)
    rows = torch.tensor(rows, dtype=torch.float64)
    lengths = torch.tensor(lengths)
    return rows[:n], rows[n:], lengths[:n], lengths[n:]


@pytest.mark.parametrize("batch,t", [(1, 9), (4, 37)])
@pytest.mark.parametrize("average,ld_alpha", [(False, None), (True, None), (False, 0.0), (False, 0.35), (False, 1.0)])
def test_reduce_sequence_logps(batch, t, average, ld_alpha):
    logps, mask = make_tokens(batch, t)
    leaf = logps.clone().requires_grad_(True)
    got = reduce_sequence_logps(leaf, mask, average=average, ld_alpha=ld_alpha)
    want = ref_reduce(logps, mask, average, ld_alpha)
    for g, w in zip(got[:2], want[:2]):
        assert_close(g.detach(), w)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert got[0][0].item() == 0.0 and got[2][0].item() == 0  # the all-masked row
    # gradient: finite, zero outside the mask, weight per token inside it
    v = torch.randn(batch)
    (grad,) = torch.autograd.grad((got[0] * v).sum() + got[1].sum(), leaf)
    assert torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()


def test_reduce_bool_and_float_masks_agree():
    logps, mask = make_tokens(3, 11)
    a = reduce_sequence_logps(logps, mask)
    b = reduce_sequence_logps(logps, mask.bool())
    c = reduce_sequence_logps(logps, mask.float())
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_reduce_then_loss_with_all_masked_pair():
    logps, mask = make_tokens(3, 13)
    mask[3] = 0  # the first pair is now entirely masked
    leaf = logps.clone().requires_grad_(True)
    c, r, lc, lr = reduce_sequence_logps(leaf, mask)
    ref = reduce_sequence_logps(logps - 0.3, mask)
    for kind in ALL_TYPES:
        losses = dpo_loss(c, r, ref[0], ref[1], loss_type=kind, chosen_lengths=lc, rejected_lengths=lr,
                          label_smoothing=1e-3 if kind == "exo_pair" else 0.0)[0]
        (g,) = torch.autograd.grad(losses.sum(), leaf, retain_graph=True)
        assert torch.isfinite(losses).all() and torch.isfinite(g).all(), kind


def test_preference_metrics():
    b = 6
    cr, rr, c, r = torch.randn(b), torch.randn(b), -torch.rand(b) * 30, -torch.rand(b) * 30
    m = preference_metrics(cr, rr, c, r)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    assert all(type(v) is float for v in m.values())
    assert math.isclose(m["rewards/chosen"], float(cr.double().mean()), rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(m["rewards/rejected"], float(rr.double().mean()), rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(m["rewards/accuracies"], sum(float(x > y) for x, y in zip(cr, rr)) / b, rel_tol=1e-6)
    assert math.isclose(m["rewards/margins"], float((cr.double() - rr.double()).mean()), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(m["logps/chosen"], float(c.double().mean()), rel_tol=1e-6)
    assert math.isclose(m["logps/rejected"], float(r.double().mean()), rel_tol=1e-6)


def test_wpo_weights():
    batch, t, vocab = 3, 10, 17
    logits = torch.randn(2 * batch, t, vocab, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2 * batch, t))
    logp_all = torch.log_softmax(logits, -1)
    token_logps = logp_all.gather(-1, labels[..., None])[..., 0]
    log_sum_sq = torch.log((logp_all.exp() ** 2).sum(-1))
    _, mask = make_tokens(batch, t)
    got = wpo_weights(token_logps.float().requires_grad_(True), log_sum_sq.float(), mask)
    assert not got.requires_grad and got.shape == (batch,)
    w = []
    for i in range(2 * batch):
        sel = mask[i].bool()
        k = max(int(sel.sum()), 1)
        w.append(math.exp(float((token_logps[i][sel] - log_sum_sq[i][sel]).sum()) / k))
    want = torch.tensor([w[i] * w[i + batch] for i in range(batch)], dtype=torch.float64)
    assert_close(got, want)


# ----------------------------------------------------------------------------- validation
def _good(**over):
    c, r, rc, rr, lc, lr = make_pairs(4)
    kw = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr)
    kw.update(over)
    return kw


BAD_CALLS = [
    (dict(loss_type="dpo"), "loss_type.*'sigmoid'"),
    (dict(loss_type=["sigmoid", "nope"]), "loss_type"),
    (dict(loss_type=[]), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_weights=[float("nan")]), "loss_weights"),
    (dict(discopop_tau=0.0, loss_type="discopop"), "discopop_tau"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(f_divergence_type="forward_kl", loss_type="bco_pair"), "f_divergence_type"),
    (dict(f_alpha_divergence_coef=float("nan")), "f_alpha_divergence_coef"),
    (dict(simpo_gamma=float("inf"), loss_type="simpo"), "simpo_gamma"),
    (dict(rejected_logps=torch.zeros(3)), "rejected_logps"),
    (dict(chosen_logps=torch.zeros(4, 1), rejected_logps=torch.zeros(4, 1)), "chosen_logps"),
    (dict(chosen_logps=torch.zeros(0), rejected_logps=torch.zeros(0)), "chosen_logps"),
    (dict(ref_chosen_logps=torch.zeros(5)), "ref_chosen_logps"),
    (dict(ref_rejected_logps=None), "ref_rejected_logps"),
    (dict(ref_chosen_logps=None), "ref_chosen_logps"),
    (dict(loss_type="ipo"), "chosen_lengths"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=torch.ones(4)), "rejected_lengths"),
    (dict(loss_type="simpo"), "chosen_lengths"),
    (dict(loss_type="sft"), "chosen_lengths"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4)), "chosen_lengths"),
    (dict(loss_type="ipo", chosen_lengths=-torch.ones(4), rejected_lengths=torch.ones(4)), "chosen_lengths"),
    (dict(sample_weights=torch.ones(2)), "sample_weights"),
    (dict(chosen_nll=torch.ones(3), loss_type="sft"), "chosen_nll"),
    (dict(bco_delta=torch.ones(2), loss_type="bco_pair"), "bco_delta"),
    (dict(bco_delta=float("nan"), loss_type="bco_pair"), "bco_delta"),
    (dict(chosen_logps=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "chosen_logps"),
    (dict(rejected_logps=torch.tensor([0.0, float("inf"), 1.0, 2.0])), "rejected_logps"),
    (dict(ref_chosen_logps=torch.tensor([0.0, float("-inf"), 1.0, 2.0])), "ref_chosen_logps"),
    (dict(sample_weights=torch.tensor([0.0, float("nan"), 1.0, 2.0])), "sample_weights"),
]


@pytest.mark.parametrize("over,match", BAD_CALLS)
def test_dpo_loss_value_errors(over, match):
    kw = _good(**over)
    c, r = kw.pop("chosen_logps"), kw.pop("rejected_logps")
    rc, rr = kw.pop("ref_chosen_logps"), kw.pop("ref_rejected_logps")
    with pytest.raises(ValueError, match=match):
        dpo_loss(c, r, rc, rr, **kw)


def test_check_finite_false_skips_value_checks():
    c, r, rc, rr, _, _ = make_pairs(3)
    c = c.clone()
    c[1] = float("nan")
    losses = dpo_loss(c, r, rc, rr, check_finite=False)[0]
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


def test_dpo_loss_type_errors():
    c, r, rc, rr, _, _ = make_pairs(3)
    with pytest.raises(TypeError, match="chosen_logps"):
        dpo_loss([0.0, 1.0, 2.0], r, rc, rr)
    with pytest.raises(TypeError, match="rejected_logps"):
        dpo_loss(c, torch.zeros(3, dtype=torch.long), rc, rr)
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(c, r, rc, rr, beta="big")


def test_reference_free_and_reference_free_types_need_no_reference():
    c, r, _, _, lc, lr = make_pairs(4)
    a = dpo_loss(c, r, reference_free=True)[0]
    b = dpo_loss(c, r, torch.zeros(4), torch.zeros(4))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(dpo_loss(c, r, loss_type=["simpo", "sft"], chosen_lengths=lc, rejected_lengths=lr)[0]).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda lp, m: reduce_sequence_logps(lp[:3], m[:3]), "token_logps"),
        (lambda lp, m: reduce_sequence_logps(lp[0], m[0]), "token_logps"),
        (lambda lp, m: reduce_sequence_logps(lp, m[:, :-1]), "loss_mask"),
        (lambda lp, m: reduce_sequence_logps(lp, m, ld_alpha=1.5), "ld_alpha"),
        (lambda lp, m: reduce_sequence_logps(lp, m, ld_alpha=-0.1), "ld_alpha"),
        (lambda lp, m: reduce_sequence_logps(lp, m, ld_alpha=0.5, average=True), "ld_alpha"),
        (lambda lp, m: wpo_weights(lp, lp[:, :-1], m), "log_sum_sq_probs"),
        (lambda lp, m: wpo_weights(lp, lp, m[:2]), "loss_mask"),
        (lambda lp, m: preference_metrics(lp[0], lp[1, :-1], lp[0], lp[1]), "rejected_rewards"),
        (lambda lp, m: preference_metrics(lp[0, :0], lp[1, :0], lp[0, :0], lp[1, :0]), "chosen_rewards"),
        (lambda lp, m: preference_metrics(lp[0], lp[1], lp[0, :-1], lp[1]), "chosen_logps"),
    ],
)
def test_helper_value_errors(call, match):
    logps, mask = make_tokens(2, 8)
    with pytest.raises(ValueError, match=match):
        call(logps, mask)


def test_reduce_type_error():
    with pytest.raises(TypeError, match="token_logps"):
        reduce_sequence_logps(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


# ----------------------------------------------------------------------------- against TRL itself
def _trl_dpo_trainer():
    trl = pytest.importorskip("trl", reason="trl is not installed; TRL cross-check skipped")
    major = int(trl.__version__.split(".")[0])
    if major < 1:
        pytest.skip(f"trl {trl.__version__} < 1.0: this check targets TRL 1.x's DPOTrainer")
    try:
        from trl.trainer.dpo_trainer import DPOTrainer
    except Exception as exc:  # pragma: no cover - depends on the installed trl
        pytest.skip(f"trl's DPOTrainer cannot be imported: {exc}")
    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip(f"trl {trl.__version__} has no DPOTrainer._compute_loss to compare against")
    return DPOTrainer


class _FakeLM(torch.nn.Module):
    """Stands in for a causal LM patched with TRL's fused head: returns given per-token log-probs."""

    def __init__(self, token_logps, shift_mask, log_sum_sq=None):
        super().__init__()
        self.is_gradient_checkpointing = False
        self.token_logps, self.shift_mask, self.log_sum_sq = token_logps, shift_mask, log_sum_sq

    def forward(self, **kwargs):
        lp = torch.where(self.shift_mask.bool(), self.token_logps, 0.0)  # the fused head gives 0 at label -100
        z = torch.zeros_like(self.shift_mask, dtype=torch.float32)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=self.shift_mask.bool(),
                               log_sum_sq_probs=self.log_sum_sq, aux_loss=None)


def _trl_loss(DPOTrainer, token_logps, ref_token_logps, completion_mask, log_sum_sq, *, kinds, weights, beta, eps,
              fdiv, alpha, ld_alpha, tau, use_weighting):
    shift_mask = completion_mask[:, 1:]
    policy = _FakeLM(token_logps, shift_mask, log_sum_sq)
    fake = SimpleNamespace(
        model=policy, ref_model=_FakeLM(ref_token_logps, shift_mask), precompute_ref_logps=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=ld_alpha, f_divergence_type=fdiv, f_alpha_divergence_coef=alpha,
        loss_types=list(kinds), loss_weights=list(weights), beta=beta, label_smoothing=eps,
        use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.randint(0, 50, completion_mask.shape),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }
    loss = DPOTrainer._compute_loss(fake, policy, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


TRL_CASES = [dict(kinds=[k]) for k in ALL_TYPES if k != "simpo"] + [
    dict(kinds=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0]),
    dict(kinds=["robust"], eps=0.2),
    dict(kinds=["aot"], eps=0.1),
    dict(kinds=["aot_unpaired"], eps=0.3),
    dict(kinds=["exo_pair"], eps=0.05),
    dict(kinds=["sigmoid", "ipo"], ld_alpha=0.4),
    # (not hinge: TRL 1.16 multiplies relu's output in place under use_weighting and its backward fails)
    dict(kinds=["sigmoid_norm", "ipo", "discopop"], use_weighting=True, tau=0.2),
    dict(kinds=["apo_down", "sppo_hard"], use_weighting=True, ld_alpha=0.0),
] + [
    # TRL 1.x ignores label_smoothing for sigmoid (here it is cDPO), so sigmoid is checked at eps=0
    dict(kinds=kinds, fdiv=f, eps=eps)
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
    for kinds, eps in (
        (["ipo", "sigmoid_norm", "robust", "exo_pair", "sft"], 0.1),
        (["sigmoid", "hinge", "discopop"], 0.0),
    )
]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(c["kinds"]) + "-" + "-".join(
    f"{k}={v}" for k, v in c.items() if k != "kinds"))
def test_matches_trl(case):
    DPOTrainer = _trl_dpo_trainer()
    kinds = case["kinds"]
    weights = case.get("weights", [1.0] * len(kinds))
    eps = case.get("eps", 1e-3 if "exo_pair" in kinds else 0.0)
    params = dict(beta=float(torch.empty(()).uniform_(0.05, 0.5)), eps=eps, fdiv=case.get("fdiv", "reverse_kl"),
                  alpha=float(torch.empty(()).uniform_(0.2, 0.8)), ld_alpha=case.get("ld_alpha"),
                  tau=case.get("tau", 0.05), use_weighting=case.get("use_weighting", False))
    batch, t = 5, 24
    # completion masks: position 0 is always prompt, so TRL's unshifted and shifted counts agree
    completion_mask = torch.zeros(2 * batch, t, dtype=torch.long)
    for i in range(2 * batch):
        start = int(torch.randint(1, t, ()))
        completion_mask[i, start:int(torch.randint(start, t + 1, ()))] = 1
    completion_mask[1] = 0  # an all-masked chosen row
    token_logps = (-torch.rand(2 * batch, t - 1) * 3).requires_grad_(True)
    ref_token_logps = token_logps.detach() + torch.randn(2 * batch, t - 1) * 0.3
    log_sum_sq = -torch.rand(2 * batch, t - 1) * 2 if params["use_weighting"] else None

    trl_loss, trl_metrics = _trl_loss(DPOTrainer, token_logps, ref_token_logps, completion_mask, log_sum_sq,
                                      kinds=kinds, weights=weights, **params)
    (trl_grad,) = torch.autograd.grad(trl_loss, token_logps)

    shift_mask = completion_mask[:, 1:]
    c, r, lc, lr = reduce_sequence_logps(token_logps, shift_mask, ld_alpha=params["ld_alpha"])
    rc, rr, _, _ = reduce_sequence_logps(ref_token_logps, shift_mask, ld_alpha=params["ld_alpha"])
    sft_nll = None
    if params["ld_alpha"] is not None and "sft" in kinds:  # TRL's sft uses the plain token mean
        plain = reduce_sequence_logps(token_logps, shift_mask)
        sft_nll = -plain[0].sum() / plain[2].sum().clamp(min=1)
    sw = wpo_weights(token_logps, log_sum_sq, shift_mask) if params["use_weighting"] else None
    losses, cr, rj = dpo_loss(
        c, r, rc, rr, beta=params["beta"], loss_type=kinds, loss_weights=weights, label_smoothing=eps,
        chosen_lengths=lc, rejected_lengths=lr, f_divergence_type=params["fdiv"],
        f_alpha_divergence_coef=params["alpha"], discopop_tau=params["tau"], chosen_nll=sft_nll, sample_weights=sw,
    )
    ours = losses.mean()
    (our_grad,) = torch.autograd.grad(ours, token_logps)
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    scale = float(trl_grad.abs().max())
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-5, atol=1e-5 * max(scale, 1e-3))
    metrics = preference_metrics(cr, rj, c, r)
    for name, value in metrics.items():
        assert math.isclose(value, trl_metrics[name], rel_tol=1e-5, abs_tol=1e-6), name
