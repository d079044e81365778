"""Properties of whole models of both architectures, over random sizes, options, values and tokens.

Tolerances. Where both sides run the same arithmetic the check is bitwise.
Where two float64 evaluations round differently, their logits may differ by
REORDER_RTOL relative to the logits' scale, and float32 from float64 by
FLOAT32_RTOL. Gradients agree with finite differences within GRADIENT_RTOL
and GRADIENT_ATOL. Each constant explains its value where it is defined.
"""

import warnings
from dataclasses import replace

import autograd.numpy as anp
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from autograd import grad
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import (
    adapter_configs,
    adapter_layers,
    lora_factors,
    make_model,
    map_adapter_layers,
    model_configs,
    models,
    permute_ranks,
    target_modules,
    with_gate_bias,
)

from minidisel import (
    AdapterConfig,
    ModelConfig,
    adapter_paths,
    forward,
    init_adapters,
    init_params,
    merge_adapters,
    unmerge_adapters,
)
from minidisel.adapters import MERGED_MARKER, copy_tree
from minidisel.gradcheck import check_gradients
from minidisel.nn import cross_entropy
from minidisel.tree import count_parameters, flatten, tree_map

# Two float64 evaluations that differ only in rounding (another summation order, (g h) B against
# h (B g), a merged weight) start about n·u ≈ 4e-15 apart for reductions of n <= 32 terms. A
# normalisation over nearly equal features can amplify that by up to 1/sqrt(norm_eps) ≈ 316, so
# 1e-12 of the logits' scale allows one such amplification and still catches any real difference.
# The largest gap measured over 300 random models was 4e-15.
REORDER_RTOL = 1e-12

# float32's unit roundoff is 2^29 times float64's, so the same growth gives 2^29 · 1e-12 ≈ 5e-4.
# The largest gap measured over 300 random models was 4e-6.
FLOAT32_RTOL = 5e-4

# Central differences with h = 1e-6. The loss carries tens of ulps of rounding error (about
# 1e-14), which the division by 2h turns into noise near 1e-8 (the largest measured over 300
# random models: 2.7e-8). Hence 1e-7 absolute, and 1e-6 relative for large gradients. The
# truncation error h² f''' / 6 is about 1e-13 for f''' of order 1, but a sharply curved loss
# can exceed both, so the check also allows each entry the measured gap |D(2h) - D(h)|.
GRADIENT_RTOL, GRADIENT_ATOL = 1e-6, 1e-7

# A gate logit that saturates σ whatever the input: σ is exactly 1.0 above 37.5 and exactly 0 below
# -745, and c·W_g x (the logit without its bias) reached at most 1.9e3 over 2000 random models
# with open gates, where wide activations feed the next layer's gate.
SATURATING_LOGIT = 1e6


def logits(model, adapters="model", adapter_config=None, params=None, tokens=None, **options):
    """Run the model's forward pass, with its own adapters unless others are given."""
    return forward(
        model.params if params is None else params,
        model.tokens if tokens is None else tokens,
        model.config,
        model.adapters if isinstance(adapters, str) else adapters,
        adapter_config or model.adapter_config,
        **options,
    )


def base_logits(model):
    """Run the base model without adapters."""
    return forward(model.params, model.tokens, model.config)


def assert_logits_close(got, expected, rtol=REORDER_RTOL):
    """Assert ``max |got - expected| <= rtol · (1 + max |expected|)``."""
    expected = np.asarray(expected, np.float64)
    error = np.max(np.abs(np.asarray(got, np.float64) - expected))
    assert error <= rtol * (1.0 + np.max(np.abs(expected))), f"max error {error:.3g}"


def zero_B(adapters):
    """Return the adapters with every B set to zero."""
    return map_adapter_layers(adapters, lambda p: {**p, "B": np.zeros_like(p["B"])})


def next_token_loss(tokens):
    """Return the mean next-token cross-entropy of a batch as a function of its logits."""
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, dtype=bool)
    return lambda logits: cross_entropy(logits, targets, mask)


# fully open gates give LoRA


@given(models(methods=("disel",)))
def test_open_gates_give_lora_model(model):
    lora = logits(model, map_adapter_layers(model.adapters, lora_factors), replace(model.adapter_config, method="lora"))

    # g = 1 exactly and 1·h = h, so the rest is LoRA's own arithmetic: bitwise equal
    forced, gates = logits(model, gate_override=1.0, return_gates=True)
    assert all(np.all(g == 1.0) for g in flatten(gates).values())
    assert np.array_equal(forced, lora)

    # σ rounds to exactly 1.0 above a logit of 37.5. A gate bias of SATURATING_LOGIT / c gets there
    opened = map_adapter_layers(model.adapters, lambda p: with_gate_bias(p, model.adapter_config, SATURATING_LOGIT))
    saturated, gates = logits(model, opened, return_gates=True)
    assert all(np.all(g == 1.0) for g in flatten(gates).values())
    assert np.array_equal(saturated, lora)


