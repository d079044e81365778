import math

import pytest

from minidisel import AdapterConfig, ModelConfig, TrainConfig


@pytest.mark.parametrize(
    "fields, error, words",
    [
        ({"d_model": 0}, ValueError, "d_model must be >= 1, got 0"),
        ({"d_model": 6.0}, TypeError, "d_model must be an int"),
        ({"n_heads": True}, TypeError, "n_heads must be an int"),
        ({"d_model": 10, "n_heads": 4}, ValueError, "divisible by n_heads"),
        ({"arch": "bert"}, ValueError, "arch must be one of 'gpt', 'llama', got 'bert'"),
        ({"dtype": "float16"}, ValueError, "dtype must be one of"),
        ({"arch": "llama", "n_kv_heads": 3}, ValueError, "multiple of n_kv_heads"),
        ({"n_kv_heads": 2}, ValueError, "n_kv_heads must equal n_heads for arch='gpt'"),
        ({"arch": "llama", "d_model": 12, "n_heads": 4}, ValueError, "head width) must be even for arch='llama'"),
        ({"norm_eps": 0.0}, ValueError, "norm_eps must be in (0.0, inf]"),
        ({"vocab_size": -3}, ValueError, "vocab_size must be >= 1, got -3"),
    ],
)
def test_model_config_rejects(fields, error, words):
    with pytest.raises(error) as raised:
        ModelConfig(**fields)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "fields, error, words",
    [
        ({"r": 0}, ValueError, "r must be >= 1, got 0"),
        ({"method": "ia3"}, ValueError, "method must be one of"),
        ({"target_modules": ["q_proj", "attn"]}, ValueError, "unknown target module 'attn'"),
        ({"target_modules": []}, ValueError, "non-empty"),
        ({"gate_bias_init": math.inf}, ValueError, "gate_bias_init must be finite"),
        ({"gate_bias_init": math.nan}, ValueError, "gate_bias_init must be finite"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout must be in [0.0, 1.0)"),
        ({"lora_dropout": -0.1}, ValueError, "lora_dropout must be in [0.0, 1.0)"),
        ({"gate_weight_init": "ones"}, ValueError, "gate_weight_init must be one of"),
        ({"gate_bottleneck_dim": 0}, ValueError, "gate_bottleneck_dim must be >= 1"),
        ({"lora_alpha": 0}, ValueError, "lora_alpha must be in (0.0, inf]"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be a bool"),
    ],
)
def test_adapter_config_rejects(fields, error, words):
    with pytest.raises(error) as raised:
        AdapterConfig(**fields)
    assert words in str(raised.value)


def test_adapter_scaling_exact():
    assert AdapterConfig(r=8, lora_alpha=16.0).scaling == 16.0 / 8
    assert AdapterConfig(r=8, lora_alpha=16.0, use_rslora=True).scaling == 16.0 / math.sqrt(8)


def test_targets_follow_architecture():
    gpt, llama = ModelConfig(), ModelConfig(arch="llama")
    assert AdapterConfig().targets_for(gpt) == ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert "gate_proj" in AdapterConfig().targets_for(llama)
    assert AdapterConfig(target_modules=["v_proj", "q_proj"]).targets_for(gpt) == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="gate_proj.*do not exist in arch='gpt'"):
        AdapterConfig(target_modules=["gate_proj"]).targets_for(gpt)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": -1.0}, "lr must be in (0.0, inf]"),
        ({"betas": (0.9,)}, "betas must be a tuple of two numbers"),
        ({"betas": (0.9, 1.0)}, "betas[1] must be in [0.0, 1.0)"),
        ({"warmup_fraction": 1.0}, "warmup_fraction must be in [0.0, 1.0)"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be in (0.0, inf]"),
    ],
)
def test_train_config_rejects(fields, words):
    with pytest.raises(ValueError) as raised:
        TrainConfig(**fields)
    assert words in str(raised.value)


def test_configs_are_frozen():
    config = ModelConfig()
    with pytest.raises(AttributeError):
        config.d_model = 128
