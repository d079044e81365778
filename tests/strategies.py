"""Hypothesis strategies and helpers shared by the property tests.

Sizes stay small (widths up to 12, ranks up to 5, at most two blocks) so that
one example takes milliseconds. The arrays of one adapted layer are drawn
element by element as bounded finite floats at the width of their dtype
(``width=32`` for float32). A whole model has too many scalars for that, so its
parameters come from a drawn seed and scale, while its sizes, options and
tokens are drawn directly and shrink as usual.
"""

from dataclasses import dataclass

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np

from minidisel import AdapterConfig, ModelConfig, init_adapters, init_params
from minidisel.config import ALL_LINEAR

ARCHITECTURES = ("gpt", "llama")
METHODS = ("lora", "disel")


def bounded_floats(bound, dtype=np.float64):
    """Finite floats in ``[-bound, bound]`` that ``dtype`` represents exactly."""
    width = np.finfo(dtype).bits
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width)


def float_arrays(shape, bound, dtype=np.float64):
    """Arrays of ``shape`` and ``dtype`` with bounded finite entries."""
    return hnp.arrays(dtype, shape, elements=bounded_floats(bound, dtype))


@dataclass(frozen=True)
class Layer:
    """One adapted linear layer: input ``x`` (..., in), frozen ``base``, adapter ``p`` and its config."""

    x: np.ndarray
    base: dict
    p: dict
    config: AdapterConfig


@st.composite
def adapter_configs(draw, methods=METHODS, **fields):
    """Draw an AdapterConfig with a small rank; ``fields`` fix some of its fields."""
    drawn = dict(
        method=draw(st.sampled_from(methods)),
        r=draw(st.integers(1, 5)),
        lora_alpha=draw(st.floats(0.1, 64.0)),
        use_rslora=draw(st.booleans()),
        gate_normalize=draw(st.booleans()),
        gate_bottleneck_dim=draw(st.none() | st.integers(1, 3)),
    )
    return AdapterConfig(**{**drawn, **fields})


@st.composite
def layers(draw, methods=METHODS, dtype=np.float64, **fields):
    """Draw one adapted linear layer with an input of one to three leading axes.

    Bounds: inputs in [-2, 2], weights and factors in [-1, 1], gate biases in [-4, 4].
    """
    config = draw(adapter_configs(methods, **fields))
    lead = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3))
    d_in, d_out, r = draw(st.integers(1, 6)), draw(st.integers(1, 6)), config.r

    base = {"weight": draw(float_arrays((d_out, d_in), 1.0, dtype)), "bias": draw(float_arrays((d_out,), 1.0, dtype))}
    p = {"A": draw(float_arrays((r, d_in), 1.0, dtype)), "B": draw(float_arrays((d_out, r), 1.0, dtype))}
    if config.method == "disel":
        if config.gate_bottleneck_dim is None:
            p["W_g"] = draw(float_arrays((r, d_in), 1.0, dtype))
        else:
            p["V"] = draw(float_arrays((config.gate_bottleneck_dim, d_in), 1.0, dtype))
            p["U"] = draw(float_arrays((r, config.gate_bottleneck_dim), 1.0, dtype))
        p["b_g"] = draw(float_arrays((r,), 4.0, dtype))
    x = draw(float_arrays(lead + (d_in,), 2.0, dtype))
    return Layer(x, base, p, config)


@dataclass(frozen=True)
class Model:
    """A small model with adapters and a batch of tokens."""

    config: ModelConfig
    params: dict
    adapter_config: AdapterConfig
    adapters: dict
    tokens: np.ndarray


@st.composite
def model_configs(draw, archs=ARCHITECTURES, dtype="float64"):
    """Draw a small ModelConfig; Llama-style models get grouped-query attention and even head widths."""
    arch = draw(st.sampled_from(archs))
    n_heads = draw(st.integers(1, 3))
    if arch == "llama":
        kv_heads = draw(st.sampled_from([g for g in range(1, n_heads + 1) if n_heads % g == 0]))
        head_dim = draw(st.sampled_from([2, 4]))
    else:
        kv_heads, head_dim = n_heads, draw(st.integers(1, 4))
    return ModelConfig(
        vocab_size=draw(st.integers(2, 8)),
        d_model=n_heads * head_dim,
        n_layers=draw(st.integers(1, 2)),
        n_heads=n_heads,
        n_kv_heads=kv_heads,
        d_ff=draw(st.integers(1, 8)),
        max_seq_len=6,
        arch=arch,
        dtype=dtype,
    )


