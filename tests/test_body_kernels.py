"""Body kernels (RMSNorm, RoPE, SwiGLU, QLoRA linear, offloaded checkpointing) against float64 references
and against the transformers / peft / bitsandbytes modules they replace.

Both backends run everywhere: "triton" (compiled on a GPU, the Triton interpreter on CPU) and "torch".
fp32 inputs must match a float64 autograd reference to ~1e-5 (relative, norm-wise); bf16 to ~1e-2. Cases
marked gpu-* (Llama-3-8B sizes) run only on CUDA (tests/gpu_cases.py).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpo_fast.ops.offload_checkpoint import offloaded_checkpoint
from dpo_fast.ops.qlora_linear import dense_weight, dropout_mask, lora_linear
from dpo_fast.ops.rms_norm import rms_norm
from dpo_fast.ops.rope import apply_rope
from dpo_fast.ops.swiglu import swiglu
from gpu_cases import gpu_case

pytestmark = pytest.mark.kernels
BACKENDS = ["triton", "torch"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 13, 72), (5, 33), gpu_case((2, 333, 4096), id="8b-width")])
def test_rms_norm_matches_llama_rms_norm(backend, dtype, shape, device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    xa, wa = leaf(x), leaf(w)
    y = rms_norm(xa, wa, 1e-5, backend=backend)
    y.backward(dy)

    ref = LlamaRMSNorm(shape[-1], eps=1e-5).to(device=device, dtype=torch.float64)
    ref.weight.data.copy_(w.double())
    xr = leaf(x.double())
    yr = ref(xr)
    yr.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOL[dtype]
    assert rel(y, yr) < tol
    assert rel(xa.grad, xr.grad) < tol
    assert rel(wa.grad, ref.weight.grad) < tol
    if dtype == torch.bfloat16:  # same rounding points as the bf16 module itself
        same = LlamaRMSNorm(shape[-1], eps=1e-5).to(device=device, dtype=dtype)
        same.weight.data.copy_(w)
        assert rel(y, same(x)) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fp32_weight_bf16_input_promotes_like_transformers(backend, device):
    """prepare_model_for_kbit_training keeps norms in fp32 while activations are bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 7, 40, device=device, dtype=torch.bfloat16)
    m = LlamaRMSNorm(40).to(device)
    m.weight.data.normal_()
    xa = leaf(x)
    y = rms_norm(xa, m.weight.detach(), m.variance_epsilon, backend=backend)  # frozen weight: no dw
    yr = m(x)
    assert y.dtype == yr.dtype == torch.float32
    # Same rounding points as transformers, so fp32-tight; except that the Triton *interpreter* casts
    # fp32 -> bf16 by truncation (a GPU rounds to nearest), which moves some values by one bf16 ulp.
    interpreted = backend == "triton" and device == "cpu"
    assert rel(y, yr) < (1e-2 if interpreted else 1e-5)
    y.sum().backward()
    assert xa.grad.dtype == torch.bfloat16 and torch.isfinite(xa.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 13, 72), (3, 4, 5, 18), (5, 33)])
def test_rms_norm_gemma_scale_matches_gemma_rms_norm(backend, dtype, shape, device):
    """offset=1, scale_in_fp32: Gemma's (1 + w) scale applied to the fp32 row, one cast (Gemma 1/2/3's RMSNorm);
    a 4-D input is Gemma 3's q/k norm over [B, H, T, head_dim]."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    x = (3 * torch.randn(shape, device=device)).to(dtype)
    w = (0.3 * torch.randn(shape[-1], device=device)).to(dtype)  # stored centred on 0: the scale is 1 + w
    dy = torch.randn(shape, device=device).to(dtype)
    xa, wa = leaf(x), leaf(w)
    y = rms_norm(xa, wa, 1e-6, offset=1.0, scale_in_fp32=True, backend=backend)
    y.backward(dy)
    ref = Gemma2RMSNorm(shape[-1], eps=1e-6).to(device=device, dtype=torch.float64)
    ref.weight.data.copy_(w.double())
    xr = leaf(x.double())
    ref(xr).backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOL[dtype]
    assert rel(y, ref(x.double())) < tol
    assert rel(xa.grad, xr.grad) < tol
    assert rel(wa.grad, ref.weight.grad) < tol
    same = Gemma3RMSNorm(shape[-1], eps=1e-6).to(device=device, dtype=dtype)  # the module in x's dtype
    same.weight.data.copy_(w)
    # the torch mirror has the module's rounding points (bitwise on CPU); the interpreter casts to bf16 by
    # truncation (a GPU rounds to nearest)
    exact = backend == "torch" or dtype == torch.float32
    assert rel(y, same(x)) < (1e-6 if exact else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_gemma_scale_keeps_the_input_dtype(backend, device):
    """Gemma casts the result to x's dtype, whatever the weight's (a fp32 norm weight on bf16 activations)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    m = Gemma2RMSNorm(40).to(device)
    m.weight.data.normal_(0.0, 0.3)
    x = torch.randn(3, 7, 40, device=device, dtype=torch.bfloat16)
    y = rms_norm(x, m.weight.detach(), m.eps, offset=1.0, scale_in_fp32=True, backend=backend)
    assert y.dtype == m(x).dtype == torch.bfloat16
    assert rel(y, m(x)) < 1e-2


