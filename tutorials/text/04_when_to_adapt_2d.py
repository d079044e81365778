# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. Learning when to adapt, in two dimensions
#
# DISeL multiplies each rank-one component of a LoRA update by its own gate, a sigmoid of the input:
#
# $$y = W x + b + s \sum_{i=1}^{r} g_i(x)\, b_i\, (a_i^\top x),\qquad g(x) = \sigma(W_g x + b_g) \in (0, 1)^r .$$
#
# The hope: gates open on inputs that need the change and stay closed elsewhere, so the base model is
# kept where it was already right. Here everything fits on a page: one linear layer with 2-D inputs and
# one output, two clusters of inputs P and Q, and a fine-tuning target that differs from the base only
# on Q. We fine-tune LoRA and DISeL **on Q only** and look at the whole plane: where the gates open,
# and where the output moved. Then we move the clusters until DISeL fails, and see why.

# %%
import platform
from dataclasses import dataclass
from importlib.metadata import version

import autograd.numpy as np
import matplotlib.pyplot as plt
import numpy

import minidisel
from minidisel import AdapterConfig, TrainConfig, train
from minidisel.adapters import AdapterMode, adapter_delta, gate_logits, gate_values, init_adapter_layer, project

SEED = 0
print(f"python {platform.python_version()}, numpy {numpy.__version__}, autograd {version('autograd')}, "
      f"matplotlib {version('matplotlib')}, minidisel {minidisel.__version__} from {minidisel.__file__}")
print(f"seed {SEED}")

# %% [markdown]
# ## The setting
#
# The frozen base layer is $f(x) = w^\top x + b$ with $x \in \mathbb{R}^2$. Inputs come from two Gaussian
# clusters with centres $\mu_P$ and $\mu_Q$ and spread $\sigma$. The fine-tuning target keeps $f$ on P and
# adds a linear change on Q:
#
# $$y^\star(x) = \begin{cases} f(x) & x \in P \\ f(x) + v^\top x & x \in Q \end{cases}$$
#
# Fine-tuning sees only samples of Q, as when a model is fine-tuned on a new task without any data from
# the old one. A geometry is a pair of cluster centres.

# %%
base = {"weight": numpy.array([[1.0, -0.5]]), "bias": numpy.array([0.2])}  # w, b: one output
v = numpy.array([1.0, 0.5])  # the change the target makes on Q
SPREAD = 0.4  # sigma of both clusters


@dataclass(frozen=True)
class Geometry:
    name: str
    mu_P: tuple
    mu_Q: tuple

    def sample(self, cluster, rng, n):
        centre = self.mu_P if cluster == "P" else self.mu_Q
        return numpy.array(centre) + SPREAD * rng.standard_normal((n, 2))


def base_output(x):
    return x @ base["weight"].T + base["bias"]  # (N, 2) -> (N, 1)


def target_on_Q(x):
    return base_output(x) + (x @ v)[:, None]


separated = Geometry("P and Q in different directions", mu_P=(-2.0, 1.0), mu_Q=(2.0, 1.0))
print(separated)

# %% [markdown]
# ## Fine-tuning on Q only
#
# The adapter is one `init_adapter_layer` (rank $r = 2$, $A$ random, $B = 0$, and for DISeL a gate with
# $b_g$ = `gate_bias_init`). The loss is the mean squared error on a batch of Q, and `minidisel.train`
# runs AdamW with the gate parameters in their own group at `gate_lr_multiplier` times the base rate.

# %%
FINE_TUNE = TrainConfig(steps=300, batch_size=32, lr=3e-2, weight_decay=0.0, log_every=0, progress=False)


def adapter_config(method, gate_bias_init=-3.0, gate_lr_multiplier=5.0):
    return AdapterConfig(method=method, r=2, lora_alpha=2.0, gate_bias_init=gate_bias_init,
                         gate_lr_multiplier=gate_lr_multiplier)


