"""The micro report's plots (matplotlib, Agg): manifold distance vs exploration, distance from
the ODE path per step, the noise budget, gradient norms per step before and after the equalizer.

Leaves to others: the numbers (`micro.py`), the tables and the text (`report.py`).
"""

from __future__ import annotations

import math
from pathlib import Path

from sage_fast.grpo.schedule import STOCHASTIC_TYPES

from .report import by_type, mean_se, step_rows

__all__ = ["COLOURS", "micro_plots"]

COLOURS = {"sage_grpo": "tab:blue", "flow_grpo": "tab:orange", "dance_grpo": "tab:green", "cps": "tab:red",
           "ode": "black"}


def _style(ax, log: bool = False, **labels) -> None:
    if log:
        ax.set_yscale("log")
    ax.set(**labels)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _save(fig, plt, out: Path, name: str, names: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    names.append(name)


def micro_plots(result: dict, out: Path, table: list[dict]) -> list[str]:
    """Write the four PNGs of the micro report into `out`; returns their file names."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by = by_type(result)
    ode = result["ode"]
    names = []

    # 1. manifold distance against exploration: the whole range, and a zoom on the ODE's neighbourhood
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    om, ose = mean_se(ode["manifold"])
    for ax in axes:
        for sde_type, cells in by.items():
            xs = [0.0] + [mean_se(c["exploration"])[0] for c in cells]
            xe = [0.0] + [mean_se(c["exploration"])[1] for c in cells]
            ys = [om] + [mean_se(c["manifold"])[0] for c in cells]
            ye = [ose] + [mean_se(c["manifold"])[1] for c in cells]
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", ms=4, capsize=2, color=COLOURS.get(sde_type),
                        label=sde_type)
            for c, x, y in zip(cells, xs[1:], ys[1:]):
                ax.annotate(f"{c['eta']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[1].set_ylim(om - 0.25 * om, om + 0.5 * om)
    _style(axes[0], xlabel="exploration: within-group std of the reward (mean over prompts)",
           ylabel="manifold distance of the final samples", title="manifold distance vs exploration "
           "(labels: eta; origin: the ODE)")
    _style(axes[1], xlabel="exploration", ylabel="manifold distance", title="the same, near the ODE")
    _save(fig, plt, out, "micro_geometry.png", names)

    # 2. where along the trajectory the types leave the ODE, at matched exploration
    rows = step_rows(table)
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(5 * (len(rows) + 1), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for sde_type, entry in row["types"].items():
            if entry is None or entry["step_distance"] is None:
                continue
            ax.plot(range(len(entry["step_distance"])), entry["step_distance"], marker="o", ms=3,
                    color=COLOURS.get(sde_type), label=f"{sde_type} (eta {entry['eta']:.3f})")
        _style(ax, xlabel="step t (state before step t; last: final)", ylabel="RMS |x_t - x_t(ODE)| (latent)",
               title=f"distance from the ODE path, exploration {row['target']:g}")
    ax = axes[0, -1]
    eta = result["recipe"]["eta"]
    for sde_type, cells in by.items():
        cell = min(cells, key=lambda c: abs(c["eta"] - eta))
        ax.plot(range(len(cell["c"])), cell["c"], marker="o", ms=3, color=COLOURS.get(sde_type),
                label=f"{sde_type} (eta {cell['eta']:g})")
    _style(ax, xlabel="step", ylabel="per-step std c", title="the samplers' step std")
    _save(fig, plt, out, "micro_steps.png", names)

    # 3. noise budget of the recipe's schedule
    budget = result["noise_budget"]["recipe"]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in budget["steps"]]
    exact = [r["exact"] if math.isfinite(r["exact"]) else float("nan") for r in budget["steps"]]
    ax.plot(steps, exact, color="black", lw=2, ls="--", label="exact integral of eta^2 u/(1-u)")
    for sde_type in STOCHASTIC_TYPES:
        ax.plot(steps, [max(r["variance"][sde_type], 1e-12) for r in budget["steps"]], marker="o", ms=3,
                color=COLOURS[sde_type], label=sde_type)
    _style(ax, log=True, xlabel="step", ylabel="variance injected (c^2)",
           title=f"noise budget, {budget['num_steps']} steps, shift {budget['shift']:g}, eta {budget['eta']:g}")
    _save(fig, plt, out, "micro_budget.png", names)

    # 4. gradient norms per step, and after the analytic equalizer
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g in result["parameter_gradients"]:
        t = g["sde_type"]
        scales = result["equalizer_analytic"][t]
        axes[0].plot(g["steps"], g["mean"], marker="o", ms=3, color=COLOURS.get(t), label=f"{t} measured")
        cell = min(by[t], key=lambda c: abs(c["eta"] - g["eta"]))
        ana = [cell["grad_norm_analytic"][s] for s in g["steps"]]
        k = sorted(m / a for m, a in zip(g["mean"], ana) if a > 0)[len(ana) // 2]  # one scale for the shape
        axes[0].plot(g["steps"], [k * a for a in ana], ls=":", color=COLOURS.get(t))
        axes[1].plot(g["steps"], [m * scales[s] for m, s in zip(g["mean"], g["steps"])], marker="o", ms=3,
                     color=COLOURS.get(t), label=t)
    _style(axes[0], log=True, xlabel="step", ylabel="|d logp_t / d theta|",
           title="parameter gradient per step (dotted: analytic |b|/c, one scale)")
    _style(axes[1], log=True, xlabel="step", ylabel="s_t x |d logp_t / d theta|", title="after the analytic equalizer")
    _save(fig, plt, out, "micro_gradients.png", names)
    return names
