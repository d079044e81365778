# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Gradients with autograd
#
# minidisel never writes a backward pass by hand: [autograd](https://github.com/HIPS/autograd) traces
# the NumPy code of the forward pass and differentiates it. This notebook shows how that works on the
# parameter trees minidisel uses (nested dicts of arrays), why code that writes into arrays cannot be
# traced, and how to check any gradient against finite differences with `minidisel.gradcheck`.

# %%
import platform
from importlib.metadata import version

import autograd.numpy as np
import matplotlib.pyplot as plt
import numpy
from autograd import grad, value_and_grad
from autograd.extend import defvjp, primitive

import minidisel
from minidisel import AdapterConfig, ModelConfig, init_adapters, init_params, nn
from minidisel.experiment import language_model_loss
from minidisel.gradcheck import check_gradients
from minidisel.tasks import make_task, sample_batch
from minidisel.tree import flatten, tree_map

SEED = 0
print(f"python {platform.python_version()}, numpy {numpy.__version__}, autograd {version('autograd')}, "
      f"matplotlib {version('matplotlib')}, minidisel {minidisel.__version__} from {minidisel.__file__}")
print(f"seed {SEED}")
rng = numpy.random.default_rng(SEED)

# %% [markdown]
# ## `grad` turns a function into its derivative
#
# `grad(f)` returns a new function that computes $\nabla f$ at the same arguments. Code inside `f` must
# use `autograd.numpy` (imported here as `np`), a thin wrapper of NumPy that records each operation.
# A first check against a derivative we know: $\frac{d}{dz}\tanh z = 1 - \tanh^2 z$.

# %%
def total_tanh(z):
    return np.sum(np.tanh(z))


z = numpy.linspace(-3, 3, 61)
derivative = grad(total_tanh)(z)
assert numpy.allclose(derivative, 1 - numpy.tanh(z) ** 2, rtol=0, atol=1e-15)

figure, axis = plt.subplots(figsize=(5, 3))
axis.plot(z, numpy.tanh(z), label=r"$\tanh z$")
axis.plot(z, derivative, "o", markersize=3, label="autograd: grad(total_tanh)")
axis.plot(z, 1 - numpy.tanh(z) ** 2, label=r"$1 - \tanh^2 z$")
axis.set_xlabel("z")
axis.legend()
figure.tight_layout()

# %% [markdown]
# ## Gradients of nested dicts
#
# Parameters in minidisel are nested dicts of arrays. `grad` returns a tree of the same shape: every
# leaf's gradient sits at the same path. For a linear layer fitted by mean squared error,
#
# $$L(W, b) = \frac{1}{N} \sum_n \lVert W x_n + b - y_n \rVert^2,\qquad
# \frac{\partial L}{\partial W} = \frac{2}{N} \sum_n (W x_n + b - y_n)\, x_n^\top,\qquad
# \frac{\partial L}{\partial b} = \frac{2}{N} \sum_n (W x_n + b - y_n),$$
#
# and autograd must agree with these formulas.

# %%
params = {"layer": {"weight": rng.standard_normal((2, 3)), "bias": rng.standard_normal(2)}}
x = rng.standard_normal((5, 3))
y = rng.standard_normal((5, 2))


def mean_squared_error(params, x, y):
    residual = nn.linear(x, params["layer"]) - y
    return np.sum(residual**2) / len(x)


gradients = grad(mean_squared_error)(params, x, y)
print({path: g.shape for path, g in flatten(gradients).items()})

residual = x @ params["layer"]["weight"].T + params["layer"]["bias"] - y
assert numpy.allclose(gradients["layer"]["weight"], 2 / len(x) * residual.T @ x)
assert numpy.allclose(gradients["layer"]["bias"], 2 / len(x) * residual.sum(axis=0))

# %% [markdown]
# `value_and_grad` returns the loss and its gradient from one pass, which is what a training loop needs.
# `grad` differentiates the **first** argument only, so minidisel passes the trainable tree first and the
# frozen base second: freezing is a matter of argument order, not of flags on each array.
#
# Take a tiny transformer with a DISeL adapter on every linear layer. The adapted layer computes
# $y = W x + b + s\,B\,(g(x) \odot A x)$ with $B = 0$ at initialisation. Every path from $A$, $W_g$ or
# $b_g$ to the loss passes through $B$, so their gradients are exactly zero at step 0; only $B$'s is not:
#
# $$\frac{\partial L}{\partial B} = s \sum_{\text{tokens}} \frac{\partial L}{\partial y}\,\big(g(x) \odot A x\big)^\top \neq 0,
# \qquad \frac{\partial L}{\partial A} = s \sum_{\text{tokens}} \big(g(x) \odot B^\top \tfrac{\partial L}{\partial y}\big)\, x^\top = 0 .$$

