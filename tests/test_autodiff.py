import autograd.numpy as anp
import numpy as np
import pytest
from autograd import value_and_grad
from conftest import tiny_setup

from minidisel.autodiff import leafwise_value_and_grad
from minidisel.experiment import language_model_loss
from minidisel.tree import flatten


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("fused", [False, True])
def test_leafwise_equals_autograd(arch, fused):
    config, params, adapter_config, adapters, tokens = tiny_setup(arch, lora_dropout=0.2)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "mask": np.ones(tokens.shape, dtype=bool)}

    def loss(trainable, frozen, batch, seed):
        rng = np.random.default_rng(seed)
        return language_model_loss(trainable, frozen, batch, rng, config, adapter_config, fused=fused)

    expected_value, expected = value_and_grad(loss)(adapters, params, batch, 3)
    value, gradients = leafwise_value_and_grad(loss)(adapters, params, batch, 3)
    assert value == expected_value
    assert flatten(gradients).keys() == flatten(expected).keys()
    for path, g in flatten(expected).items():
        assert np.allclose(flatten(gradients)[path], g, rtol=1e-13, atol=1e-16), path


def test_leafwise_handles_shared_and_unused_leaves():
    tree = {"a": np.array([1.0, 2.0]), "inner": {"b": np.array(3.0), "unused": np.ones((2, 2))}}

    def f(t):
        return anp.sum(t["a"] * t["inner"]["b"]) + anp.sum(t["a"] ** 2)

    value, gradients = leafwise_value_and_grad(f)(tree)
    assert value == 9.0 + 5.0
    assert np.array_equal(gradients["a"], np.array([3.0 + 2.0, 3.0 + 4.0]))
    assert gradients["inner"]["b"] == 3.0
    assert np.array_equal(gradients["inner"]["unused"], np.zeros((2, 2)))


def test_leafwise_constant_function_gives_zeros():
    tree = {"w": np.arange(3.0)}
    value, gradients = leafwise_value_and_grad(lambda t: 2.5)(tree)
    assert value == 2.5
    assert np.array_equal(gradients["w"], np.zeros(3))


def test_leafwise_rejects_non_scalar():
    with pytest.raises(TypeError, match="must return a scalar"):
        leafwise_value_and_grad(lambda t: t["w"] * 2.0)({"w": np.ones(3)})


def test_leafwise_keeps_float32_gradients():
    tree = {"w": np.ones(3, dtype=np.float32)}
    value, gradients = leafwise_value_and_grad(lambda t: anp.sum(t["w"]) / np.int64(3))(tree)
    assert gradients["w"].dtype == np.float32
    assert np.allclose(gradients["w"], 1.0 / 3.0)
