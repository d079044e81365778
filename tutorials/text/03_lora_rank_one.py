# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. LoRA as a sum of rank-one components
#
# LoRA freezes a linear layer $y = W x + b$ and learns a low-rank correction:
#
# $$y = W x + b + s\, B A x,\qquad A \in \mathbb{R}^{r \times d_\text{in}},\; B \in \mathbb{R}^{d_\text{out} \times r},\; s = \frac{\alpha}{r}.$$
#
# This notebook reads that update as a sum of $r$ rank-one terms (the form DISeL gates one by one),
# shows why $B$ starts at zero, merges and unmerges an adapter, counts parameters against full
# fine-tuning, and runs a short LoRA fine-tune whose final loss we can predict exactly.
#
# Letters follow PEFT: `A` is `lora_A` (input side), `B` is `lora_B` (output side).

# %%
import platform
from importlib.metadata import version

import autograd.numpy as np
import matplotlib.pyplot as plt
import numpy
from autograd import grad

import minidisel
from minidisel import AdapterConfig, ModelConfig, TrainConfig, forward, init_adapters, init_params
from minidisel import merge_adapters, train, unmerge_adapters
from minidisel.adapters import AdapterMode, adapter_delta, init_adapter_layer, project
from minidisel.experiment import Recipe
from minidisel.tree import count_parameters, flatten

SEED = 0
print(f"python {platform.python_version()}, numpy {numpy.__version__}, autograd {version('autograd')}, "
      f"matplotlib {version('matplotlib')}, minidisel {minidisel.__version__} from {minidisel.__file__}")
print(f"seed {SEED}")
rng = numpy.random.default_rng(SEED)

# %% [markdown]
# ## One adapted layer
#
# `init_adapter_layer` draws $A$ as PEFT does (uniform in $\pm 1/\sqrt{d_\text{in}}$) and sets $B = 0$.
# So the update $s B A x$ is exactly zero before training, and the adapted layer *is* the base layer.

# %%
d_in, d_out = 8, 6
lora = AdapterConfig(method="lora", r=4, lora_alpha=8.0)
base_layer = {"weight": rng.standard_normal((d_out, d_in)), "bias": rng.standard_normal(d_out)}
adapter = init_adapter_layer(rng, d_in, d_out, lora, "float64")
mode = AdapterMode(lora)
print({name: value.shape for name, value in adapter.items()}, "s =", lora.scaling)

x = rng.standard_normal((5, d_in))
delta, gates = adapter_delta(x, adapter, mode)
assert numpy.all(adapter["B"] == 0)
assert numpy.all(delta == 0)
assert gates is None
assert numpy.array_equal(project(x, base_layer, adapter, mode)[0], x @ base_layer["weight"].T + base_layer["bias"])

# %% [markdown]
# ## The update as a sum of rank-one terms
#
# Write $a_i^\top$ for row $i$ of $A$ and $b_i$ for column $i$ of $B$. Then
#
# $$s\,B A x = s \sum_{i=1}^{r} b_i \,(a_i^\top x),\qquad \Delta W = s\,B A = s \sum_{i=1}^{r} b_i a_i^\top .$$
#
# Component $i$ reads the input along one direction $a_i$ and writes along one direction $b_i$. To see
# it, give $B$ values (as training would) and compare the loop over components with minidisel's update.

# %%
adapter["B"] = rng.standard_normal((d_out, lora.r))
delta, _ = adapter_delta(x, adapter, mode)

components = [lora.scaling * numpy.outer(x @ adapter["A"][i], adapter["B"][:, i]) for i in range(lora.r)]
assert numpy.allclose(sum(components), delta, rtol=0, atol=1e-12)

rank_one = [lora.scaling * numpy.outer(adapter["B"][:, i], adapter["A"][i]) for i in range(lora.r)]
delta_W = lora.scaling * adapter["B"] @ adapter["A"]
assert numpy.allclose(sum(rank_one), delta_W, rtol=0, atol=1e-12)
assert all(numpy.linalg.matrix_rank(term) == 1 for term in rank_one)
assert numpy.linalg.matrix_rank(delta_W) == lora.r

