"""Properties of one adapted linear layer, over random shapes and values.

Tolerances. Where both sides run the same arithmetic the check is bitwise.
Where they round differently, each side is within n·u·M of the exact value
(u = eps / 2 the unit roundoff, n the longest chain of roundings from
:func:`rounding_length`, M the magnitude from :func:`update_magnitude`), so the
two differ by at most n·eps·M entry by entry.
"""

import math
import warnings
from dataclasses import replace

import autograd.numpy as anp
import numpy as np
from autograd import grad
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import (
    Layer,
    float_arrays,
    gate_scale,
    layers,
    lora_factors,
    permute_ranks,
    with_gate_bias,
)

from minidisel import AdapterConfig, merge_adapters
from minidisel.adapters import AdapterMode, adapter_delta, gate_values, project
from minidisel.nn import linear


def run(layer, p=None, config=None, **mode):
    """Return ``(y, gates)`` of the adapted layer, optionally with other adapter values or config."""
    mode = AdapterMode(config or layer.config, **mode)
    return project(layer.x, layer.base, layer.p if p is None else p, mode)


def update(layer, p=None, config=None, **mode):
    """Return the adapter's update ``s·B (g ⊙ A x)`` alone."""
    return adapter_delta(layer.x, layer.p if p is None else p, AdapterMode(config or layer.config, **mode))[0]


def gate_magnitude(x, p, config):
    """Return g + c·(|W_g| |x| + |b_g|) (bottleneck: |U| |V| |x|): (..., in) -> (..., R).

    A gate's rounding error is at most n·u times this: an error n·u·c·(|W_g||x| + |b_g|)
    in the logit moves the gate by at most a quarter of that, since σ' <= 1/4, and σ
    itself rounds relative to g.
    """
    if "W_g" in p:
        z = np.abs(x) @ np.abs(p["W_g"]).T
    else:
        z = (np.abs(x) @ np.abs(p["V"]).T) @ np.abs(p["U"]).T
    return gate_values(x, p, config) + gate_scale(config, x.shape[-1]) * (z + np.abs(p["b_g"]))


def update_magnitude(x, p, config):
    """Return s·|B| (G ⊙ |A| |x|), with G the gate magnitude (1 for LoRA): (..., in) -> (..., out).

    Every rounding error of the update is at most n·u times this.
    """
    x = np.asarray(x, np.float64)
    p = {key: np.asarray(value, np.float64) for key, value in p.items()}
    weight = gate_magnitude(x, p, config) if config.method == "disel" else 1.0
    return config.scaling * (weight * (np.abs(x) @ np.abs(p["A"]).T)) @ np.abs(p["B"]).T


def underflow_scale(p, config):
    """Return the largest factor, 1 + s·(1 + Σ|B|), that later steps multiply an underflowed result by."""
    return 1.0 + config.scaling * (1.0 + np.sum(np.abs(np.asarray(p["B"], np.float64))))


def rounding_length(layer):
    """Return n: the input width, bottleneck width and rank, plus a few single roundings (bias, c, σ, s)."""
    return layer.x.shape[-1] + (layer.config.gate_bottleneck_dim or 0) + layer.config.r + 4


def assert_rounding_close(got, expected, magnitude, n, dtype=np.float64, underflow=1.0):
    """Assert |got - expected| <= n·(eps·magnitude + tiny·underflow), entry by entry.

    n·eps·magnitude bounds two evaluations that each round by up to n·u relative
    to the magnitude. Results near zero can underflow instead, losing up to
    ``tiny`` (the smallest normal number) absolutely, which later steps multiply
    by at most ``underflow``.
    """
    info = np.finfo(dtype)
    tolerance = n * (info.eps * magnitude + info.tiny * underflow)
    excess = np.abs(np.asarray(got, np.float64) - expected) - tolerance
    assert np.all(excess <= 0.0), f"worst excess over the tolerance: {excess.max():.3g}"


def assert_update_close(layer, got, expected, p=None, dtype=np.float64):
    """Assert that two evaluations of the layer's update agree within rounding."""
    p = layer.p if p is None else p
    magnitude = update_magnitude(layer.x, p, layer.config)
    assert_rounding_close(got, expected, magnitude, rounding_length(layer), dtype, underflow_scale(p, layer.config))


def logistic(z):
    """Evaluate σ(z) = 1 / (1 + e^-z) in float64 independently of the library (for |z| < 700)."""
    return 1.0 / (1.0 + np.exp(-z))


def single_layer_tree(leaf):
    """Wrap one layer's dict in the tree shape that merging expects."""
    return {"layers": {"0": {"mlp": {"up_proj": leaf}}}}


# fully open gates give LoRA


@given(layers(methods=("disel",)))
def test_open_gates_give_lora_layer(layer):
    lora = run(layer, lora_factors(layer.p), replace(layer.config, method="lora"))[0]

    # g = 1 exactly and 1·h = h, so what follows is LoRA's own arithmetic: bitwise equal
    forced, gates = run(layer, gate_override=1.0)
    assert np.all(gates == 1.0)
    assert np.array_equal(forced, lora)

    # σ(z) rounds to 1.0 in float64 once z > 37.5; here c·|W_g x| <= 12 and c·|U V x| <= 36, so the logit is >= 64
    saturated, gates = run(layer, with_gate_bias(layer.p, layer.config, 100.0))
    assert np.all(gates == 1.0)
    assert np.array_equal(saturated, lora)


