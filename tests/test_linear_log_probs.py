"""linear_log_probs vs a float64 autograd reference: Triton kernels (interpreter on CPU) and torch path.

The op runs on the `device` fixture for the triton backend (compiled on a GPU, the interpreter on CPU)
and on the CPU for the torch backend (with a GPU, also on it: "torch-cuda"); the float64 references are
always computed on the CPU. Cases marked gpu-* run only on CUDA (tests/gpu_cases.py).
"""
import warnings

from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpo_fast import linear_log_probs
from dpo_fast.ops.backend import use_backend
from dpo_fast.ops.linear_log_probs import chunking, compacted_log_probs, linear_log_probs_with_stats
from head_checks import assert_head_matches
from gpu_cases import CUDA, gpu_case

pytestmark = pytest.mark.kernels
BACKENDS = ["torch", "triton"] + (["torch-cuda"] if CUDA else [])


def _dev(backend: str, device: str) -> str:
    """Where the op's inputs live: the test device for Triton, the CPU for the torch mirror (or the GPU)."""
    return {"triton": device, "torch-cuda": "cuda"}.get(backend, "cpu")


def _use(backend: str):
    """The backend context of a BACKENDS entry."""
    return use_backend(backend.split("-")[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _make(shape, d, vocab, dtype, trainable, with_bias, ignore_frac=0.25, device="cpu"):
    """Random inputs drawn on the CPU (same draws on every device), then moved to `device` as leaves."""
    hidden = torch.randn(*shape, d).to(dtype)
    weight = (torch.randn(vocab, d) / d**0.5 * 3).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, shape)
    flat = labels.view(-1)
    flat[torch.rand(flat.shape) < ignore_frac] = -100
    flat[0] = 0  # label in the first vocabulary tile
    flat[-1] = vocab - 1  # ... and in the last, ragged one
    if len(shape) == 2:
        labels[1, :] = -100  # an entirely ignored row
    hidden = hidden.to(device).requires_grad_()
    weight = weight.to(device).requires_grad_(trainable)
    bias = bias.to(device).requires_grad_(trainable) if with_bias else None
    return hidden, weight, bias, labels.to(device)


def _reference(hidden, weight, bias, labels):
    """float64 autograd on the CPU: materialize logits, log_softmax, gather."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_(weight.requires_grad)
    b = bias.detach().cpu().double().requires_grad_(bias.requires_grad) if bias is not None else None
    labels = labels.cpu()
    z = h @ w.t() + (b if b is not None else 0)
    logp = torch.log_softmax(z, -1)
    mask = labels != -100
    out = torch.where(mask, logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    return out, (h, w, b), z, mask


def _materialized_lowp(hidden, weight, bias, labels):
    """The common low-precision baseline: logits in the input dtype, upcast, log_softmax, gather."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    z = (h @ w.t() + (bias.detach() if bias is not None else 0)).float()
    logp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, logp, 0.0), h, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "shape,d,vocab,chunks",
    [pytest.param((3, 23), 72, 1013, (16, 300), id="odd3d"), pytest.param((37,), 40, 517, (8, 128), id="odd1d"),
     pytest.param((2, 9), 33, 1000 + 13, None, id="default-chunks"),
     gpu_case((4, 250), 264, 32000 + 13, None, id="32k-vocab")],
)
def test_fp32_matches_float64(backend, trainable, with_bias, shape, d, vocab, chunks, device):
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _make(shape, d, vocab, torch.float32, trainable, with_bias, device=dev)
    grad_out = torch.randn(shape)
    ctx = chunking(*chunks) if chunks else nullcontext()
    with _use(backend), ctx:
        out = linear_log_probs(hidden, weight, labels, bias=bias)
        (out * grad_out.to(dev)).sum().backward()
    ref, (h64, w64, b64), _, mask = _reference(hidden, weight, bias, labels)
    (ref * grad_out).sum().backward()
    assert_head_matches(out, ref, mask, hidden, weight, bias, (h64, w64, b64), trainable=trainable,
                        with_bias=with_bias, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,d,vocab,chunks", [pytest.param((4, 31), 72, 1013, (32, 300), id="odd"),
                                                  gpu_case((4, 250), 264, 32000 + 13, None, id="32k-vocab")])
