"""Constructed recall models: exact associative recall written into real architectures.

Random weights cannot recall a fact, so long-context recall is tested offline on models
whose weights are set by code. The vocabulary has fact tokens `k3:v7` ("key 3 has value
7"), question tokens `k3?`, answer tokens `v7` and filler words. One attention head of one
full-attention layer does the recall:

- its query reads the key code of a question token, its key reads the key code of a fact
  token; the codes are dense random unit vectors (one-hot codes would survive group
  quantization exactly), placed in the head's lowest-frequency RoPE pairs with a large
  `rope_theta`, so the match does not fade with distance;
- the match logit is `margin`; a filler token scores 0 and another fact scores
  `margin * cos(codes)` (at most ~0.52 * margin for 16 keys of 32 dims). Filler tokens
  carry random values, so the n filler tokens pull the answer towards noise with a
  weight ~sqrt(n) against e^margin: recall needs margin > ~ln(n)/2 plus a few units;
- its value/output projections copy the fact's (dense, orthonormal) value code into a
  free slot of the residual stream, and the LM head reads that slot into `v*` logits.

Every other weight is zero (MLPs, experts, other layers and heads), norms are identity,
so the residual passes through. Sliding-window layers are zeroed: the facts lie outside
their window, as in a real long-context prompt. Quantization noise on the cached keys
perturbs the match logits directly; `margin` sets how much noise recall survives.

What this does not test: whether a trained model's own attention keeps recall under
quantization (its keys are not random codes). Only the hub tier can say that.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import BOS, EOS, PAD

# The architectures whose attention this module knows how to write (q/k/v/o projections,
# optional per-head q/k RMS norms, non-traditional RoPE).
SUPPORTED = ("llama", "qwen3", "gemma3_text", "qwen3_next", "gpt_oss")
CONSTRUCTION = 3  # bump when the weights written for a spec change: it keys the build cache


class RecallUnsupported(NotImplementedError):
    """No recall construction for this architecture yet."""


@dataclass(frozen=True)
class RecallSpec:
    """The constructed task: sizes, the margin, and the seed of the codes."""

    n_keys: int = 16
    n_values: int = 16
    n_filler: int = 64
    code_dims: int = 32
    margin: float = 24.0
    seed: int = 0


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]

    def id(self, token: str) -> int:
        return self.tokens.index(token)

    @property
    def size(self) -> int:
        return len(self.tokens)


def vocabulary(spec: RecallSpec) -> Vocab:
    tokens = [PAD, BOS, EOS]
    tokens += [f"w{i}" for i in range(spec.n_filler)]
    tokens += [f"k{i}:v{j}" for i in range(spec.n_keys) for j in range(spec.n_values)]
    tokens += [f"k{i}?" for i in range(spec.n_keys)]
    tokens += [f"v{j}" for j in range(spec.n_values)]
    return Vocab(tokens)


def needle_prompt(spec: RecallSpec, length: int, seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Facts up front, filler, then every question: (prompt words, [(question, answer)]).

    All keys get a fact, each with a random value; the questions come after the filler, in
    a shuffled order, so the prompt is `length` words long including them.
    """
    rng = np.random.default_rng(seed)
    values = rng.integers(0, spec.n_values, spec.n_keys)
    facts = [f"k{i}:v{values[i]}" for i in rng.permutation(spec.n_keys)]
    asked = [int(i) for i in rng.permutation(spec.n_keys)]
    questions = [(f"k{i}?", f"v{values[i]}") for i in asked]
    n_filler = length - len(facts) - len(questions)
    if n_filler < 0:
        raise ValueError(f"length {length} is shorter than {len(facts) + len(questions)} facts and questions")
    filler = [f"w{i}" for i in rng.integers(0, spec.n_filler, n_filler)]
    return facts + filler, questions


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _Slots:
    """Where each kind of information lives in the residual stream."""

    key: slice
    query: slice
    value: slice
    out: slice
    filler: slice