def fine_tune_on_Q(geometry, config, train_config=FINE_TUNE):
    """Train a fresh adapter on samples of Q; return the trained adapter."""
    mode = AdapterMode(config)

    def loss(trainable, frozen, batch, rng):
        y, _ = project(batch["x"], frozen, trainable, mode)
        return np.mean((y - batch["y"]) ** 2)

    def sample_Q(rng, n):
        x = geometry.sample("Q", rng, n)
        return {"x": x, "y": target_on_Q(x)}

    start = init_adapter_layer(numpy.random.default_rng(SEED), 2, 1, config, "float64")
    assert numpy.all(adapter_delta(geometry.sample("Q", numpy.random.default_rng(1), 5), start, mode)[0] == 0)
    trained, _ = train(loss, start, base, sample_Q, train_config, gate_lr_multiplier=config.gate_lr_multiplier)
    return trained


def evaluate(geometry, adapter, config, n=1000):
    """Return the mean |output change| on P, the RMS error on Q, and mean gates on P and Q."""
    rng = numpy.random.default_rng([SEED, 2])
    mode = AdapterMode(config)
    x_P, x_Q = geometry.sample("P", rng, n), geometry.sample("Q", rng, n)
    change_P, gates_P = adapter_delta(x_P, adapter, mode)
    y_Q, gates_Q = project(x_Q, base, adapter, mode)
    return {
        "change on P": float(numpy.mean(numpy.abs(change_P))),
        "error on Q": float(numpy.sqrt(numpy.mean((y_Q - target_on_Q(x_Q)) ** 2))),
        "gate on P": None if gates_P is None else float(gates_P.mean()),
        "gate on Q": None if gates_Q is None else float(gates_Q.mean()),
    }


configs = {"lora": adapter_config("lora"), "disel": adapter_config("disel")}
trained = {method: fine_tune_on_Q(separated, config) for method, config in configs.items()}
results = {method: evaluate(separated, trained[method], configs[method]) for method in configs}
for method, result in results.items():
    print(f"{method:<6}", {key: None if value is None else round(value, 4) for key, value in result.items()})

# %% [markdown]
# Both fit Q. LoRA's update $s BAx$ is linear in $x$, so the change it learned on Q applies to P as
# well, scaled by where P sits. DISeL learned the same kind of change, but its gates are open on Q and
# nearly closed on P, so P barely moves.

# %%
assert results["lora"]["error on Q"] < 0.05
assert results["disel"]["error on Q"] < 0.05
assert results["disel"]["gate on Q"] > 0.9
assert results["disel"]["gate on P"] < 0.2
assert results["disel"]["change on P"] < 0.2 * results["lora"]["change on P"]

# %% [markdown]
# ## Looking at the whole plane
#
# Three heatmaps over a grid of inputs: the mean gate $\bar g(x) = \frac{1}{r}\sum_i g_i(x)$, and the output
# change from the base, $\Delta y(x) = y(x) - f(x)$, for LoRA and for DISeL. Dots are samples of P
# (white) and Q (black); the cross is the origin.

# %%
grid_x, grid_y = numpy.meshgrid(numpy.linspace(-4.5, 4.5, 121), numpy.linspace(-2.5, 3.5, 81))
grid = numpy.stack([grid_x.ravel(), grid_y.ravel()], axis=1)  # (N, 2)


def plane_maps(adapter, config):
    """Return the mean gate and the output change on the grid, each shaped like grid_x."""
    change, gates = adapter_delta(grid, adapter, AdapterMode(config))
    mean_gate = None if gates is None else gates.mean(axis=1).reshape(grid_x.shape)
    return mean_gate, change[:, 0].reshape(grid_x.shape)


def draw_clusters(axis, geometry):
    rng = numpy.random.default_rng([SEED, 3])
    for cluster, color in (("P", "white"), ("Q", "black")):
        points = geometry.sample(cluster, rng, 60)
        axis.scatter(points[:, 0], points[:, 1], s=6, color=color, edgecolors="gray", linewidths=0.3)
        axis.annotate(cluster, numpy.mean(points, axis=0) + [0, 0.9], color=color, ha="center", weight="bold",
                      bbox={"facecolor": "gray", "alpha": 0.5, "pad": 1})
    axis.plot(0, 0, "k+", markersize=10)
    axis.set_aspect("equal")


