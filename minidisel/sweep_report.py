"""Figures and tables of a sweep, read from its run records.

* ``tradeoff.png``: score on Q against retention on P, one panel per task,
  width and step count. Each method and rank (and DISeL gate setting) is one
  marker with error bars over seeds. The base model's retention is a
  vertical line.
* ``by_<axis>.png``: retention on P, drift ``KL(base ‖ tuned)`` on P, score
  on Q and DISeL's mean gate on P and Q inputs against each grid axis that
  takes more than one value, other axes fixed.
* ``gates.png``: the layer x module heatmap of DISeL's mean gates on P and Q
  inputs for the first DISeL series of the grid, averaged over seeds.
* ``summary.md``: the mean and standard deviation over seeds of every series.

The score is exact-match accuracy, or the NLL (in nats) for tasks without
answers (``markov``). Error bars are one sample standard deviation over seeds.
"""

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from minidisel.checkpoint import atomic_write
from minidisel.gates import plot_gate_heatmap
from minidisel.plots import COLORS

SERIES_AXES = ("method", "rank", "gate_bias_init", "gate_lr_multiplier")
PANEL_AXES = ("task", "width", "steps")
PLOTTED_AXES = ("task", "width", "rank", "gate_bias_init", "gate_lr_multiplier", "steps")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
AXIS_LABELS = {
    "task": "task (overlap-K: K input digits shared by P and Q)",
    "width": "model width d_model",
    "rank": "adapter rank r",
    "gate_bias_init": "initial gate bias b_g",
    "gate_lr_multiplier": "gate learning-rate multiplier",
    "steps": "fine-tuning steps",
}


def score(metrics):
    """Return the task score of a metrics dict: accuracy, or NLL when the task has no answers."""
    return metrics["nll"] if metrics["accuracy"] is None else metrics["accuracy"]


