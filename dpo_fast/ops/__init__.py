"""Autograd functions built on the kernels in `dpo_fast.kernels` (with pure-torch fallbacks)."""
