"""`agro-study report`: aggregate the finished cells of a study, list the missing ones, fit curves.

Writes into <study_dir>/report/ (or --out):
    results.csv    one row per group (arm and axis point): the headline numbers
    results.json   the same plus per-cell values, fits, and the missing cells
    report.md      tables and the plots, readable on GitHub
    accuracy_vs_step.png, accuracy_vs_kl.png, compute_fit.png, size_fit.png (when there are sizes)

Per group, over its finished seeds: final and peak held-out accuracy (mean and 95% t-interval),
unbiased pass@k for k in {1, eval.n} from the final evaluation's per-problem counts, the paired
per-problem difference against the baseline arm (same axis point when it has one) with its
standard error, the KL to the reference at the end, and the ScaleRL compute fit (stats.py) with
bootstrap-over-seeds intervals and a first-half / second-half prediction check. Per arm with at
least 3 model sizes: the size fit with the largest size held out. Only cells whose state is DONE
count; everything else is listed as missing with its state.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from agro_megatron.study import stats
from agro_megatron.study.cells import DONE
from agro_megatron.study.compute import cell_params, cumulative_compute
from agro_megatron.study.results import KL_KEY, CellResult, read_study
from agro_megatron.study.workers import parallel_map

N_BOOT = 200       # bootstrap replicates of the compute fit (a 3-seed study has only 10 distinct ones)
BOOT_SEED = 0


@dataclass
class ReportInputs:
    """What the report is about: the study directory, its baseline arm, and (from the spec) the
    cells it should hold, so that cells never started are listed as missing too."""
    study_dir: str
    baseline: str | None = None
    expected: list[dict] = field(default_factory=list)  # {"id", "group", "seed"} per cell of the spec
    out_dir: str | None = None
    plots: bool = True
    n_boot: int = N_BOOT             # bootstrap replicates of each compute fit
    workers: int | None = None       # processes for reading, fits and figures (None: one per CPU; 1: here)


def _ci(values) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = stats.mean_ci(vals)
    return {"mean": mean, "low": _fin(low), "high": _fin(high), "n": len(vals)}


def _fin(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _pass_at_k(res: CellResult, k: int) -> float | None:
    probs = [(n, c) for n, c in res.final_problems.values() if n >= k]
    if not probs:
        return None
    return sum(stats.pass_at_k(n, c, k) for n, c in probs) / len(probs)


def _per_problem(results: list[CellResult], seeds: set | None) -> dict[str, float]:
    """Problem id -> mean accuracy over the given seeds' final evaluations."""
    acc = defaultdict(list)
    for r in results:
        if seeds is None or r.seed in seeds:
            for pid, (n, c) in r.final_problems.items():
                acc[pid].append(c / n)
    return {pid: sum(v) / len(v) for pid, v in acc.items()}


def _paired(arm: list[CellResult], base: list[CellResult]) -> dict | None:
    common = {r.seed for r in arm} & {r.seed for r in base}
    seeds = common or None
    a, b = _per_problem(arm, seeds), _per_problem(base, seeds)
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    xa, xb = [a[i] for i in ids], [b[i] for i in ids]
    mean, low, high = stats.paired_diff(xa, xb)
    return {"mean": mean, "low": _fin(low), "high": _fin(high), "se": _fin(stats.paired_diff_se(xa, xb)),
            "n_problems": len(ids), "paired_seeds": sorted(common, key=str) if common else "unpaired"}


def _accuracy_vs_kl(res: CellResult) -> list[list[float]]:
    """[KLs, accuracies] at each evaluation, as train/metrics.py's plot pairs them."""
    from agro_megatron.train.metrics import eval_vs_kl

    history = sorted([(s, 0, {"step": s, KL_KEY: v}) for s, v in res.kl] +
                     [(s, 1, {"step": s, "eval/accuracy": a}) for s, a in res.evals], key=lambda t: t[:2])
    kls, accs = eval_vs_kl([h for _, _, h in history])
    return [kls, accs]