def show_plane(geometry, trained, configs, title):
    gate, disel_change = plane_maps(trained["disel"], configs["disel"])
    _, lora_change = plane_maps(trained["lora"], configs["lora"])
    limit = max(numpy.abs(lora_change).max(), numpy.abs(disel_change).max())
    extent = (grid_x.min(), grid_x.max(), grid_y.min(), grid_y.max())
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    panels = ((gate, "DISeL mean gate $\\bar g(x)$", "viridis", 0, 1),
              (lora_change, "LoRA: $\\Delta y(x)$", "RdBu_r", -limit, limit),
              (disel_change, "DISeL: $\\Delta y(x)$", "RdBu_r", -limit, limit))
    for axis, (values, label, cmap, low, high) in zip(axes, panels):
        image = axis.imshow(values, origin="lower", extent=extent, cmap=cmap, vmin=low, vmax=high)
        figure.colorbar(image, ax=axis, shrink=0.8)
        draw_clusters(axis, geometry)
        axis.set_title(label)
    figure.suptitle(title)
    figure.tight_layout()


show_plane(separated, trained, configs, separated.name)

# %% [markdown]
# ## Closed gates leave the base untouched
#
# Each component's contribution is multiplied by its gate, so the change at any input is bounded by
# how far the gates are open there:
#
# $$|\Delta y(x)| = \Big| s \sum_i g_i(x)\, b_i\, (a_i^\top x) \Big| \le s \sum_i g_i(x)\, |b_i|\, |a_i^\top x| ,$$
#
# and with every gate at exactly zero the layer *is* the base layer (`gate_override=0.0` forces that).
# On P the gates are nearly closed, so the bound itself is small.

# %%
config = configs["disel"]
adapter = trained["disel"]
x_P = separated.sample("P", numpy.random.default_rng([SEED, 4]), 500)
change_P, gates_P = adapter_delta(x_P, adapter, AdapterMode(config))
assert numpy.array_equal(gates_P, gate_values(x_P, adapter, config))  # the gates adapter_delta applied
bound = config.scaling * numpy.sum(gates_P * numpy.abs(adapter["B"][0]) * numpy.abs(x_P @ adapter["A"].T), axis=1)
assert numpy.all(numpy.abs(change_P[:, 0]) <= bound + 1e-12)

closed, _ = adapter_delta(x_P, adapter, AdapterMode(config, gate_override=0.0))
assert numpy.all(closed == 0.0)
print(f"on P: largest gate {gates_P.max():.3f}, largest |change| {numpy.abs(change_P).max():.3f}, "
      f"largest bound {bound.max():.3f}")

figure, axis = plt.subplots(figsize=(5, 3.4))
axis.scatter(gates_P.mean(axis=1), numpy.abs(change_P[:, 0]), s=5)
axis.set_xlabel(r"mean gate $\bar g(x)$ on a P input")
axis.set_ylabel(r"$|\Delta y(x)|$")
axis.set_title("on P, the output moves only where the gates open")
figure.tight_layout()

# %% [markdown]
# ## Where it fails: P between the origin and Q
#
# The gate's pre-activation $z(x) = W_g x + b_g$ is affine. If P lies on the segment from the origin to Q,
# $\mu_P = \lambda \mu_Q$ with $0 < \lambda < 1$, then
#
# $$z(\mu_P) = \lambda\, W_g \mu_Q + b_g = \lambda\, z(\mu_Q) + (1 - \lambda)\, b_g ,$$
#
# a weighted average of the logit on Q and the bias. Training on Q pushes $z(\mu_Q)$ up until the gates
# are open; nothing in the loss pushes $z(\mu_P)$ down, because P is never seen. So the gate on P ends
# up part way open, at best held down only by $b_g$, and the bias itself is trained on Q too.

