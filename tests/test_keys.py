from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model, tiny_setup

from minidisel import AdapterConfig, init_adapters, init_params
from minidisel.keys import (
    ADAPTER_KEYS,
    BASE_KEYS,
    adapter_shapes,
    adapters_from_peft,
    adapters_to_peft,
    base_shapes,
    base_to_hf,
    hf_key,
    path_from_hf_key,
)
from minidisel.tree import flatten

DOCS = Path(__file__).resolve().parent.parent / "docs" / "oracle.md"


def shape_text(symbols):
    text = ", ".join(symbol.replace("*", "·") for symbol in symbols)
    return f"({text},)" if len(symbols) == 1 else f"({text})"


def mapping_table():
    """Render the key tables of minidisel.keys as the markdown table docs/oracle.md must contain."""
    lines = [
        "| minidisel path | Hugging Face / PEFT key | shape | present in |",
        "|---|---|---|---|",
    ]
    for row in BASE_KEYS:
        lines.append(f"| `{row.path}` | `{row.hf_key}` | {shape_text(row.shape)} | {', '.join(row.archs)} |")
    for row in ADAPTER_KEYS:
        path = f"layers.N.GROUP.LAYER.{row.name}"
        key = f"base_model.model.model.layers.N.GROUP.LAYER.{row.suffix}"
        lines.append(f"| `{path}` | `{key}` | {shape_text(row.shape)} | {row.used_by} |")
    return "\n".join(lines)


def test_docs_contain_the_mapping_table():
    assert mapping_table() in DOCS.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "overrides",
    [dict(arch="gpt"), dict(arch="llama"), dict(arch="llama", n_kv_heads=2, n_heads=4, d_ff=20, n_layers=11)],
)
def test_base_shapes_match_init(overrides):
    config = tiny_model(**overrides)
    params = init_params(config, np.random.default_rng(0))
    assert base_shapes(config) == {path: value.shape for path, value in flatten(params).items()}


@pytest.mark.parametrize(
    "fields",
    [
        dict(method="lora"),
        dict(method="disel"),
        dict(method="disel", gate_bottleneck_dim=2, target_modules=("k_proj", "gate_proj")),
    ],
)
def test_adapter_shapes_match_init(fields):
    config = tiny_model("llama", n_heads=4, n_kv_heads=2)
    params = init_params(config, np.random.default_rng(0))
    adapter_config = AdapterConfig(r=3, **fields)
    adapters = init_adapters(params, config, adapter_config, np.random.default_rng(1))
    table = adapter_shapes(config, adapter_config)
    assert {f"{layer}.{name}": shape for (layer, name), (_, shape) in table.items()} == {
        path: value.shape for path, value in flatten(adapters).items()
    }


def test_hf_keys_follow_llama_state_dict():
    assert hf_key("layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_key("norm.weight") == "model.norm.weight"
    assert hf_key("lm_head.weight") == "lm_head.weight"
    assert path_from_hf_key("model.embed_tokens.weight") == "embed_tokens.weight"
    assert path_from_hf_key("lm_head.weight") == "lm_head.weight"
    assert path_from_hf_key("transformer.wte.weight") is None


def test_peft_keys_follow_peft_state_dict():
    config, params, adapter_config, adapters, _ = tiny_setup("llama", method="disel", gate_bottleneck_dim=2)
    flat = adapters_to_peft(adapters, config, adapter_config)
    prefix = "base_model.model.model.layers.1.mlp.down_proj."
    assert np.array_equal(flat[prefix + "lora_A.weight"], adapters["layers"]["1"]["mlp"]["down_proj"]["A"])
    assert np.array_equal(flat[prefix + "lora_disel_gate.proj_up.bias"], adapters["layers"]["1"]["mlp"]["down_proj"]["b_g"])
    assert np.array_equal(flat[prefix + "lora_disel_gate.proj_down.weight"], adapters["layers"]["1"]["mlp"]["down_proj"]["V"])
    assert len(flat) == len(flatten(adapters))
    back = adapters_from_peft(flat, config, adapter_config)
    assert all(np.array_equal(a, b) for a, b in zip(flatten(back).values(), flatten(adapters).values()))


def test_full_gate_keys():
    config, _, adapter_config, adapters, _ = tiny_setup("gpt", method="disel")
    flat = adapters_to_peft(adapters, config, adapter_config)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    assert flat[prefix + "lora_disel_gate.linear.weight"].shape == (adapter_config.r, config.d_model)
    assert flat[prefix + "lora_disel_gate.linear.bias"].shape == (adapter_config.r,)


def test_base_to_hf_renames_every_tensor():
    config, params, _, _, _ = tiny_setup("llama")
    flat = base_to_hf(params)
    assert set(flat) == {hf_key(path) for path in base_shapes(config)}
    assert "lm_head.weight" in flat
    assert "model.norm.weight" in flat
