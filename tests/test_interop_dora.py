"""DoRA against PEFT's ``use_dora=True``, in float64: logits and gradients agree within 1e-10.

Hugging Face's Llama computes RMSNorm and the rotary tables in float32 even
for a float64 model (transformers 5.x), so the reference model gets exact
float64 replacements for those two modules before it is compared.
"""

import types

import numpy as np
import pytest
from autograd import grad

from minidisel import AdapterConfig, ModelConfig, forward, init_adapters
from minidisel.adapters import AdapterMode, dora_delta
from minidisel.nn import cross_entropy
from minidisel.tree import flatten, unflatten

torch = pytest.importorskip("torch", reason="the DoRA cross-check needs PyTorch")
transformers = pytest.importorskip("transformers", reason="the DoRA cross-check needs transformers")
peft = pytest.importorskip("peft", reason="the DoRA cross-check needs peft")

pytestmark = pytest.mark.interop

TOLERANCE = 1e-10
MODEL = ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=12, max_seq_len=16, arch="llama")
ADAPTER = AdapterConfig(method="dora", r=3, lora_alpha=5.0)
# PEFT's name for each minidisel DoRA tensor, after the layer's module path
PEFT_SUFFIXES = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"}
PEFT_PREFIX = "base_model.model.model."


def exact_rms_norm(self, x):
    """RMSNorm without the float32 round trip."""
    return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def exact_rotary(self, x, position_ids):
    """Rotary cosine and sine tables computed in float64."""
    K = MODEL.head_dim
    inv_freq = 1.0 / MODEL.rope_theta ** (torch.arange(0, K, 2, dtype=torch.float64) / K)
    angles = position_ids[..., None].double() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def reference_llama():
    """Build a random float64 LlamaForCausalLM of MODEL's sizes, with exact float64 norms and rotary tables."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=MODEL.vocab_size,
        hidden_size=MODEL.d_model,
        intermediate_size=MODEL.mlp_dim,
        num_hidden_layers=MODEL.n_layers,
        num_attention_heads=MODEL.n_heads,
        num_key_value_heads=MODEL.kv_heads,
        max_position_embeddings=MODEL.max_seq_len,
        rms_norm_eps=MODEL.norm_eps,
        rope_theta=MODEL.rope_theta,
        tie_word_embeddings=False,
        initializer_range=0.3,
        attn_implementation="sdpa",  # the eager path computes its softmax in float32
    )
    model = transformers.LlamaForCausalLM(config).double()
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(exact_rms_norm, module)
        if type(module).__name__ == "LlamaRotaryEmbedding":
            module.forward = types.MethodType(exact_rotary, module)
    return model


def base_params(model):
    """Convert the Hugging Face state dict into minidisel's parameter tree (names without ``model.``)."""
    flat = {name.removeprefix("model."): value.detach().numpy().copy() for name, value in model.state_dict().items()}
    return unflatten(flat)


def peft_dora_model(reference, seed=1):
    """Wrap ``reference`` in PEFT DoRA and move B and m away from their initial values."""
    model = peft.get_peft_model(
        reference,
        peft.LoraConfig(
            r=ADAPTER.r,
            lora_alpha=ADAPTER.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(MODEL.linear_modules),
            use_dora=True,
        ),
    ).double()
    initial = {name: value.detach().clone() for name, value in peft.get_peft_model_state_dict(model).items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model, initial


def adapters_from_peft(state_dict):
    """Convert PEFT's adapter state dict into a minidisel adapter tree."""
    flat = {}
    for name, value in state_dict.items():
        module, suffix = next(
            (name.removeprefix(PEFT_PREFIX).removesuffix("." + peft_suffix), key)
            for key, peft_suffix in PEFT_SUFFIXES.items()
            if name.endswith("." + peft_suffix)
        )
        flat[f"{module}.{suffix}"] = value.detach().numpy().copy()
    return unflatten(flat)


@pytest.fixture(scope="module")
def pair():
    """Return the PEFT model, its initial adapter state, minidisel params and adapters, and a batch."""
    reference = reference_llama()
    params = base_params(reference)  # before PEFT wraps the linear layers in place
    model, initial = peft_dora_model(reference)
    adapters = adapters_from_peft(peft.get_peft_model_state_dict(model))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, MODEL.vocab_size, size=(3, 9))
    targets = rng.integers(0, MODEL.vocab_size, size=(3, 9))
    return model, initial, params, adapters, tokens, targets


