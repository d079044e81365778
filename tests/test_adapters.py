import numpy as np
import pytest
from autograd import grad
from conftest import tiny_model, tiny_setup

from minidisel import AdapterConfig, forward, init_adapters, init_params, merge_adapters, unmerge_adapters
from minidisel.adapters import AdapterMode, adapter_delta, adapter_paths, gate_values
from minidisel.nn import cross_entropy
from minidisel.tree import count_parameters, flatten


def test_init_follows_peft():
    config = tiny_model(d_model=16, n_heads=2)
    params = init_params(config, np.random.default_rng(0))
    adapter_config = AdapterConfig(r=4, gate_bias_init=-5.0)
    layer = init_adapters(params, config, adapter_config, np.random.default_rng(1))["layers"]["0"]["mlp"]["down_proj"]
    d_in = 64  # down_proj reads the MLP width 4 * 16
    assert layer["A"].shape == (4, d_in)
    assert layer["B"].shape == (16, 4)
    assert np.all(np.abs(layer["A"]) <= d_in**-0.5)
    assert layer["A"].std() > 0.5 * d_in**-0.5 / np.sqrt(3)
    assert np.all(layer["B"] == 0.0)
    assert layer["W_g"].shape == (4, d_in)
    assert np.all(np.abs(layer["W_g"]) <= d_in**-0.5)
    assert np.all(layer["b_g"] == -5.0)


def test_zero_gate_init_and_bottleneck():
    config = tiny_model()
    params = init_params(config, np.random.default_rng(0))
    zero = init_adapters(params, config, AdapterConfig(r=3, gate_weight_init="zero"), np.random.default_rng(1))
    assert np.all(zero["layers"]["0"]["self_attn"]["q_proj"]["W_g"] == 0.0)
    bottleneck = init_adapters(params, config, AdapterConfig(r=3, gate_bottleneck_dim=2), np.random.default_rng(1))
    layer = bottleneck["layers"]["0"]["self_attn"]["q_proj"]
    assert set(layer) == {"A", "B", "V", "U", "b_g"}
    assert layer["V"].shape == (2, 8)
    assert layer["U"].shape == (3, 2)
    assert np.all(np.abs(layer["U"]) <= 2**-0.5)


def test_adapter_paths_cover_targets():
    config = tiny_model("llama")
    paths = adapter_paths(config, AdapterConfig(target_modules=["q_proj", "down_proj"]))
    assert paths == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.down_proj"]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("bottleneck", [None, 2])
def test_zero_B_gives_zero_gradients_except_B(arch, bottleneck):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, random_B=False, gate_bottleneck_dim=bottleneck)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, dtype=bool)

    def loss(a):
        return cross_entropy(forward(params, tokens, config, a, adapter_config), targets, mask)

    for path, g in flatten(grad(loss)(adapters)).items():
        if path.endswith(".B"):
            assert np.any(g != 0.0), path
        else:
            assert np.all(g == 0.0), path


def test_gate_override_open_equals_lora():
    config, params, adapter_config, adapters, tokens = tiny_setup("gpt")
    lora_config = AdapterConfig(method="lora", r=3, lora_alpha=6.0)
    lora_adapters = {"layers": {i: {g: {n: {"A": p["A"], "B": p["B"]} for n, p in ms.items()} for g, ms in gs.items()} for i, gs in adapters["layers"].items()}}
    opened = forward(params, tokens, config, adapters, adapter_config, gate_override=1.0)
    lora = forward(params, tokens, config, lora_adapters, lora_config)
    assert np.array_equal(opened, lora)


def test_gate_override_closed_equals_base():
    config, params, adapter_config, adapters, tokens = tiny_setup("llama")
    closed = forward(params, tokens, config, adapters, adapter_config, gate_override=0.0)
    assert np.array_equal(closed, forward(params, tokens, config))


