"""LoRA and DISeL adapters on a frozen linear layer.

For a frozen layer ``W (out, in)``, ``b (out,)`` and an input ``x`` of width
``in``, with ``x̃ = dropout(x)`` in training and ``x̃ = x`` otherwise:

    LoRA:   y = x W^T + b + s · (x̃ A^T) B^T                       A (R, in), B (out, R)
    DoRA:   y = x W^T + b + (m / n - 1) ⊙ (x̃ W^T) + (m / n) ⊙ s · (x̃ A^T) B^T
            n = ||W + s B A||, the norm of each row (output feature)   m (out,)
    DISeL:  y = x W^T + b + s · (g ⊙ (x̃ A^T)) B^T
            g = σ(c · (x̃ W_g^T + b_g))                            W_g (R, in), b_g (R,)
    bottleneck gate: g = σ(c · ((x̃ V^T) U^T + b_g))               V (D_b, in), U (R, D_b)

``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA) and
``c = 1 / sqrt(in)`` with gate normalisation, else 1. Gates are per token: an
input ``(B, T, in)`` gives gates ``(B, T, R)``.

DoRA follows PEFT 0.21 (``tuners/lora/dora.py``, ``use_dora=True``). The
magnitude ``m`` (PEFT's ``lora_magnitude_vector``) starts at the row norms of
``W``. The norm ``n`` is a constant in the backward pass: PEFT detaches it, as
the DoRA paper (Liu et al., 2024, section 4.3) suggests. Without dropout the
output is ``(m / n) ⊙ ((W + s B A) x) + b``. With dropout, ``x W^T + b`` keeps
the undropped input and only the correction terms read ``x̃``, as in PEFT.

Letters follow PEFT (``A`` = ``lora_A``, the input side). The DISeL authors'
README writes the same update as ``A G(x) B x``, with A and B swapped.

This is the only module that knows where adapters attach: the model calls
:func:`project` for every linear layer and passes the adapter subtree, or None.
"""

import math
from dataclasses import dataclass

import autograd.numpy as np
import numpy

from minidisel.config import AdapterConfig, ModelConfig
from minidisel.nn import linear, sigmoid, stop_gradient

GATE_KEYS = ("W_g", "b_g", "U", "V")
MERGED_MARKER = "lora_merged"  # key of the empty dict that marks a layer whose weight contains a merged update


@dataclass(frozen=True)
class AdapterMode:
    """How adapters run in one forward pass.

    ``training`` turns dropout on (then ``rng`` is required); ``gate_override``
    replaces every gate value with a constant (0 closes, 1 opens all gates).
    """

    config: AdapterConfig
    training: bool = False
    rng: numpy.random.Generator | None = None
    gate_override: float | None = None


def module_group(name):
    """Return the block sub-tree a linear layer lives in: ``"self_attn"`` or ``"mlp"``."""
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def adapter_paths(model_config, adapter_config):
    """List the dotted paths of adapted layers, e.g. ``"layers.0.self_attn.q_proj"``."""
    names = adapter_config.targets_for(model_config)
    return [
        f"layers.{i}.{module_group(name)}.{name}" for i in range(model_config.n_layers) for name in names
    ]


def uniform(rng, shape, bound, dtype):
    """Draw ``U(-bound, bound)`` samples of ``shape`` from ``rng``."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_gate(rng, d_in, config, dtype):
    """Initialise one layer's gate parameters (full or bottleneck)."""
    r, zero = config.r, config.gate_weight_init == "zero"
    b_g = numpy.full((r,), config.gate_bias_init, dtype=dtype)
    if config.gate_bottleneck_dim is None:
        W_g = numpy.zeros((r, d_in), dtype) if zero else uniform(rng, (r, d_in), d_in**-0.5, dtype)
        return {"W_g": W_g, "b_g": b_g}

    d_b = config.gate_bottleneck_dim
    V = uniform(rng, (d_b, d_in), d_in**-0.5, dtype)
    U = numpy.zeros((r, d_b), dtype) if zero else uniform(rng, (r, d_b), d_b**-0.5, dtype)
    return {"V": V, "U": U, "b_g": b_g}


def init_adapter_layer(rng, d_in, d_out, config, dtype):
    """Initialise ``A`` as PEFT does (Kaiming-uniform, a = sqrt 5), ``B`` at zero, and the gate."""
    layer = {
        "A": uniform(rng, (config.r, d_in), d_in**-0.5, dtype),  # (R, in)
        "B": numpy.zeros((d_out, config.r), dtype),  # (out, R)
    }
    if config.method == "disel":
        layer.update(init_gate(rng, d_in, config, dtype))
    return layer