# %%
between = Geometry("P between the origin and Q", mu_P=(1.0, 0.5), mu_Q=(3.0, 1.5))
weight = numpy.array(between.mu_P)[0] / numpy.array(between.mu_Q)[0]
assert numpy.allclose(numpy.array(between.mu_P), weight * numpy.array(between.mu_Q))

trained_between = {method: fine_tune_on_Q(between, config) for method, config in configs.items()}
results_between = {method: evaluate(between, trained_between[method], configs[method]) for method in configs}
for method, result in results_between.items():
    print(f"{method:<6}", {key: None if value is None else round(value, 4) for key, value in result.items()})

adapter = trained_between["disel"]
z_P = gate_logits(numpy.array([between.mu_P]), adapter, configs["disel"])[0]
z_Q = gate_logits(numpy.array([between.mu_Q]), adapter, configs["disel"])[0]
assert numpy.allclose(z_P, weight * z_Q + (1 - weight) * adapter["b_g"])
print(f"lambda = {weight}: z(mu_Q) = {numpy.round(z_Q, 2)}, b_g = {numpy.round(adapter['b_g'], 2)}, "
      f"z(mu_P) = {numpy.round(z_P, 2)}")

assert results_between["disel"]["gate on P"] > 0.5
assert results_between["disel"]["change on P"] > 0.5 * results_between["lora"]["change on P"]
show_plane(between, trained_between, configs, between.name)

# %% [markdown]
# ## Where it fails: overlapping clusters
#
# If P and Q overlap, many P inputs are also typical Q inputs. A gate is a function of the input alone,
# so it cannot be open for a Q input and closed for the same point drawn from P.

# %%
overlapping = Geometry("overlapping clusters", mu_P=(1.5, 1.0), mu_Q=(2.0, 1.0))
trained_overlap = {method: fine_tune_on_Q(overlapping, config) for method, config in configs.items()}
results_overlap = {method: evaluate(overlapping, trained_overlap[method], configs[method]) for method in configs}
for method, result in results_overlap.items():
    print(f"{method:<6}", {key: None if value is None else round(value, 4) for key, value in result.items()})
assert results_overlap["disel"]["gate on P"] > 0.5
show_plane(overlapping, trained_overlap, configs, overlapping.name)

# %% [markdown]
# ## The knobs: `gate_bias_init` and the gate learning rate
#
# Two settings decide how far gates open during a short fine-tune: the starting bias $b_g$ (how closed
# the gates start, $\sigma(b_g)$) and the gate learning rate (`gate_lr_multiplier` times the base rate).
# A loop over both, for the separated geometry and for P between the origin and Q, records the change
# on P and the error on Q. Every run uses the same seed and the same number of steps.

# %%
bias_values = [-1.0, -3.0, -5.0, -7.0]
multipliers = [0.2, 1.0, 5.0, 25.0]


def sweep(geometry):
    table = {"change on P": numpy.zeros((4, 4)), "error on Q": numpy.zeros((4, 4))}
    for i, bias in enumerate(bias_values):
        for j, multiplier in enumerate(multipliers):
            config = adapter_config("disel", bias, multiplier)
            result = evaluate(geometry, fine_tune_on_Q(geometry, config), config)
            for key in table:
                table[key][i, j] = result[key]
    return table


sweeps = {geometry.name: sweep(geometry) for geometry in (separated, between)}
lora_change = {separated.name: results["lora"]["change on P"], between.name: results_between["lora"]["change on P"]}

