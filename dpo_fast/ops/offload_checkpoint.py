"""Gradient checkpointing that parks each layer's input in CPU memory (Unsloth's "smart" checkpointing).

`offloaded_checkpoint(function, hidden_states, *args)` runs `function` without building a graph,
copies `hidden_states` (the decoder layer's input, the only per-layer tensor plain checkpointing
keeps on the GPU) into pinned host memory on a side CUDA stream, and in backward copies it back,
recomputes the layer with gradients and back-propagates through it. GPU memory held between forward
and backward drops from ``layers x tokens x hidden`` to nothing; the copies overlap with compute: in
backward, the input of the layer that comes next is copied back while the current one runs (one
layer input of GPU memory), so the GPU does not wait for the host.

It has the signature transformers expects of ``_gradient_checkpointing_func`` (it is called as
``func(partial(layer.forward, **kwargs), *args)``; checkpoint keyword arguments such as
``use_reentrant`` are accepted and ignored). The RNG state (CPU and the tensor's CUDA device) and the
autocast state are restored for the recompute, so dropout masks match. Works on CPU tensors too
(the "offload" is then a copy), which is how it is tested without a GPU.

A layer may park one more tensor of its own with its input: `park(t)` during the checkpointed forward
copies t to host memory beside the input, and during the recompute `parked()` returns it, back on the
device. dpo_fast's patched decoder layers park their mid-layer residual this way, so the recompute can
skip o_proj's GEMMs (dpo_fast.patching.checkpointing).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional

import torch

from ..state import OFFLOAD_FORWARD, OFFLOAD_RELOADED

_copy_streams: dict = {}


def park(t: torch.Tensor) -> bool:
    """In an offloaded checkpoint's forward, park `t` in host memory with the layer's input, to get it back
    from `parked()` in the recompute (one tensor per layer call). False (nothing parked) anywhere else."""
    current = OFFLOAD_FORWARD.get()
    if current is None or len(current.host) > 1:
        return False
    current.add(t)
    return True


def parked() -> Optional[torch.Tensor]:
    """In an offloaded checkpoint's recompute, the tensor its forward parked with `park`, else None."""
    return OFFLOAD_RELOADED.get()


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device=device)
    return stream


class _Parked:
    """One layer's input (and the tensor it `park`ed, if any) in host memory, and the way back.

    Backward runs the layers in the reverse order of forward, so while layer k is recomputed and
    back-propagated, the tensors of layer k-1 (the layer forward ran just before k, `previous`) are
    already being copied back on the side stream: the GPU never waits for a reload. Each parked
    input knows the one parked before it (a weak reference, so a graph that is dropped frees its
    memory); a prefetch for a layer whose backward never comes is only a wasted copy.
    """

    _last: "Optional[weakref.ref]" = None   # the input parked most recently (process-wide: a wrong guess
                                            # only reloads an input early)

    def __init__(self, x: torch.Tensor) -> None:
        self.device = x.device
        self.previous = _Parked._last
        _Parked._last = weakref.ref(self)
        self.back: Optional[List[torch.Tensor]] = None   # the reloaded copies, once issued
        self.event = None                                # CUDA: the copy stream's event after the reload
        self.stream = _copy_stream(x.device) if x.is_cuda else None
        self.host: Optional[List[torch.Tensor]] = []
        self.add(x)

    def add(self, t: torch.Tensor) -> None:
        """Start copying `t` to host memory (a copy on CPU)."""
        if self.stream is None:
            self.host.append(t.detach().clone())
            return
        # pinned host memory (PyTorch's caching host allocator: no cudaHostAlloc after the first step)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.stream)  # keep t's memory alive until the copy is done
        self.host.append(host)

    def prefetch(self) -> None:
        """Start copying the parked tensors back to their device (once)."""
        if self.back is not None or self.host is None:
            return
        if self.stream is None:
            self.back = self.host
        else:
            with torch.cuda.stream(self.stream):
                self.back = [h.to(self.device, non_blocking=True) for h in self.host]
                self.event = torch.cuda.Event()
                self.event.record(self.stream)
        self.host = None  # the pinned blocks go back to the caching allocator once the copies are done

    def take(self) -> List[torch.Tensor]:
        """[input, parked tensor if any] on their device, usable on the current stream; prefetches the
        previous layer's."""
        self.prefetch()
        tensors, self.back = self.back, None
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            for t in tensors:
                t.record_stream(current)
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()
        return tensors


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function: Callable, anchor: torch.Tensor, hidden: torch.Tensor, *args: Any):
        ctx.run_function = run_function
        ctx.device = hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type)) \
            if hidden.device.type in ("cuda", "cpu") else (False, None)
        ctx.parked = _Parked(hidden)
        token = OFFLOAD_FORWARD.set(ctx.parked)
        try:
            with torch.no_grad():
                outputs = run_function(hidden, *args)
        finally:
            OFFLOAD_FORWARD.reset(token)
        tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.tensor_idx = tensor_idx
        ctx.args = [None if i in tensor_idx else a for i, a in enumerate(args)]
        ctx.save_for_backward(*[args[i] for i in tensor_idx])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if ctx.parked is None:
            raise RuntimeError("offloaded_checkpoint: a layer's backward ran twice (retain_graph=True); its "
                               "parked input was already used. Use plain gradient checkpointing for that.")
        hidden, *extra = ctx.parked.take()
        ctx.parked = None
        hidden = hidden.detach().requires_grad_(ctx.hidden_requires_grad)
        args: List[Any] = list(ctx.args)
        saved = ctx.saved_tensors
        for i, t in zip(ctx.tensor_idx, saved):
            args[i] = t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            token = OFFLOAD_RELOADED.set(extra[0] if extra else None)
            try:
                with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                    outputs = ctx.run_function(hidden, *args)
            finally:
                OFFLOAD_RELOADED.reset(token)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        arg_grads = [None] * len(args)
        for i in ctx.tensor_idx:
            if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                arg_grads[i] = args[i].grad
        return (None, None, hidden.grad if ctx.hidden_requires_grad else None, *arg_grads)


def offloaded_checkpoint(function: Callable, *args: Any, use_reentrant: Optional[bool] = None,
                         **checkpoint_kwargs: Any) -> Any:
    """Run ``function(*args)`` checkpointed, with ``args[0]`` (the layer input) offloaded to host memory.

    Drop-in for transformers' ``_gradient_checkpointing_func``. Without grad mode it simply calls
    the function. Extra checkpoint options (``use_reentrant``, ``preserve_rng_state`` ...) are ignored:
    the RNG state is always preserved. Like torch's reentrant checkpoint, gradients of parameters
    used inside `function` are accumulated into ``.grad`` during backward: use ``loss.backward()``,
    not ``torch.autograd.grad``.
    """
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded_checkpoint needs the layer input tensor as its first positional argument")
    if not torch.is_grad_enabled():
        return function(*args)
    # A leaf that requires grad makes the output require grad even when no input does (frozen
    # embeddings), so the LoRA weights inside the layer still get their gradients.
    anchor = torch.empty(0, device=args[0].device, requires_grad=True)
    return _OffloadedCheckpoint.apply(function, anchor, *args)