def mean_std(values):
    """Return the mean and the sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def series_label(point, extra=(), omit=None):
    """Return a legend label such as ``disel r8 b_g=-3 gate lr x5``, without the axis ``omit``."""
    parts = [point["method"]]
    if point["rank"] is not None and omit != "rank":
        parts.append(f"r{point['rank']}")
    if point["gate_bias_init"] is not None and omit != "gate_bias_init":
        parts.append(f"b_g={point['gate_bias_init']:g}")
    if point["gate_lr_multiplier"] is not None and omit != "gate_lr_multiplier":
        parts.append(f"gate lr x{point['gate_lr_multiplier']:g}")
    parts += [f"{axis}={point[axis]}" for axis in extra]
    return " ".join(parts)


def group(records, axes):
    """Group successful records by the values of ``axes``, in order of first appearance."""
    groups = {}
    for record in records:
        if "error" not in record:
            groups.setdefault(tuple(record["point"][axis] for axis in axes), []).append(record)
    return groups


def aggregate(members):
    """Return the statistics over seeds of one group of runs."""
    stats = {
        "seeds": len(members),
        "P": mean_std([score(r["P"]) for r in members]),
        "Q": mean_std([score(r["Q"]) for r in members]),
        "kl": mean_std([r["P_kl_from_base"] for r in members]),
        "base_P": mean_std([score(r["base"]["P"]) for r in members]),
        "base_Q": mean_std([score(r["base"]["Q"]) for r in members]),
    }
    if "gates" in members[0]:
        for dist in ("P", "Q"):
            stats[f"gate_{dist}"] = mean_std([np.mean(list(r["gates"][dist].values())) for r in members])
    return stats


def has_accuracy(records):
    """Return True when the task of every successful record has exact-match answers."""
    return all(r["base"]["P"]["accuracy"] is not None for r in records if "error" not in r)


def score_labels(records):
    """Return the axis labels of retention on P and score on Q."""
    if has_accuracy(records):
        return "accuracy on P after fine-tuning (retention)", "accuracy on Q"
    return "NLL on P after fine-tuning (nats, lower is better)", "NLL on Q (nats)"


def panel_title(key):
    """Return a panel title from a (task, width, steps) key."""
    task, width, steps = key
    return f"{task}, width {width}, {steps} steps"


def series_style(point, ranks, gate_settings):
    """Return the colour and marker of a series: colour by method (DISeL shaded by gate setting), marker by rank."""
    marker = MARKERS[ranks.index(point["rank"]) % len(MARKERS)] if point["rank"] is not None else "X"
    if point["method"] != "disel" or len(gate_settings) == 1:
        return COLORS.get(point["method"], "black"), marker
    shade = gate_settings.index((point["gate_bias_init"], point["gate_lr_multiplier"])) / (len(gate_settings) - 1)
    return tuple(np.array([0.1, 0.45, 0.1]) * (1 - shade) + np.array([0.6, 0.9, 0.3]) * shade), marker


def at_reference_gates(records, reference):
    """Keep every run except DISeL runs whose gate settings differ from ``reference`` (if any run has them)."""
    if reference is None:
        return records
    setting = (reference["gate_bias_init"], reference["gate_lr_multiplier"])

    def keep(record):
        point = record["point"]
        return point["method"] != "disel" or (point["gate_bias_init"], point["gate_lr_multiplier"]) == setting

    kept = [r for r in records if keep(r)]
    has_disel = any(r["point"]["method"] == "disel" for r in kept)
    return kept if has_disel or not any(r["point"]["method"] == "disel" for r in records) else records


def plot_tradeoff(records, reference=None):
    """Draw score on Q against retention on P, one panel per (task, width, steps); return the figure.

    With ``reference`` (``{"gate_bias_init", "gate_lr_multiplier"}``), DISeL
    appears only at those gate settings, so each method and rank is one marker;
    ``by_gate_*.png`` shows the other settings.
    """
    records = at_reference_gates(records, reference)
    panels = group(records, PANEL_AXES)
    ranks = sorted({r["point"]["rank"] for r in records if r["point"]["rank"] is not None})
    gate_settings = sorted({(r["point"]["gate_bias_init"], r["point"]["gate_lr_multiplier"]) for r in records if r["point"]["method"] == "disel"})
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns + 2.8, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()

    x_label, y_label = score_labels(records)
    handles = {}
    for axis, (key, members) in zip(axes, panels.items()):
        base = aggregate(members)["base_P"][0]
        handles["base model"] = axis.axvline(base, color="black", linestyle="--", linewidth=1.0)
        for series in group(members, SERIES_AXES).values():
            stats, point = aggregate(series), series[0]["point"]
            color, marker = series_style(point, ranks, gate_settings)
            handles[series_label(point)] = axis.errorbar(
                stats["P"][0], stats["Q"][0], xerr=stats["P"][1], yerr=stats["Q"][1],
                color=color, marker=marker, markersize=7, linestyle="none", capsize=3,
            )
        if has_accuracy(members):
            axis.set_xlim(-0.03, 1.03)
            axis.set_ylim(-0.03, 1.03)
        axis.set_title(panel_title(key), fontsize=10)
        axis.set_xlabel(x_label, fontsize=9)
        axis.set_ylabel(y_label, fontsize=9)
        axis.grid(alpha=0.3)

    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    return figure


def value_order(axis, value):
    """Sort key of a grid value: tasks by shared digits (``disjoint`` first), numbers by size."""
    if axis != "task":
        return (0, value)
    if value == "disjoint":
        return (0, 0)
    if value.startswith("overlap-"):
        return (0, int(value.rsplit("-", 1)[1]))
    return (1, value)


def axis_values(records, axis):
    """Return the distinct non-None values of ``axis``, sorted."""
    values = {r["point"][axis] for r in records if r["point"][axis] is not None}
    return sorted(values, key=lambda value: value_order(axis, value))


def axis_lines(records, axis):
    """Return ``{label: {axis value: stats}}``: one line per setting of the other axes, with at least two values."""
    others = [a for a in SERIES_AXES + PANEL_AXES if a != axis]
    candidates = [members for members in group(records, others).values() if len(group(members, (axis,))) >= 2]
    chosen = [r for members in candidates for r in members]
    varying = [a for a in PANEL_AXES if a != axis and len(axis_values(chosen, a)) > 1]
    lines = {}
    for members in candidates:
        by_value = group(members, (axis,))
        ordered = sorted(by_value.items(), key=lambda item: value_order(axis, item[0][0]))
        label = series_label(members[0]["point"], varying, omit=axis)
        lines[label] = {value: aggregate(runs) for (value,), runs in ordered}
    return lines


LINE_STYLES = ("-", "--", ":", "-.")


def plot_axis(records, axis):
    """Draw retention on P, drift on P, score on Q and DISeL's mean gates against one grid axis; return the figure."""
    values = axis_values(records, axis)
    lines = axis_lines(records, axis)
    x_label, y_label = score_labels(records)
    panels = [("P", x_label), ("kl", "KL(base || tuned) on P inputs (nats)"), ("Q", y_label)]
    if any("gate_P" in stats for points in lines.values() for stats in points.values()):
        panels.append(("gate", "DISeL mean gate (solid: P inputs, dashed: Q)"))
    figure = Figure(figsize=(4.3 * len(panels) + 2.5, 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels))

    seen = {}
    for label, points in lines.items():
        method = label.split()[0]
        style = {"color": COLORS.get(method), "marker": MARKERS[seen.get(method, 0) % len(MARKERS)], "capsize": 3}
        style["linestyle"] = LINE_STYLES[seen.get(method, 0) % len(LINE_STYLES)]
        seen[method] = seen.get(method, 0) + 1
        x = [values.index(value) for value in points]
        for panel, (statistic, _) in zip(axes, panels):
            draw_statistic(panel, x, list(points.values()), statistic, label, style)

    base = {value: aggregate(runs)["base_P"][0] for (value,), runs in group(records, (axis,)).items() if value is not None}
    axes[0].plot([values.index(v) for v in base], list(base.values()), color="black", linestyle="--", label="base model")
    for panel, (_, label_text) in zip(axes, panels):
        panel.set_xticks(range(len(values)), [str(value) for value in values], rotation=30 if axis == "task" else 0)
        panel.set_xlabel(AXIS_LABELS[axis], fontsize=9)
        panel.set_ylabel(label_text, fontsize=9)
        panel.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_ylim(bottom=0.0)
    limited = [0, 2] if has_accuracy(records) else []
    for index in limited + ([3] if len(panels) == 4 else []):
        axes[index].set_ylim(-0.03, 1.03)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return figure