def _compute_points(res: CellResult, params: int | None) -> tuple[list[float], list[float]]:
    if params is None or not res.response_length or res.prompt_tokens_mean is None:
        return [], []
    comp = cumulative_compute(res, params)
    pts = [(comp[s], a) for s, a in res.evals if s > 0 and s in comp]
    return [c for c, _ in pts], [a for _, a in pts]


def _compute_curves(results: list[CellResult], params: int | None) -> tuple | None:
    """(per-seed (compute, accuracy) curves, r0 = mean accuracy before RL), or None."""
    curves = [_compute_points(r, params) for r in results]
    curves = [c for c in curves if c[0]]
    r0s = [r.initial_accuracy for r in results if r.initial_accuracy is not None]
    if not curves or not r0s:
        return None
    return curves, sum(r0s) / len(r0s)


def _compute_fit(job: tuple | None) -> dict:
    """The compute fit of one group: a pure function of its curves (run in worker processes)."""
    if job is None:
        return {"note": "no compute curve (no per-step lengths or evaluations)"}
    curves, r0, n_boot = job
    out = {"r0": r0, "curves": [{"compute": c, "accuracy": a} for c, a in curves]}
    try:
        boot = stats.bootstrap_fit([c for c, _ in curves], [a for _, a in curves], r0, n_boot, BOOT_SEED)
        out.update({k: [_fin(x) for x in boot[k]] for k in ("A", "B", "C_mid")})
        out["identified"] = bool(boot["identified"])
        out["identified_fraction"] = _fin(boot["identified_fraction"])
        note = boot["fit"].get("note", "") or ""
        if not boot["identified"] and not note.startswith("A not identified"):
            note = "A not identified" + (f": {note}" if note else "")
        out["note"] = note
    except stats.StatsInputError as e:
        out["note"] = f"no fit: {e}"
        return out
    try:
        pooled_c = [x for c, _ in curves for x in c]
        pooled_a = [x for _, a in curves for x in a]
        h = stats.holdout_prediction_error(pooled_c, pooled_a, r0, fit_fraction=0.5)
        out["holdout"] = {k: _fin(h[k]) if isinstance(h[k], float) else h[k]
                          for k in ("mean_abs_error", "max_abs_error", "mean_error", "cutoff", "n_fit", "n_test",
                                    "identified")}
    except stats.StatsInputError as e:
        out["holdout"] = {"note": str(e)}
    return out