def init_adapters(base, model_config, adapter_config, rng):
    """Initialise adapters for ``base``, as a tree that mirrors the base parameter tree.

    Returns ``{"layers": {"0": {"self_attn": {"q_proj": {"A", "B", ...}}}}}``
    with an entry for each path of :func:`adapter_paths`.
    """
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(adapter_config, AdapterConfig):
        raise TypeError(f"adapter_config must be an AdapterConfig, got {type(adapter_config).__name__}")
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    adapters = {"layers": {}}
    for path in adapter_paths(model_config, adapter_config):
        _, index, group, name = path.split(".")
        d_out, d_in = base["layers"][index][group][name]["weight"].shape
        layer = init_adapter_layer(rng, d_in, d_out, adapter_config, model_config.dtype)
        if adapter_config.method == "dora":
            layer["m"] = row_norms(base["layers"][index][group][name]["weight"])  # (out,)
        adapters["layers"].setdefault(index, {}).setdefault(group, {})[name] = layer
    return adapters


def gate_logits(x, p, config):
    """Return the gate pre-activations ``c · (W_g x + b_g)``: (..., in) -> (..., R)."""
    if "W_g" in p:
        z = x @ p["W_g"].T + p["b_g"]
    else:
        z = (x @ p["V"].T) @ p["U"].T + p["b_g"]  # (..., D_b) -> (..., R)
    return z / math.sqrt(x.shape[-1]) if config.gate_normalize else z


def gate_values(x, p, config):
    """Return DISeL's per-token gates ``g(x) ∈ (0, 1)^R``: (..., in) -> (..., R)."""
    return sigmoid(gate_logits(x, p, config))


def dropout(x, rate, rng):
    """Inverted dropout: zero each entry with probability ``rate`` and scale the rest by 1 / (1 - rate)."""
    if rate == 0.0:
        return x
    keep = rng.random(x.shape) >= rate  # constant mask
    return np.where(keep, x / (1.0 - rate), 0.0)


def adapter_delta(x, p, mode):
    """Return the adapter's update and its gates: (..., in) -> (..., out), (..., R) or None."""
    config = mode.config
    if mode.training and config.lora_dropout > 0.0:
        x = dropout(x, config.lora_dropout, mode.rng)
    h = x @ p["A"].T  # (..., R)

    g = None
    if config.method == "disel":
        g = gate_values(x, p, config)  # (..., R)
        if mode.gate_override is not None:
            g = np.full(g.shape, mode.gate_override, dtype=h.dtype)
        h = g * h
    return config.scaling * (h @ p["B"].T), g  # (..., out)


def row_norms(W):
    """Return the L2 norm of each row (output feature) of ``W``: (out, in) -> (out,)."""
    return np.sqrt(np.sum(W * W, axis=1))


def dora_scale(W, p, config):
    """Return DoRA's ``m / n`` with ``n = ||W + s B A||`` per row, detached from the gradient: (out,)."""
    n = stop_gradient(row_norms(W + config.scaling * (p["B"] @ p["A"])))  # (out,)
    return p["m"] / n


def dora_delta(x, W, p, mode):
    """Return DoRA's update ``(m/n - 1) ⊙ (x̃ W^T) + (m/n) ⊙ s (x̃ A^T) B^T``: (..., in) -> (..., out)."""
    config = mode.config
    if mode.training and config.lora_dropout > 0.0:
        x = dropout(x, config.lora_dropout, mode.rng)
    scale = dora_scale(W, p, config)
    lora = config.scaling * ((x @ p["A"].T) @ p["B"].T)  # (..., R) -> (..., out)
    return (scale - 1.0) * (x @ W.T) + scale * lora


def project(x, base, adapter, mode):
    """Apply one linear layer with its adapter, if any: (..., in) -> (..., out), gates or None."""
    y = linear(x, base)
    if adapter is None or mode is None:
        return y, None
    if mode.config.method == "dora":
        return y + dora_delta(x, base["weight"], adapter, mode), None
    delta, g = adapter_delta(x, adapter, mode)
    return y + delta, g