def _slots(spec: RecallSpec, hidden: int) -> _Slots:
    c, v = spec.code_dims, spec.n_values
    need = 2 * c + 2 * v + 8
    if hidden < need:
        raise ValueError(f"hidden_size {hidden} < {need} needed for code_dims={c}, n_values={v}")
    return _Slots(
        key=slice(0, c),
        query=slice(c, 2 * c),
        value=slice(2 * c, 2 * c + v),
        out=slice(2 * c + v, 2 * c + 2 * v),
        filler=slice(2 * c + 2 * v, hidden),
    )


def _codes(spec: RecallSpec) -> tuple[np.ndarray, np.ndarray]:
    """Dense unit key codes (n_keys x code_dims) and orthonormal value codes."""
    rng = np.random.default_rng(spec.seed)
    keys = rng.standard_normal((spec.n_keys, spec.code_dims))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values, _ = np.linalg.qr(rng.standard_normal((spec.n_values, spec.n_values)))
    return keys, values


def _embedding(spec: RecallSpec, vocab: Vocab, hidden: int) -> np.ndarray:
    s = _slots(spec, hidden)
    keys, values = _codes(spec)
    rng = np.random.default_rng(spec.seed + 1)
    emb = np.zeros((vocab.size, hidden))
    for t, tok in enumerate(vocab.tokens):
        if ":" in tok:
            k, v = (int(x[1:]) for x in tok.split(":"))
            emb[t, s.key], emb[t, s.value] = keys[k], values[v]
        elif tok.endswith("?"):
            emb[t, s.query] = keys[int(tok[1:-1])]
        else:
            # filler (and specials, answers): key 0, so it scores 0 against any question,
            # and a random value, so the attention mass it gets pulls the answer towards
            # noise: the haystack grows with the context (~sqrt(n) against e^margin)
            e = rng.standard_normal(s.filler.stop - s.filler.start)
            emb[t, s.filler] = e / np.linalg.norm(e)
            v = rng.standard_normal(spec.n_values)
            emb[t, s.value] = v / np.linalg.norm(v)
    return emb


def _head(spec: RecallSpec, vocab: Vocab, hidden: int) -> np.ndarray:
    """LM head: `v*` logits read the output slot; every other token scores 0."""
    s = _slots(spec, hidden)
    _, values = _codes(spec)
    head = np.zeros((vocab.size, hidden))
    for j in range(spec.n_values):
        head[vocab.id(f"v{j}"), s.out] = 8.0 * values[j]
    return head