def build_report(inp: ReportInputs) -> dict:
    """The report as a dict (what results.json holds)."""
    t0 = time.perf_counter()
    all_results = read_study(inp.study_dir, inp.workers)
    by_id = {r.id: r for r in all_results}
    expected = inp.expected or [{"id": r.id, "group": r.group, "seed": r.seed} for r in all_results]
    # Cells the spec no longer asks for (an arm whose overrides changed gets new cell ids; the old
    # cells stay on disk) share group names with the new ones: counting them would pool two
    # configs as one group's seeds. They are listed, never aggregated.
    wanted = {e["id"] for e in expected}
    outside = [{"id": r.id, "group": r.group, "seed": r.seed, "state": r.state} for r in all_results
               if r.id not in wanted]
    done = [r for r in all_results if r.id in wanted and r.state == DONE and r.finished]
    missing = []
    for e in expected:
        r = by_id.get(e["id"])
        if r is None:
            missing.append({**e, "state": "NOT STARTED"})
        elif not (r.state == DONE and r.finished):
            missing.append({**e, "state": r.state})
    groups: dict[str, list[CellResult]] = defaultdict(list)
    for r in done:
        groups[r.group].append(r)
    order = list(dict.fromkeys([e["group"] for e in expected] + sorted(groups)))
    rows, fit_jobs = [], []
    for g in order:
        results = sorted(groups.get(g, []), key=lambda r: (r.seed is None, r.seed))
        expected_n = sum(e["group"] == g for e in expected)
        if not results:
            rows.append({"group": g, "seeds_done": 0, "seeds_expected": expected_n})
            continue
        first = results[0]
        params = cell_params(first, os.path.join(inp.study_dir, "cells", first.id))
        eval_ns = sorted({n for r in results for n, _ in r.final_problems.values()})
        ks = sorted({1, eval_ns[0]}) if eval_ns else []
        row = {
            "group": g, "arm": first.arm, "point": first.point, "seeds_done": len(results),
            "seeds_expected": expected_n, "seeds": [r.seed for r in results], "params": params,
            "initial_accuracy": _ci([r.initial_accuracy for r in results]),
            "final_accuracy": _ci([r.final_accuracy for r in results]),
            "peak_accuracy": _ci([r.peak_accuracy for r in results]),
            "pass_at_k": {str(k): _ci([_pass_at_k(r, k) for r in results]) for k in ks},
            "end_kl": _ci([r.end_kl for r in results]),
            "per_cell": [{"id": r.id, "seed": r.seed, "final": r.final_accuracy, "peak": r.peak_accuracy,
                          "end_kl": r.end_kl, "evals": r.evals, "accuracy_vs_kl": _accuracy_vs_kl(r)}
                         for r in results],
        }
        curves = _compute_curves(results, params)
        fit_jobs.append((len(rows), None if curves is None else (*curves, inp.n_boot)))
        rows.append(row)
    for (i, _), fit in zip(fit_jobs, parallel_map(_compute_fit, [j for _, j in fit_jobs], inp.workers)):
        rows[i]["compute_fit"] = fit
    _add_paired(rows, groups, inp.baseline)
    size_fits = _size_fits(rows)
    return {"study_dir": os.path.abspath(inp.study_dir), "baseline": inp.baseline, "cells_total": len(expected),
            "cells_done": len(done), "missing": missing, "not_in_spec": outside, "groups": rows,
            "size_fits": size_fits,
            "report_s": time.perf_counter() - t0}


def _add_paired(rows: list[dict], groups: dict, baseline: str | None) -> None:
    if not baseline:
        return
    base_groups = {row["point"]: row["group"] for row in rows if row.get("arm") == baseline}
    for row in rows:
        if "arm" not in row or row["arm"] == baseline:
            continue
        bg = base_groups.get(row["point"]) or (next(iter(base_groups.values())) if len(base_groups) == 1 else None)
        if bg is None or bg not in groups:
            row["paired_vs_baseline"] = {"note": f"no finished baseline group for {row['group']}"}
            continue
        p = _paired(groups[row["group"]], groups[bg])
        row["paired_vs_baseline"] = {"baseline": bg, **p} if p else {"baseline": bg, "note": "no common problems"}


def _size_fits(rows: list[dict]) -> dict:
    by_arm = defaultdict(list)
    for row in rows:
        if row.get("params"):
            by_arm[row["arm"]].append(row)
    out = {}
    for arm, rs in by_arm.items():
        sizes = sorted({r["params"] for r in rs})
        if len(sizes) < 2:
            continue
        params = [r["params"] for r in rs for c in r["per_cell"] if c["final"] is not None]
        values = [c["final"] for r in rs for c in r["per_cell"] if c["final"] is not None]
        entry = {"sizes": sizes, "params": params, "values": values}
        try:
            entry["fit"] = stats.fit_size_curve(params, values)
            if len(sizes) >= 3:
                ext = stats.size_extrapolation_error(params, values)
                entry["holdout_largest"] = {k: ext[k] for k in ("held_out_params", "predicted", "observed", "error",
                                                                "abs_error")}
            else:
                entry["holdout_largest"] = {"note": "needs at least 3 model sizes"}
        except stats.StatsInputError as e:
            entry["note"] = str(e)
        out[arm] = entry
    return out


