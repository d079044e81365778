import json
import struct

import numpy as np
import pytest
from conftest import tiny_model, tiny_setup

from minidisel import forward, init_params
from minidisel.checkpoint import CheckpointError
from minidisel.hf import (
    hf_config_from_model,
    load_hf_model,
    model_config_from_hf,
    read_safetensors,
    save_hf_model,
    write_safetensors,
)
from minidisel.keys import base_to_hf
from minidisel.tree import flatten


def saved_llama(folder, **overrides):
    """Save a tiny Llama with save_hf_model; return its config, params and HF tensors."""
    config = tiny_model("llama", n_heads=4, n_kv_heads=2, **overrides)
    params = init_params(config, np.random.default_rng(0))
    save_hf_model(folder, params, config)
    return config, params, base_to_hf(params)


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_hf_config_round_trip():
    config = tiny_model("llama", n_heads=4, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6)
    loaded, tied = model_config_from_hf(hf_config_from_model(config), "config.json")
    assert loaded == config
    assert tied is False


def test_transformers_4_config_reads_rope_theta():
    hf = hf_config_from_model(tiny_model("llama"))
    del hf["rope_parameters"]
    hf["rope_theta"] = 123.0
    assert model_config_from_hf(hf, "config.json")[0].rope_theta == 123.0


def test_mistral_sliding_window_limits_length():
    hf = {**hf_config_from_model(tiny_model("llama", max_seq_len=32)), "model_type": "mistral", "sliding_window": 8}
    assert model_config_from_hf(hf, "config.json")[0].max_seq_len == 8


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(mlp_bias=True), "mlp_bias=True is not supported"),
        (dict(head_dim=8), "head_dim=8"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}), "rope_type 'llama3' is not supported"),
        (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1 is not supported"),
        (dict(num_key_value_heads=3), "n_heads must be a multiple of n_kv_heads"),
    ],
)
def test_unsupported_hf_options_are_rejected(change, words):
    hf = {**hf_config_from_model(tiny_model("llama", n_heads=4, n_kv_heads=2)), **change}
    with pytest.raises(CheckpointError, match="config.json") as raised:
        model_config_from_hf(hf, "config.json")
    assert words in str(raised.value)


@pytest.mark.parametrize("field", ["rms_norm_eps", "num_key_value_heads", "vocab_size"])
def test_missing_hf_field_is_never_defaulted(field):
    hf = hf_config_from_model(tiny_model("llama"))
    del hf[field]
    with pytest.raises(CheckpointError, match=f"missing the field '{field}'"):
        model_config_from_hf(hf, "config.json")


def test_hf_model_round_trip(tmp_path):
    config, params, _ = saved_llama(tmp_path)
    loaded_config, loaded = load_hf_model(tmp_path)
    tokens = np.array([[1, 2, 3, 4]])
    assert loaded_config == config
    assert np.array_equal(forward(loaded, tokens, config), forward(params, tokens, config))


def test_gpt_has_no_hf_architecture(tmp_path):
    config, params, _, _, _ = tiny_setup("gpt")
    with pytest.raises(ValueError, match="only arch='llama' has a Hugging Face architecture"):
        save_hf_model(tmp_path, params, config)


def write_shards(folder, flat, n_shards, index_edit=None):
    keys = sorted(flat)
    weight_map = {}
    for shard in range(n_shards):
        name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {key: flat[key] for key in keys[shard::n_shards]}
        write_safetensors(folder / name, part)
        weight_map.update({key: name for key in part})
    index = {"metadata": {}, "weight_map": weight_map}
    if index_edit:
        index_edit(index)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_weights_load(tmp_path):
    config, params, flat = saved_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    write_shards(tmp_path, flat, 3)
    _, loaded = load_hf_model(tmp_path)
    assert all(np.array_equal(flatten(loaded)[k], v) for k, v in flatten(params).items())


def test_shard_missing_a_listed_tensor(tmp_path):
    _, _, flat = saved_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    write_shards(tmp_path, flat, 2, lambda index: index["weight_map"].update({"model.extra.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.extra.weight' is missing from .*model-00001-of-00002"):
        load_hf_model(tmp_path)


def test_shard_with_unlisted_tensor(tmp_path):
    _, _, flat = saved_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    write_shards(tmp_path, flat, 2, lambda index: index["weight_map"].pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.norm.weight' in .*safetensors"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f: f.pop("model.layers.1.mlp.up_proj.weight"), "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
        (lambda f: f.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(8)}), "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
        (lambda f: f.update({"model.norm.weight": np.ones(7)}), "'model.norm.weight' in .* has shape (7,), expected (8,)"),
        (lambda f: f.update({"lm_head.weight": np.ones((11, 8), dtype=np.int64)}), "'lm_head.weight' in .* has dtype int64"),
    ],
)
def test_hf_weights_are_checked_strictly(damage, words, tmp_path):
    _, _, flat = saved_llama(tmp_path)
    damage(flat)
    write_safetensors(tmp_path / "model.safetensors", flat)
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_hf_model(tmp_path)


def test_float16_widens_and_float64_does_not_narrow(tmp_path):
    _, _, flat = saved_llama(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {k: v.astype(np.float16) for k, v in flat.items()})
    _, params = load_hf_model(tmp_path)
    assert params["norm"]["weight"].dtype == np.float64
    assert np.array_equal(params["norm"]["weight"], flat["model.norm.weight"].astype(np.float16).astype(np.float64))

    write_safetensors(tmp_path / "model.safetensors", flat)
    with pytest.raises(CheckpointError, match="float64, which float32 cannot represent exactly"):
        load_hf_model(tmp_path, dtype="float32")


def test_tied_embeddings_copy_the_head(tmp_path):
    _, _, flat = saved_llama(tmp_path)
    edit_json(tmp_path / "config.json", lambda c: c.update(tie_word_embeddings=True))
    flat.pop("lm_head.weight")
    flat["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, dtype=np.float32)  # old checkpoints store it
    write_safetensors(tmp_path / "model.safetensors", flat)
    _, params = load_hf_model(tmp_path)
    assert np.array_equal(params["lm_head"]["weight"], flat["model.embed_tokens.weight"])


def bfloat16_file(path):
    """Write a safetensors file with one BF16 tensor (NumPy cannot write bfloat16)."""
    header = json.dumps({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x80\x3f\x00\x40")


def test_bfloat16_is_rejected_by_name(tmp_path):
    bfloat16_file(tmp_path / "bf16.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'x' in .*bf16.safetensors has dtype BF16"):
        read_safetensors(tmp_path / "bf16.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_safetensors_are_rejected(damage, tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.ones((4, 4))})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 3)
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        read_safetensors(path)


def test_pickle_checkpoints_are_not_loaded(tmp_path):
    saved_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never pickled pytorch_model.bin"):
        load_hf_model(tmp_path)
