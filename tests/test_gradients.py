import numpy as np
import pytest
from conftest import tiny_setup

from minidisel import forward
from minidisel.gradcheck import check_gradients
from minidisel.nn import cross_entropy


def loss_of(config, tokens):
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, dtype=bool)
    return lambda logits: cross_entropy(logits, targets, mask)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_base_gradient_matches_finite_differences(arch):
    config, params, _, _, tokens = tiny_setup(arch)
    loss = loss_of(config, tokens)
    # finite differences with h = 1e-6 on an O(1) loss: about 1e-9 absolute error
    worst = check_gradients(lambda p: loss(forward(p, tokens, config)), params, rtol=1e-5, atol=1e-8, max_entries=4)
    assert len(worst) == len([k for k in worst])


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize(
    "fields",
    [
        {"method": "lora"},
        {"method": "disel"},
        {"method": "disel", "gate_normalize": True, "gate_bias_init": 0.5},
        {"method": "disel", "gate_bottleneck_dim": 2},
        {"method": "lora", "use_rslora": True},
    ],
)
def test_adapter_gradient_matches_finite_differences(arch, fields):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, **fields)
    loss = loss_of(config, tokens)
    worst = check_gradients(
        lambda a: loss(forward(params, tokens, config, a, adapter_config)), adapters, rtol=1e-5, atol=1e-8, max_entries=4
    )
    assert any(key.endswith(".A") for key in worst)
    if fields["method"] == "disel":
        assert any(key.endswith(".b_g") for key in worst)


def test_gradient_check_detects_wrong_gradient():
    from autograd.extend import defvjp, primitive

    @primitive
    def square(x):
        return x * x

    defvjp(square, lambda ans, x: lambda g: g * 3.0 * x)  # wrong on purpose: d(x²)/dx = 2x
    params = {"w": np.array([0.5, -1.5])}
    with pytest.raises(AssertionError, match="gradient of w"):
        check_gradients(lambda p: np.sum(square(p["w"])), params)


def test_error_estimate_allows_curvature():
    import autograd.numpy as anp

    # tanh(w / 1e-4) bends on a scale of 1e-4, so at h = 1e-6 the truncation error h² f''' / 6 is
    # 1e-5 to 2.5e-5 of f' (about 1e4), ten times rtol or more
    params = {"w": np.array([3e-5, -5e-5])}

    def f(p):
        return anp.sum(anp.tanh(p["w"] / 1e-4))

    with pytest.raises(AssertionError, match="gradient of w"):
        check_gradients(f, params, rtol=1e-6, atol=1e-9)
    check_gradients(f, params, rtol=1e-6, atol=1e-9, estimate_error=True)


def test_error_estimate_still_catches_wrong_gradient():
    from autograd.extend import defvjp, primitive

    @primitive
    def square(x):
        return x * x

    defvjp(square, lambda ans, x: lambda g: g * 2.001 * x)  # wrong on purpose by 0.05 %
    params = {"w": np.array([0.5, -1.5])}
    with pytest.raises(AssertionError, match="gradient of w"):
        check_gradients(lambda p: np.sum(square(p["w"])), params, estimate_error=True)