def merge_adapters(base, adapters, adapter_config):
    """Return a copy of ``base`` with each adapter's update folded into its weight.

    LoRA: ``W <- W + s B A``. DoRA, as PEFT merges it: ``W <- (m / n) ⊙ (W + s B A)``
    row by row, bias unchanged. A DISeL update depends on the input through its
    gates, so no single weight matrix can replace it, and merging raises.

    Each merged layer of the copy carries the marker ``"lora_merged": {}``.
    The empty dict contains no array, so the tree stays a nested dict of
    float arrays and gains no parameter. Autograd, the optimiser and
    parameter counts ignore it, and the forward pass reads only ``weight``
    and ``bias``. Merging into a layer that carries the marker raises
    instead of adding the update twice.

    NOTE: checkpoints store arrays only, so a merged tree that is saved and
    loaded again has lost its markers.
    """
    check_mergeable(adapter_config)
    return _fold(base, adapters, adapter_config, merging=True)


def unmerge_adapters(merged, adapters, adapter_config):
    """Return a copy of ``merged`` with each LoRA update removed: ``W <- W - s B A``.

    Every adapted layer must carry the marker that :func:`merge_adapters`
    sets, and the copy drops it. The restored weight equals the original up
    to rounding, because ``(W + D) - D`` differs from ``W`` by at most one
    rounding of ``W + D`` and one of the difference.

    Only LoRA unmerges. A merged DoRA weight ``(m / n) ⊙ (W + s B A)`` has row
    norms ``m`` whatever ``n`` was, so neither ``n`` nor ``W`` can be recovered
    from it. Keep the unmerged base instead, because merging returns a copy.
    """
    if adapter_config.method == "dora":
        raise ValueError(
            "cannot unmerge a 'dora' adapter: the merged weight (m / n) ⊙ (W + s·B·A) does not determine the "
            "row norms n = ||W + s·B·A|| it was scaled by; keep the base parameters that merge_adapters copied"
        )
    check_mergeable(adapter_config)
    return _fold(merged, adapters, adapter_config, merging=False)


def check_mergeable(adapter_config):
    """Raise unless the adapter's update is a fixed matrix (LoRA or DoRA)."""
    if adapter_config.method == "disel":
        raise ValueError(
            f"cannot merge a {adapter_config.method!r} adapter: its gates depend on the input, so the "
            "update s·B·diag(g(x))·A differs for every token and has no single-matrix form; only "
            "method='lora' and method='dora' merge"
        )


def merged_dora_weight(W, p, config):
    """Return PEFT's merged DoRA weight ``(m / n) ⊙ (W + s B A)``, one scale per row: (out, in)."""
    return dora_scale(W, p, config)[:, None] * (W + config.scaling * (p["B"] @ p["A"]))


def folded_weight(W, p, config, merging):
    """Return the weight ``W`` with the adapter's update merged in, or (LoRA only) removed."""
    if config.method == "dora":
        return merged_dora_weight(W, p, config)
    sign = 1.0 if merging else -1.0
    return W + sign * config.scaling * (p["B"] @ p["A"])


def _fold(tree, adapters, adapter_config, merging):
    folded = copy_tree(tree)
    for index, groups in adapters["layers"].items():
        for group, layers in groups.items():
            for name, p in layers.items():
                target = folded["layers"][index][group][name]
                check_merge_state(target, f"layers.{index}.{group}.{name}", merging)
                target["weight"] = folded_weight(target["weight"], p, adapter_config, merging)
                if merging:
                    target[MERGED_MARKER] = {}
                else:
                    del target[MERGED_MARKER]
    return folded


def check_merge_state(layer, path, merging):
    """Raise unless the layer at ``path`` is unmerged (before a merge) or merged (before an unmerge)."""
    if merging and MERGED_MARKER in layer:
        raise ValueError(
            f"cannot merge into {path}: its weight already contains a merged LoRA update (key "
            f"{MERGED_MARKER!r}). Merge into the unmerged base tree, or call unmerge_adapters first"
        )
    if not merging and MERGED_MARKER not in layer:
        raise ValueError(
            f"cannot unmerge {path}: its weight contains no merged LoRA update (key {MERGED_MARKER!r} "
            "is missing). Pass the tree that merge_adapters returned"
        )


def copy_tree(tree):
    """Return a deep copy of a nested dict of arrays."""
    if isinstance(tree, dict):
        return {key: copy_tree(value) for key, value in tree.items()}
    return numpy.array(tree, copy=True)
