"""Inspect DISeL gates: per-token values, summaries by layer, module and rank, and figures.

Gate values come as ``{dist: {path: (N, R)}}``: for each input distribution
(``"P"``, ``"Q"``) and each adapted layer (``"layers.0.self_attn.q_proj"``),
one row per token and one column per rank component. Summaries average over
tokens (and over rank components, except the per-rank profile). Figures are
``matplotlib.figure.Figure`` objects built without pyplot, so they work in
scripts, worker processes and notebooks alike.

    values = collect_gates(params, batches, model_config, adapters, adapter_config)
    summary = summarize_gates(values)  # {dist: {"path", "layer", "module", "rank", "open", "mean"}}
    plot_gate_heatmap(mean_by_path(values)).savefig("gates.png")
"""

import numpy as np
from matplotlib.figure import Figure

from minidisel.config import ATTENTION_MODULES, check_choice
from minidisel.metrics import predict

POSITIONS = ("all", "scored")
OPEN_THRESHOLD = 0.5
MODULE_ORDER = ATTENTION_MODULES + ("gate_proj", "up_proj", "down_proj")
DIST_COLORS = {"P": "tab:gray", "Q": "tab:green"}


def collect_gates(params, batches, model_config, adapters, adapter_config, positions="all"):
    """Run the adapted model on each batch and return its gate values ``{dist: {path: (N, R)}}``.

    ``batches`` maps a distribution name to a batch dict (``inputs``, ``mask``).
    ``positions="all"`` keeps every input position; ``"scored"`` keeps the
    positions whose targets are scored (the batch's ``mask``).
    """
    check_choice("positions", positions, POSITIONS)
    if adapter_config is None or adapter_config.method != "disel":
        method = None if adapter_config is None else adapter_config.method
        raise ValueError(f"gates exist only for method='disel' adapters, got method={method!r}")
    values = {}
    for dist, batch in batches.items():
        _, gates = predict(params, batch["inputs"], model_config, adapters, adapter_config)
        mask = batch["mask"] if positions == "scored" else np.ones(batch["inputs"].shape, dtype=bool)
        values[dist] = select_tokens(gates, mask)
    return values


def select_tokens(gates, mask):
    """Keep the positions where ``mask`` is True: ``{path: (B, T, R)}`` -> ``{path: (N, R)}``."""
    return {path: g[mask] for path, g in gates.items()}


def split_path(path):
    """Split ``"layers.0.self_attn.q_proj"`` into its layer index ``"0"`` and module name ``"q_proj"``."""
    parts = path.split(".")
    return parts[1], parts[-1]


def mean_by_path(values):
    """Return ``{dist: {path: mean gate}}`` over tokens and rank components."""
    return {dist: {path: float(np.mean(g)) for path, g in paths.items()} for dist, paths in values.items()}


def group_means(means, key):
    """Average per-layer means ``{path: mean}`` into ``{key(path): mean}``.

    Every adapted layer has the same rank and reads the same tokens, so the
    mean of layer means equals the mean over all their gate values.
    """
    groups = {}
    for path, value in means.items():
        groups.setdefault(key(path), []).append(value)
    return {group: float(np.mean(members)) for group, members in groups.items()}


def summarize_gates(values, threshold=OPEN_THRESHOLD):
    """Summarise gate values per distribution.

    Returns ``{dist: {"path": {path: mean}, "layer": {index: mean},
    "module": {name: mean}, "rank": {path: [mean of component i]},
    "open": {path: fraction of values above threshold}, "mean": overall mean}}``.
    """
    summary = {}
    for dist, paths in values.items():
        means = {path: float(np.mean(g)) for path, g in paths.items()}
        summary[dist] = {
            "path": means,
            "layer": group_means(means, lambda path: split_path(path)[0]),
            "module": group_means(means, lambda path: split_path(path)[1]),
            "rank": {path: np.mean(g, axis=0).tolist() for path, g in paths.items()},
            "open": {path: float(np.mean(g > threshold)) for path, g in paths.items()},
            "mean": float(np.mean(list(means.values()))),
        }
    return summary