limit = numpy.abs(delta_W).max()
figure, axes = plt.subplots(1, lora.r + 1, figsize=(2.4 * (lora.r + 1), 2.6))
for i, (axis, term) in enumerate(zip(axes, rank_one + [delta_W])):
    axis.imshow(term, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axis.set_title(rf"$s\,b_{i + 1} a_{i + 1}^\top$" if i < lora.r else r"$\Delta W = s\,BA$")
    axis.set_xticks([])
    axis.set_yticks([])
figure.suptitle("four rank-one matrices add up to the rank-4 update")
figure.tight_layout()

# %% [markdown]
# ## Why $B$ starts at zero and $A$ does not
#
# The gradients of the two factors feed each other: for a loss $L$ and upstream gradient
# $\delta = \partial L / \partial y$,
#
# $$\frac{\partial L}{\partial B} = s\,\delta\,(A x)^\top, \qquad \frac{\partial L}{\partial A} = s\,B^\top \delta\, x^\top .$$
#
# With $B = 0$ and $A$ random, the update starts at exactly zero but $B$ gets a gradient, so training
# moves at once. With both zero, both gradients vanish and training never starts.

# %%
target = rng.standard_normal((5, d_out))


def layer_loss(adapter, x, target):
    y, _ = project(x, base_layer, adapter, mode)
    return np.mean((y - target) ** 2)


fresh = init_adapter_layer(rng, d_in, d_out, lora, "float64")
g = grad(layer_loss)(fresh, x, target)
print("A random, B = 0: |dL/dA| =", numpy.abs(g["A"]).max(), " |dL/dB| =", f"{numpy.abs(g['B']).max():.3f}")
assert numpy.all(g["A"] == 0)
assert numpy.abs(g["B"]).max() > 0

both_zero = {"A": numpy.zeros_like(fresh["A"]), "B": numpy.zeros_like(fresh["B"])}
g = grad(layer_loss)(both_zero, x, target)
assert numpy.all(g["A"] == 0)
assert numpy.all(g["B"] == 0)
print("A = 0, B = 0:    every gradient is zero, so training cannot start")

# %% [markdown]
# ## Merging
#
# A LoRA update is one fixed matrix, so it can be folded into the frozen weight after training,
# $W \leftarrow W + s B A$, and inference costs nothing extra. `merge_adapters` does this for every adapted
# layer of a model, and `unmerge_adapters` takes it out again. DISeL cannot merge: its update
# $s\,B\,\mathrm{diag}(g(x))\,A$ changes with every token.

# %%
config = ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
params = init_params(config, rng)
adapters = init_adapters(params, config, lora, rng)
for path, leaf in flatten(adapters).items():
    if path.endswith(".B"):
        leaf[...] = 0.1 * rng.standard_normal(leaf.shape)  # pretend training happened

tokens = rng.integers(0, config.vocab_size, size=(3, 10))
adapted = forward(params, tokens, config, adapters, lora)
merged = merge_adapters(params, adapters, lora)
assert numpy.allclose(forward(merged, tokens, config), adapted, rtol=0, atol=1e-12)
assert not numpy.allclose(forward(params, tokens, config), adapted)

restored = unmerge_adapters(merged, adapters, lora)
assert all(numpy.allclose(restored_leaf, flatten(params)[path], rtol=0, atol=1e-14)
           for path, restored_leaf in flatten(restored).items())
print("merged model == base + adapter; unmerging gives the base back")

disel = AdapterConfig(method="disel", r=4, lora_alpha=8.0)
try:
    merge_adapters(params, init_adapters(params, config, disel, rng), disel)
except ValueError as error:
    print("DISeL:", error)
else:
    raise AssertionError("merging a DISeL adapter should raise")

# %% [markdown]
# ## Parameter counts: LoRA against full fine-tuning
#
# An adapted $d_\text{out} \times d_\text{in}$ layer trains $r (d_\text{in} + d_\text{out})$ numbers
# instead of $d_\text{in} d_\text{out}$. DISeL adds a gate per layer, $W_g \in \mathbb{R}^{r \times d_\text{in}}$ and
# $b_g \in \mathbb{R}^r$, so $r (2 d_\text{in} + d_\text{out} + 1)$. We count both on the demo's model (adapters on
# every linear layer) and check the count against the formula.

# %%
demo_model = Recipe().model
demo_params = init_params(demo_model, rng)
full = count_parameters(demo_params)
linear_shapes = [leaf.shape for path, leaf in flatten(demo_params).items()
                 if path.endswith("proj.weight")]  # (d_out, d_in) of every adapted layer

ranks = [1, 2, 4, 8, 16, 32, 64]
counts = {"lora": [], "disel": []}
for r in ranks:
    for method in counts:
        adapter_config = AdapterConfig(method=method, r=r, lora_alpha=2.0 * r)
        counted = count_parameters(init_adapters(demo_params, demo_model, adapter_config, rng))
        per_layer = [r * (i + o) + (r * i + r if method == "disel" else 0) for o, i in linear_shapes]
        assert counted == sum(per_layer)
        counts[method].append(counted)

print(f"full fine-tuning: {full} parameters")
for r, lora_count, disel_count in zip(ranks, counts["lora"], counts["disel"]):
    print(f"r = {r:>2}: LoRA {lora_count:>6} ({100 * lora_count / full:5.1f} %), "
          f"DISeL {disel_count:>6} ({100 * disel_count / full:5.1f} %)")

assert counts["lora"][-1] > full  # r = d_model: the adapters outgrow the model

figure, axis = plt.subplots(figsize=(5.5, 3.5))
axis.plot(ranks, counts["lora"], "o-", label="LoRA")
axis.plot(ranks, counts["disel"], "s-", label="DISeL (LoRA + gates)")
axis.axhline(full, color="gray", linestyle="--", label="full fine-tuning")
axis.set_xscale("log", base=2)
axis.set_yscale("log")
axis.set_xlabel("rank r")
axis.set_ylabel("trainable parameters")
axis.set_title("the demo's model, adapters on every linear layer")
axis.legend()
figure.tight_layout()

# %% [markdown]
# On a model this small, high ranks cost more than full fine-tuning: at $r = d_\text{model}$ a square layer
# has as many adapter numbers as weights, twice over. The savings come at scale, where $r \ll d$
# (see exercise 3).
#
# ## A short LoRA fine-tune
#
# Suppose the frozen layer $W$ must become $W^\star = W + \Delta^\star$, where the needed change
# $\Delta^\star$ has rank two, with singular values $\sigma_1 > \sigma_2$. For inputs $x \sim \mathcal{N}(0, I)$ the
# mean squared error of a layer with update $\Delta W$ is $\mathbb{E}\,\lVert(\Delta W - \Delta^\star)x\rVert^2 / d_\text{out}
# = \lVert \Delta W - \Delta^\star \rVert_F^2 / d_\text{out}$, and the best rank-$r$ matrix leaves
# (Eckart-Young)
#
# $$\min_{\operatorname{rank} \Delta W \le r} \frac{\lVert \Delta W - \Delta^\star\rVert_F^2}{d_\text{out}} = \frac{1}{d_\text{out}} \sum_{i > r} \sigma_i^2 .$$
#
# So rank 1 must stall at $\sigma_2^2 / d_\text{out}$, and rank 2 can reach zero. We fine-tune with
# minidisel's `train` (AdamW, warm-up, cosine decay) and compare.

# %%
d = 12
W = {"weight": rng.standard_normal((d, d)) / numpy.sqrt(d)}
U, _ = numpy.linalg.qr(rng.standard_normal((d, 2)))
V, _ = numpy.linalg.qr(rng.standard_normal((d, 2)))
sigma = numpy.array([2.0, 1.0])
needed = U @ numpy.diag(sigma) @ V.T
W_target = W["weight"] + needed


def sample_inputs(rng, n):
    x = rng.standard_normal((n, d))
    return {"x": x, "y": x @ W_target.T}


def make_loss(adapter_config):
    mode = AdapterMode(adapter_config)

    def loss(trainable, frozen, batch, rng):
        y, _ = project(batch["x"], frozen, trainable, mode)
        return np.mean((y - batch["y"]) ** 2)

    return loss


fine_tune = TrainConfig(steps=400, batch_size=64, lr=3e-2, weight_decay=0.0, log_every=0, progress=False)
final = {}
figure, axis = plt.subplots(figsize=(5.5, 3.5))
for r in (1, 2, 4):
    adapter_config = AdapterConfig(method="lora", r=r, lora_alpha=float(r))
    start = init_adapter_layer(numpy.random.default_rng(SEED), d, d, adapter_config, "float64")
    trained, history = train(make_loss(adapter_config), start, W, sample_inputs, fine_tune)
    final[r] = numpy.mean(history["loss"][-20:])
    axis.plot(history["step"], history["loss"], label=f"r = {r}")
axis.axhline(sigma[1] ** 2 / d, color="gray", linestyle="--", label=r"$\sigma_2^2 / d_\mathrm{out}$")
axis.set_yscale("log")
axis.set_xlabel("step")
axis.set_ylabel("mean squared error")
axis.legend()
figure.tight_layout()

print({r: f"{loss:.2e}" for r, loss in final.items()}, f"sigma_2^2 / d = {sigma[1] ** 2 / d:.2e}")
assert abs(final[1] - sigma[1] ** 2 / d) < 0.05 * sigma[1] ** 2 / d
assert final[2] < 1e-3 * sigma[1] ** 2 / d
assert final[4] < 1e-3 * sigma[1] ** 2 / d

# %% [markdown]
# The rank-1 adapter stalls at the Eckart-Young bound, and every rank $\geq 2$ fits the change.
#
# ## Exercises
#
# 1. **Order does not matter.** Permute the rank components of `adapter` (rows of $A$ and columns of $B$
#    together) and show the update is unchanged. Then permute only $A$'s rows: what happens?
# 2. **What did rank 1 learn?** Compare the trained rank-1 $\Delta W$ with the top singular pair of
#    $\Delta^\star$ (use `numpy.linalg.svd`).
# 3. **Counts at scale.** LLaMA-2-7B has 32 blocks of width 4096 with an MLP of width 11008 (`hidden_size`,
#    `intermediate_size` and `num_hidden_layers` of the released `Llama-2-7b-hf` configuration). The DISeL
#    paper's recipe for it (Zindari et al., 2026, *Learning When to Adapt*, arXiv 2605.19028) adapts all its
#    linear layers with $r = 64$. Count LoRA's and DISeL's trainable parameters as a fraction of the
#    linear weights.
#
# Worked solutions follow; their cells are collapsed in JupyterLab.

# %% [markdown]
# ### Solution 1

# %% jupyter={"source_hidden": true}
order = numpy.array([2, 0, 3, 1])
permuted = {"A": adapter["A"][order], "B": adapter["B"][:, order]}
assert numpy.allclose(adapter_delta(x, permuted, mode)[0], adapter_delta(x, adapter, mode)[0], rtol=0, atol=1e-12)
only_A = {"A": adapter["A"][order], "B": adapter["B"]}
print("permuting A alone changes the update by", numpy.abs(adapter_delta(x, only_A, mode)[0] - delta).max())
# Permuting both pairs each a_i with the same b_i, so the sum of terms is unchanged; permuting A alone
# pairs each input direction with another component's output direction.

# %% [markdown]
# ### Solution 2

# %% jupyter={"source_hidden": true}
config_1 = AdapterConfig(method="lora", r=1, lora_alpha=1.0)
start = init_adapter_layer(numpy.random.default_rng(SEED), d, d, config_1, "float64")
rank_1, _ = train(make_loss(config_1), start, W, sample_inputs, fine_tune)
learned = config_1.scaling * rank_1["B"] @ rank_1["A"]
best_rank_1 = sigma[0] * numpy.outer(U[:, 0], V[:, 0])
print("|learned - sigma_1 u_1 v_1^T| =", f"{numpy.linalg.norm(learned - best_rank_1):.2e}",
      " |learned| =", f"{numpy.linalg.norm(learned):.3f}")
assert numpy.linalg.norm(learned - best_rank_1) < 0.05 * sigma[0]
# The single component learns the largest singular direction: the best rank-1 approximation.

# %% [markdown]
# ### Solution 3

# %% jupyter={"source_hidden": true}
width, mlp_width, blocks, r = 4096, 11008, 32, 64
shapes = [(width, width)] * 4 + [(mlp_width, width)] * 2 + [(width, mlp_width)]  # q k v o, gate up, down
weights = blocks * sum(o * i for o, i in shapes)
lora_count = blocks * sum(r * (i + o) for o, i in shapes)
disel_count = lora_count + blocks * sum(r * i + r for o, i in shapes)
print(f"linear weights {weights / 1e9:.2f} B; LoRA {lora_count / 1e6:.1f} M ({100 * lora_count / weights:.2f} %); "
      f"DISeL {disel_count / 1e6:.1f} M ({100 * disel_count / weights:.2f} %)")
assert lora_count < 0.03 * weights