def test_low_precision_accuracy(backend, trainable, with_bias, dtype, shape, d, vocab, chunks, device):
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _make(shape, d, vocab, dtype, trainable, with_bias=with_bias, device=dev)
    grad_out = torch.randn(shape)
    with _use(backend), chunking(*chunks) if chunks else nullcontext():
        out = linear_log_probs(hidden, weight, labels, bias=bias)
        (out * grad_out.to(dev)).sum().backward()
    ref, (h64, w64, _), _, _ = _reference(hidden, weight, bias, labels)
    (ref * grad_out).sum().backward()
    # the low-precision baseline runs on the same device as the op (same GEMM library, same rounding)
    base, hb, wb = _materialized_lowp(hidden, weight, bias, labels)
    (base * grad_out.to(dev)).sum().backward()
    err = {"logp": _rel(out, ref), "grad_h": _rel(hidden.grad, h64.grad)}
    base_err = {"logp": _rel(base, ref), "grad_h": _rel(hb.grad, h64.grad)}
    if trainable:
        err["grad_w"] = _rel(weight.grad, w64.grad)
        base_err["grad_w"] = _rel(wb.grad, w64.grad)
    for k in err:
        assert err[k] < 1e-2, (k, err[k])
        # never worse than materializing logits in the same dtype (small slack for rounding luck)
        assert err[k] <= 1.05 * base_err[k] + 1e-6, (k, err[k], base_err[k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,d,vocab,chunks", [pytest.param((2, 17), 40, 777, (8, 200), id="odd"),
                                                  gpu_case((3, 111), 200, 20000 + 7, None, id="20k-vocab")])