figure, axes = plt.subplots(2, 2, figsize=(10, 7))
for row, (name, table) in enumerate(sweeps.items()):
    for column, key in enumerate(("change on P", "error on Q")):
        axis = axes[row, column]
        image = axis.imshow(table[key], cmap="magma_r", vmin=0)
        for (i, j), value in numpy.ndenumerate(table[key]):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="tab:cyan", fontsize=9)
        axis.set_xticks(range(4), [str(m) for m in multipliers])
        axis.set_yticks(range(4), [str(b) for b in bias_values])
        axis.set_xlabel("gate_lr_multiplier")
        axis.set_ylabel("gate_bias_init")
        extra = f" (LoRA: {lora_change[name]:.2f})" if key == "change on P" else ""
        axis.set_title(f"{name}:\nmean |change| on P{extra}" if key == "change on P" else f"{name}:\nRMS error on Q")
        figure.colorbar(image, ax=axis, shrink=0.8)
figure.tight_layout()

default_column = multipliers.index(5.0)
print("separated, multiplier 5: change on P by bias", numpy.round(sweeps[separated.name]["change on P"][:, default_column], 3))
print("between,   multiplier 5: change on P by bias", numpy.round(sweeps[between.name]["change on P"][:, default_column], 3))
assert sweeps[separated.name]["change on P"].max() < 0.5 * lora_change[separated.name]

# among the settings that fit Q, the smallest change on P in each geometry
for name, table in sweeps.items():
    fits = table["error on Q"] < 0.1
    print(f"{name}: {fits.sum()} of 16 settings fit Q (RMS error < 0.1); "
          f"smallest change on P among them {table['change on P'][fits].min():.3f}")
smallest = {name: table["change on P"][table["error on Q"] < 0.1].min() for name, table in sweeps.items()}
assert smallest[between.name] > 5 * smallest[separated.name]

# %% [markdown]
# Read the two rows of maps together. In the separated geometry DISeL changes P far less than LoRA in
# every setting of the grid, and still fits Q wherever the gates can open in time. With P between the
# origin and Q, no setting in the grid keeps P as untouched as in the separated geometry. A more closed
# start or a slower gate delays the opening, but the gate that finally opens on Q opens on P as well.
# Among the settings that fit Q, the smallest change on P is many times larger than in the separated
# geometry (printed above).
#
# ### Interactive version
#
# With `ipywidgets` installed (`pip install -e ".[notebooks]"`) and a Jupyter frontend, the sliders below
# retrain and redraw the plane for any bias and multiplier. Without them the cell only prints a note, so
# the notebook still runs top to bottom anywhere.

# %%
def explore(mu_P_x=-2.0, mu_P_y=1.0, gate_bias_init=-3.0, gate_lr_multiplier=5.0):
    geometry = Geometry("your geometry", (mu_P_x, mu_P_y), separated.mu_Q)
    chosen = {"lora": configs["lora"], "disel": adapter_config("disel", gate_bias_init, gate_lr_multiplier)}
    adapters = {method: fine_tune_on_Q(geometry, config) for method, config in chosen.items()}
    show_plane(geometry, adapters, chosen, f"P at ({mu_P_x}, {mu_P_y}), b_g = {gate_bias_init}, "
               f"gate lr x{gate_lr_multiplier}")
    plt.show()


try:
    from ipywidgets import FloatSlider, interact
except ImportError:
    print("ipywidgets is not installed: call explore(mu_P_x, mu_P_y, gate_bias_init, gate_lr_multiplier) instead")
else:
    interact(explore, mu_P_x=FloatSlider(value=-2.0, min=-4.0, max=4.0, step=0.5),
             mu_P_y=FloatSlider(value=1.0, min=-2.0, max=3.0, step=0.5),
             gate_bias_init=FloatSlider(value=-3.0, min=-8.0, max=0.0, step=1.0),
             gate_lr_multiplier=FloatSlider(value=5.0, min=0.2, max=25.0, step=0.2))