# a constant gate is a rescaled LoRA


def constant_gate(p, config):
    """Zero the gate's input weight (W_g, or the bottleneck's U), which leaves the gate σ(c b_g)."""
    key = "W_g" if "W_g" in p else "U"
    return {**p, key: np.zeros_like(p[key])}


def rescaled_lora(p, config):
    """Return LoRA factors with B · diag(σ(c b_g)), σ evaluated independently as 1 / (1 + e^-z)."""
    c = 1.0 / np.sqrt(p["A"].shape[1]) if config.gate_normalize else 1.0
    return {"A": p["A"], "B": p["B"] / (1.0 + np.exp(-c * p["b_g"]))}


@given(models(methods=("disel",)))
def test_constant_gate_rescales_lora_model(model):
    config = model.adapter_config
    constant = map_adapter_layers(model.adapters, lambda p: constant_gate(p, config))
    rescaled = map_adapter_layers(constant, lambda p: rescaled_lora(p, config))

    # (g h) B and h (B g) round differently
    assert_logits_close(logits(model, constant), logits(model, rescaled, replace(config, method="lora")))


# closed gates give the base model


@given(models())
def test_closed_adapter_gives_base_model(model):
    base = base_logits(model)

    # each closed case adds 0·h = ±0 to every layer, and y + (±0) == y: bitwise the base output
    assert np.array_equal(logits(model, zero_B(model.adapters)), base)
    assert np.array_equal(logits(model, None), base)
    assert np.array_equal(logits(model, {"layers": {}}), base)
    if model.adapter_config.method == "disel":
        assert np.array_equal(logits(model, gate_override=0.0), base)

        # σ(z) underflows to exactly 0 below z ≈ -745. A gate bias of -SATURATING_LOGIT / c gets there
        closed_adapters = map_adapter_layers(
            model.adapters, lambda p: with_gate_bias(p, model.adapter_config, -SATURATING_LOGIT)
        )
        closed, gates = logits(model, closed_adapters, return_gates=True)
        assert all(np.all(g == 0.0) for g in flatten(gates).values())
        assert np.array_equal(closed, base)


# zero-initialised B: only B has a gradient


@given(models(zero_B=True, min_positions=2))
def test_zero_B_gradients_model(model):
    # two kinds of input leave some B without any gradient. A LayerNorm over width 1 outputs its
    # bias whatever the input. A sequence of one repeated token gives every position the same
    # value, so the attention weights, and with them q and k, do not matter.
    assume(model.config.d_model >= 2)
    assume(len(np.unique(model.tokens[0])) >= 2)
    loss = next_token_loss(model.tokens)
    grads = grad(lambda a: loss(logits(model, a)))(model.adapters)

    for path, g in flatten(grads).items():
        if path.endswith(".B"):
            assert np.any(g != 0.0), path
        else:
            assert np.all(g == 0.0), path


# permuting the rank components changes nothing


@given(models(), st.randoms(use_true_random=False))
def test_rank_permutation_invariance_model(model, random):
    def permute(p):
        order = list(range(model.adapter_config.r))
        random.shuffle(order)
        return permute_ranks(p, np.array(order))

    permuted = map_adapter_layers(model.adapters, permute)
    # the same terms summed in another order
    assert_logits_close(logits(model, permuted), logits(model))


# merging LoRA