def test_magnitude_init_matches_peft(pair):
    _, initial, params, _, _, _ = pair
    ours = flatten(init_adapters(params, MODEL, ADAPTER, np.random.default_rng(0)))
    theirs = adapters_from_peft(initial)
    for path, value in flatten(theirs).items():
        if path.endswith(".m"):
            assert np.allclose(ours[path], value, rtol=0, atol=TOLERANCE), path
    assert sum(path.endswith(".m") for path in ours) == MODEL.n_layers * len(MODEL.linear_modules)


def test_logits_match_peft(pair):
    model, _, params, adapters, tokens, _ = pair
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = forward(params, tokens, MODEL, adapters, ADAPTER)
    assert np.max(np.abs(ours - theirs)) <= TOLERANCE
    assert np.max(np.abs(ours - forward(params, tokens, MODEL))) > 1e-2  # the adapter changes the output


def test_gradients_match_peft(pair):
    model, _, params, adapters, tokens, targets = pair
    model.train()
    model.zero_grad()
    logits = model(torch.tensor(tokens)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, MODEL.vocab_size), torch.tensor(targets).reshape(-1)).backward()
    # parameter names carry the adapter name and, for the magnitude, a ".weight" the saved key drops
    theirs = adapters_from_peft({
        name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): parameter.grad
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    })

    mask = np.ones(tokens.shape, dtype=bool)
    ours = grad(lambda a: cross_entropy(forward(params, tokens, MODEL, a, ADAPTER, training=True), targets, mask))(adapters)
    expected = flatten(theirs)
    assert set(flatten(ours)) == set(expected)
    for path, value in flatten(ours).items():
        assert np.max(np.abs(value - expected[path])) <= TOLERANCE, path
        assert np.any(value != 0.0), path


class FixedDropout(torch.nn.Module):
    """Inverted dropout with a given keep mask, so both libraries drop the same entries."""

    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = keep, rate

    def forward(self, x):
        return x * self.keep / (1.0 - self.rate)


def test_dropout_and_bias_match_peft():
    torch.manual_seed(3)
    rate, rng_seed = 0.25, 11
    network = torch.nn.Sequential()
    network.add_module("proj", torch.nn.Linear(6, 5, bias=True).double())
    with torch.no_grad():
        network.proj.bias.copy_(torch.randn(5, dtype=torch.float64))
    config = peft.LoraConfig(r=2, lora_alpha=3.0, lora_dropout=rate, target_modules=["proj"], use_dora=True)
    wrapped = peft.get_peft_model(network, config).double()
    layer = wrapped.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(5, 2, dtype=torch.float64))

    x = np.random.default_rng(5).standard_normal((4, 6))
    keep = np.random.default_rng(rng_seed).random(x.shape) >= rate  # the mask minidisel draws first
    layer.lora_dropout["default"] = FixedDropout(torch.tensor(keep), rate)
    wrapped.train()
    theirs = layer(torch.tensor(x)).detach().numpy()

    p = {
        "A": layer.lora_A["default"].weight.detach().numpy(),
        "B": layer.lora_B["default"].weight.detach().numpy(),
        "m": layer.lora_magnitude_vector["default"].weight.detach().numpy(),
    }
    W, b = layer.base_layer.weight.detach().numpy(), layer.base_layer.bias.detach().numpy()
    adapter_config = AdapterConfig(method="dora", r=2, lora_alpha=3.0, lora_dropout=rate)
    mode = AdapterMode(adapter_config, training=True, rng=np.random.default_rng(rng_seed))
    ours = x @ W.T + b + dora_delta(x, W, p, mode)
    assert np.max(np.abs(ours - theirs)) <= TOLERANCE