# ------------------------------------------------------------------------------------------ writing
def write_report(inp: ReportInputs) -> dict:
    """build_report, then results.json, results.csv, report.md and the PNGs; returns the report."""
    report = build_report(inp)
    out = inp.out_dir or os.path.join(inp.study_dir, "report")
    os.makedirs(out, exist_ok=True)
    report["plots"] = _plots(report, out, inp.workers) if inp.plots else []
    _atomic(os.path.join(out, "results.json"), json.dumps(report, indent=1, default=str))
    _write_csv(report, os.path.join(out, "results.csv"))
    _atomic(os.path.join(out, "report.md"), render_markdown(report))
    report["out_dir"] = out
    return report


def _atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


CSV_FIELDS = ["group", "arm", "point", "seeds_done", "seeds_expected", "params",
              "final_mean", "final_low", "final_high", "peak_mean", "peak_low", "peak_high",
              "initial_mean", "end_kl_mean", "end_kl_low", "end_kl_high", "pass_at_1", "pass_at_n", "n",
              "paired_baseline", "paired_mean", "paired_se", "paired_low", "paired_high",
              "fit_A", "fit_A_low", "fit_A_high", "fit_B", "fit_C_mid", "fit_identified", "holdout_mae"]


def _write_csv(report: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for row in report["groups"]:
            w.writerow(_csv_row(row))
    os.replace(tmp, path)


def _csv_row(row: dict) -> dict:
    out = {k: row.get(k) for k in ("group", "arm", "point", "seeds_done", "seeds_expected", "params")}
    if not row.get("seeds_done"):
        return out
    for name, key in (("final", "final_accuracy"), ("peak", "peak_accuracy"), ("end_kl", "end_kl")):
        out[f"{name}_mean"], out[f"{name}_low"], out[f"{name}_high"] = (row[key][x] for x in ("mean", "low", "high"))
    out["end_kl_mean"] = row["end_kl"]["mean"]
    out["initial_mean"] = row["initial_accuracy"]["mean"]
    ks = sorted(row["pass_at_k"], key=int)
    if ks:
        out["pass_at_1"] = row["pass_at_k"].get("1", {}).get("mean")
        out["pass_at_n"], out["n"] = row["pass_at_k"][ks[-1]]["mean"], ks[-1]
    p = row.get("paired_vs_baseline") or {}
    if "mean" in p:
        out.update(paired_baseline=p["baseline"], paired_mean=p["mean"], paired_se=p["se"], paired_low=p["low"],
                   paired_high=p["high"])
    fit = row.get("compute_fit") or {}
    if "A" in fit:
        out.update(fit_A=fit["A"][0], fit_A_low=fit["A"][1], fit_A_high=fit["A"][2], fit_B=fit["B"][0],
                   fit_C_mid=fit["C_mid"][0], fit_identified=fit["identified"],
                   holdout_mae=(fit.get("holdout") or {}).get("mean_abs_error"))
    return out


def _fmt(ci: dict | None, digits: int = 3) -> str:
    if not ci or ci.get("mean") is None:
        return "-"
    if ci.get("low") is None:
        return f"{ci['mean']:.{digits}f} (1 seed)" if ci.get("n") == 1 else f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def render_markdown(report: dict) -> str:
    L = [f"# Study report: {report['study_dir']}", "",
         f"{report['cells_done']} of {report['cells_total']} cells finished. Intervals: 95% Student t over seeds "
         "(paired comparisons: over problems); bootstrap intervals over seeds for the fits.", ""]
    L += ["## Held-out accuracy", "",
          "| group | seeds | before RL | final | peak | pass@1 | pass@n | KL at end |",
          "|---|---|---|---|---|---|---|---|"]
    for row in report["groups"]:
        if not row.get("seeds_done"):
            L.append(f"| {row['group']} | 0/{row['seeds_expected']} | - | - | - | - | - | - |")
            continue
        ks = sorted(row["pass_at_k"], key=int)
        pn = f"{_fmt(row['pass_at_k'][ks[-1]])} (k={ks[-1]})" if ks else "-"
        L.append(f"| {row['group']} | {row['seeds_done']}/{row['seeds_expected']} | {_fmt(row['initial_accuracy'])} | "
                 f"{_fmt(row['final_accuracy'])} | {_fmt(row['peak_accuracy'])} | "
                 f"{_fmt(row['pass_at_k'].get('1'))} | {pn} | {_fmt(row['end_kl'])} |")
    if report.get("baseline"):
        L += ["", f"## Paired per-problem difference vs {report['baseline']}", "",
              "| group | baseline | mean diff | SE | 95% interval | problems | seeds paired |", "|---|---|---|---|---|---|---|"]
        for row in report["groups"]:
            p = row.get("paired_vs_baseline")
            if not p:
                continue
            if "mean" not in p:
                L.append(f"| {row['group']} | {p.get('baseline', '-')} | {p.get('note', '-')} | | | | |")
                continue
            lo = "-" if p["low"] is None else f"[{p['low']:+.3f}, {p['high']:+.3f}]"
            se = "-" if p["se"] is None else f"{p['se']:.3f}"
            L.append(f"| {row['group']} | {p['baseline']} | {p['mean']:+.3f} | {se} | {lo} | {p['n_problems']} | "
                     f"{p['paired_seeds']} |")
    L += ["", "## Compute fits (ScaleRL eq. 1: R(C) - R0 = (A - R0) / (1 + (C_mid / C)^B))", "",
          "| group | params | R0 | A | B | C_mid (FLOPs) | identified | 2nd-half MAE (fit on 1st half) | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for row in report["groups"]:
        fit = row.get("compute_fit")
        if not fit:
            continue
        if "A" not in fit:
            L.append(f"| {row['group']} | {row.get('params') or '-'} | | | | | | | {fit.get('note', '')} |")
            continue
        h = fit.get("holdout") or {}
        mae = f"{h['mean_abs_error']:.3f}" if h.get("mean_abs_error") is not None else h.get("note", "-")[:60]
        L.append(f"| {row['group']} | {row.get('params') or '-'} | {fit['r0']:.3f} | {_triple(fit['A'])} | "
                 f"{_triple(fit['B'])} | {_triple(fit['C_mid'], '.3g')} | {'yes' if fit['identified'] else 'no'} | "
                 f"{mae} | {fit.get('note', '')} |")
    if report.get("size_fits"):
        L += ["", "## Size fits (final accuracy linear in log10 params; largest size held out)", "",
              "| arm | sizes | slope per 10x | held-out size | predicted | observed | error |", "|---|---|---|---|---|---|---|"]
        for arm, s in report["size_fits"].items():
            fit, h = s.get("fit") or {}, s.get("holdout_largest") or {}
            if "predicted" in h:
                L.append(f"| {arm} | {s['sizes']} | {fit.get('slope', float('nan')):+.3f} | {h['held_out_params']} | "
                         f"{h['predicted']:.3f} | {h['observed']:.3f} | {h['error']:+.3f} |")
            else:
                L.append(f"| {arm} | {s['sizes']} | {fit.get('slope', float('nan')):+.3f} | - | - | - | "
                         f"{h.get('note', s.get('note', ''))} |")
    if report.get("plots"):
        L += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in report["plots"]]
    L += ["", f"## Missing cells ({len(report['missing'])})", ""]
    if report["missing"]:
        L += ["| cell | group | seed | state |", "|---|---|---|---|"]
        L += [f"| {m['id']} | {m['group']} | {m['seed']} | {m['state']} |" for m in report["missing"]]
    else:
        L.append("none")
    if report.get("not_in_spec"):
        L += ["", f"## Cells not in the spec ({len(report['not_in_spec'])}): on disk, not aggregated", "",
              "Left by an earlier version of the spec (their configs differ from every cell it asks for now); "
              "delete their directories under cells/ when they are no longer wanted.", "",
              "| cell | group | seed | state |", "|---|---|---|---|"]
        L += [f"| {m['id']} | {m['group']} | {m['seed']} | {m['state']} |" for m in report["not_in_spec"]]
    return "\n".join(L) + "\n"


def _triple(t, spec: str = ".3f") -> str:
    if t is None or t[0] is None:
        return "-"
    if t[1] is None:
        return format(t[0], spec)
    return f"{format(t[0], spec)} [{format(t[1], spec)}, {format(t[2], spec)}]"


# ------------------------------------------------------------------------------------------ plots
def _band(per_seed: list[list[tuple[float, float]]]):
    """x -> (mean, low, high) over seeds at the x values every seed has."""
    common = set(x for x, _ in per_seed[0])
    for s in per_seed[1:]:
        common &= {x for x, _ in s}
    xs = sorted(common)
    means, lows, highs = [], [], []
    for x in xs:
        vals = [dict(s)[x] for s in per_seed]
        m, lo, hi = stats.mean_ci(vals) if len(vals) > 1 else (vals[0], math.nan, math.nan)
        means.append(m)
        lows.append(lo if math.isfinite(lo) else m)
        highs.append(hi if math.isfinite(hi) else m)
    return xs, means, lows, highs


def _plots(report: dict, out: str, workers: int | None = None) -> list[str]:
    """Draw the report's figures into ``out``; returns the paths written.

    Each figure is independent, and over a large study each costs about a second of drawing, so
    they are drawn in parallel (`parallel_map`) once the study has many groups."""
    rows = [r for r in report["groups"] if r.get("seeds_done")]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (once here, not in every forked worker)

    jobs = [(fig, rows, report.get("size_fits") or {}, out) for fig in FIGURES]
    paths = parallel_map(_draw, jobs, workers if len(rows) >= PARALLEL_FIGURES_FROM else 1, min_jobs=2)
    return [p for p in paths if p]


PARALLEL_FIGURES_FROM = 16  # groups; below that the figures draw faster than a worker pool starts


def _draw(job: tuple) -> str | None:
    name, rows, size_fits, out = job
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5) if name == "size_fit" else (8, 5))
    handles = FIGURES[name](ax, rows, size_fits)
    if handles is None:
        plt.close(fig)
        return None
    if handles and len(handles) <= MAX_LEGEND:  # beyond that a legend hides the plot; results.csv names the groups
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    return _save(fig, out, f"{name}.png", plt)


