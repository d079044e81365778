import json

import numpy as np
import pytest
from conftest import tiny_model, tiny_setup

from minidisel import AdapterConfig, forward
from minidisel.checkpoint import CheckpointError
from minidisel.hf import read_safetensors, write_safetensors
from minidisel.peft_format import (
    adapter_config_from_peft,
    load_peft_adapter,
    peft_config_from_adapter,
    save_peft_adapter,
)
from minidisel.tree import flatten

MODEL = tiny_model("llama")


def peft_config(**changes):
    """Return an adapter_config.json dict as PEFT writes it, with ``changes``."""
    config = peft_config_from_adapter(AdapterConfig(method="lora", r=2, target_modules=("q_proj", "v_proj")), MODEL)
    config.update(changes)
    return config


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize(
    "fields",
    [
        dict(method="lora", use_rslora=True),
        dict(method="disel", gate_normalize=True, gate_bias_init=-5.0, gate_lr_multiplier=3.0),
        dict(method="disel", gate_bottleneck_dim=2, target_modules=("q_proj", "down_proj")),
        dict(method="dora", target_modules=("q_proj", "down_proj")),
    ],
)
def test_peft_adapter_round_trip(arch, fields, tmp_path):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, **fields)
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    loaded_config, loaded = load_peft_adapter(tmp_path, config)

    assert loaded_config == adapter_config
    assert all(np.array_equal(flatten(loaded)[k], v) for k, v in flatten(adapters).items())
    assert np.array_equal(
        forward(params, tokens, config, loaded, loaded_config), forward(params, tokens, config, adapters, adapter_config)
    )


def test_disel_fields_use_reference_names(tmp_path):
    config, _, adapter_config, adapters, _ = tiny_setup("llama", method="disel", gate_bottleneck_dim=2)
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = read_safetensors(tmp_path / "adapter_model.safetensors")

    assert written["peft_type"] == "LORA"
    assert written["disel_gate_bottleneck_dim"] == 2
    assert written["disel_gate_bias_init"] == -3.0
    assert written["disel_gate_weight_init"] == "random"
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_disel_gate.proj_down.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_disel_gate.proj_up.bias" in keys


@pytest.mark.parametrize(
    "targets, excluded, expected",
    [
        (["q_proj", "v_proj"], None, ("q_proj", "v_proj")),
        ("all-linear", None, "all-linear"),
        ("all-linear", ["down_proj"], ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
        (r".*\.(k_proj|up_proj)", None, ("k_proj", "up_proj")),
        (["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], None, ("down_proj",)),
        (["self_attn.o_proj"], None, ("o_proj",)),
    ],
)
def test_target_modules_match_as_in_peft(targets, excluded, expected):
    config = adapter_config_from_peft(peft_config(target_modules=targets, exclude_modules=excluded), MODEL, "a.json")
    assert config.target_modules == expected


@pytest.mark.parametrize(
    "targets, words",
    [
        (["model.layers.0.self_attn.q_proj"], "in some blocks only"),
        (["lm_head"], "minidisel adapts only block layers"),
        (["embed_tokens", "q_proj"], "minidisel adapts only block layers"),
        (["c_attn"], "selects no linear layer"),
        (7, "must be strings or lists"),
    ],
)
def test_unsupported_target_modules_are_rejected(targets, words):
    with pytest.raises(CheckpointError, match="a.json") as raised:
        adapter_config_from_peft(peft_config(target_modules=targets), MODEL, "a.json")
    assert words in str(raised.value)


@pytest.mark.parametrize("field", ["use_rslora", "lora_alpha", "r", "lora_dropout", "target_modules", "peft_type"])
def test_required_fields_are_never_defaulted(field):
    config = peft_config()
    del config[field]
    with pytest.raises(CheckpointError, match=f"a.json.*{field}"):
        adapter_config_from_peft(config, MODEL, "a.json")


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(peft_type="IA3"), "peft_type 'IA3' is not supported"),
        (dict(use_dora="yes"), "use_dora must be true or false, got 'yes'"),
        (dict(use_dora=True, **{name: None for name in ("disel_gate_bias_init", "disel_gate_normalize",
                                                         "disel_gate_weight_init", "disel_gate_bottleneck_dim",
                                                         "disel_gate_lr_multiplier")}),
         "sets both use_dora and DISeL gate fields"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
        (dict(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' changes the base weights"),
        (dict(use_magic=True), "unknown option use_magic=True"),
        (dict(disel_gate_bias_init=-3.0), "missing disel_gate_normalize"),
        (dict(r=0), "r must be >= 1"),
        (dict(lora_dropout=1.5), "lora_dropout must be in"),
    ],
)
def test_unsupported_options_are_rejected(changes, words):
    with pytest.raises(CheckpointError, match="a.json") as raised:
        adapter_config_from_peft(peft_config(**changes), MODEL, "a.json")
    assert words in str(raised.value)


def test_unknown_fields_that_are_off_are_accepted():
    config = adapter_config_from_peft(peft_config(some_new_feature=None, another=False, third={}), MODEL, "a.json")
    assert config.r == 2


def test_use_rslora_changes_the_loaded_scaling():
    plain = adapter_config_from_peft(peft_config(r=4, lora_alpha=8, use_rslora=False), MODEL, "a.json")
    stabilised = adapter_config_from_peft(peft_config(r=4, lora_alpha=8, use_rslora=True), MODEL, "a.json")
    assert plain.scaling == 2.0
    assert stabilised.scaling == 4.0


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f, k: f.pop(k), "is missing from"),
        (lambda f, k: f.update({k.replace("lora_A", "lora_C"): f[k]}), "unexpected tensor"),
        (lambda f, k: f.update({k: f[k][:1]}), "has shape"),
        (lambda f, k: f.update({k: f[k].astype(np.int32)}), "has dtype int32"),
    ],
)
def test_adapter_tensors_are_checked_strictly(damage, words, tmp_path):
    config, _, adapter_config, adapters, _ = tiny_setup("llama", method="lora")
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    path = tmp_path / "adapter_model.safetensors"
    flat = read_safetensors(path)
    damage(flat, "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
    write_safetensors(path, flat)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors") as raised:
        load_peft_adapter(tmp_path, config)
    assert words in str(raised.value)


def test_adapter_for_other_base_is_rejected(tmp_path):
    config, _, adapter_config, adapters, _ = tiny_setup("llama", method="lora")
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    wider = tiny_model("llama", d_model=12, n_heads=2)
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors has shape \(\d+, \d+\), expected"):
        load_peft_adapter(tmp_path, wider)


def test_pickled_adapter_is_not_loaded(tmp_path):
    config, _, adapter_config, adapters, _ = tiny_setup("llama", method="lora")
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin, a pickle file"):
        load_peft_adapter(tmp_path, config)


def test_dora_uses_peft_names(tmp_path):
    config, _, adapter_config, adapters, _ = tiny_setup("llama", method="dora")
    save_peft_adapter(tmp_path, adapters, config, adapter_config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    assert adapter_config_from_peft(saved, config, "a.json").method == "dora"
    tensors = read_safetensors(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"
    assert np.array_equal(tensors[key], adapters["layers"]["1"]["mlp"]["up_proj"]["m"])
    assert sum(name.endswith(".lora_magnitude_vector") for name in tensors) == config.n_layers * len(config.linear_modules)
