# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. A transformer from scratch
#
# This notebook takes minidisel's GPT-style decoder apart and puts it back together, one step at a
# time: token and position embeddings, causal self-attention, the MLP, the output head and the loss.
# Every step calls minidisel's own layer functions (`minidisel.nn`) and checks the shape it produces,
# and at the end the hand-assembled forward pass must equal `minidisel.forward`.
# Then we train the model for a few seconds on the task family P that later notebooks fine-tune away from.
#
# Shape letters, as in minidisel's docstrings: `B` batch, `T` positions, `D` model width, `H` heads,
# `K` head width, `F` MLP width, `V` vocabulary.

# %%
import platform
import time
from dataclasses import replace
from importlib.metadata import version

import matplotlib.pyplot as plt
import numpy as np

import minidisel
from minidisel import ModelConfig, TrainConfig, forward, init_params
from minidisel import nn
from minidisel.experiment import pretrain
from minidisel.metrics import predict, score
from minidisel.tasks import make_task, sample_batch
from minidisel.tree import count_parameters, flatten

SEED = 0
print(f"python {platform.python_version()}, numpy {np.__version__}, autograd {version('autograd')}, "
      f"matplotlib {version('matplotlib')}, minidisel {minidisel.__version__} from {minidisel.__file__}")
print(f"seed {SEED}")

# %% [markdown]
# ## The data: task P
#
# minidisel generates its data. In the `disjoint` task family, distribution **P** is *reverse a string
# of six digits drawn from 0-4*. A sequence reads `BOS x₁ … x₆ SEP y₁ … y₆` with token ids 0-9 for
# digits, 10 for `BOS` and 11 for `SEP`. The model reads `inputs` (all but the last token) and predicts
# `targets` (all but the first); only the answer digits are scored (`mask`).

# %%
task = make_task("disjoint")
print(task.description)
rng = np.random.default_rng(SEED)
batch = sample_batch(task, "P", rng, 4)
tokens = batch["inputs"]
print("inputs\n", tokens)
print("targets of the first row:", batch["targets"][0])
print("scored positions:        ", batch["mask"][0].astype(int))

# %% [markdown]
# ## The model and its parameters
#
# Parameters are a nested dict of arrays whose dotted paths are Hugging Face names, e.g.
# `layers.0.self_attn.q_proj.weight`. A linear weight is stored `(out_features, in_features)`, as in
# `torch.nn.Linear`, and applied as $y = x W^\top + b$.

# %%
config = ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
params = init_params(config, np.random.default_rng(SEED))
for path, leaf in list(flatten(params).items())[:12]:
    print(f"{path:<42} {leaf.shape}")
print("...")
print("parameters in total:", count_parameters(params))

B, T = tokens.shape
D, H, K, F, V = config.d_model, config.n_heads, config.head_dim, config.mlp_dim, config.vocab_size

# %% [markdown]
# ## Step 1: embeddings
#
# Each token id $w_t$ picks a row of the token embedding $E \in \mathbb{R}^{V \times D}$, and each
# position $t$ adds a learned position vector $P_t$:
#
# $$x_t = E_{w_t} + P_t .$$

# %%
x = params["embed_tokens"]["weight"][tokens] + params["embed_positions"]["weight"][:T]
assert x.shape == (B, T, D)

# %% [markdown]
# ## Step 2: LayerNorm, then queries, keys and values
#
# Each block normalises its input first (pre-norm):
# $\mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta$ with mean $\mu$ and
# variance $\sigma^2$ over the $D$ features. Three linear maps give queries, keys and values, and each is
# split into $H$ heads of width $K = D / H$:
#
# $$q = h W_q^\top + b_q,\quad k = h W_k^\top + b_k,\quad v = h W_v^\top + b_v .$$

# %%
layer = params["layers"]["0"]
h = nn.layer_norm(x, layer["input_layernorm"], config.norm_eps)
assert h.shape == (B, T, D)
assert np.allclose(h.mean(axis=-1), 0.0)  # γ = 1 and β = 0 at initialisation
assert np.allclose(h.var(axis=-1), x.var(axis=-1) / (x.var(axis=-1) + config.norm_eps))

attn = layer["self_attn"]
q = nn.split_heads(nn.linear(h, attn["q_proj"]), H)
k = nn.split_heads(nn.linear(h, attn["k_proj"]), H)
v = nn.split_heads(nn.linear(h, attn["v_proj"]), H)
assert q.shape == k.shape == v.shape == (B, H, T, K)