def test_rms_norm_rejects_bad_weight(device):
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=device), torch.ones(7, device=device))


# ----------------------------------------------------------------------------------------------- RoPE

def _llama3_cos_sin(batch, seq, head_dim, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    rot = LlamaRotaryEmbedding(cfg).to(device)
    # different position offsets per row (packed / left-padded batches)
    pos = torch.arange(seq, device=device)[None] + torch.randint(0, 100, (batch, 1), device=device)
    dummy = torch.empty(0, device=device, dtype=torch.float64)
    return rot(dummy, pos)  # float64 cos, sin [B, T, D]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("b,hq,hk,t,d", [pytest.param(2, 4, 2, 13, 18, id="odd"),
                                         gpu_case(2, 32, 8, 257, 128, id="8b-heads")])
def test_rope_matches_apply_rotary_pos_emb(backend, dtype, inplace, layout, b, hq, hk, t, d, device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = _llama3_cos_sin(b, t, d, device)
    # q, k as LlamaAttention makes them: a transposed view of a projection's output
    q_src = torch.randn(b, t, hq * d, device=device).to(dtype)
    k_src = torch.randn(b, t, hk * d, device=device).to(dtype)
    dq = torch.randn(b, hq, t, d, device=device).to(dtype)
    dk = torch.randn(b, hk, t, d, device=device).to(dtype)

    def views(qs, ks):
        q = qs.view(b, t, hq, d)
        k = ks.view(b, t, hk, d)
        return (q.transpose(1, 2), k.transpose(1, 2)) if layout == 1 else (q, k)

    def grads_as_layout(g):
        return g if layout == 1 else g.transpose(1, 2)

    qa, ka = leaf(q_src), leaf(k_src)
    q, k = views(qa * 1, ka * 1)  # non-leaf, so the in-place path is legal
    qo, ko = apply_rope(q, k, cos.to(dtype), sin.to(dtype), layout, inplace=inplace, backend=backend)
    torch.autograd.backward((qo, ko), (grads_as_layout(dq), grads_as_layout(dk)))

    qr_, kr_ = leaf(q_src.double()), leaf(k_src.double())
    qr, kr = apply_rotary_pos_emb(*views(qr_, kr_), cos, sin, unsqueeze_dim=layout)
    torch.autograd.backward((qr, kr), (grads_as_layout(dq).double(), grads_as_layout(dk).double()))
    tol = TOL[dtype]
    assert qo.dtype == dtype and qo.shape == qr.shape and ko.shape == kr.shape
    assert rel(qo, qr) < tol and rel(ko, kr) < tol
    assert rel(qa.grad, qr_.grad) < tol and rel(ka.grad, kr_.grad) < tol


def test_rope_rejects_mismatched_cos(device):
    q = torch.randn(1, 2, 5, 8, device=device)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(q, q, torch.randn(1, 4, 8, device=device), torch.randn(1, 4, 8, device=device))


# ----------------------------------------------------------------------------------------------- SwiGLU

def _check_gated(g, backend, dtype, activation, hf_name):
    """swiglu(gate, up, activation) and its gradients against float64 autograd of transformers' own activation
    (ACT2FN[hf_name](gate) * up); returns the kernel's and the reference's gate leaves."""
    from transformers.activations import ACT2FN

    g = g.to(dtype)
    u = torch.randn(g.shape, device=g.device).to(dtype)
    dh = torch.randn(g.shape, device=g.device).to(dtype)
    ga, ua = leaf(g), leaf(u)
    h = swiglu(ga, ua, activation=activation, backend=backend)
    h.backward(dh)
    gr, ur = leaf(g.double()), leaf(u.double())
    hr = ACT2FN[hf_name](gr) * ur
    hr.backward(dh.double())
    tol = TOL[dtype]
    assert h.dtype == dtype
    assert rel(h, hr) < tol and rel(ga.grad, gr.grad) < tol and rel(ua.grad, ur.grad) < tol
    return ga, gr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13, 77), gpu_case((2, 257, 14336), id="8b-mlp")])
