"""minidisel's Llama-style model against transformers' LlamaForCausalLM and MistralForCausalLM."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.interop
pytest.importorskip("torch", reason="the interop tests need PyTorch: pip install -e '.[interop]'")
pytest.importorskip("transformers", reason="the interop tests need transformers: pip install -e '.[interop]'")

from interop_support import (  # noqa: E402
    max_error,
    random_tokens,
    tiny_llama,
    tiny_mistral,
    torch_logits,
    use_float64_internals,
)

from minidisel import forward  # noqa: E402
from minidisel.hf import INDEX_FILE, load_hf_model, save_hf_model  # noqa: E402


def load_into_minidisel(model, folder):
    """Save a transformers model with save_pretrained and load it with minidisel."""
    model.save_pretrained(folder)
    return load_hf_model(folder)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa-2", "mqa"])
def test_llama_logits_match_transformers(n_kv_heads, tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = tiny_llama(n_kv_heads)
    config, params = load_into_minidisel(model, tmp_path)
    tokens = random_tokens(config.vocab_size)

    error = max_error(forward(params, tokens, config), torch_logits(model, tokens))
    print(f"llama n_kv_heads={n_kv_heads}: max |logits error| = {error:.3e}")
    assert config.kv_heads == n_kv_heads
    assert config.rope_theta == 500.0
    assert error < 1e-10


def test_unpatched_llama_is_float32_close(tmp_path):
    # transformers 5.x rounds RMSNorm and rotary tables to float32 even in a float64 model
    model = tiny_llama(2)
    config, params = load_into_minidisel(model, tmp_path)
    tokens = random_tokens(config.vocab_size)

    error = max_error(forward(params, tokens, config), torch_logits(model, tokens))
    print(f"llama, transformers' own float32 internals: max |logits error| = {error:.3e}")
    assert error < 1e-5


def test_mistral_logits_match_transformers(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = tiny_mistral()
    config, params = load_into_minidisel(model, tmp_path)
    tokens = random_tokens(config.vocab_size, shape=(2, 16))

    error = max_error(forward(params, tokens, config), torch_logits(model, tokens))
    print(f"mistral: max |logits error| = {error:.3e}")
    assert config.max_seq_len == 16
    assert error < 1e-10


def test_sharded_checkpoint_loads(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = tiny_llama(2)
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1

    config, params = load_hf_model(tmp_path)
    tokens = random_tokens(config.vocab_size)
    assert max_error(forward(params, tokens, config), torch_logits(model, tokens)) < 1e-10


def test_tied_embeddings_load_as_copied_head(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    model = tiny_llama(2, tie_word_embeddings=True)
    config, params = load_into_minidisel(model, tmp_path)
    tokens = random_tokens(config.vocab_size)

    assert np.array_equal(params["lm_head"]["weight"], params["embed_tokens"]["weight"])
    assert max_error(forward(params, tokens, config), torch_logits(model, tokens)) < 1e-10


def test_minidisel_model_loads_into_transformers(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    from transformers import LlamaForCausalLM

    config, params = load_into_minidisel(tiny_llama(1, seed=3), tmp_path / "hf")
    save_hf_model(tmp_path / "minidisel", params, config)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "minidisel", attn_implementation="sdpa").eval()
    tokens = random_tokens(config.vocab_size)

    assert str(model.dtype) == "torch.float64"
    assert max_error(forward(params, tokens, config), torch_logits(model, tokens)) < 1e-10


def test_float32_weights_widen_to_float64(tmp_path, monkeypatch):
    use_float64_internals(monkeypatch)
    import torch

    model = tiny_llama(2).to(torch.float32)
    config, params = load_into_minidisel(model, tmp_path)
    reference = tiny_llama(2)  # the same weights in float64, rounded as the float32 file stores them
    reference.load_state_dict({key: value.to(torch.float64) for key, value in model.state_dict().items()})
    tokens = random_tokens(config.vocab_size)

    assert params["norm"]["weight"].dtype == np.float64
    assert max_error(forward(params, tokens, config), torch_logits(reference, tokens)) < 1e-10