# a constant gate is a rescaled LoRA


@given(layers(methods=("disel",)), st.data())
def test_constant_gate_rescales_lora_layer(layer, data):
    beta = data.draw(float_arrays((layer.config.r,), 4.0), label="beta")
    p = {**layer.p, "b_g": beta}
    weight_key = "W_g" if "W_g" in p else "U"
    p[weight_key] = np.zeros_like(p[weight_key])
    sigma = logistic(gate_scale(layer.config, layer.x.shape[-1]) * beta)  # the constant gate σ(c β)

    rescaled = {"A": p["A"], "B": p["B"] * sigma}  # B · diag(σ(c β))
    lora = update(layer, rescaled, replace(layer.config, method="lora"))

    # (g h) B and h (B g) round each product differently
    assert_update_close(layer, update(layer, p), lora, p)


# closed gates give the base layer


@given(layers())
def test_closed_adapter_gives_base_layer(layer):
    base = linear(layer.x, layer.base)

    # every closed case adds 0·h = ±0 and y + (±0) == y, so each is bitwise the base output
    zero_B = {**layer.p, "B": np.zeros_like(layer.p["B"])}
    assert np.array_equal(run(layer, zero_B)[0], base)
    assert np.array_equal(project(layer.x, layer.base, None, AdapterMode(layer.config))[0], base)
    assert np.array_equal(project(layer.x, layer.base, layer.p, None)[0], base)
    if layer.config.method == "disel":
        assert np.array_equal(run(layer, gate_override=0.0)[0], base)

        # σ(z) underflows to exactly 0 below z ≈ -745, and the logit here is <= -1e4 + 36
        closed, gates = run(layer, with_gate_bias(layer.p, layer.config, -1e4))
        assert np.all(gates == 0.0)
        assert np.array_equal(closed, base)


# zero-initialised B: only B has a gradient


@given(layers(), st.data())
def test_zero_B_gradients_layer(layer, data):
    p = {**layer.p, "B": np.zeros_like(layer.p["B"])}
    upstream = data.draw(float_arrays(layer.x.shape[:-1] + layer.p["B"].shape[:1], 1.0), label="upstream")

    def loss(p):
        return anp.sum(upstream * run(layer, p)[0])

    grads = grad(loss)(p)
    for key in p:
        if key != "B":
            assert np.all(grads[key] == 0.0), key

    # independently: dL/dB = s · Σ_tokens upstream ⊗ (g ⊙ A x)
    r, d_out = layer.config.r, p["B"].shape[0]
    gates = gate_values(layer.x, p, layer.config) if layer.config.method == "disel" else 1.0
    gated = np.reshape(gates * (layer.x @ p["A"].T), (-1, r))  # (tokens, R)
    expected = layer.config.scaling * np.reshape(upstream, (-1, d_out)).T @ gated  # (out, R)
    gate_size = gate_magnitude(layer.x, p, layer.config) if layer.config.method == "disel" else 1.0
    magnitude = layer.config.scaling * np.reshape(np.abs(upstream), (-1, d_out)).T @ np.reshape(
        gate_size * (np.abs(layer.x) @ np.abs(p["A"]).T), (-1, r)
    )
    n = rounding_length(layer) + gated.shape[0]  # the sum over tokens adds one rounding per token
    assert_rounding_close(grads["B"], expected, magnitude, n, underflow=1.0 + layer.config.scaling * gated.shape[0])

    # for a non-degenerate input the gradient with respect to B is not zero
    assume(np.any(np.abs(expected) > n * np.finfo(np.float64).eps * magnitude))
    assert np.any(grads["B"] != 0.0)


# the matrix form equals the sum of gated rank-one terms


@given(layers())
def test_rank_one_terms_sum_to_update(layer):
    x, p, config = layer.x, layer.p, layer.config
    c = gate_scale(config, x.shape[-1])

    expected = np.zeros(x.shape[:-1] + p["B"].shape[:1])
    for i in range(config.r):
        h_i = x @ p["A"][i]  # (...,)
        g_i = 1.0
        if config.method == "disel":
            z_i = x @ p["W_g"][i] if "W_g" in p else (x @ p["V"].T) @ p["U"][i]
            g_i = logistic(c * (z_i + p["b_g"][i]))
        expected = expected + config.scaling * (g_i * h_i)[..., None] * p["B"][:, i]

    assert_update_close(layer, update(layer), expected)


# permuting the rank components changes nothing


@given(layers(), st.data())
def test_rank_permutation_invariance_layer(layer, data):
    order = np.array(data.draw(st.permutations(range(layer.config.r)), label="order"))
    permuted = permute_ranks(layer.p, order)

    # the same terms summed in another order
    assert_update_close(layer, update(layer, permuted), update(layer))
    if layer.config.method == "disel":
        gates = gate_values(layer.x, layer.p, layer.config)[..., order]
        magnitude = gate_magnitude(layer.x, layer.p, layer.config)[..., order]
        assert_rounding_close(gate_values(layer.x, permuted, layer.config), gates, magnitude, rounding_length(layer))


