"""A real byte-level BPE tokenizer built offline, with a chat template.

The offline models need a tokenizer that mlx-lm's TokenizerWrapper, its chat-template
path and its streaming BPE detokenizer accept exactly as they accept a hub tokenizer, so
it is trained with the `tokenizers` library (deterministic for a fixed corpus) and saved
as tokenizer.json + tokenizer_config.json, the files transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    text = (Path(__file__).with_name("corpus.txt")).read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on the bundled corpus."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def write_tokenizer(folder: Path) -> int:
    """Write the tokenizer files into a model folder; returns the vocabulary size."""
    tok = build_tokenizer()
    save_tokenizer(folder, tok, CHAT_TEMPLATE)
    return tok.get_vocab_size()


def save_tokenizer(folder: Path, tok: Tokenizer, chat_template: str | None = None) -> None:
    """tokenizer.json plus the config files transformers reads, with our special tokens."""
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