@given(models(methods=("lora",)))
def test_merge_and_unmerge_lora(model):
    base = copy_tree(model.params)
    merged = merge_adapters(model.params, model.adapters, model.adapter_config)

    # W + s B A changes the rounding of x Wᵀ + s (x Aᵀ) Bᵀ
    assert_logits_close(logits(model, None, params=merged), logits(model))

    # a second merge would add s B A twice: it raises
    with pytest.raises(ValueError, match="already contains a merged LoRA update"):
        merge_adapters(merged, model.adapters, model.adapter_config)

    restored = unmerge_adapters(merged, model.adapters, model.adapter_config)
    with pytest.raises(ValueError, match="contains no merged LoRA update"):
        unmerge_adapters(restored, model.adapters, model.adapter_config)

    # merging and unmerging leave their input untouched, and no result shares memory with another tree
    flat_base, flat_merged, flat_restored = flatten(base), flatten(merged), flatten(restored)
    assert set(flat_restored) == set(flat_base)
    updated = {f"{path}.weight" for path in adapter_layers(model.adapters)}
    for path, original in flatten(model.params).items():
        assert np.array_equal(original, flat_base[path]), path
        assert not np.shares_memory(flat_merged[path], original), path
        assert not np.shares_memory(flat_restored[path], original), path
        assert not np.shares_memory(flat_restored[path], flat_merged[path]), path

        if path not in updated:
            assert np.array_equal(flat_restored[path], original), path
            continue
        # (W + D) - D rounds twice: within eps · (|W| + |D|), plus tiny where it underflows
        p = adapter_layers(model.adapters)[path.removesuffix(".weight")]
        update = model.adapter_config.scaling * (p["B"] @ p["A"])
        tolerance = np.finfo(np.float64).eps * (np.abs(original) + np.abs(update)) + np.finfo(np.float64).tiny
        assert np.all(np.abs(flat_restored[path] - original) <= tolerance), path

    # every merged layer carries the marker, and the restored tree none
    for path in adapter_layers(model.adapters):
        layer_path = path.split(".")
        assert MERGED_MARKER in nested(merged, layer_path)
        assert MERGED_MARKER not in nested(restored, layer_path)

    with pytest.raises(ValueError, match="cannot merge a 'disel' adapter"):
        merge_adapters(model.params, model.adapters, replace(model.adapter_config, method="disel"))


def nested(tree, keys):
    """Return ``tree[keys[0]][keys[1]]...``."""
    for key in keys:
        tree = tree[key]
    return tree


# gradients agree with central finite differences