# %%
task = make_task("disjoint")
config = ModelConfig(vocab_size=task.vocab_size, d_model=8, n_layers=1, n_heads=2, max_seq_len=16)
adapter_config = AdapterConfig(method="disel", r=2, lora_alpha=4.0)
base = init_params(config, rng)
adapters = init_adapters(base, config, adapter_config, rng)
batch = sample_batch(task, "Q", rng, 4)


def loss(trainable, frozen, batch):
    return language_model_loss(trainable, frozen, batch, None, config, adapter_config)


value, adapter_gradients = value_and_grad(loss)(adapters, base, batch)
print(f"loss {value:.4f}")
for path, g in flatten(adapter_gradients).items():
    if path.startswith("layers.0.self_attn.q_proj"):
        print(f"{path:<32} |gradient| = {numpy.abs(g).max():.3g}")

for path, g in flatten(adapter_gradients).items():
    name = path.rsplit(".", 1)[-1]
    if name == "B":
        assert numpy.abs(g).max() > 0, path
    else:
        assert numpy.all(g == 0.0), path

# %% [markdown]
# ## Why in-place writes break tracing
#
# autograd follows values by wrapping them in *boxes* (`ArrayBox`) that record every operation applied
# to them. A plain NumPy array cannot hold a box, and a box cannot be written into, so three common
# NumPy habits fail as soon as the function is differentiated:

# %%
w = numpy.arange(1.0, 4.0)


def fill_a_buffer(w):
    out = numpy.zeros(3)
    for i in range(3):
        out[i] = np.sum(w * i)  # a box written into a plain array
    return np.sum(out)


def overwrite_an_entry(w):
    w[0] = 0.0  # item assignment on a box
    return np.sum(w**2)


def accumulate_in_place(w):
    out = numpy.zeros(3)
    out += w  # in-place add into a plain array
    return np.sum(out**2)


for function in (fill_a_buffer, overwrite_an_entry, accumulate_in_place):
    try:
        grad(function)(w)
    except (TypeError, ValueError) as error:
        print(f"{function.__name__:<20} {type(error).__name__}: {str(error)[:70]}")
    else:
        raise AssertionError(f"{function.__name__} was expected to fail under autograd")

# %% [markdown]
# Each works when called on a plain array, which is what makes the bug easy to write. The fix is to
# build new arrays instead of changing old ones: collect the pieces and `np.stack` them, select with
# `np.where` (minidisel's causal mask and loss mask work this way), or rebind a name
# (`out = out + w` creates a new box).

# %%
def fill_by_stacking(w):
    out = np.stack([np.sum(w * i) for i in range(3)])
    return np.sum(out)


def zero_first_entry(w):
    w = np.where(numpy.arange(len(w)) == 0, 0.0, w)
    return np.sum(w**2)


assert fill_a_buffer(w.copy()) == fill_by_stacking(w)
assert overwrite_an_entry(w.copy()) == zero_first_entry(w)
print("gradients:", grad(fill_by_stacking)(w), grad(zero_first_entry)(w))
assert numpy.allclose(grad(zero_first_entry)(w), [0.0, 2 * w[1], 2 * w[2]])

# %% [markdown]
# ## Checking a gradient against finite differences
#
# A gradient can also be estimated without autograd, by moving one parameter a little in each
# direction. The central difference
#
# $$\frac{f(\theta + h e_i) - f(\theta - h e_i)}{2h} = \frac{\partial f}{\partial \theta_i} + \frac{h^2}{6} f'''(\theta_i) + O(h^4)$$
#
# has a truncation error that shrinks like $h^2$, but it subtracts two nearly equal numbers, each
# rounded to relative precision $\varepsilon$ (about $2.2 \times 10^{-16}$ in float64), which adds an error
# of about $\varepsilon |f| / h$. The total is smallest in between. The figure measures it for one entry.

# %%
def central_difference(f, theta, i, h):
    step = numpy.zeros_like(theta)
    step[i] = h  # a plain array outside any traced function: writing into it is fine
    return (f(theta + step) - f(theta - step)) / (2 * h)