@st.composite
def target_modules(draw, model_config):
    """Draw ``"all-linear"`` or a non-empty subset of the architecture's linear layers."""
    names = model_config.linear_modules
    return draw(st.just(ALL_LINEAR) | st.lists(st.sampled_from(names), min_size=1, unique=True).map(tuple))


@st.composite
def token_batches(draw, model_config, min_positions=1):
    """Draw a (B, T) batch of token ids, with B in 1..3 and T up to ``max_seq_len``."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(min_positions, model_config.max_seq_len)))
    return draw(hnp.arrays(np.int64, shape, elements=st.integers(0, model_config.vocab_size - 1)))


@st.composite
def models(draw, archs=ARCHITECTURES, methods=METHODS, dtype="float64", zero_B=False, min_positions=1, **fields):
    """Draw a small model of random parameters, adapters on some of its layers, and tokens (see :func:`make_model`)."""
    config = draw(model_configs(archs, dtype))
    if "target_modules" not in fields:
        fields = {**fields, "target_modules": draw(target_modules(config))}
    adapter_config = draw(adapter_configs(methods, **fields))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.1, 1.0))
    return make_model(config, adapter_config, seed, scale, draw(token_batches(config, min_positions)), zero_B)


def make_model(config, adapter_config, seed, scale, tokens, zero_B=False):
    """Build a model with random parameters and adapters from ``seed``.

    Base parameters are N(0, scale²), so that norms, biases and gains are all
    non-trivial. Each adapter matrix is N(0, 1/n) with n its input width, and
    gate biases are uniform in [-3, 3]. With ``zero_B`` every B keeps its
    initial zero.
    """
    rng = np.random.default_rng(seed)
    params = random_like(init_params(config, rng), rng, scale)
    adapters = map_adapter_layers(
        init_adapters(params, config, adapter_config, rng), lambda p: random_adapter_layer(p, rng, zero_B)
    )
    return Model(config, params, adapter_config, adapters, tokens)


def random_like(tree, rng, scale):
    """Return a tree shaped like ``tree`` whose leaves are N(0, scale²) in the same dtypes."""
    if isinstance(tree, dict):
        return {key: random_like(value, rng, scale) for key, value in tree.items()}
    return (scale * rng.standard_normal(tree.shape)).astype(tree.dtype)


def random_adapter_layer(p, rng, zero_B=False):
    """Return one adapter layer with N(0, 1/n) matrices (n their input width) and gate biases in [-3, 3]."""
    layer = {}
    for key, value in p.items():
        if key == "b_g":
            layer[key] = rng.uniform(-3.0, 3.0, value.shape).astype(value.dtype)
        elif key == "B" and zero_B:
            layer[key] = value
        else:
            layer[key] = (rng.standard_normal(value.shape) / np.sqrt(value.shape[-1])).astype(value.dtype)
    return layer


def map_adapter_layers(adapters, function):
    """Return the adapter tree with ``function`` applied to each layer's dict of ``A``, ``B``, ..."""
    if "A" in adapters:
        return function(adapters)
    return {key: map_adapter_layers(value, function) for key, value in adapters.items()}


def adapter_layers(adapters, prefix=""):
    """Return ``{dotted path: layer dict}`` for every adapted layer of an adapter tree."""
    if "A" in adapters:
        return {prefix: adapters}
    found = {}
    for key, value in adapters.items():
        found.update(adapter_layers(value, f"{prefix}.{key}" if prefix else key))
    return found


def lora_factors(p):
    """Keep a DISeL layer's LoRA factors ``A`` and ``B`` and drop its gate."""
    return {"A": p["A"], "B": p["B"]}


def gate_scale(config, d_in):
    """Return the gate's logit factor ``c``: 1/sqrt(in) with gate normalisation, else 1."""
    return 1.0 / np.sqrt(d_in) if config.gate_normalize else 1.0


def with_gate_bias(p, config, logit):
    """Return a layer whose gate bias alone would give every gate the logit ``logit``: b_g = logit / c."""
    return {**p, "b_g": np.full(p["b_g"].shape, logit / gate_scale(config, p["A"].shape[1]), p["b_g"].dtype)}


def permute_ranks(p, order):
    """Reorder the rank components: rows of ``A``, ``W_g``, ``U`` and ``b_g``, columns of ``B``.

    The bottleneck's ``V`` has no rank axis and stays as it is.
    """
    permuted = {key: value[order] if key in ("A", "W_g", "U", "b_g") else value for key, value in p.items()}
    permuted["B"] = p["B"][:, order]
    return permuted
