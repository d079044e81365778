import numpy as np
import pytest
from conftest import tiny_model, tiny_setup

from minidisel import AdapterConfig, ModelConfig, forward, init_adapters, init_params
from minidisel.tree import flatten


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_forward_shapes(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch)
    logits, gates = forward(params, tokens, config, adapters, adapter_config, return_gates=True)
    assert logits.shape == (2, 5, config.vocab_size)
    flat = flatten(gates)
    assert len(flat) == config.n_layers * len(config.linear_modules)
    for path, g in flat.items():
        assert g.shape == (2, 5, adapter_config.r), path


def test_linear_weights_use_torch_layout():
    config = tiny_model("llama", d_model=8, n_heads=4, n_kv_heads=2, d_ff=12)
    params = init_params(config, np.random.default_rng(0))
    layer = params["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["weight"].shape == (8, 8)
    assert layer["self_attn"]["k_proj"]["weight"].shape == (4, 8)  # 2 kv heads of width 2
    assert layer["mlp"]["gate_proj"]["weight"].shape == (12, 8)
    assert layer["mlp"]["down_proj"]["weight"].shape == (8, 12)
    assert "bias" not in layer["self_attn"]["q_proj"]
    assert params["lm_head"]["weight"].shape == (config.vocab_size, 8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dtype_is_kept(dtype):
    config = tiny_model(dtype=dtype)
    params = init_params(config, np.random.default_rng(0))
    adapters = init_adapters(params, config, AdapterConfig(r=2), np.random.default_rng(1))
    for leaf in list(flatten(params).values()) + list(flatten(adapters).values()):
        assert leaf.dtype == np.dtype(dtype)
    logits = forward(params, np.zeros((1, 3), dtype=np.int64), config, adapters, AdapterConfig(r=2))
    assert logits.dtype == np.dtype(dtype)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_adapted_model_equals_base_at_init(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, random_B=False)
    base = forward(params, tokens, config)
    adapted = forward(params, tokens, config, adapters, adapter_config)
    assert np.array_equal(base, adapted)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_trained_adapter_changes_output(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, random_B=True, gate_bias_init=0.0)
    base = forward(params, tokens, config)
    adapted = forward(params, tokens, config, adapters, adapter_config)
    assert np.max(np.abs(base - adapted)) > 1e-4


def test_gates_lie_in_open_interval():
    config, params, adapter_config, adapters, tokens = tiny_setup("gpt")
    _, gates = forward(params, tokens, config, adapters, adapter_config, return_gates=True)
    for g in flatten(gates).values():
        assert np.all(g > 0.0) and np.all(g < 1.0)


def test_causal_logits():
    config, params, adapter_config, adapters, tokens = tiny_setup("llama")
    changed = tokens.copy()
    changed[:, 3:] = (changed[:, 3:] + 1) % config.vocab_size
    a = forward(params, tokens, config, adapters, adapter_config)
    b = forward(params, changed, config, adapters, adapter_config)
    assert np.array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize(
    "tokens, error, words",
    [
        (np.array([[0, 11]]), ValueError, "token id 11 is outside the vocabulary [0, 11)"),
        (np.array([[-1, 0]]), ValueError, "token id -1 is outside"),
        (np.zeros((1, 9), dtype=int), ValueError, "sequence length must be in [1, 8]"),
        (np.zeros(4, dtype=int), ValueError, "shape (batch, positions)"),
        (np.zeros((1, 3)), TypeError, "integer dtype"),
        ([[0, 1]], TypeError, "numpy array"),
    ],
)
def test_forward_rejects_bad_tokens(tokens, error, words):
    config = tiny_model()
    params = init_params(config, np.random.default_rng(0))
    with pytest.raises(error) as raised:
        forward(params, tokens, config)
    assert words in str(raised.value)


def test_forward_needs_adapter_config():
    config, params, _, adapters, tokens = tiny_setup()
    with pytest.raises(TypeError, match="adapter_config must be an AdapterConfig"):
        forward(params, tokens, config, adapters)


def test_init_rejects_non_generator():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        init_params(ModelConfig(), 0)