def test_stats_match_reference(backend, shape, d, vocab, chunks, device):
    hidden, weight, bias, labels = _make(shape, d, vocab, torch.float32, False, True, device=_dev(backend, device))
    with _use(backend), chunking(*chunks) if chunks else nullcontext():
        out, stats = linear_log_probs_with_stats(hidden, weight, labels, bias=bias, stats=True)
    stats = {k: v.cpu() for k, v in stats.items()}
    ref, _, z, mask = _reference(hidden, weight, bias, labels)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    zero = torch.zeros((), dtype=torch.float64)
    assert _rel(out, ref) < 1e-5
    assert _rel(stats["entropy"], torch.where(mask, -(p * logp).sum(-1), zero)) < 1e-5
    assert _rel(stats["mean_logit"], torch.where(mask, z.mean(-1), zero)) < 1e-5
    assert _rel(stats["log_sum_p2"], torch.where(mask, torch.log((p * p).sum(-1)), zero)) < 1e-5
    assert torch.equal(stats["argmax"][mask], z.argmax(-1)[mask])
    assert (stats["argmax"][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_all_ignored_gives_zeros_and_zero_grad(backend, trainable, device):
    dev = _dev(backend, device)
    hidden = torch.randn(3, 5, 16).to(dev).requires_grad_()
    weight = torch.randn(50, 16).to(dev).requires_grad_(trainable)
    labels = torch.full((3, 5), -100, device=dev)
    with _use(backend):
        out = linear_log_probs(hidden, weight, labels)
        assert out.requires_grad
        out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 5, device=dev))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    if trainable:
        assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_no_grad_forward(backend, device):
    hidden, weight, _, labels = _make((4, 11), 24, 300, torch.float32, False, False, device=_dev(backend, device))
    labels = torch.where(labels == -100, torch.full_like(labels, 7777), labels)
    with _use(backend), torch.no_grad():
        out = linear_log_probs(hidden, weight, labels, ignore_index=7777)
    ref, _, _, _ = _reference(hidden, weight, None, torch.where(labels == 7777, -100, labels))
    assert not out.requires_grad
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_confident_tokens_keep_gradient_accuracy(backend):
    """Near one-hot softmax: (1 - p_y) W_y - E_excl, with 1 - p_y summed from the non-label columns
    (not 1 - exp(logp), which cancels), keeps fp32 accuracy where plain fp32 autograd loses it."""
    d, vocab = 32, 400
    weight = torch.randn(vocab, d)
    labels = torch.randint(0, vocab, (20,))
    hidden = (weight[labels] * 0.5).clone().requires_grad_()  # p_y ~ 1 - 1e-4: the label dominates
    with _use(backend):
        out = linear_log_probs(hidden, weight, labels)
    g = torch.randn(20)
    (out * g).sum().backward()
    ref, (h64, _, _), _, _ = _reference(hidden, weight, None, labels)
    (ref * g).sum().backward()
    assert _rel(hidden.grad, h64.grad) < 1e-5
    plain = hidden.detach().clone().requires_grad_()
    (torch.log_softmax(plain @ weight.T, -1).gather(1, labels[:, None]).squeeze(1) * g).sum().backward()
    assert _rel(hidden.grad, h64.grad) <= max(_rel(plain.grad, h64.grad), 5e-6)  # no worse than plain fp32


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(labels=torch.randint(0, 10, (4, 6))), ValueError, "labels shape"),
        (dict(hidden=torch.randn(4, 5, 9)), ValueError, "weight.shape[1]"),
        (dict(labels=torch.full((4, 5), 10)), ValueError, "[0, 10)"),
        (dict(labels=torch.full((4, 5), -3)), ValueError, "labels must be in"),
        (dict(labels=torch.zeros(4, 5)), TypeError, "labels must be an integer"),
        (dict(hidden=torch.zeros(4, 5, 8, dtype=torch.int32)), TypeError, "hidden must be"),
        (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "weight must be"),
        (dict(weight=torch.zeros(10, 8, device="meta")), ValueError, "weight is on meta"),
        (dict(bias=torch.zeros(11)), ValueError, "bias must have shape"),
        (dict(labels=torch.tensor([[1, 2, 3, 4, 5]] * 3 + [[1, 2, 3, 4, 12]])), ValueError, "found 12"),
    ],
)
def test_bad_input_is_named(kwargs, exc, words):
    args = dict(hidden=torch.randn(4, 5, 8), weight=torch.randn(10, 8), labels=torch.randint(0, 10, (4, 5)))
    args.update(kwargs)
    bias = args.pop("bias", None)
    with pytest.raises(exc) as info:
        linear_log_probs(args["hidden"], args["weight"], args["labels"], bias=bias)
    assert words in str(info.value)


