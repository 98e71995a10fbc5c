"""The built-in default for `dpo-fast demo`: a tiny tokenizer, a rule-based preference task, a tiny Llama.

Nothing here touches the network. The tokenizer is a word-level `tokenizers` model built from
`dpo_fast/data/demo_vocab.txt` (46 tokens); the task is generated from a seed.

The task: prompts such as ``"sort: 3 1 2 ="`` (sort the digits ascending) or
``"reverse: c a b ="`` (reverse the letters). The chosen completion follows the rule
(``" 1 2 3"``); the rejected one is a near miss that breaks it (two neighbours swapped, one item
replaced or dropped, or the input copied unchanged). A short SFT on the chosen completions gets
a tiny model close but not all the way; DPO then has a clear, checkable signal to push on, and
`judge` scores greedy generations by the rule.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

VOCAB_FILE = Path(__file__).resolve().parent / "data" / "demo_vocab.txt"

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Every message is "<|role|> content <eos>"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('demo chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TASKS = ("sort", "reverse")
DIGITS = tuple("0123456789")
LETTERS = tuple("abcdefghij")
MIN_ITEMS, MAX_ITEMS = 3, 6
NEAR_MISS_KINDS = ("swap", "replace", "drop", "copy")


def read_vocab(path: Union[str, Path] = VOCAB_FILE) -> list[str]:
    """Tokens of the demo vocabulary, in id order (one token per line)."""
    tokens = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines()]
    tokens = [t for t in tokens if t]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"path: vocabulary file {path} has duplicate tokens")
    return tokens


def demo_tokenizer(vocab_file: Union[str, Path] = VOCAB_FILE):
    """A word-level fast tokenizer with pad/bos/eos/unk and a chat template, built from the vocab file.

    Text is split on whitespace; each piece is one token (unknown pieces map to ``<unk>``).
    Encoding a plain string prepends ``<bos>`` as Llama's tokenizer does; chat-template
    renderings carry their own ``<bos>``. Deterministic: ids are line numbers of the file.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = read_vocab(vocab_file)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    for special in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS):
        if special not in vocab:
            raise ValueError(f"vocab_file: {vocab_file} lacks the special token {special!r}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def rule_answer(task: str, items: Sequence[str]) -> list[str]:
    """The completion items that follow the task's rule."""
    if task == "sort":
        return sorted(items)
    if task == "reverse":
        return list(reversed(items))
    raise ValueError(f"task: unknown demo task {task!r}, expected one of {TASKS}")


def _near_miss(
    rng: random.Random,
    items: list[str],
    answer: list[str],
    alphabet: Sequence[str],
    kinds: Sequence[str] = NEAR_MISS_KINDS,
) -> list[str]:
    """A completion close to `answer` that breaks the rule (never equal to `answer`)."""
    kinds = [k for k in kinds if not (k == "copy" and items == answer)] or ["swap"]
    kind = rng.choice(kinds)
    out = list(answer)
    if kind == "swap":
        spots = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        i = rng.choice(spots)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "replace":
        i = rng.randrange(len(out))
        out[i] = rng.choice([s for s in alphabet if s != out[i]])
    elif kind == "drop":
        del out[rng.randrange(len(out))]
    else:  # copy: echo the input unchanged
        out = list(items)
    assert out != answer
    return out


def make_example(
    rng: random.Random,
    task: Optional[str] = None,
    *,
    min_items: int = MIN_ITEMS,
    max_items: int = MAX_ITEMS,
    near_miss_kinds: Sequence[str] = NEAR_MISS_KINDS,
) -> dict[str, str]:
    """One standard-format preference row drawn from `rng`."""
    task = task or rng.choice(TASKS)
    alphabet = DIGITS if task == "sort" else LETTERS
    while True:
        items = [rng.choice(alphabet) for _ in range(rng.randint(min_items, max_items))]
        if len(set(items)) > 1:  # an all-equal list has no near miss by swapping
            break
    answer = rule_answer(task, items)
    rejected = _near_miss(rng, items, answer, alphabet, near_miss_kinds)
    return {
        "prompt": f"{task}: {' '.join(items)} =",
        "chosen": " " + " ".join(answer),
        "rejected": " " + " ".join(rejected),
    }


def make_preference_dataset(
    n: int,
    seed: int = 0,
    *,
    conversational: bool = False,
    tasks: Sequence[str] = TASKS,
    min_items: int = MIN_ITEMS,
    max_items: int = MAX_ITEMS,
    near_miss_kinds: Sequence[str] = NEAR_MISS_KINDS,
) -> list[dict[str, Any]]:
    """`n` preference rows of the demo task, deterministic for `seed` (and the options).

    Standard format (prompt/chosen/rejected strings; completions start with a space, as in
    TRL's examples) unless `conversational`, which gives TRL's explicit-prompt
    conversational format (a user message; one assistant message per completion).
    `tasks`, `min_items`/`max_items` (list length) and `near_miss_kinds` (subset of
    ``("swap", "replace", "drop", "copy")``; "copy" falls back to "swap" when the input
    already follows the rule) set the difficulty.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    tasks = tuple(tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks: expected a non-empty subset of {TASKS}, got {tasks!r}")
    if not (isinstance(min_items, int) and isinstance(max_items, int) and 2 <= min_items <= max_items <= 32):
        raise ValueError(f"min_items/max_items: need 2 <= min_items <= max_items <= 32, got {min_items}, {max_items}")
    kinds = tuple(near_miss_kinds)
    if not kinds or any(k not in NEAR_MISS_KINDS for k in kinds):
        raise ValueError(f"near_miss_kinds: expected a non-empty subset of {NEAR_MISS_KINDS}, got {kinds!r}")
    rng = random.Random(f"dpo_fast.demo:{seed}")
    rows = [
        make_example(rng, rng.choice(tasks), min_items=min_items, max_items=max_items, near_miss_kinds=kinds)
        for _ in range(n)
    ]
    return [to_conversational(r) for r in rows] if conversational else rows


def to_conversational(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A standard demo row as TRL's conversational format (explicit prompt)."""
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def parse_prompt(prompt: Union[str, list]) -> tuple[str, list[str]]:
    """(task, items) of a demo prompt, given as a string or as chat messages (last user turn)."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("prompt: no user message in the conversation")
        prompt = users[-1]
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected str or list of messages, got {type(prompt).__name__}")
    words = prompt.split()
    if words and words[-1] == "=":
        words = words[:-1]
    if not words or not words[0].endswith(":") or words[0][:-1] not in TASKS:
        raise ValueError(f"prompt: not a demo task prompt: {prompt!r}")
    items = words[1:]
    if not items:
        raise ValueError(f"prompt: demo prompt has no items: {prompt!r}")
    return words[0][:-1], items


def expected_completion(prompt: Union[str, list]) -> str:
    """The rule-following completion for a demo prompt (without the leading space)."""
    task, items = parse_prompt(prompt)
    return " ".join(rule_answer(task, items))


def judge(prompt: Union[str, list], completion: str) -> bool:
    """Does `completion` follow the prompt's rule? Whitespace and a trailing ``<eos>`` are ignored."""
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected str, got {type(completion).__name__}")
    task, items = parse_prompt(prompt)
    words = completion.split()
    while words and words[-1] == EOS_TOKEN:
        words.pop()
    return words == rule_answer(task, items)


def tiny_llama_config(vocab_size: Optional[int] = None, **overrides: Any):
    """A LlamaConfig of ~0.8M parameters (hidden 128, 4 layers, 4 heads) that trains on CPU in about a minute.

    `vocab_size` defaults to the demo vocabulary's size; pad/bos/eos ids are the demo
    tokenizer's. Keyword `overrides` replace any field.
    """
    from transformers import LlamaConfig

    tokens = read_vocab()
    if vocab_size is None:
        vocab_size = len(tokens)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokens.index(PAD_TOKEN),
        bos_token_id=tokens.index(BOS_TOKEN),
        eos_token_id=tokens.index(EOS_TOKEN),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