# scaling is lora_alpha / r, or lora_alpha / sqrt(r), exactly


@given(st.floats(1e-3, 1e3), st.integers(1, 256), st.booleans())
@example(5.0, 3, False)  # 5 · (1/3) differs from 5 / 3 in the last bit
@example(1.0, 3, True)  # 3^-0.5 differs from 1 / sqrt(3) in the last bit
def test_scaling_is_exact_quotient(alpha, r, use_rslora):
    config = AdapterConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora)
    assert config.scaling == (alpha / math.sqrt(r) if use_rslora else alpha / r)


@given(layers())
def test_scaling_exact_in_forward_and_merge(layer):
    config = layer.config
    r, alpha = config.r, config.lora_alpha
    expected = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    assert config.scaling == expected

    # with lora_alpha = r (or sqrt r) the factor is exactly 1, and 1·v = v, so the update scales bitwise
    unit = replace(config, lora_alpha=math.sqrt(r) if config.use_rslora else float(r))
    assert unit.scaling == 1.0
    assert np.array_equal(update(layer), expected * update(layer, config=unit))

    # merging computes W + s·(B A) with the same s, bitwise
    lora = replace(config, method="lora")
    merged = merge_adapters(single_layer_tree(layer.base), single_layer_tree(lora_factors(layer.p)), lora)
    weight = merged["layers"]["0"]["mlp"]["up_proj"]["weight"]
    assert np.array_equal(weight, layer.base["weight"] + expected * (layer.p["B"] @ layer.p["A"]))


# gates stay in [0, 1] and finite for logits up to ±1e4


@given(st.one_of(layers(("disel",), np.float64), layers(("disel",), np.float32)), st.data())
def test_gates_bounded_for_huge_logits(layer, data):
    dtype = layer.x.dtype
    p = {**layer.p, "b_g": data.draw(float_arrays(layer.p["b_g"].shape, 1e4, dtype), label="b_g")}

    def gate_sum(b_g):
        return anp.sum(gate_values(layer.x, {**p, "b_g": b_g}, layer.config))

    # overflow, division by zero and invalid operations raise here. Underflow does not, because a
    # tiny product that rounds to a subnormal number or to zero is correctly rounded.
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        gates = gate_values(layer.x, p, layer.config)
        y = run(layer, p)[0]
        slope = grad(gate_sum)(p["b_g"])

    assert gates.dtype == dtype
    assert np.all(np.isfinite(gates))
    assert np.all((gates >= 0.0) & (gates <= 1.0))
    assert np.all(np.isfinite(y))
    # d Σ g / d b_g = c · Σ_tokens σ'(z) with 0 <= σ' <= 1/4, give or take the rounding of the sum
    tokens = int(np.prod(layer.x.shape[:-1]))
    largest = gate_scale(layer.config, layer.x.shape[-1]) * tokens / 4 * (1 + tokens * np.finfo(dtype).eps)
    assert np.all(np.isfinite(slope))
    assert np.all((slope >= 0.0) & (slope <= largest))


# dropout


@given(layers(), st.floats(0.0, 0.95), st.integers(0, 2**32 - 1))
def test_dropout_only_on_adapter_input(layer, rate, seed):
    dropped = replace(layer.config, lora_dropout=rate)
    evaluation = run(layer)[0]

    # evaluation mode never drops and draws nothing from the generator
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    assert np.array_equal(run(layer, config=dropped, training=False, rng=rng)[0], evaluation)
    assert rng.bit_generator.state == state

    # training with rate 0 is evaluation
    assert np.array_equal(run(layer, config=replace(layer.config, lora_dropout=0.0), training=True)[0], evaluation)

    # training: the base path reads x, the adapter (A and the gate) reads x̃ = mask ⊙ x / (1 - rate)
    keep = np.random.default_rng(seed).random(layer.x.shape) >= rate
    x_dropped = np.where(keep, layer.x / (1.0 - rate), 0.0) if rate > 0.0 else layer.x
    expected = linear(layer.x, layer.base) + adapter_delta(x_dropped, layer.p, AdapterMode(layer.config))[0]
    trained = run(layer, config=dropped, training=True, rng=np.random.default_rng(seed))[0]
    assert np.array_equal(trained, expected)


# float32 tracks float64


@given(layers(dtype=np.float32))
def test_float32_update_tracks_float64(layer):
    wide = Layer(
        layer.x.astype(np.float64),
        {key: value.astype(np.float64) for key, value in layer.base.items()},
        {key: value.astype(np.float64) for key, value in layer.p.items()},
        layer.config,
    )
    narrow = update(layer)
    assert narrow.dtype == np.float32

    # float32 rounds by up to n·u32 relative to the magnitude; float64's own error is 2^29 times smaller
    assert_update_close(wide, narrow, update(wide), dtype=np.float32)