def test_rank_one_sum_equals_matrix_form():
    rng = np.random.default_rng(5)
    config = AdapterConfig(r=4, lora_alpha=3.0, gate_bias_init=0.5)
    p = {"A": rng.standard_normal((4, 6)), "B": rng.standard_normal((5, 4)), "W_g": rng.standard_normal((4, 6)), "b_g": rng.standard_normal(4)}
    x = rng.standard_normal((2, 3, 6))
    delta, g = adapter_delta(x, p, AdapterMode(config))
    expected = np.zeros((2, 3, 5))
    for b in range(2):
        for t in range(3):
            for i in range(4):
                gate = 1.0 / (1.0 + np.exp(-(p["W_g"][i] @ x[b, t] + p["b_g"][i])))
                expected[b, t] += config.scaling * gate * p["B"][:, i] * (p["A"][i] @ x[b, t])
    assert np.allclose(delta, expected, rtol=1e-13, atol=1e-13)
    assert np.allclose(g, gate_values(x, p, config))


def test_gate_normalization_divides_by_sqrt_width():
    rng = np.random.default_rng(6)
    p = {"W_g": rng.standard_normal((2, 9)), "b_g": rng.standard_normal(2)}
    x = rng.standard_normal((4, 9))
    z = x @ p["W_g"].T + p["b_g"]
    assert np.allclose(gate_values(x, p, AdapterConfig(gate_normalize=True)), 1 / (1 + np.exp(-z / 3.0)))


def test_lora_merge_and_unmerge():
    config, params, _, adapters, tokens = tiny_setup("gpt", method="lora")
    adapter_config = AdapterConfig(method="lora", r=3, lora_alpha=6.0)
    merged = merge_adapters(params, adapters, adapter_config)
    assert np.allclose(forward(merged, tokens, config), forward(params, tokens, config, adapters, adapter_config), atol=1e-12)
    restored = unmerge_adapters(merged, adapters, adapter_config)
    for path, value in flatten(params).items():
        assert np.allclose(flatten(restored)[path], value, atol=1e-15), path
    assert merged["layers"]["0"]["self_attn"]["q_proj"]["weight"] is not params["layers"]["0"]["self_attn"]["q_proj"]["weight"]


def test_disel_merge_raises():
    config, params, adapter_config, adapters, _ = tiny_setup("gpt")
    with pytest.raises(ValueError, match="cannot merge a 'disel' adapter: its gates depend on the input"):
        merge_adapters(params, adapters, adapter_config)


def test_dropout_only_in_training():
    config, params, _, adapters, tokens = tiny_setup("gpt", lora_dropout=0.5)
    adapter_config = AdapterConfig(r=3, lora_alpha=6.0, lora_dropout=0.5, gate_bias_init=0.0)
    evaluation = forward(params, tokens, config, adapters, adapter_config)
    again = forward(params, tokens, config, adapters, adapter_config)
    trained = forward(params, tokens, config, adapters, adapter_config, training=True, rng=np.random.default_rng(0))
    assert np.array_equal(evaluation, again)
    assert not np.allclose(evaluation, trained)
    # with closed gates the adapter adds nothing, so dropout cannot reach the base path
    closed = forward(params, tokens, config, adapters, adapter_config, training=True, rng=np.random.default_rng(0), gate_override=0.0)
    assert np.array_equal(closed, forward(params, tokens, config))


def test_training_without_dropout_equals_evaluation():
    config, params, adapter_config, adapters, tokens = tiny_setup("gpt")
    trained = forward(params, tokens, config, adapters, adapter_config, training=True)
    assert np.array_equal(trained, forward(params, tokens, config, adapters, adapter_config))


@pytest.mark.parametrize("bottleneck", [None, 5])
def test_parameter_count_closed_form(bottleneck):
    config = tiny_model("llama")
    params = init_params(config, np.random.default_rng(0))
    r = 3
    for method in ("lora", "disel"):
        adapter_config = AdapterConfig(method=method, r=r, gate_bottleneck_dim=bottleneck)
        adapters = init_adapters(params, config, adapter_config, np.random.default_rng(0))
        expected = 0
        for path in adapter_paths(config, adapter_config):
            _, i, group, name = path.split(".")
            d_out, d_in = params["layers"][i][group][name]["weight"].shape
            expected += r * (d_in + d_out)
            if method == "disel":
                expected += r * d_in + r if bottleneck is None else (d_in + r) * bottleneck + r
        assert count_parameters(adapters) == expected
