"""Names and shapes of every tensor, in minidisel and in Hugging Face and PEFT files.

Two tables define the whole mapping, and ``docs/oracle.md`` prints them:

* :data:`BASE_KEYS`: base-model parameters. A minidisel path is Hugging
  Face's Llama name without the leading ``model.``, except ``lm_head.weight``,
  which has no prefix in either.
* :data:`ADAPTER_KEYS`: adapter parameters. PEFT's key of an adapter tensor is
  ``base_model.model.`` + the Hugging Face path of the adapted layer + a
  suffix such as ``lora_A.weight``. DISeL gates use the suffixes of the DISeL
  reference implementation (``lora_disel_gate.linear.weight``, ...).

Shapes are written with symbols, which :func:`dimension_sizes` resolves:
``V`` vocabulary, ``D`` model width, ``P`` max positions, ``H*K`` query width,
``G*K`` key/value width, ``F`` MLP width. For adapters, ``in`` and ``out`` are
the adapted layer's widths, ``R`` the rank and ``D_b`` the gate's bottleneck.
"""

from dataclasses import dataclass
from typing import Callable

from minidisel.adapters import adapter_paths
from minidisel.config import ARCHITECTURES
from minidisel.tree import flatten, unflatten

HF_PREFIX = "model."
PEFT_PREFIX = "base_model.model."
LAYER = "N"  # placeholder for the layer index in BASE_KEYS paths


@dataclass(frozen=True)
class BaseKey:
    """One base parameter: its minidisel path (``N`` for the layer index), shape symbols, architectures."""

    path: str
    shape: tuple
    archs: tuple = ARCHITECTURES

    @property
    def hf_key(self):
        return hf_key(self.path)


GPT = ("gpt",)
LLAMA = ("llama",)

BASE_KEYS = (
    BaseKey("embed_tokens.weight", ("V", "D")),
    BaseKey("embed_positions.weight", ("P", "D"), GPT),
    BaseKey("layers.N.input_layernorm.weight", ("D",)),
    BaseKey("layers.N.input_layernorm.bias", ("D",), GPT),
    BaseKey("layers.N.self_attn.q_proj.weight", ("H*K", "D")),
    BaseKey("layers.N.self_attn.q_proj.bias", ("H*K",), GPT),
    BaseKey("layers.N.self_attn.k_proj.weight", ("G*K", "D")),
    BaseKey("layers.N.self_attn.k_proj.bias", ("G*K",), GPT),
    BaseKey("layers.N.self_attn.v_proj.weight", ("G*K", "D")),
    BaseKey("layers.N.self_attn.v_proj.bias", ("G*K",), GPT),
    BaseKey("layers.N.self_attn.o_proj.weight", ("D", "H*K")),
    BaseKey("layers.N.self_attn.o_proj.bias", ("D",), GPT),
    BaseKey("layers.N.post_attention_layernorm.weight", ("D",)),
    BaseKey("layers.N.post_attention_layernorm.bias", ("D",), GPT),
    BaseKey("layers.N.mlp.gate_proj.weight", ("F", "D"), LLAMA),
    BaseKey("layers.N.mlp.up_proj.weight", ("F", "D")),
    BaseKey("layers.N.mlp.up_proj.bias", ("F",), GPT),
    BaseKey("layers.N.mlp.down_proj.weight", ("D", "F")),
    BaseKey("layers.N.mlp.down_proj.bias", ("D",), GPT),
    BaseKey("norm.weight", ("D",)),
    BaseKey("norm.bias", ("D",), GPT),
    BaseKey("lm_head.weight", ("V", "D"), LLAMA),
)


def full_gate(config):
    """True for a DISeL adapter with a full ``(R, in)`` gate."""
    return config.method == "disel" and config.gate_bottleneck_dim is None


def bottleneck_gate(config):
    """True for a DISeL adapter with a bottleneck gate ``U V``."""
    return config.method == "disel" and config.gate_bottleneck_dim is not None


def any_adapter(config):
    """True for every adapter."""
    return True


def dora(config):
    """True for a DoRA adapter, which has a magnitude vector per adapted layer."""
    return config.method == "dora"


@dataclass(frozen=True)
class AdapterKey:
    """One adapter tensor of an adapted layer: minidisel key, PEFT suffix, shape symbols, when present."""

    name: str
    suffix: str
    shape: tuple
    applies: Callable = any_adapter
    used_by: str = "LoRA, DoRA, DISeL"


