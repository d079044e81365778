"""The base transformer: a GPT-style and a Llama-style decoder.

Parameters form a nested dict whose dotted paths are Hugging Face's names
without the ``model.`` prefix, for example ``layers.0.self_attn.q_proj.weight``.
Layers are keyed by the strings ``"0"``, ``"1"``, ... so that the tree holds
dicts of arrays only.

    GPT:   x = embed_tokens[t] + embed_positions[pos]
           x = x + attn(LayerNorm(x));  x = x + W_down GELU(W_up LayerNorm(x))
           logits = LayerNorm(x) embed_tokens^T                  (tied head)
    Llama: x = embed_tokens[t]
           x = x + attn(RMSNorm(x))  with rotary q, k and G key/value heads
           x = x + W_down (SiLU(W_gate h) ⊙ W_up h),  h = RMSNorm(x)
           logits = RMSNorm(x) lm_head^T                          (untied head)

This module never imports training code. Adapters enter only through
:func:`minidisel.adapters.project`.

Two sets of layer functions compute the same model. The plain set is the
textbook formulas of :mod:`minidisel.nn` and :mod:`minidisel.adapters`,
differentiated operation by operation by autograd. The fused set
(:mod:`minidisel.fused`) computes each layer as one operation with a
hand-written gradient, which makes a training step up to two and a half times
faster. ``forward(..., fused=True)`` selects the fused set; tests check that
both give the same outputs and gradients.
"""

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import autograd.numpy as np
import numpy

from minidisel import fused as fused_layers
from minidisel.adapters import AdapterMode, project
from minidisel.config import AdapterConfig, ModelConfig, check_bool
from minidisel.nn import (
    apply_rotary,
    attention,
    gelu,
    layer_norm,
    linear,
    merge_heads,
    rms_norm,
    rotary_tables,
    silu,
    split_heads,
)

INIT_STD = 0.02


def init_linear(rng, d_in, d_out, bias, dtype):
    """Initialise a linear layer: weight ``(out, in)`` from N(0, 0.02²), bias at zero."""
    p = {"weight": (INIT_STD * rng.standard_normal((d_out, d_in))).astype(dtype)}
    if bias:
        p["bias"] = numpy.zeros(d_out, dtype)
    return p


def init_norm(config):
    """Initialise a LayerNorm (gain and bias) or an RMSNorm (gain only)."""
    p = {"weight": numpy.ones(config.d_model, config.dtype)}
    if config.arch == "gpt":
        p["bias"] = numpy.zeros(config.d_model, config.dtype)
    return p


