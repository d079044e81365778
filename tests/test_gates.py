import numpy as np
import pytest
from conftest import tiny_setup
from matplotlib.figure import Figure

from minidisel import AdapterConfig, forward
from minidisel.gates import (
    collect_gates,
    format_gate_table,
    gate_grid,
    mean_by_path,
    most_selective_layer,
    plot_gate_heatmap,
    plot_gate_histograms,
    plot_rank_profile,
    summarize_gates,
)
from minidisel.tree import flatten


def gate_setup(**fields):
    """Return a tiny DISeL model with open-ish gates and batches of two distributions."""
    config, params, adapter_config, adapters, _ = tiny_setup("gpt", gate_bias_init=0.0, **fields)
    rng = np.random.default_rng(8)
    batches = {}
    for dist, low in (("P", 0), ("Q", 5)):
        inputs = rng.integers(low, low + 5, size=(4, 6))
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, 3:] = True
        batches[dist] = {"inputs": inputs, "mask": mask}
    return config, params, adapter_config, adapters, batches


def test_collect_gates_matches_forward():
    config, params, adapter_config, adapters, batches = gate_setup()
    values = collect_gates(params, batches, config, adapters, adapter_config)
    scored = collect_gates(params, batches, config, adapters, adapter_config, positions="scored")
    for dist, batch in batches.items():
        # collect_gates evaluates with predict's default, the fused layers
        _, tree = forward(params, batch["inputs"], config, adapters, adapter_config, return_gates=True, fused=True)
        expected = flatten(tree)
        assert set(values[dist]) == set(expected)
        for path, g in expected.items():
            assert values[dist][path].shape == (4 * 6, adapter_config.r)
            assert np.array_equal(values[dist][path], g.reshape(-1, adapter_config.r))
            assert np.array_equal(scored[dist][path], g[:, 3:].reshape(-1, adapter_config.r))


def test_collect_gates_rejects_bad_input():
    config, params, _, adapters, batches = gate_setup()
    with pytest.raises(ValueError, match="positions must be one of 'all', 'scored', got 'answers'"):
        collect_gates(params, batches, config, adapters, AdapterConfig(r=3), positions="answers")
    with pytest.raises(ValueError, match="gates exist only for method='disel' adapters, got method='lora'"):
        collect_gates(params, batches, config, adapters, AdapterConfig(method="lora", r=3))


def test_summary_matches_direct_means():
    config, params, adapter_config, adapters, batches = gate_setup()
    values = collect_gates(params, batches, config, adapters, adapter_config)
    summary = summarize_gates(values, threshold=0.5)
    for dist, paths in values.items():
        layer_0 = np.concatenate([g.ravel() for path, g in paths.items() if path.startswith("layers.0.")])
        v_proj = np.concatenate([g.ravel() for path, g in paths.items() if path.endswith(".v_proj")])
        everything = np.concatenate([g.ravel() for g in paths.values()])
        q = paths["layers.1.self_attn.q_proj"]
        assert summary[dist]["layer"]["0"] == pytest.approx(layer_0.mean(), rel=1e-12)
        assert summary[dist]["module"]["v_proj"] == pytest.approx(v_proj.mean(), rel=1e-12)
        assert summary[dist]["mean"] == pytest.approx(everything.mean(), rel=1e-12)
        assert summary[dist]["rank"]["layers.1.self_attn.q_proj"] == pytest.approx(q.mean(axis=0).tolist(), rel=1e-12)
        assert summary[dist]["open"]["layers.1.self_attn.q_proj"] == np.mean(q > 0.5)
        assert summary[dist]["path"] == mean_by_path(values)[dist]
        assert set(summary[dist]["module"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_gate_grid_marks_unadapted_modules():
    means = {"layers.0.self_attn.q_proj": 0.1, "layers.0.mlp.down_proj": 0.2, "layers.1.self_attn.q_proj": 0.3}
    layers, modules, grid = gate_grid(means)
    assert layers == ["0", "1"]
    assert modules == ["q_proj", "down_proj"]
    assert grid[0, 0] == 0.1
    assert grid[0, 1] == 0.2
    assert grid[1, 0] == 0.3
    assert np.isnan(grid[1, 1])


def test_most_selective_layer():
    means = {"P": {"a.0.x.q": 0.1, "a.0.x.k": 0.2}, "Q": {"a.0.x.q": 0.15, "a.0.x.k": 0.9}}
    assert most_selective_layer(means) == "a.0.x.k"


def test_gate_table_lists_layers():
    table = format_gate_table({"P": {"layers.0.m.q": 0.1, "layers.1.m.q": 0.3}, "Q": {"layers.0.m.q": 0.5, "layers.1.m.q": 0.7}})
    lines = table.splitlines()
    assert lines[0].split() == ["DISeL", "mean", "gate", "P", "inputs", "Q", "inputs"]
    assert lines[1].split() == ["layer", "0", "0.100", "0.500"]
    assert lines[3].split() == ["all", "layers", "0.200", "0.600"]


def test_gate_figures_render(tmp_path):
    config, params, adapter_config, adapters, batches = gate_setup(target_modules=["q_proj", "down_proj"])
    values = collect_gates(params, batches, config, adapters, adapter_config)
    heatmap = plot_gate_heatmap(mean_by_path(values), "title")
    assert isinstance(heatmap, Figure) and len(heatmap.axes) == 3  # P, Q and the colour bar
    histograms = plot_gate_histograms(values)
    assert len(histograms.axes[0].patches) == 2 * 40
    profile = plot_rank_profile(values, "layers.1.mlp.down_proj")
    assert len(profile.axes[0].patches) == 2 * adapter_config.r
    for name, figure in (("heatmap", heatmap), ("histograms", histograms), ("profile", profile)):
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no gates for layer 'layers.1.mlp.up_proj'; adapted layers: "):
        plot_rank_profile(values, "layers.1.mlp.up_proj")