def _color(i: int) -> str:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[i % len(cycle)]


def _curves(ax, curves: list[tuple[str, list, list, list | None, list | None]], marker: bool = True) -> list:
    """Draw ``(label, xs, mean, low, high)`` curves, each in its own colour with its band.

    All curves go into three artists (one polygon collection for the bands, one line collection,
    one scatter for the markers) rather than two or three artists per curve: with hundreds of
    groups, matplotlib's per-artist cost (autoscaling on every ``fill_between``) was most of a
    report's time. Returns legend proxies, one per curve."""
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.lines import Line2D

    bands, lines, colors, band_colors, px, py, pc, handles = [], [], [], [], [], [], [], []
    for i, (label, xs, mean, lo, hi) in enumerate(curves):
        color = _color(i)
        if len(xs):  # a group without a line (e.g. no compute fit) keeps its colour slot and legend entry
            lines.append(list(zip(xs, mean)))
            colors.append(color)
        if lo is not None and len(xs) > 1:
            bands.append(list(zip(xs, lo)) + list(zip(reversed(xs), reversed(hi))))
            band_colors.append(color)
        if marker:
            px += list(xs)
            py += list(mean)
            pc += [color] * len(xs)
        handles.append(Line2D([], [], color=color, marker="o" if marker else None, ms=3, label=label))
    if bands:
        ax.add_collection(PolyCollection(bands, facecolors=band_colors, edgecolors="none", alpha=0.2))
    if lines:
        ax.add_collection(LineCollection(lines, colors=colors, linewidths=1.5))
    if px:
        ax.scatter(px, py, s=9, c=pc, zorder=3)
    ax.autoscale_view()
    return handles


