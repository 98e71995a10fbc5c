"""The tiny model and batch that the distributed workers and the single-process references share."""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, PAIRS, LENGTH = 97, 4, 11


def make_model(seed: int = 1234) -> torch.nn.Module:
    """Same weights on every rank: the seed is fixed here, and LoRA B starts non-zero so gradients reach A."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def make_batch(seed: int = 99) -> dict:
    """PAIRS preference pairs in TRL's layout, right-padded, with a prompt shared by each pair."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    ids[PAIRS:, :4] = ids[:PAIRS, :4]
    attention = torch.ones_like(ids)
    attention[1, -2:] = 0
    attention[PAIRS + 2, -3:] = 0
    completion = attention.clone()
    completion[:, :4] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
