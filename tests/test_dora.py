import numpy as np
import pytest
from autograd import grad
from conftest import randomize_B, tiny_model, tiny_setup

from minidisel import AdapterConfig, forward, init_adapters, init_params, merge_adapters, unmerge_adapters
from minidisel.adapters import AdapterMode, adapter_paths, dora_delta
from minidisel.gradcheck import numerical_gradient
from minidisel.nn import cross_entropy, stop_gradient
from minidisel.train import parameter_groups
from minidisel.tree import count_parameters, flatten, unflatten


def dora_setup(arch="gpt", seed=0, **fields):
    """Return a tiny model with a DoRA adapter whose B and m are moved away from their initial values."""
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, seed, method="dora", **fields)
    rng = np.random.default_rng(seed + 100)
    flat = flatten(adapters)
    for path in flat:
        if path.endswith(".m"):
            flat[path] = flat[path] * (1.0 + 0.2 * rng.standard_normal(flat[path].shape))
    return config, params, adapter_config, unflatten(flat), tokens


def naive_dora_layer(x, W, b, p, s):
    """Compute DoRA's output feature by feature: y_j = m_j / ||V_j|| · (V_j · x) + b_j with V = W + s B A."""
    V = W + s * p["B"] @ p["A"]
    y = np.zeros(x.shape[:-1] + (W.shape[0],))
    for j in range(W.shape[0]):
        y[..., j] = p["m"][j] / np.sqrt(np.sum(V[j] ** 2)) * (x @ V[j]) + (0.0 if b is None else b[j])
    return y


def test_stop_gradient_blocks_gradient():
    def f(x):
        return np.sum(stop_gradient(x) * x)

    x = np.array([1.5, -2.0, 3.0])
    assert np.array_equal(stop_gradient(x), x)
    assert np.array_equal(grad(f)(x), x)  # d/dx (c · x) with c = x held constant


def test_dora_init_magnitude_is_row_norm():
    config = tiny_model("llama")
    params = init_params(config, np.random.default_rng(0))
    adapter_config = AdapterConfig(method="dora", r=3)
    adapters = init_adapters(params, config, adapter_config, np.random.default_rng(1))
    for path in adapter_paths(config, adapter_config):
        _, i, group, name = path.split(".")
        W = params["layers"][i][group][name]["weight"]
        layer = adapters["layers"][i][group][name]
        assert set(layer) == {"A", "B", "m"}
        assert layer["m"].shape == (W.shape[0],)
        assert layer["m"].dtype == W.dtype
        assert np.allclose(layer["m"], np.linalg.norm(W, axis=1), rtol=1e-15)
        assert np.all(layer["B"] == 0.0)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_dora_at_init_equals_base(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, random_B=False, method="dora")
    assert np.array_equal(forward(params, tokens, config, adapters, adapter_config), forward(params, tokens, config))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_dora_layer_matches_naive_formula(arch):
    config, params, adapter_config, adapters, _ = dora_setup(arch)
    x = np.random.default_rng(3).standard_normal((2, 4, config.d_model))
    base = params["layers"]["0"]["self_attn"]["q_proj"]
    p = adapters["layers"]["0"]["self_attn"]["q_proj"]
    base_output = x @ base["weight"].T + base.get("bias", 0.0)
    got = base_output + dora_delta(x, base["weight"], p, AdapterMode(adapter_config))
    expected = naive_dora_layer(x, base["weight"], base.get("bias"), p, adapter_config.scaling)
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-13)


def test_dora_dropout_follows_peft():
    config, params, adapter_config, adapters, _ = dora_setup("gpt", lora_dropout=0.3)
    x = np.random.default_rng(4).standard_normal((3, 5, config.d_model))
    W = params["layers"]["1"]["mlp"]["up_proj"]["weight"]
    p = adapters["layers"]["1"]["mlp"]["up_proj"]
    got = dora_delta(x, W, p, AdapterMode(adapter_config, training=True, rng=np.random.default_rng(9)))

    # PEFT adds (m/n - 1) ⊙ (x̃ W^T) + (m/n) ⊙ s (x̃ A^T) B^T to the undropped base output x W^T + b
    keep = np.random.default_rng(9).random(x.shape) >= 0.3
    x_dropped = np.where(keep, x / 0.7, 0.0)
    s = adapter_config.scaling
    scale = p["m"] / np.linalg.norm(W + s * p["B"] @ p["A"], axis=1)
    expected = (scale - 1.0) * (x_dropped @ W.T) + scale * s * (x_dropped @ p["A"].T @ p["B"].T)
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-13)


