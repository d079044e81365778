"""minidisel's LoRA against PEFT's: logits, gradients and adapter files in both directions."""

import json
from dataclasses import replace

import numpy as np
import pytest

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch", reason="the interop tests need PyTorch: pip install -e '.[interop]'")
pytest.importorskip("transformers", reason="the interop tests need transformers: pip install -e '.[interop]'")
peft = pytest.importorskip("peft", reason="the interop tests need PEFT: pip install -e '.[interop]'")

from autograd import value_and_grad  # noqa: E402
from interop_support import max_error, random_tokens, tiny_llama, torch_logits, use_float64_internals  # noqa: E402

from minidisel import TrainConfig, forward, init_adapters, train  # noqa: E402
from minidisel.checkpoint import CheckpointError  # noqa: E402
from minidisel.hf import load_hf_model  # noqa: E402
from minidisel.keys import adapters_to_peft  # noqa: E402
from minidisel.nn import cross_entropy  # noqa: E402
from minidisel.peft_format import load_peft_adapter, save_peft_adapter  # noqa: E402

CASES = [
    dict(r=1, lora_alpha=2, use_rslora=False, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    dict(r=3, lora_alpha=5, use_rslora=False, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
]


def peft_lora(folder, n_kv_heads, case, seed=0):
    """Return a PEFT LoRA model on a tiny Llama, with random lora_B so that the adapter is not a no-op.

    The base model is saved to ``folder / "base"`` first, and the adapter to ``folder / "adapter"``.
    """
    base = tiny_llama(n_kv_heads, seed)
    base.save_pretrained(folder / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **case))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    model.save_pretrained(folder / "adapter")
    return model


def peft_loss_and_gradients(model, tokens, targets):
    """Return PEFT's logits, loss and ``{saved PEFT key: gradient}`` of every LoRA factor."""
    logits = model(input_ids=torch.as_tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(targets).flatten())
    loss.backward()
    grads = {
        name.replace(".default", ""): parameter.grad.numpy()
        for name, parameter in model.named_parameters()
        if "lora_" in name
    }
    return logits.detach().numpy(), loss.item(), grads


def minidisel_loss_and_gradients(params, adapters, tokens, targets, config, adapter_config):
    """Return minidisel's loss and ``{PEFT key: gradient}`` of every adapter tensor."""
    mask = np.ones(tokens.shape, dtype=bool)

    def loss_of(trainable):
        return cross_entropy(forward(params, tokens, config, trainable, adapter_config), targets, mask)

    loss, grads = value_and_grad(loss_of)(adapters)
    return float(loss), adapters_to_peft(grads, config, adapter_config)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"r{case['r']}-rslora{case['use_rslora']}")
def test_lora_logits_and_gradients_match_peft(case, n_kv_heads, tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = peft_lora(tmp_path, n_kv_heads, case)
    config, params = load_hf_model(tmp_path / "base")
    adapter_config, adapters = load_peft_adapter(tmp_path / "adapter", config)
    tokens = random_tokens(config.vocab_size, seed=1)
    targets = random_tokens(config.vocab_size, seed=2)

    peft_logits, peft_loss, peft_grads = peft_loss_and_gradients(model, tokens, targets)
    loss, grads = minidisel_loss_and_gradients(params, adapters, tokens, targets, config, adapter_config)
    logits = forward(params, tokens, config, adapters, adapter_config)
    base_logits = forward(params, tokens, config)

    peft_scalings = {m.scaling["default"] for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_scalings == {adapter_config.scaling}
    assert max_error(logits, base_logits) > 1e-3  # the adapter changes the output
    assert max_error(logits, peft_logits) < 1e-10
    assert abs(loss - peft_loss) < 1e-10
    assert sorted(grads) == sorted(peft_grads)
    gradient_error = max(max_error(grads[key], peft_grads[key]) for key in grads)
    print(f"{case} n_kv_heads={n_kv_heads}: logits {max_error(logits, peft_logits):.3e}, gradients {gradient_error:.3e}")
    assert gradient_error < 1e-10


def test_minidisel_trained_adapter_loads_into_peft(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    base = tiny_llama(2, seed=4)
    base.save_pretrained(tmp_path / "base")
    config, params = load_hf_model(tmp_path / "base")
    adapter_config = replace(peft_adapter_config(), method="lora")
    adapters = init_adapters(params, config, adapter_config, np.random.default_rng(0))

    # train on a fixed batch until the adapter has moved well away from B = 0
    tokens = random_tokens(config.vocab_size, seed=5, shape=(4, 8))
    mask = np.ones(tokens.shape, dtype=bool)

    def loss_fn(trainable, frozen, batch, rng):
        return cross_entropy(forward(frozen, batch[:, :-1], config, trainable, adapter_config), batch[:, 1:], mask[:, 1:])

    settings = TrainConfig(steps=20, batch_size=4, lr=1e-2, weight_decay=0.0, log_every=0, progress=False)
    adapters, history = train(loss_fn, adapters, params, lambda rng, size: tokens, settings)
    save_peft_adapter(tmp_path / "adapter", adapters, config, adapter_config)

    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    logits = forward(params, tokens, config, adapters, adapter_config)

    error = max_error(logits, torch_logits(model, tokens))
    print(f"minidisel-trained adapter in PeftModel.from_pretrained: max |logits error| = {error:.3e}")
    assert history["loss"][-1] < history["loss"][0]
    assert max_error(logits, forward(params, tokens, config)) > 1e-3
    assert error < 1e-10


def peft_adapter_config():
    """Return the LoRA adapter config the round-trip tests use."""
    from minidisel import AdapterConfig

    return AdapterConfig(method="lora", r=4, lora_alpha=6.0, use_rslora=True, target_modules=("q_proj", "v_proj", "down_proj"))


def test_peft_saved_adapter_loads_into_minidisel(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = peft_lora(tmp_path, 1, dict(r=2, lora_alpha=7, use_rslora=True, target_modules="all-linear"), seed=6)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config, params = load_hf_model(tmp_path / "base")
    adapter_config, adapters = load_peft_adapter(tmp_path / "adapter", config)
    tokens = random_tokens(config.vocab_size, seed=7)

    assert isinstance(saved["target_modules"], list)  # PEFT stores all-linear as the module paths
    assert adapter_config.target_modules == "all-linear"
    assert adapter_config.use_rslora is True
    error = max_error(forward(params, tokens, config, adapters, adapter_config), torch_logits(model, tokens))
    print(f"PEFT-saved adapter in minidisel: max |logits error| = {error:.3e}")
    assert error < 1e-10


@pytest.mark.parametrize(
    "option, words",
    [
        (dict(lora_bias=True), "lora_bias=True is not supported"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(layers_to_transform=[0]), "layers_to_transform=[0] is not supported"),
        (dict(bias="all"), "bias='all' is not supported"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_unsupported_peft_options_are_rejected(option, words, tmp_path):
    base = tiny_llama(2)
    base.save_pretrained(tmp_path / "base")
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], **option)).save_pretrained(
        tmp_path / "adapter"
    )
    config, _ = load_hf_model(tmp_path / "base")

    with pytest.raises(CheckpointError, match="adapter_config.json") as raised:
        load_peft_adapter(tmp_path / "adapter", config)
    assert words in str(raised.value)
