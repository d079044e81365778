import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import tiny_setup

from minidisel import forward
from minidisel.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_tree,
    read_npz,
    save_checkpoint,
    save_tree,
)
from minidisel.tree import flatten


def trees_equal(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    return flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("fields", [dict(method="lora"), dict(method="disel", gate_bottleneck_dim=2)])
def test_checkpoint_round_trip(arch, fields, tmp_path):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, **fields)
    save_checkpoint(tmp_path, config, params, adapter_config, adapters)
    loaded = load_checkpoint(tmp_path)

    assert loaded.model_config == config
    assert loaded.adapter_config == adapter_config
    assert trees_equal(loaded.params, params)
    assert trees_equal(loaded.adapters, adapters)
    before = forward(params, tokens, config, adapters, adapter_config)
    after = forward(loaded.params, tokens, loaded.model_config, loaded.adapters, loaded.adapter_config)
    assert np.array_equal(before, after)


def test_checkpoint_config_has_format_version(tmp_path):
    config, params, _, _, _ = tiny_setup("llama")
    save_checkpoint(tmp_path, config, params)
    written = json.loads((tmp_path / "config.json").read_text())

    assert written["format"] == "minidisel-checkpoint"
    assert written["format_version"] == 1
    assert written["adapter"] is None
    assert set(written["files"]) == {"base.npz"}
    assert load_checkpoint(tmp_path).adapters is None


def test_adapter_only_checkpoint(tmp_path):
    config, params, adapter_config, adapters, _ = tiny_setup("llama")
    save_checkpoint(tmp_path, config, adapter_config=adapter_config, adapters=adapters)
    loaded = load_checkpoint(tmp_path)
    assert loaded.params is None
    assert trees_equal(loaded.adapters, adapters)


def edit_config(folder, edit):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c["adapter"].pop("use_rslora"), "missing the field(s) use_rslora"),
        (lambda c: c["model"].update(rope_scaling=2.0), "unknown field(s) rope_scaling"),
        (lambda c: c.update(format_version=2), "format_version 2"),
        (lambda c: c.update(format="other"), "not a minidisel checkpoint"),
        (lambda c: c["model"].update(n_heads=3), "invalid ModelConfig"),
        (lambda c: c["files"].update({"base.npz": "0" * 64}), "does not match the SHA-256"),
    ],
)
def test_checkpoint_config_errors(edit, words, tmp_path):
    config, params, adapter_config, adapters, _ = tiny_setup("llama")
    save_checkpoint(tmp_path, config, params, adapter_config, adapters)
    edit_config(tmp_path, edit)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path)
    assert words in str(raised.value)
    assert "config.json" in str(raised.value) or "base.npz" in str(raised.value)


def test_checkpoint_rejects_tensor_of_other_model(tmp_path):
    config, params, _, _, _ = tiny_setup("llama")
    save_checkpoint(tmp_path, config, params)
    edit_config(tmp_path, lambda c: c["model"].update(d_ff=16))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.gate_proj.weight' in .*base.npz has shape \(12, 8\), expected \(16, 8\)"):
        load_checkpoint(tmp_path)


def test_save_checkpoint_rejects_mismatched_tree(tmp_path):
    config, params, lora_config, lora_adapters, _ = tiny_setup("llama", method="lora")
    disel_config = replace(lora_config, method="disel")
    with pytest.raises(CheckpointError, match="tensor 'layers.0.self_attn.q_proj.W_g' is missing"):
        save_checkpoint(tmp_path, config, params, disel_config, lora_adapters)
    with pytest.raises(ValueError, match="given together"):
        save_checkpoint(tmp_path, config, params, adapters=lora_adapters)
    assert not (tmp_path / "config.json").exists()


def test_npz_rejects_object_arrays(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, good=np.zeros(2), bad=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match=r"cannot read tensor 'bad' from .*pickled.npz"):
        read_npz(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_npz_rejects_damaged_files(damage, tmp_path):
    path = tmp_path / "tree.npz"
    save_tree(path, {"layer": {"weight": np.ones((4, 4))}})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="tree.npz"):
        load_tree(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "weights.npz"
    target.write_bytes(b"old contents")

    def failing_write(file):
        file.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing_write)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.npz"]
