"""A GGUF file's config and weights as an mlx-lm model folder's (config.json, safetensors).

llama.cpp's converter rewrites a checkpoint on the way into GGUF, and each rewrite must be
undone for mlx-lm's model classes to compute the same function:
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`;
- llama's Q and K rows are permuted for llama.cpp's rotary layout (interleaved pairs):
  `unpermute` restores the half-split order mlx-lm's RoPE expects (gemma files are not
  permuted: llama.cpp runs gemma with the half-split "neox" RoPE);
- Gemma's RMSNorm weights are stored as 1 + w (mlx-lm's gemma classes add the 1 back);
- tied embeddings: no `output.weight`, so `tie_word_embeddings` is true;
- quantized tensor types are dequantized with the `gguf` package to float32, then cast.
An architecture, tensor or tensor type this module does not know is an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# GGUF per-layer tensor name -> mlx-lm name, per architecture. `{}` is the layer index.
_LAYER = "model.layers.{}."
_COMMON = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
}
LAYER_NAMES = {
    "llama": {**_COMMON, "ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {
        **_COMMON,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
MODEL_TYPES = {"llama": "llama", "gemma3": "gemma3_text"}
# Tensor types the `gguf` package dequantizes and the packaged models use.
TENSOR_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


class GGUFUnsupported(ValueError):
    """The file holds something this converter does not handle; the message names it."""


@dataclass(frozen=True)
class GGUFModel:
    """What the converter reads of a GGUF file: its metadata and its tensors, lazily."""

    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key (`llama.block_count`) or a global one."""
        return self.metadata.get(f"{self.architecture}.{key}", self.metadata.get(key, default))


def read_gguf(path: str) -> GGUFModel:
    """Metadata and tensor handles of a GGUF file (nothing dequantized yet)."""
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    return GGUFModel(metadata, {t.name: t for t in reader.tensors})


def _field_value(field) -> Any:
    """A metadata field as Python: a scalar, a string, or a list (strings decoded)."""
    import gguf

    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        item = kinds[-1]
        if item == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def model_type(model: GGUFModel) -> str:
    if model.architecture not in MODEL_TYPES:
        raise GGUFUnsupported(
            f"GGUF architecture {model.architecture!r} is not supported (have: {', '.join(MODEL_TYPES)})"
        )
    return MODEL_TYPES[model.architecture]


def config(model: GGUFModel) -> dict[str, Any]:
    """config.json for mlx-lm, from the GGUF metadata (and which tensors exist)."""
    kind = model_type(model)
    heads = int(model.get("attention.head_count"))
    hidden = int(model.get("embedding_length"))
    head_dim = int(model.get("attention.key_length", model.get("rope.dimension_count", hidden // heads)))
    cfg: dict[str, Any] = {
        "model_type": kind,
        "hidden_size": hidden,
        "num_hidden_layers": int(model.get("block_count")),
        "intermediate_size": int(model.get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(model.get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(model.get("rope.freq_base", 10000.0)),
        "vocab_size": len(model.metadata["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(model.get("context_length")),
        "tie_word_embeddings": "output.weight" not in model.tensors,
    }
    for name in ("bos", "eos", "padding"):
        token = model.metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token is not None:
            cfg["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(token)
    if kind == "gemma3_text":
        # llama.cpp's gemma3 defaults where the file is silent: a global layer every 6th,
        # local RoPE base 10000, queries scaled by the head dim.
        cfg.update(
            sliding_window=int(model.get("attention.sliding_window")),
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=head_dim,
        )
    return cfg


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> halves), per head."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights(model: GGUFModel) -> Iterator[tuple[str, np.ndarray]]:
    """(mlx-lm name, float32 array) for every tensor, conversions undone."""
    import gguf

    kind = model_type(model)
    fixes = _fixes(model, kind)
    for name, tensor in model.tensors.items():
        target = _target(name, model.architecture)
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise GGUFUnsupported(f"{name}: tensor type {tensor.tensor_type.name} is not supported")
        array = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        for suffix, fix in fixes.items():
            if name.endswith(suffix):
                array = fix(array)
        yield target, array


def _target(name: str, architecture: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES[architecture]:
        return _LAYER.format(parts[1]) + LAYER_NAMES[architecture][parts[2]]
    raise GGUFUnsupported(f"tensor {name!r} has no mlx-lm name for architecture {architecture}")


def _fixes(model: GGUFModel, kind: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per tensor-name suffix, the inverse of what llama.cpp's converter did to it."""
    if kind == "llama":
        heads = int(model.get("attention.head_count"))
        kv_heads = int(model.get("attention.head_count_kv", heads))
        return {
            "attn_q.weight": lambda w: unpermute(w, heads),
            "attn_k.weight": lambda w: unpermute(w, kv_heads),
        }
    return {"norm.weight": lambda w: w - 1.0}  # gemma: stored as 1 + w
