"""Worker for tests/test_distributed.py: TRL's DPOTrainer on 2 CPU processes (DDP through accelerate),
one optimizer step without and one with `dpo_fast.integrations.trl.enable()`.

    torchrun --standalone --nproc_per_node 2 trl_worker.py OUT_DIR

Both trainers start from the same weights, copied in (a state dict made once from a fixed seed), not
from the random-number generator, so the comparison cannot depend on what drew random numbers before
(enable() and patch() draw none). LoRA B is non-zero so the first step's gradients reach A, and dropout
is off. Both run in float32 (bf16=False): DPOConfig's default bf16=True puts the forward under bf16
autocast even on the CPU, where TRL's head and dpo_fast's round differently; that, not the LoRA
initialisation, gave up to 2e-2 relative gradient gaps with identical weights (6e-3 with peft's default
B = 0), against 1e-6 in float32 (1 process, this model). Each rank saves the step's logged metrics and
the LoRA gradients just before the optimizer step (after DDP's all-reduce) to OUT_DIR/rank<r>.pt.
"""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trl  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

import dpo_fast.integrations.trl as dtrl  # noqa: E402
from test_trl_integration import dataset, tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FirstStepGrads(TrainerCallback):
    """The trainable parameters' gradients at the first optimizer step (after DDP's all-reduce)."""

    def __init__(self) -> None:
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def build_model(tok) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0,
                                                            init_lora_weights=False))


def one_step(tok, data, weights, out_dir: str, name: str) -> dict:
    model = build_model(tok)
    model.load_state_dict(weights)  # identical starting weights, whatever the RNG did before
    capture = FirstStepGrads()
    args = trl.DPOConfig(output_dir=os.path.join(out_dir, name), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         beta=0.2, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                         max_grad_norm=0.0, bf16=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[capture])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return {"log": log, "grads": capture.grads, "processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__}


def main(out_dir: str) -> None:
    torch.manual_seed(1234)
    tok, data = tokenizer(), dataset(8)  # the same on every rank: the same seed
    weights = build_model(tok).state_dict()
    dtrl.disable()
    plain = one_step(tok, data, weights, out_dir, "plain")
    dtrl.enable()
    try:
        fast = one_step(tok, data, weights, out_dir, "fast")
    finally:
        dtrl.disable()
    rank = int(os.environ["RANK"])
    torch.save({"plain": plain, "fast": fast}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
