import json

import numpy as np
import pytest
from scipy.special import expit, logsumexp

from minidisel import AdapterConfig, forward
from minidisel.cli import main
from minidisel.gradcheck import numerical_gradient
from minidisel.hf import read_safetensors
from minidisel.keys import adapters_to_peft
from minidisel.nn import cross_entropy
from minidisel.oracle import GOLDEN_MODELS, export_golden, verify_candidate
from minidisel.peft_format import load_peft_adapter
from minidisel.tree import unflatten


@pytest.fixture(scope="module")
def llama_golden(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    adapter_config = AdapterConfig(method="disel", r=4, lora_alpha=8.0)
    export_golden(folder, GOLDEN_MODELS["llama"], adapter_config, seed=0)
    return folder


def outputs_of(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    golden = read_safetensors(folder / "golden.safetensors")
    return {key: golden[key] for key in manifest["outputs"]}


def base_params(golden):
    """Return the base parameter tree stored in a golden file."""
    flat = {}
    for key, value in golden.items():
        if key.startswith("model."):
            flat[key[len("model."):]] = value
        elif key.startswith("lm_head."):
            flat[key] = value
    return unflatten(flat)


def test_manifest_describes_every_tensor(llama_golden):
    manifest = json.loads((llama_golden / "manifest.json").read_text())
    golden = read_safetensors(llama_golden / "golden.safetensors")

    assert manifest["format"] == "minidisel-golden"
    assert set(manifest["versions"]) == {"minidisel", "numpy", "autograd", "python"}
    assert manifest["tolerances"]["float64"] == {"atol": 1e-10, "rtol": 1e-10}
    assert set(manifest["tensors"]) == set(golden)
    for key, entry in manifest["tensors"].items():
        assert entry["shape"] == list(golden[key].shape), key
        assert entry["dtype"] == str(golden[key].dtype), key
    assert manifest["tensors"]["tokens"]["role"] == "input"
    assert manifest["tensors"]["lm_head.weight"]["role"] == "parameter"
    assert manifest["tensors"]["loss"] == {"shape": [], "dtype": "float64", "role": "output"}
    assert len([k for k in manifest["outputs"] if k.startswith("gates.")]) == 2 * 7
    assert len([k for k in manifest["outputs"] if k.startswith("grads.")]) == 2 * 7 * 4


def test_export_writes_loadable_folders(llama_golden):
    assert (llama_golden / "base" / "config.json").exists()
    golden = read_safetensors(llama_golden / "golden.safetensors")
    adapter_config, adapters = load_peft_adapter(llama_golden / "adapter", GOLDEN_MODELS["llama"])
    for key, value in adapters_to_peft(adapters, GOLDEN_MODELS["llama"], adapter_config).items():
        assert np.array_equal(value, golden[key]), key


def test_golden_loss_is_cross_entropy_of_logits(llama_golden):
    golden = read_safetensors(llama_golden / "golden.safetensors")
    logits, targets = golden["logits"], golden["targets"]
    log_probs = logits - logsumexp(logits, axis=-1, keepdims=True)
    expected = -np.mean(np.take_along_axis(log_probs, targets[..., None], axis=-1))
    assert abs(golden["loss"] - expected) < 1e-13


def test_golden_gate_of_first_layer_by_hand(llama_golden):
    golden = read_safetensors(llama_golden / "golden.safetensors")
    config = GOLDEN_MODELS["llama"]

    # the input of layers.0.self_attn.q_proj is RMSNorm(embedding)
    x = golden["model.embed_tokens.weight"][golden["tokens"]]
    x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + config.norm_eps) * golden["model.layers.0.input_layernorm.weight"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    W_g, b_g = golden[f"{prefix}.lora_disel_gate.linear.weight"], golden[f"{prefix}.lora_disel_gate.linear.bias"]
    expected = expit(x @ W_g.T + b_g)
    assert np.max(np.abs(golden[f"gates.{prefix}"] - expected)) < 1e-14


def test_golden_gradients_match_finite_differences(llama_golden):
    golden = read_safetensors(llama_golden / "golden.safetensors")
    config = GOLDEN_MODELS["llama"]
    adapter_config, adapters = load_peft_adapter(llama_golden / "adapter", config)
    params, tokens, targets = base_params(golden), golden["tokens"], golden["targets"]
    mask = np.ones(tokens.shape, dtype=bool)

    def loss(trainable):
        return cross_entropy(forward(params, tokens, config, trainable, adapter_config), targets, mask)

    numeric = numerical_gradient(loss, adapters, max_entries=2, rng=np.random.default_rng(0))
    peft_keys = adapters_to_peft(unflatten({path: path for path in numeric}), config, adapter_config)  # {PEFT key: path}
    for key, path in peft_keys.items():
        indices, values = numeric[path]
        stored = np.array([golden[f"grads.{key}"][index] for index in indices])
        assert np.max(np.abs(stored - values)) < 1e-8, key


def test_golden_outputs_verify_against_themselves(llama_golden, tmp_path):
    np.savez(tmp_path / "same.npz", **outputs_of(llama_golden))
    comparisons, atol, rtol = verify_candidate(llama_golden, tmp_path / "same.npz")
    assert all(c.passed for c in comparisons)
    assert all(c.max_abs == 0.0 for c in comparisons)
    assert (atol, rtol) == (1e-10, 1e-10)


@pytest.mark.parametrize(
    "damage, status",
    [
        (lambda o: o.update(logits=o["logits"] * np.nan), "mismatch"),
        (lambda o: o.update(logits=o["logits"].astype(np.int64)), "wrong dtype"),
        (lambda o: o.update(logits=o["logits"][:, :3]), "wrong shape"),
        (lambda o: o.update(loss=o["loss"] + 1e-9), "mismatch"),
    ],
)
def test_verify_flags_bad_tensors(damage, status, llama_golden, tmp_path):
    outputs = outputs_of(llama_golden)
    damage(outputs)
    np.savez(tmp_path / "bad.npz", **outputs)
    comparisons, _, _ = verify_candidate(llama_golden, tmp_path / "bad.npz")
    failed = [c for c in comparisons if not c.passed]
    assert len(failed) == 1
    assert failed[0].status == status


def test_float32_preset_accepts_float32_rounding(llama_golden, tmp_path):
    outputs = {key: value.astype(np.float32) for key, value in outputs_of(llama_golden).items()}
    np.savez(tmp_path / "single.npz", **outputs)
    assert not all(c.passed for c in verify_candidate(llama_golden, tmp_path / "single.npz")[0])
    assert all(c.passed for c in verify_candidate(llama_golden, tmp_path / "single.npz", "float32")[0])


def test_cli_verify_exit_codes(llama_golden, tmp_path, capsys):
    outputs = outputs_of(llama_golden)
    np.savez(tmp_path / "good.npz", **outputs)
    outputs["extra"] = np.zeros(3)
    np.savez(tmp_path / "extra.npz", **outputs)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01")

    assert main(["oracle", "verify", str(llama_golden), str(tmp_path / "good.npz")]) == 0
    assert "PASS: all 72 tensors match" in capsys.readouterr().out
    assert main(["oracle", "verify", str(llama_golden), str(tmp_path / "extra.npz")]) == 1
    assert "extra" in capsys.readouterr().out
    assert main(["oracle", "verify", str(llama_golden), str(tmp_path / "broken.safetensors")]) == 2
    assert "cannot read safetensors file" in capsys.readouterr().err
    assert main(["oracle", "verify", str(llama_golden), str(tmp_path / "good.txt")]) == 2
    assert "must be a .npz or .safetensors file" in capsys.readouterr().err


def test_cli_export_gpt_lora(tmp_path, capsys):
    status = main(["oracle", "export", str(tmp_path), "--arch", "gpt", "--method", "lora", "--rank", "2", "--seed", "3"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert status == 0
    assert not (tmp_path / "base").exists()  # no Hugging Face class has the GPT-style layout
    assert manifest["adapter_config"]["r"] == 2
    assert not [key for key in manifest["outputs"] if key.startswith("gates.")]
    assert "model.embed_positions.weight" in manifest["tensors"]


def test_cli_export_rejects_bad_options(tmp_path, capsys):
    assert main(["oracle", "export", str(tmp_path), "--gate-bottleneck-dim", "0"]) == 2
    assert "gate_bottleneck_dim must be >= 1" in capsys.readouterr().err
    assert main(["oracle", "export", str(tmp_path), "--seq-len", "40"]) == 2
    assert "seq_len must be in [1, 16]" in capsys.readouterr().err
    assert main(["oracle", "export", str(tmp_path), "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_export_is_reproducible(tmp_path):
    config = AdapterConfig(method="disel", r=2, gate_bottleneck_dim=3)
    export_golden(tmp_path / "a", GOLDEN_MODELS["gpt"], config, seed=7)
    export_golden(tmp_path / "b", GOLDEN_MODELS["gpt"], config, seed=7)
    a, b = read_safetensors(tmp_path / "a" / "golden.safetensors"), read_safetensors(tmp_path / "b" / "golden.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[key], b[key]) for key in a)
