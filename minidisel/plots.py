"""Figures of the demo: training curves and mean gate values on P and Q inputs."""

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"full": "tab:red", "lora": "tab:blue", "disel": "tab:green", "dora": "tab:purple"}


def plot_training_curves(histories, path, title):
    """Save the fine-tuning loss of each method against the step."""
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for method, history in histories.items():
        axis.plot(history["step"], history["loss"], label=method, color=COLORS.get(method), linewidth=1.2)
    axis.set_yscale("log")
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel("training loss on Q (nats)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_gate_means(gates, path, title):
    """Save a bar chart of the mean gate value of each adapted layer on P and on Q inputs."""
    layers = list(gates["P"])
    positions = np.arange(len(layers))
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 2), 3.8))
    axis.bar(positions - 0.2, [gates["P"][name] for name in layers], 0.4, label="P inputs", color="tab:gray")
    axis.bar(positions + 0.2, [gates["Q"][name] for name in layers], 0.4, label="Q inputs", color="tab:green")
    axis.set_xticks(positions)
    axis.set_xticklabels([name.replace("layers.", "").replace("self_attn.", "") for name in layers], rotation=60, ha="right")
    axis.set_ylabel("mean gate value")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
