"""Hugging Face files: safetensors tensors, a Llama ``config.json``, and base weights.

Base weights load from a Hugging Face model folder: ``config.json`` plus
either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Llama (``LlamaForCausalLM``) and Mistral (``MistralForCausalLM``) folders load;
every config option that minidisel does not implement is rejected by name.
Tensors are read with the ``safetensors`` package, never unpickled, and a
tensor whose dtype cannot be converted exactly raises an error naming it.
"""

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from minidisel.checkpoint import (
    CheckpointError,
    atomic_write,
    check_keys_and_shapes,
    check_trees,
    convert_tensor,
    read_json,
    save_json,
)
from minidisel.config import ModelConfig
from minidisel.keys import base_shapes, base_to_hf, hf_key, path_from_hf_key
from minidisel.tree import unflatten

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# transformers refuses to load a safetensors file whose metadata lacks a format
SAFETENSORS_METADATA = {"format": "pt"}

# safetensors dtypes that NumPy has no type for
NON_NUMPY_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4")

# Checkpoints written by transformers before 4.31 store the rotary inverse
# frequencies, which minidisel recomputes from rope_theta.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def read_safetensors(path):
    """Return ``{key: array}`` from a safetensors file.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file,
    and for a tensor whose dtype NumPy cannot hold (bfloat16, float8).
    """
    try:
        with safe_open(str(path), framework="numpy") as file:
            keys = list(file.keys())
            for key in keys:
                dtype = file.get_slice(key).get_dtype()
                if dtype in NON_NUMPY_DTYPES:
                    raise CheckpointError(
                        f"tensor {key!r} in {path} has dtype {dtype}, which NumPy cannot represent; "
                        "convert the file to float32 first (in PyTorch: tensor.float())"
                    )
            return {key: file.get_tensor(key) for key in keys}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error


def write_safetensors(path, flat):
    """Write ``{key: array}`` to a safetensors file, atomically."""
    arrays = {key: np.asarray(value, order="C") for key, value in flat.items()}  # keeps 0-d arrays 0-d
    data = safetensors_bytes(arrays, metadata=SAFETENSORS_METADATA)
    atomic_write(path, lambda file: file.write(data))


def required_field(config, name, source):
    """Return ``config[name]``; raise :class:`CheckpointError` if the field is missing."""
    if name not in config:
        raise CheckpointError(f"{source} is missing the field {name!r}, which minidisel needs")
    return config[name]


def check_option(config, name, allowed, source):
    """Raise unless an optional field is absent or one of the ``allowed`` values."""
    if name in config and config[name] not in allowed:
        raise CheckpointError(
            f"{source}: {name}={config[name]!r} is not supported; minidisel implements only "
            f"{' or '.join(map(repr, allowed))}"
        )