# %% [markdown]
# ## Exercises
#
# 1. **A gate that starts blind.** With `gate_weight_init="zero"` the gate starts as the constant
#    $\sigma(b_g)$, the same for every input. Fine-tune DISeL this way in the separated geometry. Does it
#    end up like LoRA, changing P as much? (What does the gradient of $W_g$ look like?)
# 2. **Beyond Q.** Put P on the same ray as Q but *farther* from the origin ($\lambda > 1$). Predict the gate
#    on P from $z(\mu_P) = \lambda z(\mu_Q) + (1 - \lambda) b_g$ before you train, then check.
# 3. **A little P data.** The failure with P between the origin and Q comes from training on Q alone. Add
#    P samples with target $f(x)$ to each batch (a quarter of the batch) and train again. What happens to
#    the gate on P?
#
# Worked solutions follow; their cells are collapsed in JupyterLab.

# %% [markdown]
# ### Solution 1

# %% jupyter={"source_hidden": true}
zero_gate = AdapterConfig(method="disel", r=2, lora_alpha=2.0, gate_weight_init="zero")
zero_result = evaluate(separated, fine_tune_on_Q(separated, zero_gate), zero_gate)
print("zero W_g:", {key: round(value, 4) for key, value in zero_result.items()})
print("LoRA:    ", {key: value if value is None else round(value, 4) for key, value in results["lora"].items()})
assert zero_result["change on P"] < 0.5 * results["lora"]["change on P"]
# No. W_g starts at zero but is trained: its gradient is a sum over Q inputs of (dL/dz) x, so it moves
# towards Q's side of the plane at once, and in this geometry the gate learns to tell P from Q anyway.
# "zero" only removes the random start; a gate that stays constant needs W_g frozen at zero.

# %% [markdown]
# ### Solution 2

# %% jupyter={"source_hidden": true}
beyond = Geometry("P beyond Q", mu_P=(4.0, 2.0), mu_Q=(2.0, 1.0))
beyond_adapter = fine_tune_on_Q(beyond, configs["disel"])
ratio = 2.0
z_Q = gate_logits(numpy.array([beyond.mu_Q]), beyond_adapter, configs["disel"])[0]
predicted = ratio * z_Q + (1 - ratio) * beyond_adapter["b_g"]
measured = gate_logits(numpy.array([beyond.mu_P]), beyond_adapter, configs["disel"])[0]
print("predicted z(mu_P):", numpy.round(predicted, 3), " measured:", numpy.round(measured, 3))
assert numpy.allclose(predicted, measured)
print("gate on P:", round(evaluate(beyond, beyond_adapter, configs["disel"])["gate on P"], 3))
# With lambda > 1 the formula extrapolates: z(mu_P) lies beyond z(mu_Q), so the gate on P is at least
# as open as on Q, and the change there is larger still because a_i^T x grows with |x|.

# %% [markdown]
# ### Solution 3

# %% jupyter={"source_hidden": true}
def fine_tune_with_replay(geometry, config, fraction=0.25):
    mode = AdapterMode(config)

    def loss(trainable, frozen, batch, rng):
        y, _ = project(batch["x"], frozen, trainable, mode)
        return np.mean((y - batch["y"]) ** 2)

    def sample_mixed(rng, n):
        n_P = int(fraction * n)
        x_P, x_Q = geometry.sample("P", rng, n_P), geometry.sample("Q", rng, n - n_P)
        return {"x": numpy.concatenate([x_P, x_Q]), "y": numpy.concatenate([base_output(x_P), target_on_Q(x_Q)])}

    start = init_adapter_layer(numpy.random.default_rng(SEED), 2, 1, config, "float64")
    trained, _ = train(loss, start, base, sample_mixed, FINE_TUNE, gate_lr_multiplier=config.gate_lr_multiplier)
    return trained


replay = evaluate(between, fine_tune_with_replay(between, configs["disel"]), configs["disel"])
print("Q only:   ", {key: round(value, 4) for key, value in results_between["disel"].items()})
print("with P:   ", {key: round(value, 4) for key, value in replay.items()})
assert replay["gate on P"] < results_between["disel"]["gate on P"]
assert replay["change on P"] < results_between["disel"]["change on P"]
# With P in the loss, the gate is told to stay closed there, and the bias and W_g find the hyperplane
# between the clusters. DISeL itself trains on the task data only, which is why the geometry matters.