# One row per adapter tensor. A new adapter tensor is one more row with its
# own ``applies`` predicate. PEFT saves DoRA's magnitude without ".weight".
ADAPTER_KEYS = (
    AdapterKey("A", "lora_A.weight", ("R", "in")),
    AdapterKey("B", "lora_B.weight", ("out", "R")),
    AdapterKey("m", "lora_magnitude_vector", ("out",), dora, "DoRA"),
    AdapterKey("W_g", "lora_disel_gate.linear.weight", ("R", "in"), full_gate, "DISeL, full gate"),
    AdapterKey("b_g", "lora_disel_gate.linear.bias", ("R",), full_gate, "DISeL, full gate"),
    AdapterKey("V", "lora_disel_gate.proj_down.weight", ("D_b", "in"), bottleneck_gate, "DISeL, bottleneck gate"),
    AdapterKey("U", "lora_disel_gate.proj_up.weight", ("R", "D_b"), bottleneck_gate, "DISeL, bottleneck gate"),
    AdapterKey("b_g", "lora_disel_gate.proj_up.bias", ("R",), bottleneck_gate, "DISeL, bottleneck gate"),
)


def hf_key(path):
    """Return the Hugging Face key of a minidisel base path: ``layers.0.…`` -> ``model.layers.0.…``."""
    return path if path.startswith("lm_head.") else HF_PREFIX + path


def path_from_hf_key(key):
    """Return the minidisel path of a Hugging Face key, or None if the key has no minidisel form."""
    if key.startswith("lm_head."):
        return key
    return key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else None


def peft_module(layer_path):
    """Return PEFT's module path of an adapted layer: ``layers.0.self_attn.q_proj`` -> ``base_model.model.model.…``."""
    return PEFT_PREFIX + hf_key(layer_path)


def dimension_sizes(model_config, adapter_config=None):
    """Return the size of each shape symbol of the base-model table (and ``R``, ``D_b`` for adapters)."""
    K = model_config.head_dim
    sizes = {
        "V": model_config.vocab_size,
        "D": model_config.d_model,
        "P": model_config.max_seq_len,
        "H*K": model_config.n_heads * K,
        "G*K": model_config.kv_heads * K,
        "F": model_config.mlp_dim,
    }
    if adapter_config is not None:
        sizes["R"] = adapter_config.r
        sizes["D_b"] = adapter_config.gate_bottleneck_dim
    return sizes


def base_shapes(model_config):
    """Return ``{minidisel path: shape}`` of every base parameter of ``model_config``."""
    sizes = dimension_sizes(model_config)
    shapes = {}
    for row in BASE_KEYS:
        if model_config.arch not in row.archs:
            continue
        shape = tuple(sizes[symbol] for symbol in row.shape)
        if LAYER in row.path.split("."):
            for i in range(model_config.n_layers):
                shapes[row.path.replace(f".{LAYER}.", f".{i}.")] = shape
        else:
            shapes[row.path] = shape
    return dict(sorted(shapes.items(), key=lambda item: layer_order(item[0])))


def layer_order(path):
    """Sort key that puts ``layers.10`` after ``layers.9``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


def adapter_rows(adapter_config):
    """Return the rows of :data:`ADAPTER_KEYS` that ``adapter_config`` uses."""
    return [row for row in ADAPTER_KEYS if row.applies(adapter_config)]


def adapter_shapes(model_config, adapter_config):
    """Return ``{(layer path, minidisel key): (PEFT key, shape)}`` for every adapter tensor."""
    sizes = dimension_sizes(model_config, adapter_config)
    weights = base_shapes(model_config)
    table = {}
    for layer in adapter_paths(model_config, adapter_config):
        d_out, d_in = weights[f"{layer}.weight"]
        layer_sizes = {**sizes, "in": d_in, "out": d_out}
        for row in adapter_rows(adapter_config):
            shape = tuple(layer_sizes[symbol] for symbol in row.shape)
            table[(layer, row.name)] = (f"{peft_module(layer)}.{row.suffix}", shape)
    return table


def base_to_hf(params):
    """Return ``{Hugging Face key: array}`` for a base parameter tree."""
    return {hf_key(path): value for path, value in flatten(params).items()}


def adapters_to_peft(adapters, model_config, adapter_config):
    """Return ``{PEFT key: array}`` for an adapter tree."""
    flat = flatten(adapters)
    table = adapter_shapes(model_config, adapter_config)
    return {key: flat[f"{layer}.{name}"] for (layer, name), (key, _) in table.items()}


def adapters_from_peft(flat, model_config, adapter_config):
    """Return the adapter tree of ``{PEFT key: array}``; the keys must already match :func:`adapter_shapes`."""
    table = adapter_shapes(model_config, adapter_config)
    return unflatten({f"{layer}.{name}": flat[key] for (layer, name), (key, _) in table.items()})