def draw_statistic(panel, x, points, statistic, label, style):
    """Draw one line's mean ± standard deviation of ``statistic``; ``"gate"`` draws DISeL's P and Q gates."""
    if statistic != "gate":
        means, spreads = zip(*(stats[statistic] for stats in points))
        panel.errorbar(x, means, yerr=spreads, label=label, alpha=0.85, **style)
    elif "gate_P" in points[0]:
        for dist, linestyle in (("P", "-"), ("Q", "--")):
            means, spreads = zip(*(stats[f"gate_{dist}"] for stats in points))
            panel.errorbar(x, means, yerr=spreads, alpha=0.85, **{**style, "linestyle": linestyle})


def series_order(point):
    """Sort key of a table row: task, width, steps, method, then rank and gate settings."""
    methods = ("full", "lora", "dora", "disel")
    order = [value_order("task", point["task"]), point["width"], point["steps"], methods.index(point["method"])]
    return order + [(value is None, value or 0) for value in (point["rank"], point["gate_bias_init"], point["gate_lr_multiplier"])]


def format_summary(records):
    """Return a Markdown table of every series: mean ± standard deviation over seeds."""
    accuracy = has_accuracy(records)
    kind = "acc" if accuracy else "NLL"
    header = (f"| task | width | steps | method | r | b_g | gate lr x | seeds | base P {kind} | P {kind} | Q {kind} "
              "| KL on P | gate on P | gate on Q |")
    lines = [header, "|" + "---|" * 14]
    for series in sorted(group(records, PANEL_AXES + SERIES_AXES).values(), key=lambda runs: series_order(runs[0]["point"])):
        p, stats = series[0]["point"], aggregate(series)

        def cell(name, digits=3):
            return f"{stats[name][0]:.{digits}f} ± {stats[name][1]:.{digits}f}" if name in stats else ""

        settings = [p["task"], p["width"], p["steps"], p["method"], p["rank"], p["gate_bias_init"], p["gate_lr_multiplier"]]
        settings = ["" if value is None else str(value) for value in settings]
        lines.append("| " + " | ".join(settings + [str(stats["seeds"]), cell("base_P"), cell("P"), cell("Q"), cell("kl", 4), cell("gate_P"), cell("gate_Q")]) + " |")
    failed = [r for r in records if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} runs failed:", ""]
        lines += [f"- {r['point']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def first_disel_series(records):
    """Return the runs (one per seed) of the first DISeL series in grid order, or None."""
    for members in group(records, PANEL_AXES + SERIES_AXES).values():
        if members[0]["method"] == "disel":
            return members
    return None


def seed_mean_gates(members):
    """Average DISeL's per-layer mean gates ``{dist: {path: mean}}`` over the runs of one series."""
    return {
        dist: {path: float(np.mean([r["gates"][dist][path] for r in members])) for path in members[0]["gates"][dist]}
        for dist in members[0]["gates"]
    }


def plot_series_gates(members):
    """Draw the layer x module heatmap of one DISeL series' gates, averaged over seeds; return the figure."""
    point = members[0]["point"]
    title = f"{series_label(point)}, {panel_title((point['task'], point['width'], point['steps']))}, mean of {len(members)} seeds"
    return plot_gate_heatmap(seed_mean_gates(members), title)


def write_report(out, records, reference=None):
    """Write ``tradeoff.png``, ``gates.png``, one ``by_<axis>.png`` per varying axis and ``summary.md``; return the names."""
    out = Path(out)
    succeeded = [r for r in records if "error" not in r]
    names = []
    if succeeded:
        plot_tradeoff(succeeded, reference).savefig(out / "tradeoff.png", dpi=120)
        names.append("tradeoff.png")
        series = first_disel_series(succeeded)
        if series is not None:
            plot_series_gates(series).savefig(out / "gates.png", dpi=120)
            names.append("gates.png")
        for axis in PLOTTED_AXES:
            if axis_lines(succeeded, axis):
                plot_axis(succeeded, axis).savefig(out / f"by_{axis}.png", dpi=120)
                names.append(f"by_{axis}.png")
    text = format_summary(records)
    atomic_write(out / "summary.md", lambda file: file.write(text.encode("utf-8")))
    return names + ["summary.md"]