def init_block(rng, config):
    """Initialise one transformer block."""
    D, F, bias = config.d_model, config.mlp_dim, config.arch == "gpt"
    kv_width = config.kv_heads * config.head_dim
    widths = {"q_proj": (D, D), "k_proj": (D, kv_width), "v_proj": (D, kv_width), "o_proj": (D, D)}
    widths.update({"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)})

    def layer(name):
        return init_linear(rng, *widths[name], bias, config.dtype)

    return {
        "input_layernorm": init_norm(config),
        "self_attn": {name: layer(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "post_attention_layernorm": init_norm(config),
        "mlp": {name: layer(name) for name in config.linear_modules[4:]},
    }


def init_params(config, rng):
    """Initialise the base model's parameters from ``rng``."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    def normal(*shape):
        return (INIT_STD * rng.standard_normal(shape)).astype(config.dtype)

    params = {"embed_tokens": {"weight": normal(config.vocab_size, config.d_model)}}
    if config.arch == "gpt":
        params["embed_positions"] = {"weight": normal(config.max_seq_len, config.d_model)}
    params["layers"] = {str(i): init_block(rng, config) for i in range(config.n_layers)}
    params["norm"] = init_norm(config)
    if config.arch == "llama":
        params["lm_head"] = {"weight": normal(config.vocab_size, config.d_model)}
    return params


def normalize(x, p, config, layers):
    """Apply the architecture's normalisation: LayerNorm (GPT) or RMSNorm (Llama)."""
    if config.arch == "gpt":
        return layers.layer_norm(x, p, config.norm_eps)
    return layers.rms_norm(x, p, config.norm_eps)


@lru_cache(maxsize=32)
def cached_rotary_tables(T, K, theta, dtype):
    """Return rotary tables for one shape, built once and kept read-only."""
    cos, sin = rotary_tables(T, K, theta, dtype)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def multi_head_attention(q, k, v, config, rotary=None):
    """Causal attention on projected inputs: (B, T, H*K), (B, T, G*K), (B, T, G*K) -> (B, T, D).

    ``rotary`` is ``(cos, sin)`` for Llama's rotary embeddings, else None.
    """
    q = split_heads(q, config.n_heads)  # (B, H, T, K)
    k = split_heads(k, config.kv_heads)  # (B, G, T, K)
    v = split_heads(v, config.kv_heads)  # (B, G, T, K)

    if rotary is not None:
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    # grouped-query attention: each key/value head serves H / G query heads
    repeats = config.n_heads // config.kv_heads
    if repeats > 1:
        k, v = np.repeat(k, repeats, axis=1), np.repeat(v, repeats, axis=1)  # (B, H, T, K)

    return merge_heads(attention(q, k, v))  # (B, T, D)


def swiglu(gate, up):
    """Return Llama's gated activation ``silu(gate) ⊙ up``."""
    return silu(gate) * up


@dataclass(frozen=True)
class LayerFunctions:
    """The layer functions a forward pass calls; each fused one has the plain one's signature."""

    linear: Callable
    project: Callable
    layer_norm: Callable
    rms_norm: Callable
    attention: Callable
    gelu: Callable
    swiglu: Callable


PLAIN = LayerFunctions(linear, project, layer_norm, rms_norm, multi_head_attention, gelu, swiglu)
FUSED = LayerFunctions(
    fused_layers.linear,
    fused_layers.project,
    fused_layers.layer_norm,
    fused_layers.rms_norm,
    fused_layers.attention,
    fused_layers.gelu,
    fused_layers.swiglu,
)
# the fused project skips computing gates unless they are returned
FUSED_WITH_GATES = LayerFunctions(**{**FUSED.__dict__, "project": partial(fused_layers.project, with_gates=True)})


def layer_functions(fused, return_gates=False):
    """Return the plain (textbook) or the fused (fast) layer functions: the one place that chooses."""
    if not fused:
        return PLAIN
    return FUSED_WITH_GATES if return_gates else FUSED


def self_attention(x, p, adapters, mode, config, layers):
    """Causal multi-head self-attention: (B, T, D) -> (B, T, D), gates."""
    q, g_q = layers.project(x, p["q_proj"], adapters.get("q_proj"), mode)  # (B, T, H*K)
    k, g_k = layers.project(x, p["k_proj"], adapters.get("k_proj"), mode)  # (B, T, G*K)
    v, g_v = layers.project(x, p["v_proj"], adapters.get("v_proj"), mode)  # (B, T, G*K)

    rotary = None
    if config.arch == "llama":
        rotary = cached_rotary_tables(x.shape[1], config.head_dim, config.rope_theta, config.dtype)
    y = layers.attention(q, k, v, config, rotary)  # (B, T, D)

    y, g_o = layers.project(y, p["o_proj"], adapters.get("o_proj"), mode)
    return y, collect(q_proj=g_q, k_proj=g_k, v_proj=g_v, o_proj=g_o)


def mlp(x, p, adapters, mode, config, layers):
    """Apply the feed-forward block, GELU (GPT) or SwiGLU (Llama): (B, T, D) -> (B, T, D), gates."""
    up, g_up = layers.project(x, p["up_proj"], adapters.get("up_proj"), mode)  # (B, T, F)
    if config.arch == "gpt":
        h, g_gate = layers.gelu(up), None
    else:
        gate, g_gate = layers.project(x, p["gate_proj"], adapters.get("gate_proj"), mode)  # (B, T, F)
        h = layers.swiglu(gate, up)
    y, g_down = layers.project(h, p["down_proj"], adapters.get("down_proj"), mode)  # (B, T, D)
    return y, collect(gate_proj=g_gate, up_proj=g_up, down_proj=g_down)


def block(x, p, adapters, mode, config, layers):
    """Apply one pre-norm transformer block: (B, T, D) -> (B, T, D), gates."""
    h = normalize(x, p["input_layernorm"], config, layers)
    a, attention_gates = self_attention(h, p["self_attn"], adapters.get("self_attn", {}), mode, config, layers)
    x = x + a

    h = normalize(x, p["post_attention_layernorm"], config, layers)
    m, mlp_gates = mlp(h, p["mlp"], adapters.get("mlp", {}), mode, config, layers)
    return x + m, collect(self_attn=attention_gates, mlp=mlp_gates)


def collect(**gates):
    """Keep the non-empty entries, so the gate tree mirrors the adapter tree."""
    return {name: g for name, g in gates.items() if g is not None and not (isinstance(g, dict) and not g)}


def check_tokens(tokens, config):
    """Raise unless ``tokens`` is a (B, T) integer array of valid ids and a length the model supports."""
    if not isinstance(tokens, numpy.ndarray):
        raise TypeError(f"tokens must be a numpy array, got {type(tokens).__name__}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, positions), got shape {tokens.shape}")
    if not numpy.issubdtype(tokens.dtype, numpy.integer):
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.shape[1] < 1 or tokens.shape[1] > config.max_seq_len:
        raise ValueError(f"sequence length must be in [1, {config.max_seq_len}] (max_seq_len), got {tokens.shape[1]}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= config.vocab_size)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


def forward(
    params,
    tokens,
    config,
    adapters=None,
    adapter_config=None,
    *,
    training=False,
    rng=None,
    gate_override=None,
    return_gates=False,
    fused=False,
):
    """Run the model: tokens (B, T) -> logits (B, T, V).

    With ``adapters`` (and their ``adapter_config``) each adapted layer adds its
    LoRA or DISeL update. ``training=True`` applies adapter dropout, drawing
    masks from ``rng``. ``gate_override`` forces every DISeL gate to a constant.
    With ``return_gates=True`` it returns ``(logits, gates)``, where ``gates``
    mirrors the adapter tree and contains ``(B, T, R)`` arrays. ``fused=True``
    runs the fused layer functions of :mod:`minidisel.fused`: the same model,
    faster to differentiate.
    """
    check_tokens(tokens, config)
    check_bool("fused", fused)
    mode = adapter_mode(adapters, adapter_config, training, rng, gate_override)
    adapters = adapters or {"layers": {}}
    layers = layer_functions(fused, return_gates)

    B, T = tokens.shape
    x = params["embed_tokens"]["weight"][tokens]  # (B, T, D)
    if config.arch == "gpt":
        x = x + params["embed_positions"]["weight"][:T]

    gates = {}
    for i in range(config.n_layers):
        x, layer_gates = block(x, params["layers"][str(i)], adapters["layers"].get(str(i), {}), mode, config, layers)
        if layer_gates:
            gates[str(i)] = layer_gates

    # the output head is a linear layer without bias (GPT: tied to the token embedding)
    x = normalize(x, params["norm"], config, layers)
    logits = layers.linear(x, params["embed_tokens" if config.arch == "gpt" else "lm_head"])  # (B, T, V)
    return (logits, {"layers": gates}) if return_gates else logits


def adapter_mode(adapters, adapter_config, training, rng, gate_override):
    """Check the adapter arguments of :func:`forward` and bundle them."""
    if adapters is None:
        return None
    if not isinstance(adapter_config, AdapterConfig):
        raise TypeError(f"adapter_config must be an AdapterConfig when adapters are given, got {adapter_config!r}")
    if training and adapter_config.lora_dropout > 0.0 and not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator when training with dropout, got {rng!r}")
    if gate_override is not None and not 0.0 <= gate_override <= 1.0:
        raise ValueError(f"gate_override must be None or in [0, 1], got {gate_override}")
    return AdapterMode(adapter_config, training, rng, gate_override)
