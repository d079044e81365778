"""PEFT's adapter format: ``adapter_model.safetensors`` and ``adapter_config.json``.

Tensor keys are PEFT's state-dict names (see :mod:`minidisel.keys`), for
example ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
A DISeL adapter is stored as the DISeL reference implementation stores it: a
``peft_type: "LORA"`` config with the extra fields ``disel_gate_bias_init``,
``disel_gate_normalize``, ``disel_gate_weight_init``,
``disel_gate_bottleneck_dim`` and ``disel_gate_lr_multiplier``, and gate
tensors under ``…lora_disel_gate.…``. A DoRA adapter is PEFT's own
``use_dora: true`` config with magnitude vectors under ``…lora_magnitude_vector``.

Loading is strict. Each known ``adapter_config.json`` field is required and
mapped, accepted only at the value that turns a feature off, or ignored as
metadata. An unknown field is accepted only when its value is null, false or
empty.
"""

import re
from pathlib import Path

from minidisel.adapters import adapter_paths
from minidisel.checkpoint import CheckpointError, check_keys_and_shapes, check_trees, convert_tensor, read_json, save_json
from minidisel.config import ALL_LINEAR, AdapterConfig
from minidisel.hf import read_safetensors, write_safetensors
from minidisel.keys import adapter_shapes, adapters_from_peft, adapters_to_peft, hf_key

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPE = "LORA"

# adapter_config.json field -> AdapterConfig field
LORA_FIELDS = {"r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_rslora": "use_rslora"}
DISEL_FIELDS = {
    "disel_gate_bias_init": "gate_bias_init",
    "disel_gate_normalize": "gate_normalize",
    "disel_gate_weight_init": "gate_weight_init",
    "disel_gate_bottleneck_dim": "gate_bottleneck_dim",
    "disel_gate_lr_multiplier": "gate_lr_multiplier",
}

# PEFT features that minidisel does not implement, with the values that turn them off
OFF_VALUES = {
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "rank_pattern": ({},),
    "alpha_pattern": ({},),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "use_bdlora": (None, False),
    "arrow_config": (None, {}),
}

# Initialisations that only set A and B; others (PiSSA, OLoRA, LoftQ, EVA,
# CorDA, ...) also rewrite the base weights, so the adapter would not apply to
# the original base model.
PLAIN_INITS = (True, False, "gaussian")

# Metadata, and settings that only initialise weights or configure PEFT itself
IGNORED_FIELDS = (
    "auto_mapping",
    "base_model_name_or_path",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",  # applied by resolve_targets
    "inference_mode",
    "init_lora_weights",  # checked against PLAIN_INITS
    "kasa_config",
    "loftq_config",
    "lora_ga_config",
    "megatron_core",
    "monteclora_config",
    "peft_type",  # checked in adapter_config_from_peft
    "peft_version",
    "qalora_group_size",
    "revision",
    "target_modules",  # resolved by resolve_targets
    "task_type",
    "velora_config",
)


def is_off(value):
    """True for values that leave a PEFT option unused: null, false, empty."""
    return value is None or value is False or value in ("", [], {})


def check_fields(config, source):
    """Raise for a missing required field or an option minidisel does not implement."""
    for name in ("peft_type", "target_modules", *LORA_FIELDS):
        if name not in config:
            raise CheckpointError(f"{source} is missing the field {name!r}; minidisel never guesses it")
    for name, allowed in OFF_VALUES.items():
        if name in config and config[name] not in allowed:
            raise CheckpointError(f"{source}: {name}={config[name]!r} is not supported; minidisel needs {allowed[0]!r}")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise CheckpointError(
            f"{source}: init_lora_weights={init!r} changes the base weights; minidisel loads adapters "
            f"initialised with {', '.join(map(repr, PLAIN_INITS))} only"
        )
    if not isinstance(config.get("use_dora", False), bool):
        raise CheckpointError(f"{source}: use_dora must be true or false, got {config['use_dora']!r}")
    known = set(LORA_FIELDS) | set(DISEL_FIELDS) | set(OFF_VALUES) | set(IGNORED_FIELDS) | {"use_dora"}
    for name, value in config.items():
        if name not in known and not is_off(value):
            raise CheckpointError(f"{source}: unknown option {name}={value!r} is not supported")


def block_layer_names(model_config, target_modules=ALL_LINEAR):
    """Return the Hugging Face names of the blocks' linear layers called ``target_modules``."""
    return [hf_key(path) for path in adapter_paths(model_config, AdapterConfig(target_modules=target_modules))]


def module_names(model_config):
    """Return the Hugging Face names of every module PEFT could adapt: block layers, embedding and head."""
    return block_layer_names(model_config) + [hf_key("embed_tokens"), "lm_head"]