# each checked entry costs four forward passes, so this property runs a quarter of the profile's examples
@settings(max_examples=max(1, settings().max_examples // 4))
@given(models(), st.sampled_from([0.0, 0.3]), st.integers(0, 2**32 - 1))
@example(
    model=make_model(
        ModelConfig(vocab_size=5, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=3, max_seq_len=6, arch="llama"),
        AdapterConfig(method="lora", r=1, lora_alpha=26.0),
        seed=3485,
        scale=0.3125,
        tokens=np.array([[2, 4, 0, 0]]),
    ),
    rate=0.0,
    seed=0,
)  # a sharply curved loss: at h = 1e-6 the truncation error is 1.5e-6 of o_proj's A gradient 15.4
def test_gradients_match_finite_differences(model, rate, seed):
    config = replace(model.adapter_config, lora_dropout=rate)
    loss = next_token_loss(model.tokens)

    def objective(tree):
        # a fresh generator with one seed draws the same dropout mask at every evaluation
        rng = np.random.default_rng(seed)
        return loss(forward(tree["base"], model.tokens, model.config, tree["adapters"], config, training=True, rng=rng))

    # every tensor of the base model and of the adapters, at two random entries each
    tree = {"base": model.params, "adapters": model.adapters}
    rng = np.random.default_rng(seed)
    worst = check_gradients(
        objective, tree, rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL, max_entries=2, rng=rng, estimate_error=True
    )
    assert set(worst) == set(flatten(tree))


# causality


@given(models(min_positions=2), st.data())
def test_causal_model(model, data):
    B, T = model.tokens.shape
    t = data.draw(st.integers(0, T - 2), label="t")
    later = data.draw(hnp.arrays(np.int64, (B, T - t - 1), elements=st.integers(0, model.config.vocab_size - 1)))
    changed = np.concatenate([model.tokens[:, : t + 1], later], axis=1)

    before, gates_before = logits(model, return_gates=True)
    after, gates_after = logits(model, tokens=changed, return_gates=True)

    # masked attention weights are exactly 0, so positions <= t run the same arithmetic: bitwise equal
    assert np.array_equal(before[:, : t + 1], after[:, : t + 1])
    for path, g in flatten(gates_before).items():
        assert np.array_equal(g[:, : t + 1], flatten(gates_after)[path][:, : t + 1]), path


# batch independence


@given(models())
def test_batch_independence(model):
    batch, batch_gates = logits(model, return_gates=True)

    for b in range(model.tokens.shape[0]):
        single, gates = logits(model, tokens=model.tokens[b : b + 1], return_gates=True)
        # numpy may pick other BLAS kernels or blocking for another batch size, so an example can
        # round differently. Mixing examples would show up far above rounding.
        assert_logits_close(single[0], batch[b])
        for path, g in flatten(gates).items():
            assert_logits_close(g[0], flatten(batch_gates)[path][b])


# gates stay in [0, 1] and finite for logits up to ±1e4


@given(
    st.one_of(models(methods=("disel",)), models(methods=("disel",), dtype="float32")),
    st.floats(-1e4, 1e4),
    st.randoms(use_true_random=False),
)
def test_gates_bounded_for_huge_logits_model(model, logit, random):
    def bias(p):
        signs = np.array([random.choice([-1.0, 1.0]) for _ in range(model.adapter_config.r)])
        return {**p, "b_g": (signs * with_gate_bias(p, model.adapter_config, logit)["b_g"]).astype(p["b_g"].dtype)}

    adapters = map_adapter_layers(model.adapters, bias)
    loss = next_token_loss(model.tokens)

    # overflow, division by zero and invalid operations raise. Underflow to 0 is the correctly rounded result.
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        out, gates = logits(model, adapters, return_gates=True)
        grads = grad(lambda a: loss(logits(model, a)))(adapters)

    assert np.all(np.isfinite(out))
    for path, g in flatten(gates).items():
        assert g.dtype == np.dtype(model.config.dtype), path
        assert np.all((g >= 0.0) & (g <= 1.0)), path
    for path, g in flatten(grads).items():
        assert np.all(np.isfinite(g)), path


# parameter counts


@given(model_configs(), st.data())
def test_parameter_counts_closed_form(config, data):
    adapter_config = data.draw(adapter_configs(target_modules=data.draw(target_modules(config))))
    params = init_params(config, np.random.default_rng(0))
    adapters = init_adapters(params, config, adapter_config, np.random.default_rng(1))
    layers = adapter_layers(adapters)
    assert set(layers) == set(adapter_paths(config, adapter_config))

    r, d_b = adapter_config.r, adapter_config.gate_bottleneck_dim
    for path, p in layers.items():
        d_out, d_in = nested(params, path.split("."))["weight"].shape
        expected = r * (d_in + d_out)  # A (R, in) and B (out, R)
        if adapter_config.method == "disel":
            expected += r * d_in + r if d_b is None else (d_in + r) * d_b + r
        assert count_parameters(p) == expected, path


# dropout


@given(models(), st.floats(0.0, 0.95), st.integers(0, 2**32 - 1))
def test_dropout_model(model, rate, seed):
    dropped = replace(model.adapter_config, lora_dropout=rate)
    evaluation = logits(model)

    # evaluation mode never drops and draws nothing from the generator
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    assert np.array_equal(logits(model, adapter_config=dropped, rng=rng), evaluation)
    assert rng.bit_generator.state == state

    # training with rate 0 is evaluation
    no_dropout = replace(model.adapter_config, lora_dropout=0.0)
    assert np.array_equal(logits(model, adapter_config=no_dropout, training=True), evaluation)

    # dropout acts on the adapters' input only: a closed adapter leaves the base output bitwise
    base = base_logits(model)
    training = dict(adapter_config=dropped, training=True, rng=np.random.default_rng(seed))
    assert np.array_equal(logits(model, zero_B(model.adapters), **training), base)
    if model.adapter_config.method == "disel":
        assert np.array_equal(logits(model, gate_override=0.0, **training), base)


# float32 tracks float64


@given(models(dtype="float32"))
def test_float32_tracks_float64_model(model):
    narrow, narrow_gates = logits(model, return_gates=True)
    assert narrow.dtype == np.float32
    for path, g in flatten(narrow_gates).items():
        assert g.dtype == np.float32, path

    # the same float32 values, widened exactly, then run in float64
    wide_config = replace(model.config, dtype="float64")
    wide, wide_gates = forward(
        widen(model.params), model.tokens, wide_config, widen(model.adapters), model.adapter_config, return_gates=True
    )
    assert_logits_close(narrow, wide, FLOAT32_RTOL)
    for path, g in flatten(wide_gates).items():
        assert_logits_close(flatten(narrow_gates)[path], g, FLOAT32_RTOL)


def widen(tree):
    """Return a float64 copy of a tree of float32 arrays (exact: every float32 is a float64)."""
    return tree_map(lambda leaf: leaf.astype(np.float64), tree)


# every configuration that constructs also runs


@given(
    st.sampled_from(["gpt", "llama"]),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 4),
)
@example(arch="llama", n_heads=1, head_dim=3, n_kv_heads=1, positions=1)  # rotary tables need an even head width
def test_accepted_config_runs(arch, n_heads, head_dim, n_kv_heads, positions):
    try:
        config = ModelConfig(
            vocab_size=5, d_model=n_heads * head_dim, n_layers=1, n_heads=n_heads,
            n_kv_heads=n_kv_heads, d_ff=4, max_seq_len=4, arch=arch,
        )
    except ValueError:
        return
    tokens = np.arange(positions)[None, :] % config.vocab_size
    out = forward(init_params(config, np.random.default_rng(0)), tokens, config)
    assert out.shape == (1, positions, config.vocab_size)
    assert np.all(np.isfinite(out))
