"""The fused layer functions against the plain formulas, autograd and finite differences.

Every fused primitive must give the plain formula's output and autograd's
gradient of the plain formula to within a few ulps times the length of the
longest sum involved, and its hand-written gradient must match central finite
differences. The whole fused model must match the plain one the same way.
"""

import numpy as np
import pytest
import scipy.special
from autograd import grad, value_and_grad
from autograd.extend import defvjp, primitive
from conftest import tiny_setup

from minidisel import AdapterConfig, ModelConfig, forward, fused, nn
from minidisel.adapters import AdapterMode
from minidisel.adapters import project as plain_project
from minidisel.experiment import language_model_loss
from minidisel.gradcheck import check_gradients
from minidisel.model import cached_rotary_tables, multi_head_attention, swiglu
from minidisel.tree import flatten, tree_map

EPS = np.finfo(np.float64).eps


def assert_close_ulps(actual, expected, reduction, ulps=8, name="value", scale=None):
    """Assert ``|actual - expected| <= ulps · eps · reduction · scale`` elementwise.

    ``scale`` defaults to ``max|expected|``. A sum's rounding error is bounded
    by the size of its terms, not of its result. Gradients that cancel to
    almost nothing are therefore compared on the scale of the largest
    gradient: a key bias, for one, shifts every score of a row alike and gets
    a zero gradient.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    error = float(np.max(np.abs(actual - expected)))
    assert error <= ulps * EPS * reduction * scale, f"{name}: error {error:.3g} for scale {scale:.3g}"


def compare_with_plain(plain, fast, params, reduction, finite_differences=True):
    """Check ``fast(params)`` against ``plain(params)``: outputs, gradients and finite differences."""
    expected = plain(params)
    assert_close_ulps(fast(params), expected, reduction, name="output")

    weights = np.random.default_rng(99).standard_normal(np.shape(expected))

    def plain_loss(p):
        return np.sum(plain(p) * weights)

    def fast_loss(p):
        return np.sum(fast(p) * weights)

    plain_grads, fast_grads = flatten(grad(plain_loss)(params)), flatten(grad(fast_loss)(params))
    assert_same_gradients(fast_grads, plain_grads, reduction)
    if finite_differences:
        check_gradients(fast_loss, params, rtol=1e-6, atol=1e-8)


def assert_same_gradients(actual, expected, reduction):
    """Compare flat gradient dicts entry by entry, on the scale of the largest expected gradient."""
    assert actual.keys() == expected.keys()
    scale = max(float(np.max(np.abs(g))) for g in expected.values())
    for path, g in expected.items():
        assert_close_ulps(actual[path], g, reduction, name=f"gradient of {path}", scale=scale)


def random_arrays(seed, **shapes):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


# ---------------------------------------------------------------- primitives


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_plain(bias):
    shapes = {"x": (2, 3, 5), "weight": (4, 5)} | ({"bias": (4,)} if bias else {})
    params = random_arrays(0, **shapes)

    def layer(p):
        return {key: value for key, value in p.items() if key != "x"}

    compare_with_plain(
        lambda p: nn.linear(p["x"], layer(p)), lambda p: fused.linear(p["x"], layer(p)), params, reduction=5
    )


ADAPTER_CASES = [
    {"method": "lora"},
    {"method": "lora", "lora_dropout": 0.25},
    {"method": "disel"},
    {"method": "disel", "gate_normalize": True, "gate_bias_init": 0.5},
    {"method": "disel", "gate_bottleneck_dim": 2},
    {"method": "disel", "gate_bottleneck_dim": 2, "gate_normalize": True, "lora_dropout": 0.25},
    {"method": "disel", "lora_dropout": 0.5},
]


def adapter_parameters(fields, bias, seed=1):
    """Return float64 arrays for ``x``, the base layer and one adapter of ``fields`` (rank 3, 5 -> 4)."""
    config = AdapterConfig(r=3, lora_alpha=6.0, **fields)
    shapes = {"x": (2, 3, 5), "weight": (4, 5), "A": (3, 5), "B": (4, 3)}
    if bias:
        shapes["bias"] = (4,)
    if config.method == "disel" and config.gate_bottleneck_dim is None:
        shapes.update(W_g=(3, 5), b_g=(3,))
    elif config.method == "disel":
        shapes.update(V=(2, 5), U=(3, 2), b_g=(3,))
    return config, random_arrays(seed, **shapes)


def split_layer(p):
    """Split a flat parameter dict into ``x``, the base layer dict and the adapter dict."""
    base = {key: p[key] for key in ("weight", "bias") if key in p}
    adapter = {key: value for key, value in p.items() if key not in base and key != "x"}
    return p["x"], base, adapter


def projection(project, config, gate_override=None, **kwargs):
    """Return ``p -> y`` for one adapted layer; each call draws dropout masks from the same seed."""

    def apply(p):
        x, base, adapter = split_layer(p)
        mode = AdapterMode(config, training=True, rng=np.random.default_rng(7), gate_override=gate_override)
        return project(x, base, adapter, mode, **kwargs)[0]

    return apply


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fields", ADAPTER_CASES)
def test_adapted_projection_matches_plain(fields, bias):
    config, params = adapter_parameters(fields, bias)
    compare_with_plain(projection(plain_project, config), projection(fused.project, config), params, reduction=5)


@pytest.mark.parametrize("override", [0.0, 0.3, 1.0])
def test_adapted_projection_gate_override(override):
    config, params = adapter_parameters({"method": "disel", "lora_dropout": 0.25}, bias=True)
    plain = projection(plain_project, config, gate_override=override)
    fast = projection(fused.project, config, gate_override=override)
    compare_with_plain(plain, fast, params, reduction=5)
    gradients = grad(lambda p: np.sum(fast(p) ** 2))(params)
    assert np.all(gradients["W_g"] == 0.0)
    assert np.all(gradients["b_g"] == 0.0)


@pytest.mark.parametrize("override", [None, 0.4])
@pytest.mark.parametrize("fields", ADAPTER_CASES)
def test_adapted_projection_input_gradient_alone(fields, override):
    config, params = adapter_parameters(fields, bias=False)
    weights = np.random.default_rng(5).standard_normal((2, 3, 4))

    def input_gradient(project):
        def loss(x):
            return np.sum(projection(project, config, gate_override=override)({**params, "x": x}) * weights)

        return grad(loss)(params["x"])

    assert_close_ulps(input_gradient(fused.project), input_gradient(plain_project), reduction=5)


@pytest.mark.parametrize("fields", [{"method": "disel"}, {"method": "disel", "gate_bottleneck_dim": 2, "lora_dropout": 0.25}])
def test_adapted_projection_returns_plain_gates(fields):
    config, params = adapter_parameters(fields, bias=True)
    x, base, adapter = split_layer(params)

    def mode():
        return AdapterMode(config, training=True, rng=np.random.default_rng(7))

    plain_y, plain_g = plain_project(x, base, adapter, mode())
    fast_y, fast_g = fused.project(x, base, adapter, mode(), with_gates=True)
    assert np.array_equal(fast_g, plain_g)
    assert_close_ulps(fast_y, plain_y, reduction=5)
    assert fused.project(x, base, adapter, mode())[1] is None


def test_zero_B_adapter_adds_exactly_nothing():
    config, params = adapter_parameters({"method": "disel"}, bias=True)
    params["B"] = np.zeros_like(params["B"])
    x, base, _ = split_layer(params)
    assert np.array_equal(projection(fused.project, config)(params), fused.linear(x, base))

    gradients = grad(lambda p: np.sum(projection(fused.project, config)(p) ** 2))(params)
    for name in ("A", "W_g", "b_g"):
        assert np.all(gradients[name] == 0.0), name
    assert np.any(gradients["B"] != 0.0)


def test_layer_norm_matches_plain():
    params = random_arrays(2, x=(2, 3, 6), weight=(6,), bias=(6,))

    def run(layer_norm):
        return lambda p: layer_norm(p["x"], {"weight": p["weight"], "bias": p["bias"]}, 1e-5)

    compare_with_plain(run(nn.layer_norm), run(fused.layer_norm), params, reduction=6)


def test_rms_norm_matches_plain():
    params = random_arrays(3, x=(2, 3, 6), weight=(6,))

    def run(rms_norm):
        return lambda p: rms_norm(p["x"], {"weight": p["weight"]}, 1e-6)

    compare_with_plain(run(nn.rms_norm), run(fused.rms_norm), params, reduction=6)


def test_gelu_matches_plain():
    x = np.concatenate([np.linspace(-9.0, 9.0, 38), [0.0, 1e-200, -1e-300, 1e-9]])
    compare_with_plain(lambda p: nn.gelu(p["x"]), lambda p: fused.gelu(p["x"]), {"x": x.reshape(3, 14)}, reduction=2)


def test_wrong_gradient_is_detected():
    @primitive
    def scaled_gelu(x):
        return fused.gelu(x)

    defvjp(scaled_gelu, lambda ans, x: lambda g: 1.001 * g * fused.gelu_gradient(np.ones_like(x), ans, x))
    params = {"x": np.linspace(-3.0, 3.0, 12).reshape(3, 4)}
    with pytest.raises(AssertionError, match="gradient of x"):
        compare_with_plain(lambda p: nn.gelu(p["x"]), lambda p: scaled_gelu(p["x"]), params, reduction=2)


def test_blockwise_matches_whole_array():
    x = np.random.default_rng(3).standard_normal((5, fused.BLOCK_BYTES // 4 + 1))[:, ::2]  # not contiguous
    y = np.random.default_rng(4).standard_normal(x.shape)
    assert np.array_equal(fused.blockwise(lambda a, b: a * b + 1.0, x, y), x * y + 1.0)


def test_gelu_spans_several_blocks():
    x = np.random.default_rng(4).standard_normal((3, fused.BLOCK_BYTES // 16 + 7))
    assert_close_ulps(fused.gelu(x), nn.gelu(x), reduction=2)


def test_normal_cdf_float32_accuracy():
    x = np.linspace(-16.0, 10.0, 520_001).astype(np.float32)
    exact = scipy.special.ndtr(x.astype(np.float64))
    cdf = fused.normal_cdf(x)
    assert cdf.dtype == np.float32
    assert np.max(np.abs(cdf - exact)) <= 2.5e-7  # 4 float32 ulps of values near 1
    small = (x < 0) & (exact > 1e-30)
    assert np.max(np.abs(cdf[small] / exact[small] - 1.0)) <= 3e-5
    assert np.all(cdf[x < -15.0] == 0.0)
    assert np.all(cdf[x > 6.0] == 1.0)


def test_normal_cdf_float32_extremes():
    x = np.array([-np.inf, -1e30, -0.0, 0.0, 1e30, np.inf], dtype=np.float32)
    assert np.array_equal(fused.normal_cdf(x), np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.0], dtype=np.float32))


def test_gelu_float32_close_to_exact():
    x = np.linspace(-10.0, 10.0, 400_001).astype(np.float32)
    exact = x.astype(np.float64) * scipy.special.ndtr(x.astype(np.float64))
    y = fused.gelu(x)
    assert y.dtype == np.float32
    assert np.all(np.abs(y - exact) <= np.abs(x) * 2.5e-7 + np.spacing(np.abs(y)))


def test_swiglu_matches_plain():
    params = random_arrays(5, gate=(2, 3, 4), up=(2, 3, 4))
    compare_with_plain(
        lambda p: swiglu(p["gate"], p["up"]), lambda p: fused.swiglu(p["gate"], p["up"]), params, reduction=2
    )


def test_rotary_matches_plain():
    params = random_arrays(6, x=(2, 5, 3 * 4))
    cos, sin = cached_rotary_tables(5, 4, 10000.0, "float64")

    def plain(p):
        return nn.merge_heads(nn.apply_rotary(nn.split_heads(p["x"], 3), cos, sin))

    compare_with_plain(plain, lambda p: fused.apply_rotary(p["x"], cos, sin, 3), params, reduction=2)


@pytest.mark.parametrize("arch, n_heads, n_kv_heads", [("gpt", 2, None), ("llama", 4, 2), ("llama", 4, 1), ("llama", 2, 2)])
def test_attention_matches_plain(arch, n_heads, n_kv_heads):
    config = ModelConfig(d_model=8, n_heads=n_heads, n_kv_heads=n_kv_heads, arch=arch, max_seq_len=8)
    kv_width = config.kv_heads * config.head_dim
    params = random_arrays(7, q=(2, 6, 8), k=(2, 6, kv_width), v=(2, 6, kv_width))
    rotary = cached_rotary_tables(6, config.head_dim, config.rope_theta, config.dtype) if arch == "llama" else None

    def run(attention):
        return lambda p: attention(p["q"], p["k"], p["v"], config, rotary)

    compare_with_plain(run(multi_head_attention), run(fused.attention), params, reduction=8)


def test_attention_is_causal():
    config = ModelConfig(d_model=8, n_heads=2)
    q, k, v = random_arrays(8, q=(1, 5, 8), k=(1, 5, 8), v=(1, 5, 8)).values()
    changed = v.copy()
    changed[:, 3:] += 1.0
    a, b = fused.attention(q, k, v, config), fused.attention(q, k, changed, config)
    assert np.array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_cross_entropy_matches_plain():
    rng = np.random.default_rng(9)
    targets = rng.integers(0, 5, (3, 4))
    mask = rng.random((3, 4)) < 0.6
    mask[0, 0] = True
    params = {"logits": 3.0 * rng.standard_normal((3, 4, 5))}

    def run(cross_entropy):
        return lambda p: cross_entropy(p["logits"], targets, mask)

    compare_with_plain(run(nn.cross_entropy), run(fused.cross_entropy), params, reduction=12)


def test_cross_entropy_keeps_float32():
    logits = np.random.default_rng(4).standard_normal((2, 3, 5)).astype(np.float32)
    targets, mask = np.zeros((2, 3), dtype=int), np.ones((2, 3), dtype=bool)
    value, gradient = value_and_grad(fused.cross_entropy)(logits, targets, mask)
    assert value.dtype == np.float32
    assert gradient.dtype == np.float32


def test_cross_entropy_stable_for_large_logits():
    logits = np.array([[[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]]])
    value, gradient = value_and_grad(fused.cross_entropy)(logits, np.array([[1, 2]]), np.ones((1, 2), dtype=bool))
    assert np.isfinite(value)
    assert np.all(np.isfinite(gradient))
    assert value == pytest.approx((1e4 + np.log(3.0)) / 2, rel=1e-12)


# ---------------------------------------------------------------- the whole model


MODEL_CASES = [
    {"method": "lora"},
    {"method": "dora"},  # runs the plain DoRA formula inside the fused model
    {"method": "disel"},
    {"method": "disel", "gate_bottleneck_dim": 2, "gate_normalize": True},
    {"method": "disel", "lora_dropout": 0.3, "gate_normalize": True},
    {"method": "lora", "lora_dropout": 0.3, "use_rslora": True},
]
# the longest sum in the tiny models: the 4 x 8 MLP width (weight gradients sum over only 2 x 5 tokens)
MODEL_REDUCTION = 32


def training_loss(config, params, adapter_config, tokens, fused_layers):
    """Return ``trainable -> loss`` for adapters (or the base when ``adapter_config`` is None), with dropout."""
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "mask": np.ones(tokens.shape, dtype=bool)}

    def loss(trainable):
        frozen = params if adapter_config is not None else None
        rng = np.random.default_rng(11)
        return language_model_loss(trainable, frozen, batch, rng, config, adapter_config, fused=fused_layers)

    return loss


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("fields", MODEL_CASES)
def test_model_matches_plain(arch, fields):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, **fields)
    plain_logits, plain_gates = forward(params, tokens, config, adapters, adapter_config, return_gates=True)
    fast_logits, fast_gates = forward(params, tokens, config, adapters, adapter_config, return_gates=True, fused=True)
    assert_close_ulps(fast_logits, plain_logits, MODEL_REDUCTION, name="logits")
    assert flatten(fast_gates).keys() == flatten(plain_gates).keys()
    for path, g in flatten(plain_gates).items():
        assert_close_ulps(flatten(fast_gates)[path], g, MODEL_REDUCTION, name=path)

    assert_same_training_gradients(config, params, adapter_config, tokens, adapters)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_base_gradients_match_plain(arch):
    config, params, _, _, tokens = tiny_setup(arch)
    assert_same_training_gradients(config, params, None, tokens, params)


def assert_same_training_gradients(config, params, adapter_config, tokens, trainable):
    """Assert that the fused and plain training losses agree in value and gradient at ``trainable``."""
    plain_value, plain_grads = value_and_grad(training_loss(config, params, adapter_config, tokens, False))(trainable)
    fast_value, fast_grads = value_and_grad(training_loss(config, params, adapter_config, tokens, True))(trainable)
    assert fast_value == pytest.approx(plain_value, rel=MODEL_REDUCTION * 8 * EPS)
    assert_same_gradients(flatten(fast_grads), flatten(plain_grads), MODEL_REDUCTION)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fused_model_gradient_matches_finite_differences(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, gate_bottleneck_dim=2, lora_dropout=0.2)
    loss = training_loss(config, params, adapter_config, tokens, True)
    worst = check_gradients(loss, adapters, rtol=1e-5, atol=1e-8, max_entries=3)
    assert any(path.endswith(".V") for path in worst)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("override", [0.0, 0.5, 1.0])
def test_model_gate_override_matches_plain(arch, override):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch)
    plain_logits, plain_gates = forward(
        params, tokens, config, adapters, adapter_config, gate_override=override, return_gates=True
    )
    fast_logits, fast_gates = forward(
        params, tokens, config, adapters, adapter_config, gate_override=override, return_gates=True, fused=True
    )
    assert_close_ulps(fast_logits, plain_logits, MODEL_REDUCTION, name="logits")
    for g in flatten(fast_gates).values():
        assert np.all(g == override)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_fused_closed_gates_give_base_exactly(arch):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch)
    closed = forward(params, tokens, config, adapters, adapter_config, gate_override=0.0, fused=True)
    assert np.array_equal(closed, forward(params, tokens, config, fused=True))


def test_fused_model_keeps_float32():
    config, params, adapter_config, adapters, tokens = tiny_setup("gpt")
    config32 = ModelConfig(**{**config.__dict__, "dtype": "float32"})
    params32 = tree_map(lambda a: a.astype(np.float32), params)
    adapters32 = tree_map(lambda a: a.astype(np.float32), adapters)
    logits = forward(params32, tokens, config32, adapters32, adapter_config, fused=True)
    assert logits.dtype == np.float32
    plain = forward(params, tokens, config, adapters, adapter_config)
    assert np.max(np.abs(logits - plain)) < 1e-5

    loss = training_loss(config32, params32, adapter_config, tokens, True)
    for path, g in flatten(grad(loss)(adapters32)).items():
        assert g.dtype == np.float32, path


def test_forward_rejects_non_bool_fused():
    config, params, _, _, tokens = tiny_setup("gpt")
    with pytest.raises(TypeError, match="fused must be a bool"):
        forward(params, tokens, config, fused=1)
