import math

import numpy as np
import pytest
from conftest import tiny_setup

from minidisel import TrainConfig, forward, train
from minidisel.nn import cross_entropy
from minidisel.train import adamw_init, adamw_step, clip_by_global_norm, learning_rate, parameter_groups
from minidisel.tree import flatten


def test_adamw_first_step_matches_pytorch_formula():
    config = TrainConfig(steps=10, lr=0.1, weight_decay=0.5, warmup_fraction=0.0, betas=(0.9, 0.999), eps=1e-8)
    params = {"layer": {"weight": np.array([[1.0, -2.0]]), "bias": np.array([0.5])}, "gate": {"W_g": np.array([[3.0]])}}
    grads = {"layer": {"weight": np.array([[0.2, 0.4]]), "bias": np.array([-1.0])}, "gate": {"W_g": np.array([[2.0]])}}
    new, state = adamw_step(params, grads, adamw_init(params), config, gate_lr_multiplier=5.0)

    # at step 1, m̂ = g and v̂ = g², so the Adam step is lr · g / (|g| + eps)
    lr = learning_rate(1, config)
    assert lr == pytest.approx(0.1)
    weight = np.array([1.0, -2.0]) * (1 - lr * 0.5) - lr * np.array([0.2, 0.4]) / (np.array([0.2, 0.4]) + 1e-8)
    assert np.allclose(new["layer"]["weight"][0], weight, rtol=1e-15)
    assert new["layer"]["bias"][0] == pytest.approx(0.5 + lr * 1.0 / (1.0 + 1e-8), rel=1e-15)  # no decay
    assert new["gate"]["W_g"][0, 0] == pytest.approx(3.0 - 5 * lr * 2.0 / (2.0 + 1e-8), rel=1e-15)  # 5x rate, no decay
    assert state["step"] == 1
    assert np.allclose(state["m"]["layer"]["weight"], 0.1 * np.array([[0.2, 0.4]]))
    assert np.allclose(state["v"]["layer"]["bias"], 0.001 * 1.0)


def test_every_parameter_in_exactly_one_group():
    _, params, _, adapters, _ = tiny_setup("gpt", gate_bottleneck_dim=2)
    for tree in (params, adapters):
        groups = parameter_groups(tree)
        listed = [path for paths in groups.values() for path in paths]
        assert sorted(listed) == sorted(flatten(tree))
        assert len(listed) == len(set(listed))
    gate_paths = parameter_groups(adapters)["gate"]
    assert gate_paths
    assert all(path.rsplit(".", 1)[-1] in {"V", "U", "b_g"} for path in gate_paths)
    base_groups = parameter_groups(params)
    assert "norm.weight" in base_groups["no_decay"]
    assert "layers.0.self_attn.q_proj.bias" in base_groups["no_decay"]
    assert "layers.0.mlp.up_proj.weight" in base_groups["decay"]
    assert not base_groups["gate"]


def test_schedule_warmup_then_cosine():
    config = TrainConfig(steps=100, lr=1.0, warmup_fraction=0.1)
    assert learning_rate(5, config) == pytest.approx(0.5)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(11, config) == pytest.approx(1.0)
    assert learning_rate(56, config) == pytest.approx(0.5)
    assert 0.0 < learning_rate(100, config) < 1e-3
    rates = [learning_rate(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_clip_by_global_norm():
    grads = {"a": np.array([3.0]), "b": {"c": np.array([4.0])}}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.hypot(clipped["a"][0], clipped["b"]["c"][0]) == pytest.approx(1.0, rel=1e-6)
    same, _ = clip_by_global_norm(grads, 10.0)
    assert same is grads


def make_problem(method="disel"):
    config, params, adapter_config, adapters, _ = tiny_setup("gpt", random_B=False, method=method, gate_bias_init=0.0)
    # unit-scale embeddings, so that the tied output head can express confident predictions
    params["embed_tokens"]["weight"] = params["embed_tokens"]["weight"] * 50.0

    def loss(trainable, frozen, batch, rng):
        logits = forward(frozen, batch["inputs"], config, trainable, adapter_config, training=True, rng=rng)
        return cross_entropy(logits, batch["targets"], batch["mask"])

    def sample(rng, n):
        tokens = rng.integers(0, 4, size=(n, 6))  # a learnable rule: the next token repeats this one
        tokens = np.repeat(tokens[:, :3], 2, axis=1)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((n, 5), bool)}

    return loss, adapters, params, sample


def test_training_lowers_loss_and_is_reproducible():
    loss, adapters, params, sample = make_problem()
    config = TrainConfig(steps=60, batch_size=16, lr=5e-2, seed=3, progress=False, log_every=0)
    first, history = train(loss, adapters, params, sample, config)
    second, again = train(loss, adapters, params, sample, config)
    assert np.mean(history["loss"][-5:]) < 0.9 * np.mean(history["loss"][:5])
    assert history["loss"] == again["loss"]
    for path, value in flatten(first).items():
        assert np.array_equal(value, flatten(second)[path]), path
    assert len(history["step"]) == 60
    assert history["step"][-1] == 60


def test_training_logs_fixed_format_lines():
    loss, adapters, params, sample = make_problem("lora")
    lines = []
    config = TrainConfig(steps=6, batch_size=4, progress=False, log_every=3)
    train(loss, adapters, params, sample, config, log=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("step 3/6 | loss ")
    assert "| lr " in lines[0]
    assert lines[0].endswith("ms/step")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_loss_stops_with_step():
    loss, adapters, params, sample = make_problem()
    calls = []

    def exploding(trainable, frozen, batch, rng):
        calls.append(1)
        value = loss(trainable, frozen, batch, rng)
        return value * np.inf if len(calls) == 3 else value

    config = TrainConfig(steps=5, batch_size=4, progress=False, log_every=0)
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 3; last finite loss: .* at step 2"):
        train(exploding, adapters, params, sample, config)


def test_train_rejects_bad_arguments():
    loss, adapters, params, sample = make_problem()
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(loss, adapters, params, sample, {"steps": 3})
    with pytest.raises(ValueError, match="gate_lr_multiplier must be in"):
        train(loss, adapters, params, sample, TrainConfig(steps=1), gate_lr_multiplier=0.0)
