"""The embedded demo's policy: a small Qwen2 with a byte-level BPE tokenizer trained on the embedded world.

Why: SmolLM2's 49,152-token vocabulary splits the world's invented names into ~5.4 tokens each and puts
~95% of a small model's parameters (and most of its compute, the [T, V] head) into tokens the world never
uses. Trained on the world's own text, 8,192 tokens cover every name in ~2.1 tokens and the head costs
6x less, so a 2-layer model can learn, within minutes on a CPU, to copy names from the question into its
search and from the retrieved documents into its answer.

Model ("world-small" as model.path): SMALL_MODEL, 2 layers, hidden 128, 1.5M parameters with the 8k
vocabulary, transformers' own initialisation. The tokenizer speaks ChatML (<|im_start|>role ... <|im_end|>),
as SmolLM2 and Qwen2 do, with no default system message; <|im_end|> is EOS. Its training is deterministic,
and the result is cached under the cache dir keyed by a hash of the training text and settings.
"""

from __future__ import annotations

import hashlib
from typing import Any

from rexrag_fast.agent.loop import INFORMATION_TEMPLATE
from rexrag_fast.agent.template import DEFAULT_TEMPLATE
from rexrag_fast.paths import default_cache_dir, save_dir_atomically

WORLD_VOCAB = 8192
SMALL_MODEL: dict[str, Any] = {"arch": "qwen2", "hidden_size": 128, "intermediate_size": 512,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "max_position_embeddings": 2048, "tie_word_embeddings": True}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The protocol's own words, so tags and the demonstration phrasing get whole tokens of their own.
PROTOCOL_TEXT = (
    "<think> </think>\n<search> </search>\n<answer> </answer>\n" + INFORMATION_TEMPLATE.format("Doc 1(Title: ) ")
    + " I need to look up Next I look up The document on names So the answer is I need to compare and"
    " First I look up Now I look up Comparing the two documents, the answer is"
)


def world_training_text(world: Any) -> list[str]:
    """The texts the tokenizer is trained on: every document, the train questions, the protocol, the template."""
    texts = [d["contents"] for d in world.documents]
    texts += [q["question"] for q in world.questions if q.get("split") == "train"]
    return texts + [DEFAULT_TEMPLATE, PROTOCOL_TEXT] * 64


def train_world_tokenizer(world: Any, vocab_size: int = WORLD_VOCAB) -> Any:
    """A PreTrainedTokenizerFast (byte-level BPE, `vocab_size` entries incl. SPECIAL_TOKENS) for `world`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be >= 512 (256 bytes + merges), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(world_training_text(world), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_world_tokenizer(world: Any, vocab_size: int = WORLD_VOCAB) -> Any:
    """`train_world_tokenizer(world, vocab_size)`, trained once and then loaded from the cache dir."""
    from transformers import AutoTokenizer

    h = hashlib.sha256(repr((vocab_size, CHATML_TEMPLATE)).encode())
    for text in world_training_text(world):
        h.update(text.encode())
        h.update(b"\0")
    cached = default_cache_dir() / f"world-tokenizer-{h.hexdigest()[:16]}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = train_world_tokenizer(world, vocab_size)
    if save_dir_atomically(cached, tokenizer.save_pretrained):
        return AutoTokenizer.from_pretrained(str(cached))  # the same object a later process will load
    return tokenizer


def small_model(tokenizer: Any, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(fresh fp32 SMALL_MODEL for `tokenizer`'s vocabulary, its description for cache keys).

    transformers' own initialisation (normal(0, initializer_range=0.02)): the first loss is about
    log(vocab size)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = {k: v for k, v in SMALL_MODEL.items() if k != "arch"}
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float(), {"name": "world-small", **SMALL_MODEL, "vocab_size": len(tokenizer), "seed": seed}


def load_world_small(seed: int = 0) -> tuple[Any, Any]:
    """(fresh SMALL_MODEL, world tokenizer) for the default embedded world: what model.path "world-small" loads."""
    from rexrag_fast.data.world import World, default_world_dir

    tokenizer = load_world_tokenizer(World.load(default_world_dir()))
    return small_model(tokenizer, seed)[0], tokenizer