def _nan_pattern_matches(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(ours.detach().cpu()), torch.isnan(ref.detach().cpu()))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_non_finite_hidden_propagates_like_materialized_logits(backend, trainable, device):
    """NaN / Inf in hidden at scored positions: NaN log-probs for those tokens, as materialized
    logits -> log_softmax -> gather gives (no error, no host sync to look for them); every other
    token keeps its value and its gradient."""
    dev = _dev(backend, device)
    hidden, weight, _, labels = _make((2, 13), 24, 300, torch.float32, trainable, False, ignore_frac=0.0, device=dev)
    labels[0, 7] = -100
    with torch.no_grad():
        hidden[0, 3, 5] = float("nan")  # scored
        hidden[0, 4, 1] = float("inf")  # scored: +inf and -inf logits, NaN after the shift
        hidden[0, 7, 2] = float("nan")  # ignored
    g = torch.randn(labels.shape)
    with use_backend(backend), chunking(8, 128):
        out = linear_log_probs(hidden, weight, labels)
        (out * g.to(dev)).sum().backward()
    ref, (h64, w64, _), _, mask = _reference(hidden, weight, None, labels)
    (ref * g).sum().backward()
    bad = torch.zeros_like(mask)
    bad[0, 3] = bad[0, 4] = True
    assert torch.isnan(ref[bad]).all() and _nan_pattern_matches(out, ref)
    assert out[0, 7] == 0 and _rel(out.cpu()[~bad], ref[~bad]) < 1e-5
    grad_h = hidden.grad.cpu()
    assert torch.isnan(grad_h[bad]).all() and torch.isfinite(grad_h[~bad]).all()
    assert (grad_h[0, 7] == 0).all()  # materialized autograd would put NaN * 0 = NaN here
    clean = ~bad & mask
    assert _rel(grad_h[clean], h64.grad[clean]) < 1e-5
    if trainable:
        assert torch.isnan(weight.grad).all() and torch.isnan(w64.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_non_finite_hidden_at_ignored_positions_changes_nothing(backend, trainable, device):
    """Positions whose label is ignore_index never enter: NaN / Inf there leave everything bitwise equal."""
    dev = _dev(backend, device)
    hidden, weight, bias, labels = _make((3, 11), 20, 150, torch.float32, trainable, True, device=dev)
    ignored = (labels == -100).cpu()
    assert ignored.any() and (~ignored).any()
    dirty = hidden.detach().clone()
    dirty[ignored.to(dev)] = float("nan")
    dirty[1, 0, 0] = float("inf")  # row 1 is all ignored
    g = torch.randn(labels.shape).to(dev)
    results = []
    for h0 in (hidden.detach(), dirty):
        h = h0.clone().requires_grad_()
        if trainable:
            weight.grad = bias.grad = None
        with use_backend(backend), chunking(8, 64):
            out = linear_log_probs(h, weight, labels, bias=bias)
            (out * g).sum().backward()
        results.append([out, h.grad] + ([weight.grad, bias.grad] if trainable else []))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.isfinite(results[1][1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weight_propagates_to_every_token(backend, device):
    dev = _dev(backend, device)
    weight = torch.randn(10, 8)
    weight[3, 2] = float("nan")
    labels = torch.tensor([1, 2, -100, 9])
    hidden = torch.randn(4, 8)
    with use_backend(backend):
        out = linear_log_probs(hidden.to(dev), weight.to(dev), labels.to(dev))
    ref = _reference(hidden, weight, None, labels)[0]
    assert _nan_pattern_matches(out, ref) and torch.isnan(out[[0, 1, 3]]).all() and out[2] == 0


def test_check_finite_opt_in_raises(monkeypatch):
    """check_finite=True (or DPO_FAST_CHECK_FINITE=1) gives the clear errors instead of NaN."""
    hidden, weight, labels = torch.randn(2, 5, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 5))
    hidden_nan = hidden.clone()
    hidden_nan[1, 2, 3] = float("nan")
    weight_nan = weight.clone()
    weight_nan[4, 0] = float("inf")
    with pytest.raises(ValueError, match="hidden contains NaN or Inf at a position whose label is not ignore_index"):
        linear_log_probs(hidden_nan, weight, labels, check_finite=True)
    with pytest.raises(ValueError, match="weight \\(or bias\\) produced non-finite logits"):
        linear_log_probs(hidden, weight_nan, labels, check_finite=True)
    labels_ign = labels.clone()
    labels_ign[1, 2] = -100
    assert torch.isfinite(linear_log_probs(hidden_nan, weight, labels_ign, check_finite=True)).all()
    monkeypatch.setenv("DPO_FAST_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="hidden contains NaN"):
        linear_log_probs(hidden_nan, weight, labels)
    assert torch.isnan(linear_log_probs(hidden_nan, weight, labels, check_finite=False)[1, 2])
    monkeypatch.setenv("DPO_FAST_CHECK_FINITE", "0")
    assert torch.isnan(linear_log_probs(hidden_nan, weight, labels)[1, 2])


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (data-dependent sizes, scalar reads)."""

    SYNCING = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "frozen-head"])
def test_one_host_sync_per_call(grad):
    """The compaction's nonzero is the only host sync of the forward (the label-range check rides on
    it; nothing looks for NaN)."""
    hidden, weight, _, labels = _make((3, 17), 16, 200, torch.float32, False, False)
    with use_backend("torch"), torch.set_grad_enabled(grad), _SyncCounter() as counter:
        compacted_log_probs(hidden, weight, labels, stats=True)
    assert counter.seen == ["aten::nonzero"], counter.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode")
def test_one_host_sync_per_call_cuda():
    hidden, weight, _, labels = _make((3, 17), 16, 200, torch.float32, False, False, device="cuda")
    compacted_log_probs(hidden, weight, labels)  # warm-up: kernel compilation, GEMM probes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compacted_log_probs(hidden, weight, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_recast_the_sweep(backend, device):
    """Under bf16 autocast the fp32 head still computes in fp32 (tiles and accumulators)."""
    dev = _dev(backend, device)
    hidden, weight, _, labels = _make((2, 7), 24, 300, torch.float32, True, False, device=dev)
    with _use(backend), torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        out = linear_log_probs(hidden, weight, labels)
        out.sum().backward()
    ref, (h64, w64, _), _, _ = _reference(hidden, weight, None, labels)
    ref.sum().backward()
    assert _rel(out, ref) < 1e-5 and _rel(hidden.grad, h64.grad) < 1e-5 and _rel(weight.grad, w64.grad) < 1e-5


def _float64_rows(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, g: torch.Tensor, chunk: int = 16384):
    """float64 logp and d(sum g * logp)/dh of a few rows, sweeping the vocabulary in chunks (no float64 copy
    of the whole weight): logp = z_y - lse(z), grad_h = g * (W[y] - softmax(z) W)."""
    h64 = h.double()
    z = torch.cat([h64 @ w[v0:v0 + chunk].double().t() for v0 in range(0, w.shape[0], chunk)], dim=1)
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    e = sum(p[:, v0:v0 + chunk] @ w[v0:v0 + chunk].double() for v0 in range(0, w.shape[0], chunk))
    return z.gather(1, y[:, None]).squeeze(1) - lse, g.double()[:, None] * (w.index_select(0, y).double() - e)


@pytest.mark.parametrize("n,d,vocab", [pytest.param(80, 16, 300, id="toy"),
                                       gpu_case(8192, 4096, 128256, id="llama3-8b-head")])
def test_bf16_frozen_head_agrees_with_torch_backend_and_float64_rows(n, d, vocab, device):
    """The frozen bf16 head at the Llama-3-8B shape (on CUDA; a toy size elsewhere): the triton backend and
    the torch mirror on the same device agree, and both match float64 on a sample of 64 scored rows."""
    hidden = torch.randn(n, d, device=device).to(torch.bfloat16)
    weight = (torch.randn(vocab, d, device=device) * d ** -0.5 * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.1] = -100
    g = torch.randn(n, device=device)
    outs = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        with use_backend(backend):
            out = linear_log_probs(h, weight, labels)
            (out * g).sum().backward()
        outs[backend] = (out.detach(), h.grad)
    assert _rel(outs["triton"][0], outs["torch"][0]) < 1e-2
    assert _rel(outs["triton"][1], outs["torch"][1]) < 1e-2
    rows = torch.nonzero(labels != -100).squeeze(1)
    rows = rows[torch.randperm(rows.numel(), device=device)[:64]]
    logp64, grad64 = _float64_rows(hidden[rows], weight, labels[rows], g[rows])
    for backend, (out, grad) in outs.items():
        assert _rel(out[rows], logp64) < 1e-2, backend
        assert _rel(grad[rows], grad64) < 1e-2, backend