def _code_dims(head_dim: int, n: int) -> np.ndarray:
    """The head dims of the n/2 lowest-frequency RoPE pairs (non-traditional layout)."""
    half = head_dim // 2
    pairs = np.arange(half - n // 2, half)
    return np.concatenate([pairs, pairs + half])


def retrieval_layer(model: Any) -> int:
    """Index of the last full-attention layer (sliding layers cannot see the facts)."""
    from mlx_lm.models.cache import KVCache

    caches = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
    full = [i for i, c in enumerate(caches) if type(c) is KVCache]
    if not full:
        raise RecallUnsupported(f"{type(model).__module__}: no full-attention layer to recall with")
    return full[-1]


def _identity_norms(model: Any) -> dict[str, Any]:
    """Weights that make every RMS norm the plain normalization (Gemma stores 1 + w)."""
    import mlx.core as mx
    import mlx.nn as nn

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" not in type(module).__name__.lower() or weight is None or isinstance(module, nn.Linear):
            continue
        module.weight = mx.ones_like(weight)
        try:
            probe = float(module(mx.ones((1, weight.shape[-1]), dtype=mx.float32)).max())
        except TypeError:  # a gated norm (gated-delta layers): standard weight, output zeroed anyway
            probe = 1.0
        out[f"{name}.weight"] = 1.0 if probe < 1.5 else 0.0
    return out


def construct_weights(model: Any, spec: RecallSpec, vocab: Vocab) -> dict[str, np.ndarray]:
    """Every parameter of `model`, set for recall (see the module docstring)."""
    from mlx.utils import tree_flatten

    model_type = getattr(model, "model_type", None) or model.args.model_type
    if model_type not in SUPPORTED:
        raise RecallUnsupported(f"{model_type}: no recall construction (supported: {', '.join(SUPPORTED)})")
    identity = _identity_norms(model)
    weights = {
        k: np.full(v.shape, identity[k]) if k in identity else np.zeros(v.shape)
        for k, v in tree_flatten(model.parameters())
    }
    hidden = weights[_find(weights, "embed_tokens.weight")].shape[1]
    weights[_find(weights, "embed_tokens.weight")] = _embedding(spec, vocab, hidden)
    weights[_find(weights, "lm_head.weight")] = _head(spec, vocab, hidden)
    layer = retrieval_layer(model)
    attn = model.layers[layer].self_attn
    prefix = _find(weights, f"layers.{layer}.self_attn.q_proj.weight").removesuffix("q_proj.weight")
    _write_attention(
        weights,
        prefix,
        attn,
        spec,
        hidden,
    )
    return weights


def _find(weights: dict[str, Any], suffix: str) -> str:
    found = [k for k in weights if k.endswith(suffix) and (k == suffix or k.endswith("." + suffix))]
    if len(found) != 1:
        raise RecallUnsupported(f"expected one parameter named *{suffix}, found {found}")
    return found[0]


def _write_attention(
    weights: dict[str, np.ndarray], prefix: str, attn: Any, spec: RecallSpec, hidden: int
) -> None:
    s = _slots(spec, hidden)
    heads = getattr(attn, "n_heads", None) or attn.num_attention_heads
    scale = getattr(attn, "scale", None) or attn.sm_scale  # gpt-oss names it sm_scale
    d = weights[prefix + "o_proj.weight"].shape[1] // heads
    dims = _code_dims(d, spec.code_dims)
    q, k = weights[prefix + "q_proj.weight"], weights[prefix + "k_proj.weight"]
    v, o = weights[prefix + "v_proj.weight"], weights[prefix + "o_proj.weight"]
    eye = np.eye(spec.code_dims)
    k[dims, s.key] = eye
    v[: spec.n_values, s.value] = np.eye(spec.n_values)
    o[s.out, : spec.n_values] = np.eye(spec.n_values)
    if prefix + "q_norm.weight" in weights:
        # q/k RMS-normed per head: |q| = g*sqrt(d), |k| = sqrt(d) on the code dims
        q[dims, s.query] = eye
        gain = spec.margin / (scale * d)
        offset = weights[prefix + "q_norm.weight"][0]  # 0 where the norm stores 1 + w
        weights[prefix + "q_norm.weight"][dims] = gain - (1.0 - offset)
    else:
        # inputs RMS-normed over the hidden size: a question token has one unit slot
        # (|x| = sqrt(H)), a fact token two (|x| = sqrt(H/2) per slot)
        q[dims, s.query] = eye * spec.margin / (scale * hidden / math.sqrt(2))


# ----------------------------------------------------------------------------- folder


def write_recall_model(
    folder: Path, base_config: dict[str, Any], spec: RecallSpec, dtype: str = "bfloat16"
) -> Path:
    """Write a constructed recall model (config, weights, tokenizer) into `folder`."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    vocab = vocabulary(spec)
    config = json.loads(json.dumps(base_config))
    inner = config["text_config"] if "text_config" in config else config  # qwen3.5 nests it
    inner.update(vocab_size=vocab.size, rope_theta=1e12, tie_word_embeddings=False)
    inner.pop("rope_scaling", None)
    if "rope_parameters" in inner:
        inner["rope_parameters"] = dict(inner["rope_parameters"], rope_theta=1e12)
    config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = construct_weights(model, spec, vocab)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: mx.array(v.astype(np.float32)).astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "recall.json").write_text(json.dumps(asdict(spec), indent=2))
    _write_word_tokenizer(folder, vocab)
    return folder


def _write_word_tokenizer(folder: Path, vocab: Vocab) -> None:
    """A whitespace word-level tokenizer: one token per word of the task."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from .tokenizer import save_tokenizer

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab.tokens)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    save_tokenizer(folder, tok)