# %% [markdown]
# ## Step 3: attention with the causal mask
#
# Position $t$ may look only at positions $s \le t$, otherwise the model could read the answer it is
# asked to predict. Scores above the diagonal are set to $-\infty$ before the softmax, so their weight
# is exactly zero:
#
# $$\alpha_{ts} = \operatorname{softmax}_s\!\left(\frac{q_t \cdot k_s}{\sqrt{K}} + m_{ts}\right),\qquad
# m_{ts} = \begin{cases} 0 & s \le t \\ -\infty & s > t \end{cases},\qquad
# \mathrm{attn}_t = \sum_s \alpha_{ts} v_s .$$

# %%
scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(K)
assert scores.shape == (B, H, T, T)
weights = nn.softmax(np.where(nn.causal_mask(T), scores, -np.inf))
assert np.allclose(weights.sum(axis=-1), 1.0)
assert np.all(weights[..., np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0.0)

attended = weights @ v
assert np.array_equal(attended, nn.attention(q, k, v))
assert attended.shape == (B, H, T, K)

figure, axes = plt.subplots(1, H, figsize=(3 * H, 3))
for head, axis in enumerate(axes):
    axis.imshow(weights[0, head], cmap="viridis", vmin=0, vmax=weights[0].max())
    axis.set_title(f"head {head}")
    axis.set_xlabel("key position s")
axes[0].set_ylabel("query position t")
figure.suptitle("attention weights at initialisation: nothing above the diagonal")
figure.tight_layout()

# %% [markdown]
# At initialisation the weights are nearly uniform over the allowed positions. Causality is a property
# we can test: change a token, and no output *before* it may move.

# %%
changed = tokens.copy()
changed[:, 9] = (changed[:, 9] + 1) % 5
before = forward(params, tokens, config)
after = forward(params, changed, config)
assert np.array_equal(before[:, :9], after[:, :9])
assert not np.allclose(before[:, 9:], after[:, 9:])
print("outputs before position 9 are unchanged; from position 9 on they move")

# %% [markdown]
# ## Step 4: merge heads, project, add the residual
#
# The heads are concatenated back to width $D$, mixed by $W_o$, and added to the block's input:
# $x \leftarrow x + \mathrm{attn}\, W_o^\top + b_o$.

# %%
a = nn.linear(nn.merge_heads(attended), attn["o_proj"])
assert a.shape == (B, T, D)
x1 = x + a

# %% [markdown]
# ## Step 5: the MLP
#
# A second pre-norm, then a two-layer perceptron of width $F = 4D$ with the exact GELU
# $\mathrm{GELU}(z) = \tfrac{z}{2}\left(1 + \operatorname{erf}(z/\sqrt{2})\right)$, and another residual:
#
# $$x \leftarrow x + \mathrm{GELU}\!\left(\mathrm{LN}(x) W_\text{up}^\top + b_\text{up}\right) W_\text{down}^\top + b_\text{down}.$$

# %%
h = nn.layer_norm(x1, layer["post_attention_layernorm"], config.norm_eps)
up = nn.linear(h, layer["mlp"]["up_proj"])
assert up.shape == (B, T, F)
x2 = x1 + nn.linear(nn.gelu(up), layer["mlp"]["down_proj"])
assert x2.shape == (B, T, D)

# %% [markdown]
# Steps 2-5 make one block. Written as one function, so that the next block can reuse it:

# %%
def block_by_hand(x, p):
    """Apply steps 2-5 (attention and MLP, each pre-norm with a residual): (B, T, D) -> (B, T, D)."""
    h = nn.layer_norm(x, p["input_layernorm"], config.norm_eps)
    q, k, v = (nn.split_heads(nn.linear(h, p["self_attn"][name]), H) for name in ("q_proj", "k_proj", "v_proj"))
    x = x + nn.linear(nn.merge_heads(nn.attention(q, k, v)), p["self_attn"]["o_proj"])
    h = nn.layer_norm(x, p["post_attention_layernorm"], config.norm_eps)
    return x + nn.linear(nn.gelu(nn.linear(h, p["mlp"]["up_proj"])), p["mlp"]["down_proj"])


assert np.array_equal(block_by_hand(x, layer), x2)

# %% [markdown]
# ## Step 6: the other blocks, the final norm and the tied head
#
# The second block repeats steps 2-5 with its own weights. A last
# LayerNorm and the token embedding, reused as the output matrix ("tied head"), give one logit per
# vocabulary entry: $\ell_t = \mathrm{LN}(x_t)\, E^\top$.

# %%
x3 = block_by_hand(x2, params["layers"]["1"])
logits = nn.layer_norm(x3, params["norm"], config.norm_eps) @ params["embed_tokens"]["weight"].T
assert logits.shape == (B, T, V)
difference = np.abs(logits - forward(params, tokens, config)).max()
print(f"hand-assembled forward pass vs minidisel.forward: largest difference {difference}")
assert difference < 1e-12

# %% [markdown]
# ## Step 7: the loss
#
# The loss is the mean negative log-likelihood of the target tokens over the scored positions $M$:
#
# $$L = -\frac{1}{|M|} \sum_{(b,t) \in M} \log \operatorname{softmax}(\ell_{bt})_{y_{bt}} .$$
#
# An untrained model spreads its probability almost evenly, so $L$ starts near $\log V$.

# %%
loss = nn.cross_entropy(logits, batch["targets"], batch["mask"])
print(f"loss at initialisation {loss:.4f} nats; log V = {np.log(V):.4f}")
assert abs(loss - np.log(V)) < 0.1

# %% [markdown]
# ## Train on P for a few seconds
#
# `minidisel.experiment.pretrain` draws fresh batches of P and minimises the loss with AdamW
# (PyTorch's convention), warm-up and cosine decay. The history it returns is what we plot.

# %%
train_config = TrainConfig(steps=400, batch_size=16, lr=1e-2, log_every=100, progress=False)
started = time.perf_counter()
trained, history = pretrain(task, config, train_config, seed=SEED)
seconds = time.perf_counter() - started
print(f"{train_config.steps} steps in {seconds:.1f} s")

figure, axis = plt.subplots(figsize=(6, 3.2))
axis.plot(history["step"], history["loss"])
axis.set_yscale("log")
axis.set_xlabel("step")
axis.set_ylabel("training loss (nats)")
axis.set_title("pre-training on P")
figure.tight_layout()

# %% [markdown]
# Exact-match accuracy counts a sequence as right only if every answer digit is the arg-max
# prediction. We measure it on a held-out batch of P.

# %%
held_out = sample_batch(task, "P", np.random.default_rng([SEED, 1]), 256)
logits, _ = predict(trained, held_out["inputs"], config)
metrics = score(logits, held_out)
print(f"P: exact match {metrics['accuracy']:.3f}, NLL {metrics['nll']:.4f} nats")
assert metrics["accuracy"] > 0.9

row = held_out["inputs"][0]
answer = np.argmax(logits[0], axis=-1)[held_out["mask"][0]]
print("input digits:", row[1:7], "-> predicted answer:", answer)
assert np.array_equal(answer, row[1:7][::-1])

# %% [markdown]
# ## What attention learned
#
# Positions are 0 for `BOS`, 1-6 for the digits, 7 for `SEP` and 8-12 for the answer digits written so
# far. The target at position $t \in \{7, \dots, 12\}$ is $y_{t-6} = x_{13-t}$, which sits at position
# $13 - t$. Every string has the same length, so reversal can be done by position alone: a head whose
# query at $t$ attends to key $13 - t$ copies the right digit. We look for such a "mirror head" in each
# layer: for every head, the fraction of answer positions whose strongest attention lands on $13 - t$.

# %%
def attention_weights(params, tokens, config, layer_index):
    """Recompute one layer's attention weights (B, H, T, T) by running the blocks before it."""
    x = params["embed_tokens"]["weight"][tokens] + params["embed_positions"]["weight"][: tokens.shape[1]]
    for i in range(layer_index):
        x = block_by_hand(x, params["layers"][str(i)])
    p = params["layers"][str(layer_index)]
    h = nn.layer_norm(x, p["input_layernorm"], config.norm_eps)
    q = nn.split_heads(nn.linear(h, p["self_attn"]["q_proj"]), config.n_heads)
    k = nn.split_heads(nn.linear(h, p["self_attn"]["k_proj"]), config.n_heads)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(config.head_dim)
    return nn.softmax(np.where(nn.causal_mask(tokens.shape[1]), scores, -np.inf))


def mirror_fraction(weights):
    """Return, per head, the fraction of answer positions t = 7..12 that attend most to position 13 - t."""
    strongest = np.argmax(weights[:, :, 7:13, :], axis=-1)  # (B, H, 6)
    return np.mean(strongest == np.arange(6, 0, -1), axis=(0, 2))  # (H,)


for layer_index in range(config.n_layers):
    fractions = mirror_fraction(attention_weights(trained, held_out["inputs"], config, layer_index))
    print(f"layer {layer_index}: mirror fraction per head {np.round(fractions, 2)}")
fractions = mirror_fraction(attention_weights(trained, held_out["inputs"], config, 0))
mirror_head = int(np.argmax(fractions))
assert fractions[mirror_head] > 0.8

one_sequence = attention_weights(trained, held_out["inputs"][:1], config, 0)[0]
figure, axes = plt.subplots(1, H, figsize=(3 * H, 3))
for head, axis in enumerate(axes):
    axis.imshow(one_sequence[head], cmap="viridis", vmin=0, vmax=1)
    axis.set_title(f"layer 0, head {head}" + (" (mirror)" if head == mirror_head else ""))
    axis.set_xlabel("key position s")
axes[0].set_ylabel("query position t")
figure.suptitle("attention after training on P: one head reads the answer digit's mirror position")
figure.tight_layout()

# %% [markdown]
# ## Exercises
#
# 1. **Remove the mask.** Recompute step 3 without the causal mask and show that the output at position
#    3 now changes when token 9 changes. Why would a model trained this way score perfectly in training
#    and fail when it generates?
# 2. **Count by formula.** Write the number of parameters of this GPT-style model as a formula in
#    $V$, $T_\max$, $D$, $F$ and the number of layers, and check it against `count_parameters`.
# 3. **How many layers does reversal need?** Train a one-layer model with the same budget. Does it reach
#    the two-layer model's exact match on P, and does it have a mirror head? Why is that enough here, and
#    which change to task P would make a positional mirror head useless?
#
# Worked solutions follow; their cells are collapsed in JupyterLab (click the bar to expand).

# %% [markdown]
# ### Solution 1

# %% jupyter={"source_hidden": true}
def first_block_attention(tokens, masked):
    x = params["embed_tokens"]["weight"][tokens] + params["embed_positions"]["weight"][: tokens.shape[1]]
    h = nn.layer_norm(x, layer["input_layernorm"], config.norm_eps)
    q, k, v = (nn.split_heads(nn.linear(h, attn[name]), H) for name in ("q_proj", "k_proj", "v_proj"))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(K)
    if masked:
        scores = np.where(nn.causal_mask(tokens.shape[1]), scores, -np.inf)
    return nn.softmax(scores) @ v


unmasked_change = first_block_attention(changed, False)[:, :, 3] - first_block_attention(tokens, False)[:, :, 3]
masked_change = first_block_attention(changed, True)[:, :, 3] - first_block_attention(tokens, True)[:, :, 3]
print("largest change at position 3 without the mask:", np.abs(unmasked_change).max())
print("largest change at position 3 with the mask:   ", np.abs(masked_change).max())
assert np.abs(unmasked_change).max() > 0
assert np.abs(masked_change).max() == 0
# Without the mask, position t reads token t + 1, which is its own target: training learns to copy it.
# When generating, token t + 1 does not exist yet, so that shortcut has nothing to read.

# %% [markdown]
# ### Solution 2

# %% jupyter={"source_hidden": true}
# per block: two LayerNorms (2 · 2D), four D×D attention maps with biases (4 (D² + D)),
# up (D F + F) and down (F D + D); plus embeddings V D + T_max D and the final LayerNorm 2D
per_block = 2 * 2 * D + 4 * (D * D + D) + (D * F + F) + (F * D + D)
formula = V * D + config.max_seq_len * D + config.n_layers * per_block + 2 * D
print(formula, count_parameters(params))
assert formula == count_parameters(params)

# %% [markdown]
# ### Solution 3

# %% jupyter={"source_hidden": true}
one_layer = ModelConfig(vocab_size=task.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)
one_layer_params, _ = pretrain(task, one_layer, replace(train_config, log_every=0), seed=SEED)
one_layer_logits, _ = predict(one_layer_params, held_out["inputs"], one_layer)
one_layer_accuracy = score(one_layer_logits, held_out)["accuracy"]
one_layer_mirror = mirror_fraction(attention_weights(one_layer_params, held_out["inputs"], one_layer, 0))
print(f"exact match on P: one layer {one_layer_accuracy:.3f}, two layers {metrics['accuracy']:.3f}")
print(f"one layer, mirror fraction per head {np.round(one_layer_mirror, 2)}")
assert one_layer_accuracy > 0.9
assert one_layer_mirror.max() > 0.8
# One layer is enough because every string has length 6: the answer at position t copies the digit at
# the fixed position 13 - t, so one head that attends by position (learned position embeddings) does
# it. Strings of varying length would break this: position 13 - t would no longer hold the mirrored
# digit, and the model would have to find SEP first and count back from it, which needs a second layer.
