"""LossOptions: each rule of the loss options raises naming the option; the trainer config reuses it."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from dpo_fast import compute_dpo_loss, dpo_loss, fused_linear_dpo_loss
from dpo_fast.loss_options import LossOptions
from dpo_fast.loss_types import F_DIVERGENCE_TYPES, LOSS_TYPES, LOSSES
from dpo_fast.train import TrainConfig
from dpo_fast.train.config import LOSS_FIELDS

F_DIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")  # TRL's list

# (options, exception, pattern): the pattern names the option and what is wrong with it
BAD_OPTIONS = [
    (dict(loss_type="dpo"), ValueError, r"loss_type: unknown loss type 'dpo'; valid: \[.*'sigmoid'"),
    (dict(loss_type=["sigmoid", "nope"]), ValueError, r"loss_type: unknown loss type 'nope'"),
    (dict(loss_type=[]), ValueError, r"loss_type must name at least one loss type"),
    (dict(loss_type=3), TypeError, r"loss_type must be a loss type name or a list of them, got int"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError,
     r"loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_weights=[1.0, 2.0]), ValueError, r"loss_weights has 2 entries but loss_type has 1"),
    (dict(loss_weights=[float("nan")]), ValueError, r"loss_weights must be finite, got nan"),
    (dict(loss_weights="1"), TypeError, r"loss_weights must be a list of numbers, got str"),
    (dict(loss_weights=0.5), TypeError, r"loss_weights must be a list of numbers, got float"),
    (dict(beta=0.0), ValueError, r"beta must be > 0.0, got 0.0"),
    (dict(beta=-1.0), ValueError, r"beta must be > 0.0, got -1.0"),
    (dict(beta=float("inf")), ValueError, r"beta must be finite, got inf"),
    (dict(beta="big"), TypeError, r"beta must be a real number, got str"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be >= 0.0, got -0.1"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must lie in \[0, 0.5\), got 0.5"),
    (dict(loss_type="exo_pair"), ValueError, r"label_smoothing must be > 0 for loss_type 'exo_pair'"),
    (dict(loss_type=["sigmoid", "exo_pair"], label_smoothing=0.0), ValueError, r"label_smoothing must be > 0"),
    (dict(discopop_tau=0.0), ValueError, r"discopop_tau must be > 0.0, got 0.0"),
    (dict(discopop_tau=-0.5), ValueError, r"discopop_tau must be > 0.0"),
    (dict(simpo_gamma=float("inf")), ValueError, r"simpo_gamma must be finite, got inf"),
    (dict(simpo_gamma=None), TypeError, r"simpo_gamma must be a real number, got NoneType"),
    (dict(f_alpha_divergence_coef=float("nan")), ValueError, r"f_alpha_divergence_coef must be finite, got nan"),
    (dict(f_divergence_type="kl"), ValueError, r"f_divergence_type: unknown 'kl'; valid: \['reverse_kl'"),
    (dict(f_divergence_type="forward_kl", loss_type="bco_pair"), ValueError,
     r"f_divergence_type='forward_kl' is only defined for loss types \[.*\]; got \['bco_pair'\]"),
    (dict(f_divergence_type="js_divergence", loss_type=["sigmoid", "simpo", "aot"]), ValueError,
     r"got \['simpo', 'aot'\]"),
    (dict(reference_free="yes"), TypeError, r"reference_free must be True or False, got 'yes'"),
    (dict(average_log_prob=2), TypeError, r"average_log_prob must be True or False, got 2"),
    (dict(use_weighting="true"), TypeError, r"use_weighting must be True or False, got 'true'"),
    (dict(ld_alpha=1.5), ValueError, r"ld_alpha must lie in \[0, 1\], got 1.5"),
    (dict(ld_alpha=-0.1), ValueError, r"ld_alpha must be >= 0.0, got -0.1"),
    (dict(ld_alpha=float("nan")), ValueError, r"ld_alpha must be finite"),
    (dict(ld_alpha=0.5, average_log_prob=True), ValueError,
     r"ld_alpha cannot be combined with averaged log-probs \(average_log_prob=True"),
]


@pytest.mark.parametrize("options,error,pattern", BAD_OPTIONS)
def test_each_rule_raises_naming_the_option(options, error, pattern):
    with pytest.raises(error, match=pattern):
        LossOptions(**options)
    with pytest.raises(error, match=pattern):
        LossOptions.from_kwargs(**options)


@pytest.mark.parametrize("options,error,pattern", [case for case in BAD_OPTIONS
                                                   if set(case[0]) <= set(inspect.signature(dpo_loss).parameters)])
def test_dpo_loss_checks_its_options_before_its_tensors(options, error, pattern):
    # the tensors are not even tensors: the option error comes first, the same one LossOptions raises
    with pytest.raises(error, match=pattern):
        dpo_loss(None, None, **options)


def test_edge_values_are_accepted_and_normalised():
    opts = LossOptions(loss_type="ipo", loss_weights=(2,), beta=1, label_smoothing=0.4999, reference_free=1,
                       discopop_tau=1e-6, simpo_gamma=-3, ld_alpha=1, average_log_prob=0, use_weighting=True)
    assert opts.loss_type == ("ipo",) and opts.loss_weights == (2.0,)
    assert type(opts.beta) is float and opts.beta == 1.0 and type(opts.ld_alpha) is float and opts.ld_alpha == 1.0
    assert opts.reference_free is True and opts.average_log_prob is False and opts.use_weighting is True
    assert LossOptions(ld_alpha=0).ld_alpha == 0.0 and LossOptions(label_smoothing=0).label_smoothing == 0.0
    assert LossOptions(loss_type="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3
    assert LossOptions(loss_weights=torch.tensor([0.5])).loss_weights == (0.5,)  # any iterable of numbers
    assert LossOptions(average_log_prob=True).ld_alpha is None
    for kind in F_DIVERGENCE_TYPES:
        assert LossOptions(loss_type=list(F_DIV_TYPES), label_smoothing=0.1, f_divergence_type=kind)
    with pytest.raises(AttributeError):
        opts.beta = 2.0  # frozen: a checked object stays checked


def test_f_divergence_types_follow_trl():
    assert {t for t, spec in LOSSES.items() if spec.f_divergence} == set(F_DIV_TYPES)
    for t in LOSS_TYPES:
        opts = dict(loss_type=t, f_divergence_type="forward_kl", label_smoothing=0.1)
        if t in F_DIV_TYPES:
            LossOptions(**opts)
        else:
            with pytest.raises(ValueError, match=f"got \\['{t}'\\]"):
                LossOptions(**opts)


def test_from_kwargs_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        LossOptions.from_kwargs(beta=0.2, simpo_gama=0.7)
    message = str(exc.value)
    assert "unknown loss option(s) ['simpo_gama']" in message
    for name in LossOptions.names():
        assert repr(name) in message
    with pytest.raises(ValueError, match=r"\['chosen_lengths', 'check_finite'\]"):  # tensors / switches: not options
        LossOptions.from_kwargs(chosen_lengths=torch.ones(2), check_finite=False)
    assert LossOptions.from_kwargs(beta=0.2, simpo_gamma=0.7) == LossOptions(beta=0.2, simpo_gamma=0.7)


def test_as_kwargs_round_trips_and_feeds_the_loss_functions():
    opts = LossOptions(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5], beta=0.3, label_smoothing=0.1,
                       ld_alpha=0.25, use_weighting=True, f_divergence_type="js_divergence")
    kwargs = opts.as_kwargs()
    assert set(kwargs) == set(LossOptions.names())
    assert kwargs["loss_type"] == ["sigmoid", "sft"] and kwargs["loss_weights"] == [1.0, 0.5]
    assert LossOptions.from_kwargs(**kwargs) == opts
    assert LossOptions(loss_type=["ipo"]).as_kwargs()["loss_type"] == "ipo"
    accepted = set(inspect.signature(compute_dpo_loss).parameters) | set(
        inspect.signature(fused_linear_dpo_loss).parameters) | set(inspect.signature(dpo_loss).parameters)
    assert set(kwargs) <= accepted


def test_defaults_are_those_of_the_loss_functions_and_the_config():
    defaults = LossOptions()
    config = TrainConfig()
    for fn in (dpo_loss, fused_linear_dpo_loss, compute_dpo_loss):
        for name, param in inspect.signature(fn).parameters.items():
            if name in LossOptions.names():
                assert LossOptions(**{name: param.default}) == defaults, (fn.__name__, name)
    for name in LOSS_FIELDS:
        assert LossOptions(**{name: getattr(config, name)}) == defaults, name
    assert set(LOSS_FIELDS) == {"loss_type", "loss_weights", "beta", "label_smoothing", "reference_free",
                                "ld_alpha", "average_log_prob"}


# ----------------------------------------------------------------------------- the trainer config reuses it
@pytest.mark.parametrize("fields,pattern", [
    (dict(loss_kwargs={"simpo_gama": 0.7}), r"unknown loss option\(s\) \['simpo_gama'\]; valid: .*'simpo_gamma'"),
    (dict(loss_kwargs={"check_finite": False}), r"unknown loss option\(s\) \['check_finite'\]"),
    (dict(loss_kwargs={"beta": 0.2}), r"loss_kwargs: 'beta' has its own option; set TrainConfig.beta \(--beta\)"),
    (dict(loss_kwargs={"loss_type": "ipo"}), r"'loss_type' has its own option; .*--loss-type"),
    (dict(loss_kwargs=[("simpo_gamma", 0.7)]), r"loss_kwargs: must be a dict of loss options, got list"),
    (dict(loss_kwargs={"simpo_gamma": "high"}), r"simpo_gamma must be a real number, got str"),
    (dict(loss_kwargs={"use_weighting": "yes"}), r"use_weighting must be True or False"),
    (dict(loss_kwargs={"f_divergence_type": "kl"}), r"f_divergence_type: unknown 'kl'"),
    (dict(loss_kwargs={"f_divergence_type": "forward_kl"}, loss_type="sigmoid,bco_pair"),
     r"only defined for loss types .*; got \['bco_pair'\]"),
    (dict(loss_kwargs={"discopop_tau": 0}, loss_type="discopop"), r"discopop_tau must be > 0.0, got 0.0"),
    (dict(loss_type="exo_pair"), r"label_smoothing must be > 0 for loss_type 'exo_pair'"),
    (dict(loss_type="sigmoid,nope"), r"loss_type: unknown loss type 'nope'"),
    (dict(loss_type=[]), r"loss_type must name at least one loss type"),
    (dict(label_smoothing=0.5), r"label_smoothing must lie in \[0, 0.5\), got 0.5"),
    (dict(beta=0.0), r"beta must be > 0.0, got 0.0"),
    (dict(beta="x"), r"beta must be a real number, got str"),
    (dict(ld_alpha=1.01), r"ld_alpha must lie in \[0, 1\], got 1.01"),
    (dict(ld_alpha=0.5, average_log_prob=True), r"ld_alpha cannot be combined with averaged log-probs"),
    (dict(loss_type="sigmoid,ipo", loss_weights=[1.0]), r"loss_weights has 1 entries but loss_type has 2"),
])
def test_config_rejects_a_bad_loss_option_at_construction(fields, pattern):
    # ValueError only (also for a value of the wrong kind), so the CLI can print it as a usage error
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**fields)


def test_config_loss_options_come_from_the_checked_object():
    cfg = TrainConfig(loss_type="sigmoid, ipo", loss_weights="1,0.5", beta=0.2, label_smoothing=0.1,
                      ld_alpha=0.5, loss_kwargs={"f_divergence_type": "js_divergence", "use_weighting": True})
    opts = cfg.build_loss_options()
    assert opts == LossOptions(loss_type=("sigmoid", "ipo"), loss_weights=(1.0, 0.5), beta=0.2, label_smoothing=0.1,
                               ld_alpha=0.5, f_divergence_type="js_divergence", use_weighting=True)
    assert cfg.loss_options() == opts.as_kwargs()
    cfg.beta = -1.0  # a later edit is checked again when the options are read
    with pytest.raises(ValueError, match="beta must be > 0.0"):
        cfg.loss_options()


def test_fused_loss_rejects_ld_alpha_with_averaged_log_probs():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    ref = dict(ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="ld_alpha cannot be combined with averaged log-probs"):
        fused_linear_dpo_loss(hidden, weight, labels, average_log_prob=True, ld_alpha=0.5, **ref)
    loss, _ = fused_linear_dpo_loss(hidden, weight, labels, ld_alpha=0.5, compute_metrics=False, **ref)
    assert math.isfinite(loss.item())
