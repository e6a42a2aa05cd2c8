"""Offline stand-ins for the hub models that upstream mlx-lm's own tests load.

Upstream's `tests/` load `mlx-community/Qwen1.5-0.5B-Chat-4bit` by repo id. To run them
without the hub, a model of the same architecture is built into a local Hugging Face
cache under that very repo id (and the tests run with HF_HUB_OFFLINE=1): `qwen2`, 4-bit
affine weights with the real group size, tied embeddings, a ChatML template, and a
byte-level BPE whose first 256 ids are the byte alphabet in GPT-2 order as in Qwen's
vocabulary (id 0 is "!", which upstream's logit-bias test relies on). Weights are random:
tests that check behaviour pass, tests that check a real model's text cannot, and the
report lists them as failing on both trees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..zoo.build import cache_home, ensure_snapshot
from ..zoo.tokenizer import build_tokenizer

QWEN_REPO = "mlx-community/Qwen1.5-0.5B-Chat-4bit"
STANDIN_VERSION = 2
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "quantization": {"group_size": 64, "bits": 4},
}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in its id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def qwen_tokenizer_json() -> dict[str, Any]:
    """The project's byte-level BPE, renumbered as Qwen numbers its vocabulary."""
    data = json.loads(build_tokenizer().to_str())
    old_vocab = data["model"]["vocab"]
    alphabet = _byte_alphabet()
    merged = sorted((t for t in old_vocab if t not in alphabet and not t.startswith("<|")), key=old_vocab.get)
    vocab = {t: i for i, t in enumerate(alphabet + merged)}
    specials = [ENDOFTEXT, IM_START, IM_END]
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {
            "id": len(vocab) + i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    ]
    return data


def _write_tokenizer(folder: Path) -> int:
    data = qwen_tokenizer_json()
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "bos_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(data["model"]["vocab"]) + len(data["added_tokens"])


def build_qwen(folder: Path, seed: int = 0) -> None:
    """A 4-bit qwen2 model folder in the layout mlx-community publishes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    folder.mkdir(parents=True)
    vocab_size = _write_tokenizer(folder)
    config = dict(QWEN2_CONFIG, vocab_size=vocab_size, eos_token_id=vocab_size - 1, bos_token_id=None)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    q = config["quantization"]
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"])
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text(
        f"Offline stand-in for {QWEN_REPO}, built by mlx-lm-ext. Random weights.\n"
    )


STANDINS = {QWEN_REPO: build_qwen}


def ensure_standins(home: Path | None = None) -> Path:
    """Build every stand-in into `home` (a Hugging Face cache); returns the cache folder."""
    home = home or cache_home()
    for repo, build in STANDINS.items():
        ensure_snapshot(repo, f"{STANDIN_VERSION:040x}", build, home)
    return home