def format_gate_table(means):
    """Return a text table of the mean gate per layer and overall, one column per distribution.

    ``means`` is ``{dist: {path: mean gate}}``.
    """
    dists = list(means)
    by_layer = {dist: group_means(means[dist], lambda path: split_path(path)[0]) for dist in dists}
    lines = ["DISeL mean gate " + "".join(f"{dist + ' inputs':>10}" for dist in dists)]
    for layer in sorted(by_layer[dists[0]], key=int):
        lines.append(f"  layer {layer:<8}" + "".join(f"{by_layer[dist][layer]:>10.3f}" for dist in dists))
    overall = [float(np.mean(list(means[dist].values()))) for dist in dists]
    lines.append(f"  {'all layers':<14}" + "".join(f"{value:>10.3f}" for value in overall))
    return "\n".join(lines)


def most_selective_layer(means):
    """Return the adapted layer whose mean gate differs most between the first two distributions."""
    first, second = list(means)[:2]
    return max(means[first], key=lambda path: abs(means[second][path] - means[first][path]))


def gate_grid(means):
    """Arrange ``{path: mean}`` as a layer x module matrix: returns layers, modules and (L, M) values.

    Layers are in numeric order and modules in block order (attention, then
    MLP), whatever the order of ``means``. Modules a layer does not adapt are NaN.
    """
    layers, modules = [], []
    for path in means:
        layer, module = split_path(path)
        if layer not in layers:
            layers.append(layer)
        if module not in modules:
            modules.append(module)

    layers.sort(key=int)
    modules.sort(key=lambda name: MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER))
    grid = np.full((len(layers), len(modules)), np.nan)
    for path, value in means.items():
        layer, module = split_path(path)
        grid[layers.index(layer), modules.index(module)] = value
    return layers, modules, grid


def plot_gate_heatmap(means, title=None):
    """Draw the mean gate value by layer x module, one panel per distribution; return the figure.

    ``means`` is ``{dist: {path: mean gate}}``, as :func:`mean_by_path` returns
    and as the demo's ``results.json`` stores under ``"gates"``.
    """
    layers, modules, _ = gate_grid(next(iter(means.values())))
    size = ((0.7 * len(modules) + 0.6) * len(means) + 2.0, 0.6 * len(layers) + 2.2)
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(1, len(means), squeeze=False, sharey=True)[0]
    for axis, (dist, dist_means) in zip(axes, means.items()):
        layers, modules, grid = gate_grid(dist_means)
        image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                color = "white" if value < 0.6 else "black"
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
        axis.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        axis.set_title(f"{dist} inputs")
    figure.colorbar(image, ax=list(axes), label="mean gate value")
    if title:
        figure.suptitle(title)
    return figure


def plot_gate_histograms(values, bins=40, title=None):
    """Draw histograms of all gate values on each distribution's inputs, overlaid; return the figure."""
    figure = Figure(figsize=(6, 3.6))
    axis = figure.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for dist, paths in values.items():
        pooled = np.concatenate([g.ravel() for g in paths.values()])
        axis.hist(pooled, bins=edges, density=True, alpha=0.55, label=f"{dist} inputs", color=DIST_COLORS.get(dist))
    axis.set_yscale("log")
    axis.set_xlabel("gate value g_i(x), all layers and rank components")
    axis.set_ylabel("density")
    axis.legend()
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_rank_profile(values, path, title=None):
    """Draw each rank component's mean gate in layer ``path`` as a bar, its 25-75 % range as a line; return the figure."""
    dists = list(values)
    if any(path not in values[dist] for dist in dists):
        known = ", ".join(values[dists[0]])
        raise ValueError(f"no gates for layer {path!r}; adapted layers: {known}")
    rank = values[dists[0]][path].shape[-1]
    figure = Figure(figsize=(max(4.5, 0.45 * rank + 2.5), 3.4))
    axis = figure.subplots()
    width = 0.8 / len(dists)
    for k, dist in enumerate(dists):
        g = values[dist][path]  # (N, R)
        low, high = np.percentile(g, [25, 75], axis=0)  # (R,) each
        positions = np.arange(rank) + (k - (len(dists) - 1) / 2) * width
        axis.bar(positions, np.mean(g, axis=0), width, color=DIST_COLORS.get(dist), label=f"{dist} inputs")
        axis.vlines(positions, low, high, color="black", linewidth=1.0)
    axis.set_xticks(range(rank), [str(i) for i in range(rank)])
    axis.set_xlabel("rank component i")
    axis.set_ylabel("gate value (mean, 25-75 %)")
    axis.set_ylim(0.0, 1.0)
    axis.legend()
    axis.set_title(title or path)
    figure.tight_layout()
    return figure