def test_swiglu_matches_silu_times_up(backend, dtype, shape, device):
    _check_gated(2 * torch.randn(shape, device=device), backend, dtype, "silu", "silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_matches_gelu_tanh_times_up(backend, dtype, device):
    """activation="gelu_tanh": Gemma's gelu_pytorch_tanh(gate) * up, against float64 autograd (gate values
    from -12 to 12, where tanh saturates and the slope's 1 - tanh^2 must not cancel)."""
    g = (4 * torch.randn(3, 13, 77, device=device)).clamp(-12, 12)
    ga, gr = _check_gated(g, backend, dtype, "gelu_tanh", "gelu_pytorch_tanh")
    # elementwise too: no element may be off by more than a few of its dtype's ulps of the largest value
    scale = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert ((ga.grad.double() - gr.grad).abs() <= scale * (1 + gr.grad.abs())).all()


def test_swiglu_rejects_shape_mismatch(device):
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(2, 3, device=device), torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="activation"):
        swiglu(torch.randn(2, 3, device=device), torch.randn(2, 3, device=device), activation="gelu")


# ----------------------------------------------------------------------------------------------- QLoRA

def _peft_lora_layer(base: nn.Module, r: int, alpha: int, dropout: float):
    """A peft LoRA layer (lora.Linear or lora.Linear4bit) around `base`, with random A and B."""
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Holder(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"],
                                                init_lora_weights=False))
    return model.base_model.model.proj


def _base_layer(kind: str, in_f: int, out_f: int, bias: bool, dtype: torch.dtype, device: str) -> nn.Module:
    w = torch.randn(out_f, in_f, device=device) / in_f ** 0.5
    if kind == "linear":
        layer = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
        layer.weight.data.copy_(w)
        if bias:
            layer.bias.data.normal_()
        return layer.requires_grad_(False)
    bnb = pytest.importorskip("bitsandbytes")
    quant_type = "nf4" if kind.startswith("nf4") else "fp4"
    double = kind.endswith("dq")
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=double)
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=quant_type, compress_statistics=double)
    if bias:
        layer.bias = nn.Parameter(torch.randn(out_f, dtype=dtype), requires_grad=False)
    return layer.to(device)


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("in_f,out_f,r,lead", [pytest.param(72, 40, 8, (3, 13), id="odd"),
                                               gpu_case(4096, 1024 + 8, 16, (515,), id="8b-width")])
def test_qlora_linear_matches_float64_reference(kind, dtype, dropout, in_f, out_f, r, lead, device):
    alpha = 2 * r
    base = _base_layer(kind, in_f, out_f, bias=(kind != "fp4"), dtype=dtype, device=device)
    a = (torch.randn(r, in_f, device=device) / in_f ** 0.5)  # adapters stay fp32, as peft keeps them
    bw = torch.randn(out_f, r, device=device) / r ** 0.5
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    x.view(-1, in_f)[x.numel() // in_f // 2] = 0.0  # a fully zero row
    dy = torch.randn(*lead, out_f, device=device).to(dtype)
    mask = dropout_mask(x, dropout) if dropout else None
    xa, aa, ba = leaf(x), leaf(a), leaf(bw)
    y = lora_linear(xa, base, aa, ba, alpha / r, dropout_p=dropout, mask=mask)
    y.backward(dy)

    wd = dense_weight(base, torch.float64).detach()
    xr, ar, br = leaf(x.double()), leaf(a.double()), leaf(bw.double())
    xd = xr * mask.double() / (1 - dropout) if dropout else xr
    yr = F.linear(xr, wd, None if base.bias is None else base.bias.double()) + (alpha / r) * (xd @ ar.t()) @ br.t()
    yr.backward(dy.double())
    tol = TOL[dtype] * (3 if dtype == torch.bfloat16 else 1)
    assert y.dtype == dtype and y.shape == yr.shape
    assert rel(y, yr) < tol
    assert rel(xa.grad, xr.grad) < tol
    assert aa.grad.dtype == torch.float32 and ba.grad.dtype == torch.float32
    assert rel(aa.grad, ar.grad) < tol and rel(ba.grad, br.grad) < tol


@pytest.mark.parametrize("kind", ["nf4-dq", "linear"])
def test_qlora_linear_matches_peft_module(kind, device):
    """Against the peft LoRA layer itself (bitsandbytes' own 4-bit matmul for the base)."""
    dtype = torch.float32
    base = _base_layer(kind, 72, 40, bias=True, dtype=dtype, device=device)
    layer = _peft_lora_layer(base, r=8, alpha=16, dropout=0.0)
    a, bw = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 13, 72, device=device)
    dy = torch.randn(2, 13, 40, device=device)
    xa = leaf(x)
    y = lora_linear(xa, layer.base_layer, a, bw, layer.scaling["default"])
    y.backward(dy)
    ours = (xa.grad, a.grad.clone(), bw.grad.clone())
    a.grad = bw.grad = None
    xr = leaf(x)
    yr = layer(xr)
    yr.backward(dy)
    assert rel(y, yr) < 1e-5
    for got, want in zip(ours, (xr.grad, a.grad, bw.grad)):
        assert rel(got, want) < 1e-5


