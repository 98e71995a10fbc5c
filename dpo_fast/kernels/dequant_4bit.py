"""Dequantize a bitsandbytes 4-bit weight (nf4 or fp4, double quantization included) in one kernel.

bitsandbytes packs two 4-bit codes per byte, the first element in the high nibble, and keeps one
absmax per ``blocksize`` elements: value = code[nibble] * absmax, in fp32, rounded once to the
weight's dtype. With double quantization (``quant_state.nested``) each absmax is itself an 8-bit
code into state2's 256-entry map, scaled per ``state2.blocksize`` absmax, plus ``quant_state.offset``.
bitsandbytes runs that as three kernels per weight (the 8-bit absmax dequantization, the offset add,
the 4-bit dequantization); this kernel does all of it in one pass over the packed bytes. The arithmetic
is bitsandbytes' (the same fp32 products, the offset added after the product, not fused into an FMA),
so the result is bitwise theirs.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_4bit_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, code2_ptr, absmax2_ptr, offset_ptr,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                         OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK packed bytes in, 2 * BLOCK elements out per program
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = byte < (n + 1) // 2
    packed = tl.load(q_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = (2 * byte) // BLOCKSIZE  # both elements of a byte are in one block (block sizes are even)
    if NESTED:
        code_index = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + code_index) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range,
                                                           other=0.0)
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * absmax
    low = tl.load(code_ptr + (packed & 15)) * absmax
    vals = tl.interleave(high, low)
    if OUT_BF16:
        # round to nearest even on the bits, so that the cast below is exact: the GPU's cast rounds so too,
        # the Triton interpreter's truncates
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        vals = bits.to(tl.float32, bitcast=True)
    offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < n)


def dequantize_4bit(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The dense weight (``quant_state.shape``, ``quant_state.dtype``) of a bitsandbytes 4-bit weight:
    `packed` is ``Params4bit.data`` (two codes per byte, in uint8 or any quant_storage dtype), `quant_state`
    its QuantState."""
    qs = quant_state
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage (e.g. bf16 for FSDP): the same bytes
        packed = packed.view(torch.uint8)
    out = torch.empty(qs.shape, dtype=qs.dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    if qs.nested:
        state2 = qs.state2
        code2, absmax2, offset, blocksize2 = state2.code, state2.absmax, qs.offset, state2.blocksize
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
    else:  # unused by the kernel; any tensors on the device
        code2 = absmax2 = offset = qs.absmax
        blocksize2 = 1
    block = 1024 if packed.is_cuda else 128
    grid = (triton.cdiv((n + 1) // 2, block),)
    _dequant_4bit_kernel[grid](packed, qs.absmax, qs.code, out, n, code2, absmax2, offset,
                               BLOCKSIZE=qs.blocksize, BLOCKSIZE2=blocksize2, NESTED=bool(qs.nested),
                               OUT_BF16=out.dtype == torch.bfloat16, BLOCK=block,
                               num_warps=4, enable_fp_fusion=False)
    return out
