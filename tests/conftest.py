"""Shared fixtures: tiny models of both architectures and a fresh cache folder."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minidisel import AdapterConfig, ModelConfig, init_adapters, init_params

# Hypothesis profiles for the property tests: "ci" (the default) is fixed and fast;
# MINIDISEL_HYPOTHESIS_PROFILE=thorough draws ten times as many random examples.
settings.register_profile(
    "ci", max_examples=40, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", settings.get_profile("ci"), max_examples=400, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("MINIDISEL_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the base-model cache at a fresh folder, so tests never share state."""
    monkeypatch.setenv("MINIDISEL_CACHE", str(tmp_path / "cache"))


def tiny_model(arch="gpt", **overrides):
    """Return a small ModelConfig of ``arch``."""
    settings = dict(vocab_size=11, d_model=8, n_layers=2, n_heads=2, max_seq_len=8, arch=arch)
    if arch == "llama":
        settings.update(n_kv_heads=1, d_ff=12)
    settings.update(overrides)
    return ModelConfig(**settings)


def randomize_B(adapters, rng, scale=0.3):
    """Return adapters whose zero-initialised B factors are replaced by random values."""
    return {
        key: randomize_B(value, rng, scale) if isinstance(value, dict)
        else (scale * rng.standard_normal(value.shape) if key == "B" else value)
        for key, value in adapters.items()
    }


def tiny_setup(arch="gpt", seed=0, random_B=True, **adapter_fields):
    """Return ``(model_config, params, adapter_config, adapters, tokens)`` for a tiny model."""
    rng = np.random.default_rng(seed)
    config = tiny_model(arch)
    params = init_params(config, rng)
    adapter_config = AdapterConfig(**{"r": 3, "lora_alpha": 6.0, **adapter_fields})
    adapters = init_adapters(params, config, adapter_config, rng)
    if random_B:
        adapters = randomize_B(adapters, rng)
    tokens = rng.integers(0, config.vocab_size, size=(2, 5))
    return config, params, adapter_config, adapters, tokens


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report a skipped tutorial test as failed: every notebook must run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.nodeid.split("::")[0].endswith("test_tutorials.py"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} was skipped, but every tutorial notebook must run"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Report the tutorial test module as failed if it is skipped at collection (for example by importorskip)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and collector.nodeid.endswith("test_tutorials.py"):
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} was skipped at collection, but every tutorial notebook must run"
