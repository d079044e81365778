"""Figures of the demo: training curves. Gate figures live in :mod:`minidisel.gates`."""

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402

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
