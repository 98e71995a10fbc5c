"""benchmarks/gemm_flops.py: the matrix-product FLOP counter, and what it says the recompute tail skip removes."""
import json

import pytest
import torch

from benchmarks.gemm_flops import GemmFlops, main, run, scaled
from benchmarks.methods_step import PROMPT_FRACTION
from benchmarks.models import MODELS, get_model


def test_counter_adds_2mnk_per_product():
    a, b, c = torch.randn(5, 7), torch.randn(7, 3), torch.randn(5, 3)
    x, y = torch.randn(4, 5, 7), torch.randn(4, 7, 2)
    with GemmFlops() as counter:
        a @ b
        torch.addmm(c, a, b)
        c.clone().addmm_(a, b)
        torch.bmm(x, y)
        torch.nn.functional.linear(a, b.t())
        a + 1.0  # not a product
    one = 2 * 5 * 7 * 3
    assert counter.flops["mm"] == 2 * one  # a @ b, and the linear without bias
    assert counter.flops["addmm"] == one and counter.flops["addmm_"] == one
    assert counter.flops["bmm"] == 2 * 4 * 5 * 7 * 2
    assert counter.total == sum(counter.flops.values())


def test_scaled_keeps_head_dim_and_gqa_ratio():
    shape = scaled(MODELS["llama-3.1-8b"], 8, 4)
    assert shape.hidden_size // shape.num_attention_heads == 128
    assert shape.num_attention_heads // shape.num_key_value_heads == 4
    assert (shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers) == \
        (512, 1792, 16032, 4)


def test_tail_skip_removes_exactly_down_and_o_projs_recompute_gemms():
    """Per layer, the skip removes down_proj's and (offloaded, as in dpo_fast_all) o_proj's base GEMMs and LoRA B
    terms over every body token, nothing else."""
    shape, pairs, seq = get_model("tiny"), 2, 16
    rows = {r["method"]: r for r in run(shape, ["dpo_fast_all_no_tail_skip", "dpo_fast_all", "trl"], pairs, seq)}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    prompt = int(seq * PROMPT_FRACTION)
    tokens = pairs * (2 * seq - prompt)  # prefix sharing: one [prompt | chosen | rejected] row per pair
    hidden, inter, rank = shape.hidden_size, shape.intermediate_size, 16  # build_model's LoRA r
    down = 2 * tokens * inter * hidden + 2 * tokens * rank * hidden
    o_proj = 2 * tokens * hidden * hidden + 2 * tokens * rank * hidden  # [heads x head_dim = hidden] -> hidden
    per_layer = down + o_proj
    delta = (rows["dpo_fast_all_no_tail_skip"]["gflop"] - rows["dpo_fast_all"]["gflop"]) * 1e9
    assert delta == pytest.approx(shape.num_hidden_layers * per_layer, rel=1e-9)
    assert rows["dpo_fast_all_no_tail_skip"]["vs_first"] == 1.0 and rows["dpo_fast_all"]["vs_first"] < 1.0


def test_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert main(["--shape", "llama-3.2-1b", "--divisor", "16", "--layers", "1", "--size", "1x8",
                 "--methods", "dpo_fast", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows"][0]["method"] == "dpo_fast" and report["rows"][0]["gflop"] > 0
    assert "dpo_fast" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--divisor", "0"])
