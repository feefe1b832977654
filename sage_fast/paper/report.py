"""The micro report: `docs/paper/micro.md`, its PNGs (`plots.py`) and its raw numbers (`micro.json`).

    write_micro_report(result, out_dir, command="python -m sage_fast.paper micro")

Every number in the report comes from `result` (`sage_fast.paper.micro.run_micro`); the readings
are sentences generated from those numbers by rules fixed in advance (`CLAIM_Z`), never edited
towards the paper.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sage_fast.grpo.schedule import STOCHASTIC_TYPES
from sage_fast.provenance import cpu_name, git_commit

from .micro import matched_exploration

__all__ = ["CLAIM_Z", "write_micro_report", "machine_line", "commit_line", "matched_table"]

#: A paired difference counts as resolved at |mean| >= CLAIM_Z standard errors.
CLAIM_Z = 2.0


def machine_line() -> str:
    import torch  # noqa: PLC0415

    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def commit_line() -> str:
    sha, dirty = git_commit()
    if sha == "unknown":
        return "unknown (not a git checkout)"
    return sha + (" (with uncommitted changes)" if dirty else "")


def mean_se(values) -> tuple[float, float]:
    x = [float(v) for v in values]
    n = len(x)
    m = sum(x) / n
    se = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def _fmt(m: float, se: float, digits: int = 4) -> str:
    return f"{m:.{digits}f} +- {se:.{digits}f}"


def by_type(result: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for cell in result["cells"]:
        out.setdefault(cell["sde_type"], []).append(cell)
    for cells in out.values():
        cells.sort(key=lambda c: c["eta"])
    return out


def _targets(result: dict) -> list[float]:
    """Exploration levels to compare at: three spread below the smallest top exploration of any type
    (every type reaches them), then two along the sage curve's range (its largest mean), if higher."""
    by = by_type(result)
    tops = {t: max(mean_se(c["exploration"])[0] for c in cells) for t, cells in by.items()}
    common = min(tops.values())
    targets = [round(common * f, 3) for f in (0.3, 0.6, 0.9)]
    top = tops.get("sage_grpo", max(tops.values()))
    targets += [round(top * f, 3) for f in (0.5, 0.8) if top * f > targets[-1] * 1.25]
    return targets


def matched_table(result: dict, key: str = "manifold") -> list[dict]:
    """At each target exploration: every type's interpolated `key` (mean +- SE over prompts) and its
    paired difference from sage_grpo (other - sage, per prompt)."""
    by = by_type(result)
    ode = result["ode"]
    rows = []
    for target in _targets(result):
        row = {"target": target, "types": {}}
        ref = None
        if "sage_grpo" in by:
            ref = matched_exploration([ode | {"sde_type": "sage_grpo"}] + by["sage_grpo"], target, key)
        for sde_type, cells in by.items():
            got = matched_exploration([ode | {"sde_type": sde_type}] + cells, target, key)
            if got is None:
                row["types"][sde_type] = None
                continue
            entry = {"eta": got["eta"], "value": mean_se(got["values"]), "step_distance": got["step_distance"]}
            if ref is not None and sde_type != "sage_grpo":
                entry["diff"] = mean_se([a - b for a, b in zip(got["values"], ref["values"])])
            row["types"][sde_type] = entry
        rows.append(row)
    return rows


def _verdict(diff: tuple[float, float]) -> str:
    m, se = diff
    if not (se > 0):
        return "not resolved"
    z = m / se
    if z >= CLAIM_Z:
        return f"sage closer (z {z:+.1f})"
    if z <= -CLAIM_Z:
        return f"sage farther (z {z:+.1f})"
    return f"not resolved (z {z:+.1f})"


def step_rows(table: list[dict]) -> list[dict]:
    """The lowest matched level (every type) and the highest one at least two types reach."""
    shared = [r for r in table if sum(v is not None for v in r["types"].values()) >= 2]
    rows = [table[0]] + ([shared[-1]] if shared and shared[-1] is not table[0] else [])
    return rows


def _spread(values) -> float:
    v = [x for x in values if x > 0]
    return max(v) / min(v) if v else float("nan")


