# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Reading the gates
#
# A trained DISeL adapter carries a record of where it adapts: every adapted layer has one gate per rank
# component, evaluated at every token, $g(x) = \sigma(W_g x + b_g) \in (0, 1)^r$. This notebook reads that
# record for a small transformer fine-tuned on the `markov` family: gate values per layer, module and
# component, on P inputs and on Q inputs; their histograms; which components open and which of them
# matter; and what that says about where the adaptation happens.

# %%
# %matplotlib inline
import platform
from importlib.metadata import version

import matplotlib.pyplot as plt
import numpy
from IPython.display import display

import minidisel
from minidisel import AdapterConfig, ModelConfig, TrainConfig, adapter_paths, forward
from minidisel import nn
from minidisel.adapters import gate_values
from minidisel.experiment import Recipe, evaluate, evaluation_sets, finetune, pretrain
from minidisel.gates import (
    collect_gates,
    format_gate_table,
    mean_by_path,
    plot_gate_heatmap,
    plot_gate_histograms,
    plot_rank_profile,
    summarize_gates,
)
from minidisel.metrics import predict, score
from minidisel.tasks import make_task
from minidisel.tree import flatten, unflatten

SEED = 0
print(f"python {platform.python_version()}, numpy {numpy.__version__}, autograd {version('autograd')}, "
      f"matplotlib {version('matplotlib')}, minidisel {minidisel.__version__} from {minidisel.__file__}")
print(f"seed {SEED}")

# %% [markdown]
# ## A model to read
#
# A two-layer model of width 32 is pre-trained on P (one Markov chain over the digits) and fine-tuned
# with DISeL on Q (another chain over the same digits): rank 4 on every linear layer, DISeL's default
# gates ($b_g = -3$, gate learning rate five times the base rate). This is smaller and shorter than
# `minidisel demo`, so that the notebook runs in seconds.

# %%
task = make_task("markov")
config = ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
pretrain_config = TrainConfig(steps=200, batch_size=16, lr=1e-2, log_every=0, progress=False)
recipe = Recipe(model=config, pretrain=pretrain_config, finetune_steps=100, finetune_batch_size=16,
                learning_rates=(("full", 3e-3), ("lora", 1e-2), ("disel", 1e-2)),
                adapter=AdapterConfig(method="disel", r=4, lora_alpha=8.0), eval_size=256)
adapter_config = recipe.adapter_for("disel")

base, _ = pretrain(task, config, pretrain_config, seed=SEED)
params, adapters, _ = finetune(base, task, "disel", recipe, SEED)
eval_sets = evaluation_sets(task, SEED, recipe.eval_size)
before = evaluate(base, eval_sets, task, config)
after = evaluate(params, eval_sets, task, config, adapters, adapter_config)
for dist in "PQ":
    print(f"NLL on {dist}: base {before[dist]['metrics']['nll']:.3f} -> DISeL {after[dist]['metrics']['nll']:.3f}")
assert after["Q"]["metrics"]["nll"] < before["Q"]["metrics"]["nll"]

# %% [markdown]
# ## Getting the gates out
#
# `forward(..., return_gates=True)` returns the logits and a gate tree that mirrors the adapter tree:
# one `(B, T, R)` array per adapted layer, one value per sequence, position and rank component.
# `minidisel.tree.flatten` turns it into `{dotted path: array}`.

# %%
inputs = {dist: eval_sets[dist]["inputs"] for dist in "PQ"}
_, gate_tree = forward(params, inputs["P"], config, adapters, adapter_config, return_gates=True)
gates_P = flatten(gate_tree)
_, gates_Q = predict(params, inputs["Q"], config, adapters, adapter_config)  # the same, in chunks, flattened

paths = adapter_paths(config, adapter_config)
assert list(gates_P) == paths
assert list(gates_Q) == paths
B, T = inputs["P"].shape
for path in paths:
    assert gates_P[path].shape == (B, T, adapter_config.r)
    assert numpy.all((gates_P[path] >= 0) & (gates_P[path] <= 1))  # σ rounds to exactly 1.0 past z ≈ 37
print(len(paths), "adapted layers, e.g.", paths[0], gates_P[paths[0]].shape)

# %% [markdown]
# As a check, recompute one layer's gates from its input. The first block's query projection reads
# $h = \mathrm{LN}(E_{w_t} + P_t)$, and its gates are $\sigma(W_g h + b_g)$:

# %%
x = params["embed_tokens"]["weight"][inputs["P"]] + params["embed_positions"]["weight"][:T]
h = nn.layer_norm(x, params["layers"]["0"]["input_layernorm"], config.norm_eps)
q_adapter = adapters["layers"]["0"]["self_attn"]["q_proj"]
assert numpy.allclose(gate_values(h, q_adapter, adapter_config), gates_P["layers.0.self_attn.q_proj"], rtol=0, atol=1e-15)
print("recomputed gates of layers.0.self_attn.q_proj match the ones forward returned")

# %% [markdown]
# For everything that follows, `minidisel.gates` does the bookkeeping. `collect_gates` runs the model on
# a batch of each distribution and returns `{dist: {path: (N, R)}}`, one row per token;
# `summarize_gates` averages them by layer, module and rank component; `mean_by_path` and
# `format_gate_table` give the mean gate per adapted layer.

# %%
values = collect_gates(params, eval_sets, config, adapters, adapter_config)
R = adapter_config.r
assert numpy.allclose(values["P"]["layers.0.self_attn.q_proj"], gates_P["layers.0.self_attn.q_proj"].reshape(-1, R), rtol=0, atol=1e-12)
summary = summarize_gates(values)
print(format_gate_table(mean_by_path(values)))

# %% [markdown]
# ## Gate values per layer, module and rank component
#
# First the mean gate per layer and module (over tokens and rank components), on P inputs and on Q
# inputs. At initialisation every gate was close to $\sigma(-3)$; anything far from that, training moved.

# %%
display(plot_gate_heatmap(mean_by_path(values)))  # gates' figures are built without pyplot, so display them

# %% [markdown]
# A layer's mean hides its components. Here is the mean gate of every rank component
# (`summary[dist]["rank"]`), on P, on Q, and the difference.

# %%
def short(path):
    return path.replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


mean_P = numpy.array([summary["P"]["rank"][path] for path in paths])  # (layers, R)
mean_Q = numpy.array([summary["Q"]["rank"][path] for path in paths])
assert numpy.allclose(mean_P, numpy.stack([gates_P[path].mean(axis=(0, 1)) for path in paths]))