def _accuracy_vs_step_figure(ax, rows: list[dict], size_fits: dict) -> list | None:
    curves = []
    for row in rows:
        xs, m, lo, hi = _band([c["evals"] for c in row["per_cell"] if c["evals"]])
        if xs:
            curves.append((row["group"], xs, m, lo, hi))
    handles = _curves(ax, curves)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy vs step (mean, 95% band over seeds)")
    return handles


def _accuracy_vs_kl_figure(ax, rows: list[dict], size_fits: dict) -> list | None:
    out = []
    for row in rows:
        curves = [c["accuracy_vs_kl"] for c in row["per_cell"] if c["accuracy_vs_kl"][0]]
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        if n == 0:
            continue
        kls = [[c[0][i] for c in curves] for i in range(n)]
        accs = [[c[1][i] for c in curves] for i in range(n)]
        mk = [sum(k) / len(k) for k in kls]
        band = [stats.mean_ci(a) if len(a) > 1 else (a[0], a[0], a[0]) for a in accs]
        out.append((row["group"], mk, [b[0] for b in band], [b[1] if math.isfinite(b[1]) else b[0] for b in band],
                    [b[2] if math.isfinite(b[2]) else b[0] for b in band]))
    handles = _curves(ax, out)
    ax.set_xlabel("KL(pi || pi_ref) per sequence (full vocabulary), mean since the previous evaluation")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy vs KL (mean, 95% band over seeds)")
    return handles