def rope_theta_from_hf(config, source):
    """Return ``rope_theta`` from a transformers 4 (``rope_theta``) or 5 (``rope_parameters``) config."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported; minidisel implements 'default'")
    if "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(required_field(config, "rope_theta", source))


def model_config_from_hf(config, source, dtype="float64"):
    """Return ``(ModelConfig, tie_word_embeddings)`` for a Hugging Face Llama or Mistral ``config.json``."""
    model_type = required_field(config, "model_type", source)
    if model_type not in HF_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; minidisel loads {', '.join(HF_ARCHITECTURES)}"
        )
    check_option(config, "hidden_act", ("silu",), source)
    check_option(config, "attention_bias", (False,), source)
    check_option(config, "mlp_bias", (False,), source)
    check_option(config, "pretraining_tp", (1,), source)
    check_option(config, "attention_dropout", (0, 0.0), source)
    check_option(config, "tie_word_embeddings", (True, False), source)

    n_heads = required_field(config, "num_attention_heads", source)
    d_model = required_field(config, "hidden_size", source)
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        raise CheckpointError(
            f"{source}: head_dim={head_dim} with num_attention_heads={n_heads} differs from "
            f"hidden_size={d_model}; minidisel needs head_dim = hidden_size / num_attention_heads"
        )

    # A sliding window wider than every sequence never masks anything, so
    # limiting the length to the window keeps Mistral's attention exact.
    max_seq_len = required_field(config, "max_position_embeddings", source)
    if config.get("sliding_window"):
        max_seq_len = min(max_seq_len, config["sliding_window"])

    try:
        model_config = ModelConfig(
            arch="llama",
            vocab_size=required_field(config, "vocab_size", source),
            d_model=d_model,
            n_layers=required_field(config, "num_hidden_layers", source),
            n_heads=n_heads,
            n_kv_heads=required_field(config, "num_key_value_heads", source),
            d_ff=required_field(config, "intermediate_size", source),
            max_seq_len=max_seq_len,
            norm_eps=float(required_field(config, "rms_norm_eps", source)),
            rope_theta=rope_theta_from_hf(config, source),
            dtype=dtype,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from error
    return model_config, bool(config.get("tie_word_embeddings", False))


def hf_config_from_model(model_config):
    """Return the ``config.json`` of a Llama-style ``model_config`` for ``LlamaForCausalLM``."""
    if model_config.arch != "llama":
        raise ValueError(
            f"only arch='llama' has a Hugging Face architecture (LlamaForCausalLM), got arch={model_config.arch!r}"
        )
    return {
        "architectures": [HF_ARCHITECTURES["llama"]],
        "model_type": "llama",
        "vocab_size": model_config.vocab_size,
        "hidden_size": model_config.d_model,
        "intermediate_size": model_config.mlp_dim,
        "num_hidden_layers": model_config.n_layers,
        "num_attention_heads": model_config.n_heads,
        "num_key_value_heads": model_config.kv_heads,
        "head_dim": model_config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_config.max_seq_len,
        "rms_norm_eps": model_config.norm_eps,
        "rope_theta": model_config.rope_theta,
        "rope_parameters": {"rope_theta": model_config.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "dtype": model_config.dtype,
    }


def save_hf_model(folder, params, model_config):
    """Write ``config.json`` and ``model.safetensors`` that ``LlamaForCausalLM.from_pretrained`` loads."""
    config = hf_config_from_model(model_config)
    check_trees(model_config, params, None, None)
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS_FILE, base_to_hf(params))
    save_json(folder / CONFIG_FILE, config)


def read_sharded(folder):
    """Return ``{key: array}`` of every shard listed in ``model.safetensors.index.json``."""
    index_path = Path(folder) / INDEX_FILE
    weight_map = required_field(read_json(index_path), "weight_map", index_path)
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard files")
    flat = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} must be a file name inside {folder}")
        shard_path = Path(folder) / shard
        for key, value in read_safetensors(shard_path).items():
            if weight_map.get(key) != shard:
                raise CheckpointError(f"unexpected tensor {key!r} in {shard_path}: {INDEX_FILE} does not list it there")
            flat[key] = value
    for key, shard in weight_map.items():
        if key not in flat:
            raise CheckpointError(f"tensor {key!r} is missing from {Path(folder) / shard}, where {INDEX_FILE} lists it")
    return flat


def read_hf_weights(folder):
    """Return ``({key: array}, source)`` from ``model.safetensors`` or from its shards."""
    folder = Path(folder)
    if (folder / INDEX_FILE).exists():
        return read_sharded(folder), folder / INDEX_FILE
    if (folder / WEIGHTS_FILE).exists():
        return read_safetensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE
    raise CheckpointError(
        f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; minidisel loads safetensors weights only, "
        "never pickled pytorch_model.bin files"
    )


def tie_output_head(flat, source):
    """Add ``lm_head.weight`` as a copy of the token embedding, as tied embeddings mean."""
    embedding = flat.get(hf_key("embed_tokens.weight"))
    head = flat.get("lm_head.weight")
    if head is not None and embedding is not None and not np.array_equal(head, embedding):
        raise CheckpointError(f"{source}: tie_word_embeddings is true, but lm_head.weight differs from the embedding")
    if embedding is not None:
        flat = {**flat, "lm_head.weight": embedding}
    return flat


def load_hf_model(folder, dtype="float64"):
    """Load a Hugging Face Llama or Mistral folder; return ``(ModelConfig, params)``.

    The folder contains ``config.json`` and ``model.safetensors`` (or shards with
    an index). Tensors convert to ``dtype`` only where that is exact. With
    ``tie_word_embeddings`` the output head is a copy of the embedding, which
    is exact for a frozen base model.
    """
    folder = Path(folder)
    model_config, tied = model_config_from_hf(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE, dtype)
    flat, source = read_hf_weights(folder)
    flat = {key: value for key, value in flat.items() if not key.endswith(IGNORED_HF_SUFFIXES)}
    if tied:
        flat = tie_output_head(flat, source)

    shapes = {hf_key(path): shape for path, shape in base_shapes(model_config).items()}
    check_keys_and_shapes(flat, shapes, source)
    params = {path_from_hf_key(key): convert_tensor(value, dtype, key, source) for key, value in flat.items()}
    return model_config, unflatten(params)
