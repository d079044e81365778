"""Helpers for the tests that compare minidisel with transformers and PEFT.

Import this module only after ``pytest.importorskip("torch")`` and friends:
it imports PyTorch and transformers at the top.
"""

import os

# nothing in these tests may reach the Hugging Face hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402

SIZES = dict(
    vocab_size=13,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    rms_norm_eps=1e-5,
    attn_implementation="sdpa",  # eager attention rounds its softmax to float32
)


def rms_norm_float64(self, x):
    """Hugging Face's RMSNorm formula without its cast to float32."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def rotary_float64(self, x, position_ids):
    """Hugging Face's default rotary tables, computed in float64 instead of float32."""
    dim = 2 * self.inv_freq.shape[0]
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, K/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def use_float64_internals(monkeypatch):
    """Make Hugging Face's Llama and Mistral compute RMSNorm and rotary tables in the model's dtype.

    transformers 5.x casts to float32 in both places even for a float64 model,
    which alone gives logit errors near 1e-6. The replacements compute the same
    formulas; attention, MLP, residuals and heads stay Hugging Face's own code.
    """
    for module, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral")):
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", rms_norm_float64)
        monkeypatch.setattr(getattr(module, f"{prefix}RotaryEmbedding"), "forward", rotary_float64)


def randomize_(model, seed):
    """Draw every parameter at random, so that no weight sits at its trivial initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(noise / parameter.shape[-1] ** 0.5)
    return model


def tiny_llama(n_kv_heads=2, seed=0, **overrides):
    """Return a randomly initialised float64 LlamaForCausalLM in eval mode; nothing is downloaded."""
    config = LlamaConfig(**{**SIZES, "num_key_value_heads": n_kv_heads, "rope_theta": 500.0, **overrides})
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(config).to(torch.float64), seed).eval()


def tiny_mistral(seed=0):
    """Return a randomly initialised float64 MistralForCausalLM whose sliding window covers every sequence."""
    config = MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=16)
    torch.manual_seed(seed)
    return randomize_(MistralForCausalLM(config).to(torch.float64), seed).eval()


def random_tokens(vocab_size, seed=0, shape=(2, 7)):
    """Return a (B, T) int64 array of token ids."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape)


def torch_logits(model, tokens):
    """Return the model's logits for ``tokens`` as a NumPy array."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)).logits.numpy()


def max_error(a, b):
    """Return max |a - b|."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
