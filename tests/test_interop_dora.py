"""minidisel's DoRA against PEFT's ``use_dora=True``, in float64: logits, gradients and adapter files."""

import numpy as np
import pytest

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch", reason="the interop tests need PyTorch: pip install -e '.[interop]'")
pytest.importorskip("transformers", reason="the interop tests need transformers: pip install -e '.[interop]'")
peft = pytest.importorskip("peft", reason="the interop tests need PEFT: pip install -e '.[interop]'")

from autograd import value_and_grad  # noqa: E402
from interop_support import max_error, random_tokens, tiny_llama, torch_logits, use_float64_internals  # noqa: E402

from minidisel import AdapterConfig, forward, init_adapters  # noqa: E402
from minidisel.adapters import AdapterMode, dora_delta  # noqa: E402
from minidisel.hf import load_hf_model  # noqa: E402
from minidisel.keys import adapters_to_peft  # noqa: E402
from minidisel.nn import cross_entropy  # noqa: E402
from minidisel.peft_format import load_peft_adapter, save_peft_adapter  # noqa: E402
from minidisel.tree import flatten, unflatten  # noqa: E402

TOLERANCE = 1e-10
CASES = [
    dict(r=3, lora_alpha=5, use_rslora=False, target_modules="all-linear"),
    dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
]


def peft_dora(folder, case, seed=0):
    """Return a PEFT DoRA model on a tiny Llama with B and m moved away from their initial values.

    The base model is saved to ``folder / "base"``, the initial adapter to
    ``folder / "initial"`` and the changed adapter to ``folder / "adapter"``.
    """
    base = tiny_llama(2, seed)
    base.save_pretrained(folder / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, use_dora=True, **case))
    model.save_pretrained(folder / "initial")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if "lora_B" in name:
                parameter.copy_(0.3 * noise)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + 0.2 * noise)
    model.save_pretrained(folder / "adapter")
    return model


def saved_key(name):
    """Return the saved PEFT key of a parameter name: no adapter name, no ``.weight`` after the magnitude."""
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("case", CASES, ids=["all-linear", "rslora-some"])
def test_dora_magnitude_init_matches_peft(case, tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    peft_dora(tmp_path, case)
    config, params = load_hf_model(tmp_path / "base")
    adapter_config, initial = load_peft_adapter(tmp_path / "initial", config)
    assert adapter_config.method == "dora"
    ours = flatten(init_adapters(params, config, adapter_config, np.random.default_rng(0)))
    magnitudes = [path for path in ours if path.endswith(".m")]
    assert magnitudes
    for path in magnitudes:
        assert max_error(ours[path], flatten(initial)[path]) <= TOLERANCE, path


@pytest.mark.parametrize("case", CASES, ids=["all-linear", "rslora-some"])
def test_dora_logits_and_gradients_match_peft(case, tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = peft_dora(tmp_path, case)
    config, params = load_hf_model(tmp_path / "base")
    adapter_config, adapters = load_peft_adapter(tmp_path / "adapter", config)
    tokens = random_tokens(config.vocab_size, seed=1)
    targets = random_tokens(config.vocab_size, seed=2)

    # PEFT: logits, loss and gradients
    logits = model(input_ids=torch.as_tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(targets).flatten())
    loss.backward()
    theirs = {saved_key(name): p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}

    # minidisel: the same, keyed by PEFT's names
    mask = np.ones(tokens.shape, dtype=bool)

    def loss_of(trainable):
        return cross_entropy(forward(params, tokens, config, trainable, adapter_config), targets, mask)

    our_loss, grads = value_and_grad(loss_of)(adapters)
    ours = adapters_to_peft(grads, config, adapter_config)

    error = max_error(forward(params, tokens, config, adapters, adapter_config), logits.detach().numpy())
    gradient_error = max(max_error(gradient, theirs.get(key, np.inf)) for key, gradient in ours.items())
    print(f"DoRA {case['target_modules']}: max |logits error| = {error:.3e}, max |gradient error| = {gradient_error:.3e}")
    assert error <= TOLERANCE
    assert max_error(forward(params, tokens, config), logits.detach().numpy()) > 1e-2  # the adapter changes the output
    assert abs(float(our_loss) - loss.item()) <= TOLERANCE
    assert set(ours) == set(theirs)
    assert any(key.endswith(".lora_magnitude_vector") for key in ours)
    for key, gradient in ours.items():
        assert max_error(gradient, theirs[key]) <= TOLERANCE, key
        assert np.any(gradient != 0.0), key


def test_minidisel_dora_adapter_loads_in_peft(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    base = tiny_llama(2, seed=4)
    base.save_pretrained(tmp_path / "base")
    config, params = load_hf_model(tmp_path / "base")
    adapter_config = AdapterConfig(method="dora", r=2, lora_alpha=3.0, target_modules=("k_proj", "up_proj"))
    rng = np.random.default_rng(5)
    adapters = init_adapters(params, config, adapter_config, rng)
    changed = {}
    for path, value in flatten(adapters).items():
        if path.endswith(".B"):
            value = 0.3 * rng.standard_normal(value.shape)
        if path.endswith(".m"):
            value = value * (1.0 + 0.2 * rng.standard_normal(value.shape))
        changed[path] = value
    adapters = unflatten(changed)
    save_peft_adapter(tmp_path / "adapter", adapters, config, adapter_config)

    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = random_tokens(config.vocab_size, seed=6)
    error = max_error(forward(params, tokens, config, adapters, adapter_config), torch_logits(loaded, tokens))
    assert error <= TOLERANCE


class FixedDropout(torch.nn.Module):
    """Inverted dropout with a given keep mask, so both libraries drop the same entries."""

    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = keep, rate

    def forward(self, x):
        return x * self.keep / (1.0 - self.rate)


def test_dora_dropout_and_bias_match_peft():
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

    # PEFT in training mode, dropping the entries that minidisel's first draw from rng_seed drops
    x = np.random.default_rng(5).standard_normal((4, 6))
    keep = np.random.default_rng(rng_seed).random(x.shape) >= rate
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
    assert max_error(ours, theirs) <= TOLERANCE