def test_qlora_linear_casts_each_operand_once(device):
    """bf16 compute over fp32 adapters (peft's default): forward casts A and B once each, backward only
    brings grad_A and grad_B back to fp32. Each cast is a kernel launch on a GPU, and the op runs 7
    times per layer and pass, so an extra round trip here is thousands of launches per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] == "_to_copy":
                self.casts.append((args[0].dtype, (kwargs or {}).get("dtype"), tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    base = _base_layer("linear", 72, 40, bias=False, dtype=torch.bfloat16, device=device)
    a, bw = leaf(torch.randn(8, 72, device=device)), leaf(torch.randn(40, 8, device=device))
    x = leaf(torch.randn(3, 13, 72, device=device).bfloat16())
    fwd, bwd = Casts(), Casts()
    with fwd:
        y = lora_linear(x, base, a, bw, 2.0)
    with bwd:
        y.backward(torch.randn_like(y))
    assert sorted(fwd.casts) == sorted([(torch.float32, torch.bfloat16, (8, 72)),
                                        (torch.float32, torch.bfloat16, (40, 8))])
    assert sorted(bwd.casts) == sorted([(torch.bfloat16, torch.float32, (8, 72)),
                                        (torch.bfloat16, torch.float32, (40, 8))])
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == bw.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["nf4-dq", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,outs,ranks,scalings,lead", [
    pytest.param(72, (40, 24, 24), (8, 8, 4), (2.0, 2.0, 0.5), (3, 13), id="odd"),
    gpu_case(4096, (1032, 261, 261), (16, 16, 8), (2.0, 2.0, 4.0), (515,), id="8b-width")])
def test_qlora_group_matches_float64_reference(kind, dtype, in_f, outs, ranks, scalings, lead, device):
    """q/k/v-like projections of different widths and ranks over one x: outputs and every gradient."""
    from dpo_fast.ops.qlora_group import lora_linear_group

    bases = [_base_layer(kind, in_f, o, bias=(i == 0 and kind == "linear"), dtype=dtype, device=device)
             for i, o in enumerate(outs)]
    a_s = [leaf(torch.randn(r, in_f, device=device) / in_f ** 0.5) for r in ranks]
    b_s = [leaf(torch.randn(o, r, device=device) / r ** 0.5) for o, r in zip(outs, ranks)]
    x = leaf(torch.randn(*lead, in_f, device=device).to(dtype))
    dys = [torch.randn(*lead, o, device=device).to(dtype) for o in outs]
    ys = lora_linear_group(x, bases, a_s, b_s, scalings)
    torch.autograd.backward(ys, dys)

    xr = leaf(x.detach().double())
    ars, brs = [leaf(a.detach().double()) for a in a_s], [leaf(b.detach().double()) for b in b_s]
    yrs = [F.linear(xr, dense_weight(base, torch.float64).detach(),
                    None if base.bias is None else base.bias.double()) + s * (xr @ ar.t()) @ br.t()
           for base, ar, br, s in zip(bases, ars, brs, scalings)]
    torch.autograd.backward(yrs, [dy.double() for dy in dys])
    tol = TOL[dtype] * (3 if dtype == torch.bfloat16 else 1)
    for y, yr in zip(ys, yrs):
        assert y.dtype == dtype and y.shape == yr.shape and rel(y, yr) < tol
    assert rel(x.grad, xr.grad) < tol
    for got, want in zip(a_s + b_s, ars + brs):
        assert got.grad.dtype == torch.float32 and rel(got.grad, want.grad) < tol


def test_qlora_group_equals_separate_ops(device):
    """fp32: the grouped op gives what one lora_linear per projection gives, up to summation order."""
    from dpo_fast.ops.qlora_group import lora_linear_group

    bases = [_base_layer("linear", 40, o, bias=False, dtype=torch.float32, device=device) for o in (40, 56)]
    a_s = [leaf(torch.randn(4, 40, device=device)) for _ in bases]
    b_s = [leaf(torch.randn(b.out_features, 4, device=device)) for b in bases]
    x = leaf(torch.randn(2, 9, 40, device=device))
    ys = lora_linear_group(x, bases, a_s, b_s, [1.5, 1.5])
    (ys[0].sum() + (ys[1] ** 2).sum()).backward()
    grouped = [t.grad.clone() for t in [x] + a_s + b_s]
    for t in [x] + a_s + b_s:
        t.grad = None
    sep = [lora_linear(x, b, a, bb, 1.5) for b, a, bb in zip(bases, a_s, b_s)]
    (sep[0].sum() + (sep[1] ** 2).sum()).backward()
    for y, z in zip(ys, sep):
        assert rel(y, z) < 1e-6
    for got, t in zip(grouped, [x] + a_s + b_s):
        assert rel(got, t.grad) < 1e-6


def test_qlora_group_under_autocast_matches_separate_ops(device):
    """bf16 autocast over fp32 x and fp32 bases (HF/TRL bf16=True): same dtypes and numbers as lora_linear."""
    from dpo_fast.ops.qlora_group import lora_linear_group

    bases = [_base_layer("linear", 48, o, bias=(o == 32), dtype=torch.float32, device=device) for o in (32, 16)]
    a_s = [leaf(torch.randn(4, 48, device=device)) for _ in bases]
    b_s = [leaf(torch.randn(b.out_features, 4, device=device)) for b in bases]
    x = leaf(torch.randn(2, 7, 48, device=device))
    dys = [torch.randn(2, 7, b.out_features, device=device) for b in bases]
    results = []
    for grouped in (True, False):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            ys = lora_linear_group(x, bases, a_s, b_s, [2.0, 2.0]) if grouped else \
                [lora_linear(x, b, a, bb, 2.0) for b, a, bb in zip(bases, a_s, b_s)]
        torch.autograd.backward(ys, [dy.to(ys[0].dtype) for dy in dys])
        results.append((ys, [t.grad.clone() for t in [x] + a_s + b_s]))
        for t in [x] + a_s + b_s:
            t.grad = None
    (yg, gg), (ys, gs) = results
    assert [y.dtype for y in yg] == [y.dtype for y in ys] == [torch.bfloat16] * 2
    assert max(rel(a, b) for a, b in zip(yg + gg, ys + gs)) < 1e-2  # bf16 rounding apart (measured ~3e-3)
    assert [g.dtype for g in gg] == [g.dtype for g in gs]


def test_qlora_group_rejects_what_it_cannot_reproduce(device):
    from dpo_fast.ops.qlora_group import can_group, lora_linear_group

    f32 = _base_layer("linear", 16, 8, bias=False, dtype=torch.float32, device=device)
    b16 = _base_layer("linear", 16, 8, bias=False, dtype=torch.bfloat16, device=device)
    a, b = torch.randn(2, 16, device=device), torch.randn(8, 2, device=device)
    x = torch.randn(3, 16, device=device)
    assert can_group([f32, f32], [a, a], [b, b], x)
    assert not can_group([f32], [a], [b], x)                                         # nothing to group
    assert can_group([f32, b16], [a, a], [b, b], x)          # an nn.Linear computes in x's dtype: both fp32
    assert not can_group([f32, _base_layer("nf4-dq", 16, 8, False, torch.bfloat16, device)], [a, a], [b, b], x)
    assert not can_group([f32, f32], [a, a.double()], [b, b], x)                     # mixed adapter dtypes
    assert not can_group([f32, _base_layer("linear", 12, 8, False, torch.float32, device)], [a, a], [b, b], x)
    with pytest.raises(ValueError, match="lora_linear per projection"):
        lora_linear_group(x, [f32, f32], [a, a.double()], [b, b], [1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        lora_linear_group(x, [f32, f32], [a], [b, b], [1.0, 1.0])
    with pytest.raises(ValueError, match="lora A must be"):
        lora_linear_group(x, [f32, f32], [a, a[:, :8]], [b, b], [1.0, 1.0])


def test_qlora_linear_rejects_trainable_base(device):
    base = nn.Linear(8, 4, device=device)
    with pytest.raises(TypeError, match="frozen"):
        lora_linear(torch.randn(2, 8, device=device), base, torch.randn(2, 8, device=device),
                    torch.randn(4, 2, device=device), 1.0)


def test_qlora_linear_rejects_bad_dropout(device):
    base = nn.Linear(8, 4, device=device).requires_grad_(False)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(torch.randn(2, 8, device=device), base, torch.randn(2, 8, device=device),
                    torch.randn(4, 2, device=device), 1.0, dropout_p=1.0)


# ----------------------------------------------------------------------------------------------- checkpointing

class _Block(nn.Module):
    """A layer with dropout and a frozen part, like a LoRA decoder layer."""

    def __init__(self, d):
        super().__init__()
        self.frozen = nn.Linear(d, d).requires_grad_(False)
        self.lora = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, scale=1.0):
        return x + scale * torch.tanh(self.frozen(x) + self.lora(self.drop(x)))


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_offloaded_checkpoint_matches_plain_forward(input_requires_grad, device):
    d = 24
    blocks = nn.ModuleList([_Block(d) for _ in range(3)]).to(device).double().train()
    x = torch.randn(2, 5, d, device=device, dtype=torch.float64)

    def run(ckpt):
        h = leaf(x) if input_requires_grad else x.clone()
        torch.manual_seed(1234)
        out = h
        for blk in blocks:
            out = ckpt(blk.forward, out, 0.5) if ckpt else blk(out, 0.5)
        loss = (out ** 2).sum()
        blocks.zero_grad(set_to_none=True)
        loss.backward()  # like torch's reentrant checkpoint: weight grads land in .grad (no autograd.grad)
        grads = [h.grad] * input_requires_grad + [b.lora.weight.grad for b in blocks]
        assert all(g is not None for g in grads)
        return loss.detach(), grads

    loss0, g0 = run(None)
    loss1, g1 = run(offloaded_checkpoint)
    assert rel(loss1, loss0) < 1e-12
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        assert rel(a, b) < 1e-12  # same dropout masks in the recompute (RNG restored)


def test_offloaded_checkpoint_prefetches_the_next_layer_input(monkeypatch, device):
    """Backward copies layer k-1's parked input back while layer k runs: every layer but the first one
    back-propagated finds its input already on the way; a dropped graph frees its parked inputs."""
    import gc

    from dpo_fast.ops import offload_checkpoint as oc

    log = []
    take = oc._Parked.take

    def spy(self):
        log.append((self.index, self.back is not None))
        return take(self)

    monkeypatch.setattr(oc._Parked, "take", spy)
    d = 16
    blocks = nn.ModuleList([_Block(d) for _ in range(4)]).to(device).double().train()
    x = torch.randn(2, 3, d, device=device, dtype=torch.float64)
    out = x
    for i, blk in enumerate(blocks):
        out = offloaded_checkpoint(blk.forward, out, 0.5)
        oc._Parked._last().index = i
    out.sum().backward()
    assert log == [(3, False), (2, True), (1, True), (0, True)]
    assert all(b.lora.weight.grad is not None for b in blocks)

    out = offloaded_checkpoint(blocks[0].forward, x, 0.5)
    assert oc._Parked._last() is not None
    del out
    gc.collect()
    assert oc._Parked._last() is None  # nothing keeps a dropped graph's host copy alive


def test_offloaded_checkpoint_rejects_a_second_backward(device):
    blk = _Block(8).to(device).double()
    out = offloaded_checkpoint(blk.forward, torch.randn(2, 8, device=device, dtype=torch.float64), 0.5)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()


def test_offloaded_checkpoint_needs_tensor_input():
    with pytest.raises(TypeError, match="first positional"):
        offloaded_checkpoint(lambda: None)


def test_explicit_backend_is_checked(monkeypatch):
    """An op's backend= argument gets the same checks as DPO_FAST_BACKEND: a clear error, not a crash in triton."""
    from dpo_fast.ops.swiglu import swiglu

    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        swiglu(gate, up, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        swiglu(gate, up, backend="triton")