def write_micro_report(result: dict, out_dir: str | Path, command: str, date: str | None = None) -> Path:
    """Write micro.md, micro.json and the PNGs into out_dir; returns the markdown's path. The first
    call records the command, date, commit and machine in `result["run"]`."""
    import time  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # where the numbers came from: recorded once, when they were measured (a re-rendered report keeps them)
    run = result.setdefault("run", {"command": command, "date": date or time.strftime("%Y-%m-%d"),
                                    "commit": commit_line(), "machine": machine_line()})
    (out / "micro.json").write_text(json.dumps(result, indent=1))
    table = matched_table(result)
    from .plots import micro_plots  # noqa: PLC0415  (matplotlib, only when writing)

    pngs = micro_plots(result, out, table)
    by = by_type(result)
    cfg, rec, ode = result["config"], result["recipe"], result["ode"]
    P, G = cfg["prompts"], cfg["group"]
    L = []
    L += ["# The paper's micro-level claims, measured on the world", "",
          f"Produced by `{run['command']}` on {run['date']}. Commit {run['commit']}. Machine: {run['machine']}. "
          f"Wall time {result['seconds'] / 60:.1f} min. Raw numbers: `micro.json`."
          + ("" if run["command"] == command else f" This report was re-rendered from that file by `{command}`.")
          + "", "",
          f"Base model: `{Path(result['checkpoint']).name}` (the `tiny_world` recipe's). Sampler: the recipe's, "
          f"{rec['num_steps']} steps, shift {rec['shift']:g}, CFG {rec['cfg_scale']:g}; reward: the recipe's "
          f"(`{rec['reward_weights']}` weights of VQ / MQ / TA). {P} held-out prompts (the recipe's evaluation "
          f"prompts, never its training prompts), G = {G} samples each. Every prompt's G samples start from one "
          "initial noise, shared by every SDE type and noise level, and every step's noise is addressed by "
          "(seed, step, sample): all cells see the same random numbers, so differences between cells are paired "
          "per prompt. The ODE from that noise is the reference (its G samples coincide: exploration 0). "
          f"Standard errors (+-) are over the {P} prompts. A paired difference is called resolved at "
          f"|z| >= {CLAIM_Z:g}.", ""]

    # 1. geometry
    L += ["## 1. Rollout geometry per SDE type", "",
          "Exploration = within-group std of the reward (per prompt, then mean). Manifold = RMS distance of the "
          "final video from its best re-rendering by the world (0 for a render). Reward, VQ, MQ, TA: means of "
          "the final samples.", "",
          "The last column is the paired change of the manifold distance against the ODE from the same noise "
          "(per prompt; z in brackets).", "",
          "| type | eta | exploration | manifold | reward | VQ | MQ | TA | manifold - ODE |",
          "|---|---|---|---|---|---|---|---|---|"]

    def line(name, eta, cell):
        vals = [_fmt(*mean_se(cell[k])) for k in ("exploration", "manifold", "reward", "vq", "mq", "ta")]
        d = mean_se([a - b for a, b in zip(cell["manifold"], ode["manifold"])])
        vs_ode = "-" if cell is ode else f"{d[0]:+.4f} +- {d[1]:.4f} ({d[0] / d[1]:+.1f})" if d[1] > 0 else "0"
        return f"| {name} | {eta} | " + " | ".join(vals) + f" | {vs_ode} |"

    L.append(line("ode", "0", ode))
    for sde_type, cells in by.items():
        for c in cells:
            L.append(line(sde_type, f"{c['eta']:g}", c))
    L += ["", f"![manifold vs exploration]({pngs[0]})", "",
          "**At matched exploration** (each type's per-prompt values interpolated linearly in mean exploration "
          "between the two noise levels that bracket the target, the ODE counting as level 0; the difference "
          "is other - sage per prompt, so > 0 means sage is closer to the manifold):", "",
          "| target exploration | " + " | ".join(f"{t} manifold (eta)" for t in by) + " | "
          + " | ".join(f"{t} - sage" for t in by if t != "sage_grpo") + " |",
          "|---|" + "---|" * (len(by) + sum(t != "sage_grpo" for t in by))]
    readings = []
    for row in table:
        cells_txt, diffs_txt = [], []
        for t in by:
            e = row["types"].get(t)
            cells_txt.append("unreached" if e is None else f"{_fmt(*e['value'])} ({e['eta']:.3f})")
        for t in by:
            if t == "sage_grpo":
                continue
            e = row["types"].get(t)
            if e is None or "diff" not in e:
                diffs_txt.append("-")
                continue
            diffs_txt.append(f"{_fmt(*e['diff'])}: {_verdict(e['diff'])}")
            readings.append((row["target"], t, e["diff"]))
        L.append(f"| {row['target']:g} | " + " | ".join(cells_txt) + " | " + " | ".join(diffs_txt) + " |")
    L += ["", "**Reading** (generated from the table by the rule above):", ""]
    for t in [x for x in by if x != "sage_grpo"]:
        rs = [(tg, d) for tg, tt, d in readings if tt == t]
        if not rs:
            L.append(f"- vs {t}: the two curves do not share an exploration range; no matched comparison.")
            continue
        closer = [tg for tg, d in rs if d[1] > 0 and d[0] / d[1] >= CLAIM_Z]
        farther = [tg for tg, d in rs if d[1] > 0 and d[0] / d[1] <= -CLAIM_Z]
        text = f"- vs {t} ({len(rs)} matched levels): "
        if closer and not farther:
            text += f"sage is closer to the manifold at {', '.join(f'{x:g}' for x in closer)}"
            text += "; the claim holds there" + ("" if len(closer) == len(rs) else ", unresolved elsewhere") + "."
        elif farther and not closer:
            text += (f"sage is farther from the manifold at {', '.join(f'{x:g}' for x in farther)}: the claim "
                     "does not hold there" + ("" if len(farther) == len(rs) else "; unresolved elsewhere") + ".")
        elif closer and farther:
            text += (f"mixed: sage closer at {', '.join(f'{x:g}' for x in closer)}, farther at "
                     f"{', '.join(f'{x:g}' for x in farther)}.")
        else:
            text += "no resolved difference: the world does not show the claim against this type."
        L.append(text)
    # where along the trajectory
    L += ["", f"![steps]({pngs[1]})", "",
          "**Where the types leave the ODE path** (RMS latent distance from the ODE trajectory before each step, "
          "at the matched levels of the table; step 0 is the shared initial noise):", ""]
    for row in step_rows(table):
        L.append(f"- exploration {row['target']:g}: " + "; ".join(
            f"{t} " + ", ".join(f"{v:.3f}" for v in e["step_distance"][1:])
            for t, e in row["types"].items() if e is not None and e["step_distance"] is not None))
        sage = row["types"].get("sage_grpo")
        if sage is None or sage["step_distance"] is None:
            continue
        for t, e in row["types"].items():
            if t == "sage_grpo" or e is None or e["step_distance"] is None:
                continue
            ratio = [o / s_ if s_ > 0 else float("nan") for o, s_ in zip(e["step_distance"][1:], sage["step_distance"][1:])]
            peak = max(range(len(ratio)), key=lambda k: ratio[k])
            low = min(range(len(ratio)), key=lambda k: ratio[k])
            L.append(f"  - {t} / sage: {min(ratio):.2f}x (before step {low + 1}) to {max(ratio):.2f}x (before step "
                     f"{peak + 1}); final latent {ratio[-1]:.2f}x")
    # 2. noise budget
    for name, budget in result["noise_budget"].items():
        label = "the recipe's schedule" if name == "recipe" else "docs/SPEC.md section 2 defaults"
        L += ["", f"## 2. Noise budget per type ({label}: {budget['num_steps']} steps, shift {budget['shift']:g}, "
              f"eta {budget['eta']:g})", "",
              "Variance each step injects (c^2) vs the exact integral of the marginal-preserving coefficient "
              "eta^2 u / (1 - u) over the step (`sage_fast.paper.noise`). The exact integral is infinite at step "
              "0 (sigma = 1): sage clamps sigma to 1 - e there, flow evaluates the denominator at sigma_1. "
              "dance integrates a different coefficient (the constant eta^2) exactly; cps is built otherwise "
              "(c = sigma' sin(eta pi / 2)).", "",
              "| step | sigma -> sigma' | exact | sage | flow | dance | cps |", "|---|---|---|---|---|---|---|"]
        for r in budget["steps"]:
            ex = "inf" if not math.isfinite(r["exact"]) else f"{r['exact']:.4g}"
            v = r["variance"]
            L.append(f"| {r['step']} | {r['sigma']:.4f} -> {r['sigma_next']:.4f} | {ex} | "
                     + " | ".join(f"{v[t]:.4g}" for t in STOCHASTIC_TYPES) + " |")
        tot = budget["totals"]
        L += ["", f"Summed over steps {tot['steps_counted'][0]}..{tot['steps_counted'][-1]} (the exact integral "
              f"{tot['exact']:.4f}): " + "; ".join(
                  f"{t} {tot['variance'][t]:.4f} (excess {tot['excess'][t]:+.4f}, x{tot['ratio'][t]:.2f})"
                  for t in STOCHASTIC_TYPES)
              + ". Step 0 alone: " + "; ".join(f"{t} {tot['step0_variance'][t]:.4f}"
                                              for t in STOCHASTIC_TYPES) + "."]
        flow, sage = budget["steps"][0]["variance"]["flow_grpo"], budget["steps"][0]["variance"]["sage_grpo"]
        finite = [r for r in budget["steps"] if r["excess"]["flow_grpo"] is not None]
        flow_more = sum(r["excess"]["flow_grpo"] > 0 for r in finite)
        dance_more = [r["step"] for r in finite if r["excess"]["dance_grpo"] > 0]
        L += ["", f"Reading: over the steps where the exact integral is finite, flow_grpo's Euler area injects "
              f"x{tot['ratio']['flow_grpo']:.2f} the exact variance (more at {flow_more} of {len(finite)} steps); "
              f"at step 0 it injects {'less' if flow < sage else 'more'} than sage ({flow:.4f} vs {sage:.4f}), "
              f"where sage's clamp stands in for an infinite integral. dance injects "
              f"x{tot['ratio']['dance_grpo']:.2f}, more than the exact integral only at steps "
              f"{', '.join(map(str, dance_more)) or 'none'}; cps x{tot['ratio']['cps']:.2f}."]
        if name == "recipe":
            L += ["", f"![noise budget]({pngs[2]})"]
    # 3. gradients
    L += ["", f"## 3. Gradient norm per step (eta {cfg['grad_eta']:g})", "",
          "The fused op's |d logp / d v| against docs/SPEC.md section 3's |b| / (c sqrt(D)) (cps: 2 |b| c / sqrt(D)), "
          "ratio measured / analytic per step over every sample of the eta cell:", ""]
    for t, cells in by.items():
        cell = min(cells, key=lambda c: abs(c["eta"] - cfg["grad_eta"]))
        ratios = [m / a for m, a in zip(cell["grad_norm"], cell["grad_norm_analytic"]) if a > 0]
        L.append(f"- {t}: {min(ratios):.4f} .. {max(ratios):.4f}")
    L += ["", "These agree by construction: the stored x_next is mean + c eps with the same velocity, so "
          "|d logp / d v| = |b| |eps| / (c D) and only |eps| / sqrt(D) ~ 1 varies. The empirical equalizer fed "
          "this norm therefore reproduces the analytic scales. What training feels is the gradient with "
          "respect to the parameters, which also carries d v / d theta:", "",
          f"|d logp_t / d theta| over every transformer parameter ({result['parameter_gradients'][0]['parameters']:,}"
          f"), one backward per sample and step, {result['parameter_gradients'][0]['samples']} samples per type "
          f"({cfg['grad_prompts']} prompts x {cfg['grad_group']}), mean +- SE:", "",
          "| type | " + " | ".join(f"step {s}" for s in range(rec["num_steps"])) + " | spread max/min | after "
          "equalizer |", "|---|" + "---|" * (rec["num_steps"] + 2)]
    for g in result["parameter_gradients"]:
        scales = result["equalizer_analytic"][g["sde_type"]]
        vals = {s: (m, e) for s, m, e in zip(g["steps"], g["mean"], g["se"] or [float("nan")] * len(g["steps"]))}
        cells_txt = [f"{vals[s][0]:.3g} +- {vals[s][1]:.2g}" if s in vals else "-" for s in range(rec["num_steps"])]
        eq = [m * scales[s] for s, m in zip(g["steps"], g["mean"])]
        L.append(f"| {g['sde_type']} | " + " | ".join(cells_txt) + f" | {_spread(g['mean']):.0f}x | "
                 f"{_spread(eq):.1f}x |")
    L += [""]
    for g in result["parameter_gradients"]:
        scales = result["equalizer_analytic"][g["sde_type"]]
        before = _spread(g["mean"])
        after = _spread([m * scales[s_] for s_, m in zip(g["steps"], g["mean"])])
        verb = "narrows" if after < before else "widens"
        L.append(f"- {g['sde_type']}: the parameter gradient grows {before:.0f}x from the first to the largest "
                 f"step; the analytic equalizer {verb} the spread to {after:.1f}x"
                 + (" (its |b|/c proxy does not describe cps's log-prob, whose gradient scales like |b| c)"
                    if g["sde_type"] == "cps" and after > before else "") + ".")
    L += ["", "Analytic equalizer scales s_t = median(|b|/c) / (|b_t|/c_t) at this eta:", ""]
    for t, s in result["equalizer_analytic"].items():
        L.append(f"- {t}: " + ", ".join(f"{x:.3g}" for x in s))
    L += ["", "Empirical scales from the parameter gradient (median over steps / measured, the same lower median):", ""]
    for g in result["parameter_gradients"]:
        srt = sorted(g["mean"])
        med = srt[(len(srt) - 1) // 2]
        L.append(f"- {g['sde_type']}: " + ", ".join(f"{med / m:.3g}" for m in g["mean"]))
    L += ["", f"![gradients]({pngs[3]})", ""]
    path = out / "micro.md"
    path.write_text("\n".join(L) + "\n")
    return path
