"""Tiny, fully offline models for tests: no hub, no download, built in a second.

`tiny_reward_model(dir)` saves a random 2-layer LlamaForSequenceClassification
(num_labels=1, like Skywork-Reward) plus a byte-level BPE tokenizer trained on
the fly with `tokenizers`, with a chat template and a pad token, so that
`AutoTokenizer/AutoModelForSequenceClassification.from_pretrained(dir)` work
exactly as they do for a real reward model.
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
)

# Enough text for BPE to learn a few hundred merges; byte-level BPE can still
# encode any string (unseen characters fall back to single bytes).
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please summarize this post in one short sentence.",
    "Here is a detailed answer with a list: first, second and third points.",
    "Thank you for asking! I would be happy to help you with that.",
    "Waking up early helped at first, but sleep quality mattered more.",
    "The author values customization and battery life more than ecosystem lock-in.",
    "user assistant system hello world reward model preference pair chosen rejected",
] * 20

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def build_tokenizer(padding_side: str = "right", chat_template: bool = True, max_length: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side=padding_side, chat_template=CHAT_TEMPLATE if chat_template else None,
        model_max_length=max_length)


def tiny_reward_model(out_dir, hidden_size: int = 48, layers: int = 2, padding_side: str = "right",
                      seed: int = 0, chat_template: bool = True, max_positions: int = 512,
                      attention_dropout: float = 0.0) -> str:
    """Save a tiny random Llama reward model + tokenizer under `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(padding_side, chat_template, max_positions)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, attention_dropout=attention_dropout)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    # Random init gives a near-zero score head; scale it so scores differ visibly between texts.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