def _compute_fit_figure(ax, rows: list[dict], size_fits: dict) -> list | None:
    import numpy as np
    from matplotlib.lines import Line2D

    fits = [r for r in rows if (r.get("compute_fit") or {}).get("curves")]
    px, py, pc, lines, handles = [], [], [], [], []
    for i, row in enumerate(fits):
        fit, color = row["compute_fit"], _color(i)
        cs = [x for c in fit["curves"] for x in c["compute"]]
        acc = [x for c in fit["curves"] for x in c["accuracy"]]
        px += cs
        py += acc
        pc += [color] * len(cs)
        grid, y = [], []  # no line where the fit failed; the group keeps its colour slot in _curves
        if "A" in fit and fit["A"][0] is not None:
            grid = np.geomspace(min(cs), max(cs) * 4, 100)
            y = stats.sigmoid_curve(grid, fit["A"][0], fit["B"][0], fit["C_mid"][0], fit["r0"])
        lines.append((row["group"], list(grid), list(y), None, None))
        handles.append(Line2D([], [], color=color, marker=".", label=row["group"]))
    ax.set_xscale("log")
    if px:
        ax.scatter(px, py, s=12, c=pc, alpha=0.5)
    _curves(ax, lines, marker=False)
    ax.set_xlabel("compute C (training + generation FLOPs)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("compute fits (points: evaluations of every seed; line: fit; beyond the data: extrapolation)")
    return handles if fits else None


def _size_fit_figure(ax, rows: list[dict], size_fits: dict) -> list | None:
    import numpy as np

    for arm, s in size_fits.items():
        pts = ax.plot(s["params"], s["values"], "o", alpha=0.6, label=arm)
        fit = s.get("fit")
        if fit:
            grid = np.geomspace(min(s["sizes"]), max(s["sizes"]), 50)
            ax.plot(grid, stats.size_curve(grid, fit["slope"], fit["intercept"]), "-", color=pts[0].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final held-out accuracy")
    ax.set_title("size axis")
    return ax.get_legend_handles_labels()[0] if size_fits else None


# name -> draws it on an axis and returns its legend handles (None: nothing to draw); the PNG is <name>.png
FIGURES = {"accuracy_vs_step": _accuracy_vs_step_figure, "accuracy_vs_kl": _accuracy_vs_kl_figure,
           "compute_fit": _compute_fit_figure, "size_fit": _size_fit_figure}


MAX_LEGEND = 24


def _save(fig, out: str, name: str, plt) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