def test_dora_norm_is_constant_in_backward():
    config, params, adapter_config, adapters, tokens = dora_setup("gpt")
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, dtype=bool)
    s = adapter_config.scaling

    def loss(a):
        return cross_entropy(forward(params, tokens, config, a, adapter_config), targets, mask)

    # the same loss, with every n = ||W + s B A|| frozen at the current adapters' values
    norms = {
        path: np.linalg.norm(params["layers"][i][g][n]["weight"] + s * layer["B"] @ layer["A"], axis=1)
        for path, (i, g, n, layer) in adapted_layers(adapters).items()
    }

    def frozen_norm_loss(a):
        # minidisel divides m by the live norm, so m · live / frozen makes the scale m / frozen
        rescaled = {}
        for path, (i, g, n, layer) in adapted_layers(a).items():
            live = np.linalg.norm(params["layers"][i][g][n]["weight"] + s * layer["B"] @ layer["A"], axis=1)
            rescaled[path] = dict(layer, m=layer["m"] * live / norms[path])
        return loss(rebuild(rescaled))

    analytic = flatten(grad(loss)(adapters))
    paths = ["layers.0.self_attn.q_proj.A", "layers.1.mlp.down_proj.B", "layers.0.mlp.up_proj.m"]
    frozen = numerical_gradient(frozen_norm_loss, adapters, paths=paths, max_entries=6)
    live = numerical_gradient(loss, adapters, paths=paths, max_entries=6)
    for path in paths:
        indices, values = frozen[path]
        got = np.array([analytic[path][index] for index in indices])
        assert np.allclose(got, values, rtol=1e-6, atol=1e-9), path
    # the detach matters: the gradient through a live norm differs for A and B
    for path in paths[:2]:
        indices, values = live[path]
        got = np.array([analytic[path][index] for index in indices])
        assert not np.allclose(got, values, rtol=1e-4, atol=1e-7), path


def adapted_layers(adapters):
    """Return ``{path: (index, group, name, layer)}`` for each adapted layer."""
    return {
        f"layers.{i}.{g}.{n}": (i, g, n, layer)
        for i, groups in adapters["layers"].items()
        for g, layers in groups.items()
        for n, layer in layers.items()
    }


def rebuild(layers_by_path):
    """Build an adapter tree from ``{path: layer}``."""
    tree = {"layers": {}}
    for path, layer in layers_by_path.items():
        _, i, g, n = path.split(".")
        tree["layers"].setdefault(i, {}).setdefault(g, {})[n] = layer
    return tree


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_dora_merge_matches_unmerged(arch):
    config, params, adapter_config, adapters, tokens = dora_setup(arch)
    merged = merge_adapters(params, adapters, adapter_config)
    expected = forward(params, tokens, config, adapters, adapter_config)
    assert np.allclose(forward(merged, tokens, config), expected, rtol=1e-12, atol=1e-12)
    q = merged["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert np.allclose(np.linalg.norm(q, axis=1), adapters["layers"]["0"]["self_attn"]["q_proj"]["m"], rtol=1e-13)
    if arch == "gpt":
        assert np.array_equal(merged["layers"]["0"]["self_attn"]["q_proj"]["bias"], params["layers"]["0"]["self_attn"]["q_proj"]["bias"])


def test_dora_unmerge_raises():
    _, params, adapter_config, adapters, _ = dora_setup("gpt")
    merged = merge_adapters(params, adapters, adapter_config)
    with pytest.raises(ValueError, match="cannot unmerge a 'dora' adapter"):
        unmerge_adapters(merged, adapters, adapter_config)


def test_dora_magnitude_not_decayed():
    _, _, _, adapters, _ = dora_setup("llama")
    groups = parameter_groups(adapters)
    magnitudes = [path for path in flatten(adapters) if path.endswith(".m")]
    assert magnitudes and set(magnitudes) <= set(groups["no_decay"])
    assert not groups["gate"]
    assert all(path.endswith((".A", ".B")) for path in groups["decay"])


def test_dora_parameter_count():
    config = tiny_model("llama")
    params = init_params(config, np.random.default_rng(0))
    lora = init_adapters(params, config, AdapterConfig(method="lora", r=3), np.random.default_rng(0))
    dora = init_adapters(params, config, AdapterConfig(method="dora", r=3), np.random.default_rng(0))
    extra = 0
    for path in adapter_paths(config, AdapterConfig()):
        _, i, group, name = path.split(".")
        extra += params["layers"][i][group][name]["weight"].shape[0]  # one magnitude per output feature
    assert count_parameters(dora) == count_parameters(lora) + extra


def test_dora_trains_magnitude():
    config, params, adapter_config, _, tokens = tiny_setup("gpt", random_B=False, method="dora")
    adapters = init_adapters(params, config, adapter_config, np.random.default_rng(2))
    adapters = randomize_B(adapters, np.random.default_rng(3))
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, dtype=bool)
    gradient = flatten(grad(lambda a: cross_entropy(forward(params, tokens, config, a, adapter_config), targets, mask))(adapters))
    for path, value in gradient.items():
        assert np.any(value != 0.0), path