# ----------------------------------------------------------------------------- asking


@dataclass(frozen=True)
class RecallResult:
    correct: int
    total: int
    wrong: tuple[tuple[str, str, str], ...]  # (question, expected, answered)

    @property
    def rate(self) -> float:
        return self.correct / self.total


def ask(
    model: Any, tokenizer: Any, cache: list[Any], question: list[int], settings: Any, max_tokens: int
) -> str:
    """Greedy answer to `question` after the cached prefix, through mlx-lm's stream_generate."""
    import copy

    from mlx_lm import stream_generate

    text = ""
    for r in stream_generate(
        model,
        tokenizer,
        question,
        max_tokens=max_tokens,
        prompt_cache=copy.deepcopy(cache),
        kv_bits=settings.kv_bits,
        kv_group_size=settings.kv_group_size,
        quantized_kv_start=settings.start,
    ):
        text += r.text
    return text


def recall(
    model: Any,
    tokenizer: Any,
    prefix: list[int],
    questions: list[tuple[list[int], str]],
    settings: Any,
    max_tokens: int = 1,
) -> RecallResult:
    """Ask every question after one shared prefix; an answer counts when it contains the fact."""
    from ..report.measure import prefill

    cache = prefill(model, prefix, settings)
    wrong = []
    for ids, expected in questions:
        got = ask(model, tokenizer, cache, ids, settings, max_tokens)
        if expected not in got:
            wrong.append((tokenizer.decode(ids), expected, got))
    return RecallResult(len(questions) - len(wrong), len(questions), tuple(wrong))


def constructed_task(spec: RecallSpec, tokenizer: Any, length: int, seed: int = 0):
    """(prefix ids, [(question ids, answer)]) of the constructed vocabulary's needle prompt."""
    words, questions = needle_prompt(spec, length, seed)
    prefix = tokenizer.encode(" ".join(words), add_special_tokens=False)
    asked = [(tokenizer.encode(q, add_special_tokens=False), a) for q, a in questions]
    return prefix, asked


# ----------------------------------------------------------------------------- in words

_ROOMS = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor"]
_FILLER = (
    "The committee met again to review the quarterly figures, and after a long discussion "
    "of budgets, schedules and the state of the old archive, it adjourned without a vote. "
)


def worded_task(tokenizer: Any, length: int, n_questions: int = 4, seed: int = 0):
    """The needle prompt of real models: facts in words, filler, a question (chat-templated,
    or a continuation where the tokenizer has no chat template: base models).

    Returns (prefix ids, [(question ids, answer)]) like `constructed_task`: the prefix is
    every token the questions' prompts share, so one prefill serves all of them.
    """
    rng = np.random.default_rng(seed)
    codes = {room: str(rng.integers(1000, 9999)) for room in _ROOMS}
    facts = " ".join(f"The pass code of the {room} room is {code}." for room, code in codes.items())
    filler_tokens = len(tokenizer.encode(_FILLER, add_special_tokens=False))
    body = facts + "\n\n" + _FILLER * max(1, (length - 200) // filler_tokens)
    asked = [str(r) for r in rng.permutation(_ROOMS)[:n_questions]]
    prompts = [_worded_prompt(tokenizer, body, room) for room in asked]
    shared = (
        min(common_prefix(prompts[0], p) for p in prompts[1:]) if len(prompts) > 1 else len(prompts[0]) - 1
    )
    return prompts[0][:shared], [(p[shared:], codes[room]) for p, room in zip(prompts, asked, strict=True)]


def _worded_prompt(tokenizer: Any, body: str, room: str) -> list[int]:
    """A chat turn where the model has a chat template; a continuation for base models."""
    if getattr(tokenizer, "chat_template", None):
        question = f"{body}\n\nWhat is the pass code of the {room} room? Answer with the number only."
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
    return tokenizer.encode(f"{body}\n\nThe pass code of the {room} room is")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