def peft_matches(pattern, key):
    """Return True if PEFT's ``target_modules`` (or ``exclude_modules``) value selects module ``key``.

    A string is a regular expression matched against the whole name; a list
    selects names that equal an entry or end with ``"." + entry``.
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return key in pattern or any(key.endswith(f".{entry}") for entry in pattern)


def resolve_targets(config, model_config, source):
    """Return minidisel's ``target_modules`` for PEFT's ``target_modules`` and ``exclude_modules``."""
    targets, excluded = config["target_modules"], config.get("exclude_modules")
    if not isinstance(targets, (str, list)) or (excluded is not None and not isinstance(excluded, (str, list))):
        raise CheckpointError(f"{source}: target_modules and exclude_modules must be strings or lists of names")
    if targets == ALL_LINEAR:
        targets = block_layer_names(model_config)  # as PEFT: every linear layer but the output head

    chosen = [
        name for name in module_names(model_config)
        if peft_matches(targets, name) and not (excluded and peft_matches(excluded, name))
    ]
    if not chosen:
        raise CheckpointError(f"{source}: target_modules {targets!r} selects no linear layer of the model")
    for name in chosen:
        if "layers." not in name:
            raise CheckpointError(f"{source}: target_modules selects {name!r}; minidisel adapts only block layers")

    # minidisel adapts the same layer names in every block
    names = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in chosen))
    if sorted(block_layer_names(model_config, names)) != sorted(chosen):
        raise CheckpointError(
            f"{source}: target_modules adapts {', '.join(names)} in some blocks only; minidisel adapts "
            "the same layers in every block"
        )
    return ALL_LINEAR if set(names) == set(model_config.linear_modules) else names


def adapter_config_from_peft(config, model_config, source):
    """Return the :class:`AdapterConfig` of a PEFT ``adapter_config.json`` (LoRA, DoRA, or DISeL with gate fields)."""
    if config.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(
            f"{source}: peft_type {config.get('peft_type')!r} is not supported; minidisel reads "
            f"{PEFT_TYPE!r} adapters (plain LoRA, DoRA, or DISeL with disel_gate_* fields)"
        )
    check_fields(config, source)
    fields = {ours: config[theirs] for theirs, ours in LORA_FIELDS.items()}

    disel = [name for name in DISEL_FIELDS if name in config]
    if disel:
        missing = [name for name in DISEL_FIELDS if name not in config]
        if missing:
            raise CheckpointError(f"{source} has DISeL gate fields but is missing {', '.join(missing)}")
        fields.update({ours: config[theirs] for theirs, ours in DISEL_FIELDS.items()})
    if disel and config.get("use_dora"):
        raise CheckpointError(f"{source} sets both use_dora and DISeL gate fields; an adapter is one or the other")

    fields["target_modules"] = resolve_targets(config, model_config, source)
    method = "disel" if disel else "lora"
    if config.get("use_dora"):
        method = "dora"
    try:
        return AdapterConfig(method=method, **fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from error


def peft_config_from_adapter(adapter_config, model_config):
    """Return the ``adapter_config.json`` contents for ``adapter_config`` (PEFT's field names)."""
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "r": adapter_config.r,
        "lora_alpha": adapter_config.lora_alpha,
        "lora_dropout": adapter_config.lora_dropout,
        "use_rslora": adapter_config.use_rslora,
        "target_modules": list(adapter_config.targets_for(model_config)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": adapter_config.method == "dora",
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    if adapter_config.method == "disel":
        config.update({theirs: getattr(adapter_config, ours) for theirs, ours in DISEL_FIELDS.items()})
    return config


def save_peft_adapter(folder, adapters, model_config, adapter_config):
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's format.

    A LoRA or DoRA folder loads with ``PeftModel.from_pretrained``; a DISeL folder
    loads with the DISeL reference implementation, which adds the gates.
    """
    check_trees(model_config, None, adapter_config, adapters)
    folder = Path(folder)
    write_safetensors(folder / WEIGHTS_FILE, adapters_to_peft(adapters, model_config, adapter_config))
    save_json(folder / CONFIG_FILE, peft_config_from_adapter(adapter_config, model_config))


def load_peft_adapter(folder, model_config):
    """Load a PEFT adapter folder for the base model of ``model_config``; return ``(AdapterConfig, adapters)``.

    Tensors convert to ``model_config.dtype`` only where that is exact.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    adapter_config = adapter_config_from_peft(read_json(config_path), model_config, config_path)
    if not weights_path.exists() and (folder / "adapter_model.bin").exists():
        raise CheckpointError(f"{folder} has only adapter_model.bin, a pickle file; minidisel loads safetensors only")

    flat = read_safetensors(weights_path)
    table = adapter_shapes(model_config, adapter_config)
    check_keys_and_shapes(flat, {key: shape for key, shape in table.values()}, weights_path)
    flat = {key: convert_tensor(value, model_config.dtype, key, weights_path) for key, value in flat.items()}
    return adapter_config, adapters_from_peft(flat, model_config, adapter_config)