figure, axes = plt.subplots(1, 3, figsize=(11, 5), sharey=True)
for axis, grid, title, cmap, low, high in (
    (axes[0], mean_P, "mean gate on P", "viridis", 0, 1),
    (axes[1], mean_Q, "mean gate on Q", "viridis", 0, 1),
    (axes[2], mean_Q - mean_P, "Q minus P", "RdBu_r", -0.3, 0.3),
):
    image = axis.imshow(grid, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    axis.set_title(title)
    axis.set_xticks(range(adapter_config.r), [f"i = {i}" for i in range(adapter_config.r)])
    axis.set_xlabel("rank component")
    figure.colorbar(image, ax=axis, shrink=0.7)
axes[0].set_yticks(range(len(paths)), [short(path) for path in paths])
figure.tight_layout()

print(f"sigma(-3) = {1 / (1 + numpy.exp(3)):.4f}; trained mean gates range from {mean_Q.min():.3f} to {mean_Q.max():.3f}")
print(f"largest |Q - P| difference of a component's mean gate: {numpy.abs(mean_Q - mean_P).max():.3f}")
assert mean_Q.min() < 1 / (1 + numpy.exp(3))
assert mean_Q.max() > 0.95

# %% [markdown]
# ## Histograms by input distribution
#
# Means hide the spread. First all gate values pooled (`plot_gate_histograms`, note the log scale),
# then, for each adapted layer, the histogram of its gate values (every token and component) on P
# inputs and on Q inputs:

# %%
display(plot_gate_histograms(values))

figure, axes = plt.subplots(2, 6, figsize=(15, 5), sharex=True)
bins = numpy.linspace(0, 1, 26)
for axis, path in zip(axes.ravel(), paths):
    axis.hist(values["P"][path].ravel(), bins=bins, alpha=0.6, density=True, label="P inputs", color="tab:gray")
    axis.hist(values["Q"][path].ravel(), bins=bins, alpha=0.6, density=True, label="Q inputs", color="tab:green")
    axis.set_title(short(path), fontsize=9)
    axis.set_yticks([])
axes[0, 0].legend(fontsize=8)
for axis in axes[1]:
    axis.set_xlabel("gate value")
figure.tight_layout()

# %% [markdown]
# Two things stand out. Most gate values sit near 0 or near 1: after training, a component is switched
# on for some tokens and off for others, rather than half open everywhere. And the P and Q histograms
# lie almost on top of each other. Both distributions are made of the same ten digits, and the first
# block's query, key and value gates read a function of the token and its position only. So the same
# digit at the same position gets exactly the same gate, whether it comes from P or from Q. Later gates
# also see the context, which differs between the chains in how often each digit follows another.

# %%
def matched_difference(path):
    """Return the largest gate difference between a P token and a Q token with the same id at the same position."""
    largest = 0.0
    for t in range(T):
        for token in range(10):
            in_P = gates_P[path][:, t][inputs["P"][:, t] == token]
            in_Q = gates_Q[path][:, t][inputs["Q"][:, t] == token]
            if len(in_P) and len(in_Q):
                largest = max(largest, numpy.abs(in_P[:, None, :] - in_Q[None, :, :]).max())
    return largest


for path in ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"):
    print(f"{path:<28} largest gate difference for the same token at the same position: {matched_difference(path):.2e}")
assert matched_difference("layers.0.self_attn.q_proj") < 1e-12
assert matched_difference("layers.1.self_attn.q_proj") > 1e-3

# %% [markdown]
# ## Which components open, and which matter
#
# An open gate only matters if its component writes something. The size of component $i$'s rank-one
# matrix is $\lVert s\, b_i a_i^\top \rVert_F = s\, \lVert b_i \rVert\, \lVert a_i \rVert$, and what it adds at a token is
# $g_i(x)$ times that matrix applied to $x$. Plotting each component's mean gate on Q against its size
# separates components that are open and large (doing the adapting) from open but small ones.

# %%
sizes = numpy.stack([
    adapter_config.scaling
    * numpy.linalg.norm(flatten(adapters)[f"{path}.B"], axis=0)
    * numpy.linalg.norm(flatten(adapters)[f"{path}.A"], axis=1)
    for path in paths
])  # (layers, R)

figure, axis = plt.subplots(figsize=(6.5, 4.2))
for index, path in enumerate(paths):
    axis.scatter(mean_Q[index], sizes[index], s=25, label=short(path), marker="os^v<>"[index % 6],
                 color=plt.cm.tab20(index))
axis.set_xlabel("mean gate on Q inputs")
axis.set_ylabel(r"component size $s\,\|b_i\|\,\|a_i\|$")
axis.legend(fontsize=7, ncol=2)
figure.tight_layout()

# %% [markdown]
# Closing a component is the same as zeroing its column of $B$, so we can ask directly how much each
# adapted layer contributes. We close all of one layer's components at a time and measure the NLL on Q
# (how much of the new task is lost) and on P (how much of the base comes back).

# %%
def close_components(adapters, path, components=slice(None)):
    """Return a copy of ``adapters`` with the given components of the layer at ``path`` closed (columns of B zeroed)."""
    flat = {key: value.copy() for key, value in flatten(adapters).items()}
    flat[f"{path}.B"][:, components] = 0.0
    return unflatten(flat)


def nll(adapters, dist):
    logits, _ = predict(params, inputs[dist], config, adapters, adapter_config)
    return score(logits, eval_sets[dist], has_answers=False)["nll"]


full_Q, full_P = nll(adapters, "Q"), nll(adapters, "P")
loss_on_Q = numpy.array([nll(close_components(adapters, path), "Q") - full_Q for path in paths])
gain_on_P = numpy.array([full_P - nll(close_components(adapters, path), "P") for path in paths])

figure, axis = plt.subplots(figsize=(9, 3.6))
positions = numpy.arange(len(paths))
axis.bar(positions - 0.2, loss_on_Q, 0.4, label="NLL on Q rises by", color="tab:green")
axis.bar(positions + 0.2, gain_on_P, 0.4, label="NLL on P falls by", color="tab:gray")
axis.set_xticks(positions, [short(path) for path in paths], rotation=45, ha="right")
axis.set_ylabel("nats")
axis.set_title("closing one adapted layer's gates")
axis.legend()
figure.tight_layout()

costliest = paths[int(numpy.argmax(loss_on_Q))]
print(f"closing {costliest} costs the most on Q: +{loss_on_Q.max():.3f} nats")
print(f"open-gate fraction (mean gate on Q > 0.5): {numpy.mean(mean_Q > 0.5):.2f} of all components")
near_edges = numpy.mean([numpy.mean((g < 0.1) | (g > 0.9)) for g in values["Q"].values()])
print(f"fraction of gate values below 0.1 or above 0.9 on Q: {near_edges:.2f}")
print(f"closing {costliest} lowers the NLL on P by {gain_on_P[paths.index(costliest)]:.3f}; "
      f"closing {paths[int(numpy.argmin(gain_on_P))]} raises it by {-gain_on_P.min():.3f}")
assert gain_on_P[paths.index(costliest)] > 0
assert gain_on_P.min() < 0

# %% [markdown]
# Inside that layer, `plot_rank_profile` shows each component's mean gate and the range of its middle
# half of tokens (25-75 %), on P and on Q:

# %%
display(plot_rank_profile(values, costliest))

# %% [markdown]
# ## What this says about where adaptation happens
#
# * Training opens some components fully and closes others further than they started, and most gates end
#   up near 0 or 1 for a given token: the gate tree maps which rank-one directions the task uses, in
#   which layer and module, and for which tokens.
# * The layer whose closing costs most on Q is where this adapter put most of the new chain. Closing it
#   also gives back part of P, because the same gates are open on P: the histograms overlap, and in the
#   first block they *must*, because the gate sees the same token at the same position.
# * Closing some other layers makes P *worse* (the negative grey bars): the adapted layers work
#   together, and removing one leaves the others' changes unbalanced. Reading gates one layer at a time
#   is a first look, not the whole story.
# * Where P and Q share their inputs, a gate can choose where in the network and for which tokens to
#   adapt, but not for which distribution. Notebook 4 shows the other case, where the inputs differ.
#
# ## Exercises
#
# 1. **One component at a time.** Close only the single largest component (by size) of the layer in
#    `costliest`. How much of that layer's effect on Q does it carry?
# 2. **Which digits open a gate?** Take the adapted layer whose mean gate varies most from token to token,
#    and compute its mean gate on Q for each input digit. Do some digits open it more than others?
# 3. **Before training.** Read the gates of the freshly initialised adapter (`init_adapters` with the
#    same config). How wide is their spread around $\sigma(-3)$, and why is it not zero?
#
# Worked solutions follow; their cells are collapsed in JupyterLab.

# %% [markdown]
# ### Solution 1

# %% jupyter={"source_hidden": true}
index = paths.index(costliest)
largest = int(numpy.argmax(sizes[index]))
single = nll(close_components(adapters, costliest, [largest]), "Q") - full_Q
print(f"closing component {largest} of {costliest}: +{single:.3f} nats on Q; the whole layer: +{loss_on_Q[index]:.3f}")
# Components of one layer do not simply add up: the loss is not linear in them, so compare the two
# numbers as "how much of the layer's effect one direction carries", not as a share that must sum to 1.

# %% [markdown]
# ### Solution 2

# %% jupyter={"source_hidden": true}
spread = {path: gates_Q[path].mean(axis=-1).std() for path in paths}
path = max(spread, key=spread.get)  # the layer whose mean gate varies most between tokens
print(path)
per_digit = [gates_Q[path][inputs["Q"] == digit].mean() for digit in range(10)]
print("mean gate by input digit:", numpy.round(per_digit, 3))
print("spread between digits:", f"{max(per_digit) - min(per_digit):.3f}")
assert max(per_digit) - min(per_digit) > 0.5
# Yes, strongly. In the first block a gate is a function of the token and its position, and training
# has switched each component on for some digits and off for others: the two peaks of the histograms.

# %% [markdown]
# ### Solution 3

# %% jupyter={"source_hidden": true}
fresh = minidisel.init_adapters(base, config, adapter_config, numpy.random.default_rng(SEED + 1))
_, fresh_gates = predict(base, inputs["Q"], config, fresh, adapter_config)
values = numpy.concatenate([g.ravel() for g in fresh_gates.values()])
print(f"at initialisation: gates from {values.min():.4f} to {values.max():.4f}, sigma(-3) = {1 / (1 + numpy.exp(3)):.4f}")
assert values.min() < 1 / (1 + numpy.exp(3)) < values.max()
# W_g starts random (uniform in ±1/sqrt(d_in)), so W_g x adds a small input-dependent term to b_g = -3.
# That spread is what lets the gradient tell inputs apart from the first step, once B is not zero.
