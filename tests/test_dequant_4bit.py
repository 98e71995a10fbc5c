"""dpo_fast.kernels.dequant_4bit against bitsandbytes' dequantization, and its use by the patched QLoRA linear.

The kernel must give bitsandbytes' values bit for bit: nf4 and fp4, with and without double quantization,
every block size, bf16 / fp16 / fp32 weights, sizes that end inside a block or inside a byte. The reference
is bitsandbytes' formula (its default backend, which "matches C++ / CUDA behavior"), written out in torch:
bitsandbytes' own CPU kernel disagrees with its quantizer when a block spans two rows, so it is compared
only on shapes whose rows are whole blocks. On CUDA the kernel is also compared with bitsandbytes' CUDA
kernel at the Llama-3-8B projection shapes.
"""
import itertools
import tempfile

import pytest
import torch

from dpo_fast.ops.backend import use_backend
from gpu_cases import cuda_only

pytestmark = pytest.mark.kernels
bnbF = pytest.importorskip("bitsandbytes.functional")
from dpo_fast.kernels.dequant_4bit import dequantize_4bit  # noqa: E402


def _reference(packed: torch.Tensor, qs) -> torch.Tensor:
    """bitsandbytes' dequantization in torch: code[nibble] * absmax in fp32 (absmax itself dequantized and
    offset when nested), high nibble first, rounded once to the weight's dtype."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], 1).reshape(-1).long()
    n = qs.shape.numel()
    absmax = qs.absmax
    if qs.nested:
        scale = qs.state2.absmax.repeat_interleave(qs.state2.blocksize)[:absmax.numel()]
        absmax = qs.state2.code[absmax.long()] * scale + qs.offset
    per_element = absmax.repeat_interleave(qs.blocksize)[:n]
    return (qs.code[nibbles][:n] * per_element).to(qs.dtype).reshape(qs.shape)


CASES = list(itertools.product([(40, 24), (130, 96), (7, 9), (3, 1)], ["nf4", "fp4"], [False, True],
                               [32, 64, 256], [torch.bfloat16, torch.float16, torch.float32]))


@pytest.mark.parametrize("shape,quant_type,nested,blocksize,dtype", CASES)
def test_dequantize_4bit_is_bitwise_bitsandbytes(shape, quant_type, nested, blocksize, dtype, device):
    w = (torch.randn(*shape, device=device) * 3).to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    got = dequantize_4bit(packed, qs)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, _reference(packed, qs))
    if shape[1] % blocksize == 0 or device == "cuda":
        assert torch.equal(got, bnbF.dequantize_4bit(packed, qs))


@cuda_only
@pytest.mark.parametrize("shape", [(14336, 4096), (1024, 4096), (4096, 14336), (77, 33)],
                         ids=["8b-gate-up", "8b-k-v", "8b-down", "odd"])
@pytest.mark.parametrize("quant_type,nested,dtype", list(itertools.product(["nf4", "fp4"], [True, False],
                                                                           [torch.bfloat16, torch.float16])))
def test_dequantize_4bit_is_bitwise_bitsandbytes_cuda_at_8b_shapes(shape, quant_type, nested, dtype, device):
    """The compiled kernel gives bitsandbytes' CUDA kernel's values bit for bit at the 8B projection shapes
    (QLoRA's block size 64), and an odd shape that ends inside a block and inside a byte."""
    w = (torch.randn(*shape, device=device) / shape[1] ** 0.5).to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    assert torch.equal(dequantize_4bit(packed, qs), bnbF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_dequantize_4bit_reads_any_quant_storage(storage, device):
    """bnb_4bit_quant_storage packs the same bytes into another dtype (FSDP QLoRA uses bf16)."""
    w = torch.randn(48, 128, device=device).to(torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage
    assert torch.equal(dequantize_4bit(packed, qs), bnbF.dequantize_4bit(packed, qs))


def test_reference_is_bitsandbytes_where_its_cpu_kernel_agrees():
    """The torch reference above is bitsandbytes' result on shapes whose rows are whole blocks."""
    for quant_type, nested in itertools.product(["nf4", "fp4"], [False, True]):
        w = torch.randn(48, 128).to(torch.bfloat16)
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        assert torch.equal(_reference(packed, qs), bnbF.dequantize_4bit(packed, qs))


@pytest.fixture(scope="module")
def whole_block_qlora_dir():
    """A tiny Llama whose linear layers' rows are whole 64-element blocks (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(config).save_pretrained(d)
        yield d


def test_patched_qlora_linear_dequantizes_with_the_kernel(whole_block_qlora_dir, device, monkeypatch):
    """patch(nf4_dequant=True) routes every 4-bit base of the patched LoRA layers through the kernel on the
    Triton backend; loss and LoRA gradients are bitwise those of bitsandbytes' dequantization
    (nf4_dequant=False); unpatch removes the marks."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import dpo_fast.kernels.dequant_4bit as kernel_module
    from dpo_fast.ops.qlora_linear import TRITON_DEQUANT
    from dpo_fast.patching.body import patch_body, unpatch_body

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(whole_block_qlora_dir, quantization_config=q, dtype=torch.float32,
                                            device_map={"": device})
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False)).train()
    calls = []
    real = kernel_module.dequantize_4bit
    monkeypatch.setattr(kernel_module, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 101, (2, 11), device=device)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with use_backend("triton"):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    switches = dict(rms_norm=False, rope=False, swiglu=False)  # only the QLoRA linear runs on the backend
    counts = patch_body(model, **switches)
    assert counts["nf4_dequant"] == 14
    loss, grads = loss_and_grads()
    # each 4-bit base in forward, and for grad_x in backward but layer 0's q/k/v (their input, the frozen
    # embeddings' normalized output, needs no gradient)
    assert len(calls) == 14 + 14 - 3
    patch_body(model, nf4_dequant=False, **switches)
    calls.clear()
    want_loss, want_grads = loss_and_grads()
    assert not calls
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[n], want_grads[n]) for n in grads)
    patch_body(model, **switches)
    unpatch_body(model)
    assert not any(TRITON_DEQUANT in m.__dict__ for m in model.modules())