theta = numpy.array([0.3, -1.2, 0.8])
exact = grad(total_tanh)(theta)[0]
steps = numpy.logspace(-12, -1, 45)
errors = numpy.array([abs(central_difference(total_tanh, theta, 0, h) - exact) for h in steps])
best = steps[numpy.argmin(errors)]
print(f"smallest error {errors.min():.1e} at h = {best:.1e}; float64 epsilon = {numpy.finfo(float).eps:.1e}")
assert 1e-8 < best < 1e-3
assert errors.min() < 1e-9

figure, axis = plt.subplots(figsize=(5.5, 3.5))
axis.loglog(steps, errors, "o-", markersize=3, label="measured error")
axis.loglog(steps, numpy.finfo(float).eps * abs(total_tanh(theta)) / steps, "--", label=r"rounding $\approx \varepsilon|f|/h$")
t = numpy.tanh(theta[0])
third_derivative = -2 * (1 - t**2) * (1 - 3 * t**2)  # of tanh, at theta[0]
axis.loglog(steps, steps**2 / 6 * abs(third_derivative), ":", label=r"truncation $\approx h^2 |f'''| / 6$")
axis.set_xlabel("step h")
axis.set_ylabel("|finite difference - autograd|")
axis.set_ylim(1e-14, 1)
axis.legend()
figure.tight_layout()

# %% [markdown]
# `minidisel.gradcheck.check_gradients(f, params)` does this for every entry of a parameter tree
# (float64 only, $h = 10^{-6}$) and raises `AssertionError` naming the first entry where
# $|\text{autograd} - \text{finite difference}| > \text{atol} + \text{rtol}\,|\text{finite difference}|$.
# It returns the worst error per tensor. Here it checks the DISeL adapter of the tiny transformer,
# with $B$ set to random values so that every gradient is non-zero.

# %%
adapters_with_B = tree_map(lambda leaf: leaf, adapters)  # new dicts, same arrays: `adapters` keeps B = 0
for group in adapters_with_B["layers"]["0"].values():
    for layer in group.values():
        layer["B"] = 0.3 * rng.standard_normal(layer["B"].shape)

worst = check_gradients(lambda trainable: loss(trainable, base, batch), adapters_with_B)
for path, error in list(worst.items())[:4]:
    print(f"{path:<32} worst error {error:.1e}")
print("largest over all tensors:", f"{max(worst.values()):.1e}")
assert max(worst.values()) < 1e-8

# %% [markdown]
# A check is only worth something if it can fail. Here is the logistic function written as an autograd
# *primitive* with a deliberately wrong derivative ($2\sigma(1-\sigma)$ instead of $\sigma(1-\sigma)$),
# the bug you get from confusing $\sigma(z)$ with $\tfrac{1}{2}(\tanh z + 1) = \sigma(2z)$.

# %%
@primitive
def wrong_sigmoid(z):
    return 1.0 / (1.0 + numpy.exp(-z))


defvjp(wrong_sigmoid, lambda s, z: lambda upstream: upstream * 2 * s * (1 - s))

try:
    check_gradients(lambda p: np.sum(wrong_sigmoid(p["z"])), {"z": rng.standard_normal(4)})
except AssertionError as error:
    print("check_gradients caught it:", error)
else:
    raise AssertionError("the wrong derivative was not caught")

# %% [markdown]
# ## The same gradients, faster
#
# Tracing every small NumPy operation costs time: autograd records each one and replays it backwards.
# For training, minidisel also has each layer as a single autograd primitive whose backward pass is
# written by hand (`minidisel/fused.py`; each docstring derives its gradient). `forward(..., fused=True)`
# selects them, and the training loop uses them by default. The plain functions stay the reference:
# the two paths must give the same gradient up to rounding. The cell times one loss-and-gradient
# evaluation of a demo-sized model both ways and prints the medians; the times depend on your machine.
# If other programs keep the cores busy, a multi-threaded BLAS can make the fused path many times
# slower: start Jupyter with `OPENBLAS_NUM_THREADS=1`, as the README's command does.

# %%
import time

