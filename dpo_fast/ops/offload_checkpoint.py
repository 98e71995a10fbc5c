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
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional

import torch

_copy_streams: dict = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _copy_streams.get(device)
    if stream is None:
        stream = _copy_streams[device] = torch.cuda.Stream(device=device)
    return stream


class _Parked:
    """One layer input parked in host memory, and its way back.

    Backward runs the layers in the reverse order of forward, so while layer k is recomputed and
    back-propagated, the input of layer k-1 (the layer forward ran just before k, `previous`) is
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
        self.back: Optional[torch.Tensor] = None   # the reloaded copy, once issued
        self.event = None                          # CUDA: the copy stream's event after the reload
        if not x.is_cuda:
            self.host, self.stream = x.detach().clone(), None
            return
        # pinned host memory (PyTorch's caching host allocator: no cudaHostAlloc after the first step)
        self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        self.stream = _copy_stream(x.device)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            self.host.copy_(x.detach(), non_blocking=True)
            x.record_stream(self.stream)  # keep x's memory alive until the copy is done

    def prefetch(self) -> None:
        """Start copying the input back to its device (once)."""
        if self.back is not None or self.host is None:
            return
        if self.stream is None:
            self.back = self.host
        else:
            with torch.cuda.stream(self.stream):
                self.back = self.host.to(self.device, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(self.stream)
        self.host = None  # the pinned block goes back to the caching allocator once the copy is done

    def take(self) -> torch.Tensor:
        """The input on its device, usable on the current stream; prefetches the previous layer's input."""
        self.prefetch()
        x, self.back = self.back, None
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            x.record_stream(current)
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()
        return x


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
        with torch.no_grad():
            outputs = run_function(hidden, *args)
        ctx.parked = _Parked(hidden)
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
        hidden = ctx.parked.take()
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
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.run_function(hidden, *args)
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
