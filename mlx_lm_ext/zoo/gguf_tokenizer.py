"""A GGUF file's tokenizer as tokenizer.json + tokenizer_config.json, built with `tokenizers`.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges or scores, token types
and special token ids as metadata under llama.cpp's names. Two tokenizer models cover the
packaged real models:
- `gpt2` (SmolLM2): byte-level BPE with the file's merges; llama.cpp's `smollm`
  pre-tokenizer splits digits one by one before the GPT-2 split;
- `llama` (Gemma 3): SentencePiece BPE over "▁"-spaced text with byte fallback. The file
  lists no merges, so they are rebuilt from the vocabulary: every split of a token into
  two tokens, ranked by the merged token's position in the vocabulary (Gemma's scores do
  not follow its merge order; its vocabulary order does). Tokens of spaces only are
  stored as real spaces and respelled with "▁".
Control tokens (type 3) become special tokens and user-defined ones (type 4) added
tokens, so they are never cut into pieces. Anything else is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4
PRE_TOKENIZERS = {"smollm", "gpt2", "default"}
SPACE = "\u2581"


class TokenizerUnsupported(ValueError):
    """A tokenizer model or pre-tokenizer this module does not build; the message names it."""


def build(metadata: dict[str, Any]) -> Tokenizer:
    """The tokenizer the metadata describes."""
    kind = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerUnsupported(
            f"GGUF pre-tokenizer {pre!r} is not supported (have: {sorted(PRE_TOKENIZERS)})"
        )
    if kind == "gpt2":
        tok = _byte_level(metadata, digits=pre == "smollm")
    elif kind == "llama":
        tok = _sentencepiece(metadata)
    else:
        raise TokenizerUnsupported(f"GGUF tokenizer model {kind!r} is not supported (have: gpt2, llama)")
    _add_special(tok, metadata)
    return tok


def _byte_level(metadata: dict[str, Any], digits: bool) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    # ByteLevel's own regex is GPT-2's split
    tok.pre_tokenizer = pre_tokenizers.Sequence([*split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece(metadata: dict[str, Any]) -> Tokenizer:
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in metadata["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[int(metadata.get("tokenizer.ggml.unknown_token_id", 0))]
    tok = Tokenizer(
        models.BPE(vocab, merges_by_position(tokens), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    if metadata.get("tokenizer.ggml.add_bos_token"):
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def merges_by_position(tokens: list[str]) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens that concatenates to a token, earliest token
    first; pairs of one token by the positions of their parts."""
    position = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, rank in position.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in position and right in position:
                ranked.append((rank, position[left], position[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special(tok: Tokenizer, metadata: dict[str, Any]) -> None:
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or []
    vocab = tok.get_vocab()
    control = [t for t, k in zip(tokens, types, strict=False) if k == CONTROL and t in vocab]
    user = [t for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def save(folder: Path, tok: Tokenizer, metadata: dict[str, Any]) -> None:
    """tokenizer.json, tokenizer_config.json (BOS/EOS/PAD, chat template) and the special
    tokens map, as transformers reads them for mlx-lm's TokenizerWrapper."""
    tokens = metadata["tokenizer.ggml.tokens"]
    tok.save(str(folder / "tokenizer.json"))
    special = {
        f"{name}_token": tokens[int(metadata[f"tokenizer.ggml.{key}_token_id"])]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if metadata.get(f"tokenizer.ggml.{key}_token_id") is not None
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