demo_config = ModelConfig(vocab_size=16, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
demo_adapter_config = AdapterConfig(method="disel", r=8, lora_alpha=16.0)
demo_base = init_params(demo_config, numpy.random.default_rng(SEED))
demo_adapters = init_adapters(demo_base, demo_config, demo_adapter_config, numpy.random.default_rng(SEED))
demo_batch = sample_batch(make_task("disjoint"), "Q", numpy.random.default_rng(SEED), 32)


def timed_gradient(fused, repeats=7):
    """Return the median seconds of one loss-and-gradient evaluation, and the gradient."""
    def loss_of(trainable):
        return language_model_loss(
            trainable, demo_base, demo_batch, None, demo_config, demo_adapter_config, fused=fused
        )

    loss_and_grad = value_and_grad(loss_of)
    loss_and_grad(demo_adapters)  # the first call builds cached constants such as the causal mask
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        _, gradient = loss_and_grad(demo_adapters)
        seconds.append(time.perf_counter() - started)
    return float(numpy.median(seconds)), gradient


plain_seconds, plain_gradient = timed_gradient(fused=False)
fused_seconds, fused_gradient = timed_gradient(fused=True)
print(f"plain layers: {1000 * plain_seconds:.1f} ms, fused layers: {1000 * fused_seconds:.1f} ms "
      f"(ratio {plain_seconds / fused_seconds:.2f})")

for path, value in flatten(plain_gradient).items():
    scale = max(numpy.max(numpy.abs(value)), 1e-30)
    assert numpy.max(numpy.abs(flatten(fused_gradient)[path] - value)) <= 1e-10 * scale, path

# %% [markdown]
# ## Exercises
#
# 1. **When does the gate start to learn?** With $B = 0$ the gradient of $b_g$ is zero. Use
#    `value_and_grad` on `adapters_with_B` and show that it is not zero once $B \neq 0$. Which factor of the
#    chain rule was zero before?
# 2. **Mask without writing.** `causal_scores(s)` below sets the scores above the diagonal to
#    $-10^9$ by item assignment. Rewrite it with `np.where` and confirm its gradient with `check_gradients`.
# 3. **Why float64?** Repeat the $h$ sweep in float32 (cast $\theta$ and compute in float32). Where is the
#    best $h$ now, and how large is the best error? What does this mean for a gradient *oracle*?
#
# ```python
# def causal_scores(s):
#     s = s.copy()
#     s[numpy.triu_indices(len(s), k=1)] = -1e9
#     return np.sum(nn.softmax(s) * numpy.arange(len(s)))
# ```
#
# Worked solutions follow; their cells are collapsed in JupyterLab.

# %% [markdown]
# ### Solution 1

# %% jupyter={"source_hidden": true}
_, gradients_with_B = value_and_grad(loss)(adapters_with_B, base, batch)
gate_bias_gradient = gradients_with_B["layers"]["0"]["self_attn"]["q_proj"]["b_g"]
print("gradient of b_g with B != 0:", gate_bias_gradient)
assert numpy.abs(gate_bias_gradient).max() > 0
# dL/db_g = sum over tokens of s · (B^T dL/dy) ⊙ (A x) ⊙ g (1 - g): the factor B^T dL/dy was zero.

# %% [markdown]
# ### Solution 2

# %% jupyter={"source_hidden": true}
def causal_scores(s):
    upper = numpy.triu(numpy.ones(s.shape, dtype=bool), k=1)  # a constant mask
    s = np.where(upper, -1e9, s)
    return np.sum(nn.softmax(s) * numpy.arange(len(s)))


scores = rng.standard_normal((4, 4))
print(check_gradients(lambda p: causal_scores(p["s"]), {"s": scores}))

# %% [markdown]
# ### Solution 3

# %% jupyter={"source_hidden": true}
theta32 = theta.astype(numpy.float32)


def total_tanh_32(z):
    return numpy.sum(numpy.tanh(z.astype(numpy.float32)), dtype=numpy.float32)


def central_difference_32(theta, h):
    step = numpy.zeros_like(theta)
    step[0] = h
    return (total_tanh_32(theta + step) - total_tanh_32(theta - step)) / numpy.float32(2 * h)


errors32 = numpy.array([abs(float(central_difference_32(theta32, h)) - exact) for h in steps])
best32 = steps[numpy.argmin(errors32)]
print(f"float32: smallest error {errors32.min():.1e} at h = {best32:.1e}")
print(f"float64: smallest error {errors.min():.1e} at h = {best:.1e}")
print(f"epsilon: float32 {numpy.finfo(numpy.float32).eps:.1e}, float64 {numpy.finfo(numpy.float64).eps:.1e}")
assert errors32.min() > 1000 * errors.min()
assert best32 > best
# The rounding term grows with epsilon, so the best h moves up and the best error grows by orders of
# magnitude: a float32 check could not tell a small real bug from rounding. That is why
# check_gradients raises TypeError for float32 parameters:
try:
    check_gradients(lambda p: np.sum(np.tanh(p["z"])), {"z": theta32})
except TypeError as error:
    print("TypeError:", error)
