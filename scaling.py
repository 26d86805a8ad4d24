"""Scaling laws for planning a run: fit them to your own runs, sweep, tabulate, plan.

    python scaling.py fit tests/data/chinchilla_svg_extracted_data.csv --drop_highest=5
    python scaling.py sweep                   # tiny isoFLOP sweep: out-sweep/report.md, law.json
    python scaling.py fit out-sweep/*/        # on run directories; Approach 2 too, on profiles
    python scaling.py table [--law=approach1|chinchilla|epoch|out-sweep/law.json]
    python scaling.py plan --gpu=H100 --hours=24 --law=epoch   # writes out-scaling/plan.py

N is the active non-embedding parameter count, read back from a run's FLOPs per token. fit needs
scipy. Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556);
Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102).
"""

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import report

from configurator import ROOT, UserError
from files import die_with_parent, locked_folder, read_log, write_atomically

OUT = "out-scaling"  # default home of plan.py: ignored by git, like every out*/
# Approach 3 laws L(N, D) = E + A / N^alpha + B / D^beta, in nats per token on MassiveText:
# Hoffmann et al. 2022, eq. (10), and Besiroglu et al. 2024's refit
LAWS = dict(chinchilla=dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
            epoch=dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658))
# Hoffmann et al. 2022, Table 3 (Approach 1), as the primer quotes it: parameters, FLOPs, tokens
APPROACH1_TABLE = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                   (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                   (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]
# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models": up to about 4 epochs are
# nearly as good as new data; beyond that repeated tokens are worth less and less
FEW_EPOCHS = 4
# CSV columns (any case): N, loss, and D (tokens) or C (FLOPs), an optional budget; and the
# names the Chinchilla CSV gives N and C
COLUMNS = {"n": "N", "d": "D", "c": "C", "loss": "loss", "budget": "budget", "model size": "N",
           "training flop": "C"}


@dataclass
class ScalingConfig:
    json: bool = False          # print one JSON object instead of text
    # fit: CSV files (N, D or FLOPs, loss) or train.py run directories, as arguments
    drop_highest: int = 0       # drop the highest losses first (Besiroglu et al. drop 5)
    huber_delta: float = 1e-3   # Hoffmann et al. 2022, section 3.3
    bootstrap: int = 100        # resamples for 95% intervals; 0 = off
    law_out: str = ""           # fit: write the law as JSON here, for `table --law=`
    plot: str = ""              # sweep's isoFLOP figure; default sweep_dir/isoflop.png
    law: str = "approach1"      # table, plan: approach1 | chinchilla | epoch | a JSON law file
    sizes: list = field(default_factory=lambda: [row[0] for row in APPROACH1_TABLE])
    # plan: GPUs x hours (or dollars at a price) at --mfu -> a config file for train.py
    gpu: str = ""               # a name from runtime.PEAK_TFLOPS (or set --peak_tflops)
    gpus: int = 1
    hours: float = 0.0
    dollars: float = 0.0
    price_per_gpu_hour: float = 0.0
    mfu: float = 0.4            # what a well-tuned run reaches on A100/H100-class GPUs
    plan_block_size: int = 1024
    plan_out: str = f"{OUT}/plan.py"
    # sweep: each budget x shape is `train.py --max_flops=budget`; other keys go to train.py
    sweep_dir: str = "out-sweep"
    jobs: int = 0               # runs at once; 0 = one per CPU core without a GPU, 1 with one
    # every budget's minimum lies inside these one-layer widths (width is the dial that matters at
    # this scale: deeper shapes of the same size did worse; RESULTS.md has the runs)
    budgets: list = field(default_factory=lambda: [5e11, 1e12, 2e12])
    shapes: list = field(default_factory=lambda: [(1, 16), (1, 24), (1, 32), (1, 48), (1, 64)])

    def __post_init__(self):
        configurator.check_at_least(self, drop_highest=0, bootstrap=0, jobs=0, gpus=1, hours=0,
                                    plan_block_size=1, dollars=0, price_per_gpu_hour=0)
        for ok, message in ((self.huber_delta > 0, "--huber_delta must be more than 0"),
                            (0 < self.mfu <= 1, "--mfu is a fraction of the peak, in (0, 1]"),
                            (len(self.shapes) >= 3 and self.budgets, "a sweep needs a budget "
                             "and 3 or more --shapes (a parabola's least)"),
                            (self.sizes and all(isinstance(n, (int, float)) and 0 < n < math.inf
                                                for n in self.sizes), "--sizes must be a list of "
                             "positive parameter counts")):
            if not ok:
                raise ValueError(message)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)
    return message


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f, restval="")  # a short row's missing values read as ""
        rows, names = list(reader), reader.fieldnames or []
    header = {COLUMNS[n.strip().lower()]: n for n in names if n.strip().lower() in COLUMNS}
    if not ("N" in header and "loss" in header and ("D" in header or "C" in header)):
        raise UserError(f"{path} needs columns N, loss, and D (tokens) or C (FLOPs); it has "
                        f"{', '.join(names) or 'none'}")
    if not rows:
        raise UserError(f"{path} has its columns but no data rows")
    try:
        cols = {k: np.array([float(r[name]) for r in rows]) for k, name in header.items()}
    except ValueError as e:
        raise UserError(f"{path}: a value is not a number ({e})") from e
    # without D, D = C / 6N: how Besiroglu et al. turn the Chinchilla CSV's FLOPs into tokens
    cols.setdefault("D", cols.get("C", 0) / (6 * cols["N"]))
    cols.setdefault("C", 6 * cols["N"] * cols["D"])
    return dict(cols, budget=cols.get("budget", cols["C"]))


def read_run(path):
    """Final validation loss, tokens and FLOPs of a train.py run; N from its FLOPs per token."""
    from model import GPTConfig, flops_per_token
    for name in ("log.jsonl", "config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"{path} has no {name}: not a train.py run directory")
    try:
        last = [r for r in read_log(path) if "val_loss" in r and r["tokens"] > 0][-1:]
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        model_cfg, budget = GPTConfig(**config["model"]), config["train"]["max_flops"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: log.jsonl or config.json is not train.py's ({e})") from e
    if not last:
        raise UserError(f"{path}/log.jsonl has no evaluation after training started: unfinished")
    r = last[0]  # flops per token = 6N + attention, solved for N
    n = (r["flops"] / r["tokens"] - flops_per_token(model_cfg, 0)) / 6
    return dict(N=n, D=r["tokens"], C=r["flops"], loss=r["val_loss"], budget=budget or r["flops"])


def finished(path):
    try:
        return read_run(path)
    except UserError:
        return None


def load_points(paths, drop_highest=0):
    if not paths:
        raise UserError("give CSV files or train.py run directories as arguments")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{missing[0]} not found")
    parts = [{k: np.array([v]) for k, v in read_run(p).items()} if os.path.isdir(p) else read_csv(p)
             for p in paths]
    points = {k: np.concatenate([p[k] for p in parts]) for k in ("N", "D", "C", "loss", "budget")}
    bad = ~np.all([np.isfinite(points[k]) & (points[k] > 0) for k in ("N", "D", "loss")], axis=0)
    if bad.any():  # before drop_highest, which would count a NaN loss among the highest
        raise UserError(f"{bad.sum()} of {len(bad)} points have an N, D or loss that is not a "
                        f"positive finite number (the first is point {np.argmax(bad) + 1})")
    keep = np.sort(np.argsort(points["loss"])[:len(bad) - drop_highest])
    if len(keep) < 5:
        raise UserError(f"need at least 5 points with positive N, D and loss; have {len(keep)}")
    return {k: v[keep] for k, v in points.items()}


def huber(r, delta):
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def huber_objective(p, lN, lD, lL, delta):
    """Huber loss of log L against LSE(a - alpha log N, b - beta log D, e) (Hoffmann et al. 2022,
    eq. 3, D.2), A = e^a, B = e^b, E = e^e, and its gradient in p = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = p
    terms = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    weights = np.exp(terms - terms.max(0))
    total = weights.sum(0)
    r = terms.max(0) + np.log(total) - lL
    g = np.where(np.abs(r) <= delta, r, delta * np.sign(r)) * weights / total
    return huber(r, delta).sum(), np.array([*g.sum(1), -g[0] @ lN, -g[1] @ lD])


def fit_law(points, delta=1e-3, bootstrap=0, seed=0):
    """The Approach 3 law by L-BFGS from the 10 best points of a grid over (alpha, beta), where
    (E, A, B) come from least squares (the paper starts from 4,500), bootstrapped for intervals."""
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise UserError("the fit needs scipy: pip install scipy") from None
    distinct = [len(np.unique(points[k])) for k in ("N", "D")]
    if min(distinct) < 3:  # else E, A/N^alpha and B/D^beta cannot be told apart
        raise UserError(f"the fit needs 3 or more distinct N and D; these points have {distinct[0]}"
                        f" and {distinct[1]}: vary the model sizes and the tokens")
    lN, lD, lL = data = tuple(np.log(points[k]) for k in ("N", "D", "loss"))
    exps, candidates = np.arange(0.02, 1.5, 0.03), []
    for alpha in exps:  # for fixed exponents the law is linear in (E, A, B)
        X = np.stack(np.broadcast_arrays(1.0, np.exp(-alpha * lN), np.exp(-exps[:, None] * lD)), -1)
        Xw = X / np.exp(lL)[:, None]  # (beta, point, [E, A, B]), for the relative error
        gram = np.einsum("kni,knj->kij", Xw, Xw) + 1e-12 * np.eye(3)
        coef = np.maximum(np.linalg.solve(gram, Xw.sum(1)[..., None])[..., 0], 1e-12)
        h = huber(np.log(np.einsum("kni,ki->kn", X, coef)) - lL, delta).sum(1)
        candidates += [(h[k], [*np.log(coef[k, [1, 2, 0]]), alpha, exps[k]]) for k in range(len(h))]
    # with scipy's default tolerances L-BFGS stopped after 10-17 steps, exponents 0.01 off: the
    # early stop Besiroglu et al. blame for the original fit's bias
    def fit(start, d):
        return minimize(huber_objective, start, args=(*d, delta), jac=True, method="L-BFGS-B",
                        options=dict(ftol=1e-15, gtol=1e-12, maxiter=2000))
    best = min((fit(c[1], data) for c in sorted(candidates, key=lambda c: c[0])[:10]),
               key=lambda r: r.fun)
    rng = np.random.default_rng(seed)  # bootstrap: refits from the optimum on resampled points
    laws = [fit(best.x, tuple(d[i] for d in data)).x
            for i in (rng.integers(0, len(lN), len(lN)) for _ in range(bootstrap))]
    laws = [dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                 beta=float(beta), a_opt=float(beta / (alpha + beta)))  # N_opt ~ C^a_opt
            for a, b, e, alpha, beta in [best.x, *laws]]
    law, laws, notes = laws[0], laws[1:], []
    ci = {k: [float(np.percentile([l[k] for l in laws], q)) for q in (2.5, 97.5)]
          for k in law} if laws else {}
    for k in law:
        if k in "EAB" and law[k] < 1e-3 * points["loss"].min() or k in ("alpha", "beta") and not (
                0.01 < law[k] < 3):
            notes.append(f"{k} = {law[k]:.3g} sits at a bound (0 for E, A, B; 0.01 to 3 for an "
                         "exponent): the points do not pin it down; vary sizes and tokens more")
        elif laws and ci[k][1] - ci[k][0] <= 1e-6 * abs(law[k]):
            notes.append(f"the 95% interval of {k} collapses to {law[k]:.4g}: every resample gave "
                         "one value, so it measures nothing")
    return dict(law=law, huber=float(best.fun), points=len(lN), warnings=notes,
                **(dict(ci95=ci) if ci else {}))


def optimal_split(law):
    """G and a of N_opt = G (C/6)^a, D_opt = (C/6)^(1-a) / G (Hoffmann et al. 2022, eq. 4)."""
    s = law["alpha"] + law["beta"]
    return (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / s), law["beta"] / s


def predicted_loss(law, n, d):
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def isoflop_fit(points):
    """A parabola in log N per budget (Hoffmann et al. 2022, 3.2), then N_opt = k C^a through the
    minima inside the sampled sizes, with a Student's t interval from 3 budgets. Runs within 10%
    of a group's smallest budget (max_flops) form one profile."""
    budgets, groups, first = [], [], 0
    for i in np.argsort(points["budget"]):
        if not groups or points["budget"][i] > 1.1 * first:
            groups, first = groups + [[]], points["budget"][i]
        groups[-1].append(i)
    for idx in (np.array(g) for g in groups if len(np.unique(points["N"][g])) >= 3):
        x = np.log(points["N"][idx])
        c2, c1, c0 = parabola = np.polyfit(x, points["loss"][idx], 2).tolist()
        budgets.append(dict(
            C=float(np.median(points["C"][idx])), runs=len(idx), N_parabola=parabola,
            points=dict(N=points["N"][idx].tolist(), loss=points["loss"][idx].tolist()),
            N_opt=math.exp(-c1 / (2 * c2)) if c2 > 0 else None,  # None: no minimum
            loss_opt=c0 - c1 * c1 / (4 * c2) if c2 > 0 else None,
            N_inside=bool(c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max())))
    if not budgets:
        raise UserError("no compute budget has runs of 3 or more model sizes, the least an isoFLOP "
                        "parabola needs")
    used = [b for b in budgets if b["N_inside"]]  # else an extrapolation
    laws, x = {}, np.log([b["C"] for b in used])
    if len(used) >= 2:  # Hoffmann et al.: a = 0.49 (Approach 2)
        y = np.log([b["N_opt"] for b in used])
        slope, intercept = np.polyfit(x, y, 1)
        laws["N"] = dict(exponent=float(slope), coefficient=float(math.exp(intercept)))
        if len(used) >= 3:
            from scipy.stats import t
            se = math.sqrt(np.sum((y - slope * x - intercept) ** 2) / (len(used) - 2)
                           / np.sum((x - x.mean()) ** 2))
            q = t.ppf(0.975, len(used) - 2) * se
            laws["N"]["ci95"] = [float(slope - q), float(slope + q)]
    return dict(budgets=budgets, power_laws=laws, budgets_used=len(used))


def checked(fit, iso):
    """The fit's text and warnings, one more when Approach 2's and 3's exponents of N_opt from the
    same runs disagree beyond their 95% intervals (one of them must have one)."""
    if "law" not in fit:
        return [f"no fit: {fit['error']}"], []
    law, ci, notes = fit["law"], fit.get("ci95", {}), list(fit["warnings"])
    iso_law, a = (iso or {}).get("power_laws", {}).get("N"), law["a_opt"]
    if iso_law and ("ci95" in iso_law or ci):
        lo2, hi2 = iso_law.get("ci95", [iso_law["exponent"]] * 2)
        lo3, hi3 = ci.get("a_opt", [a] * 2)
        if hi2 < lo3 or hi3 < lo2:
            notes.append(f"isoflop's N_opt ~ C^{iso_law['exponent']:.3f} [{lo2:.3f}, {hi2:.3f}] and"
                         f" the fit's C^{a:.3f} [{lo3:.3f}, {hi3:.3f}] disagree beyond their 95% "
                         "intervals: trust neither until more budgets and sizes agree")
    lines = [f"L(N, D) = E + A / N^alpha + B / D^beta from {fit['points']} points:",
             *(f"  {k:5s} = {v:10.4f}" + ("   95% CI [{:.4f}, {:.4f}]".format(*ci[k]) if ci else "")
               for k, v in law.items() if k != "a_opt"),
             f"compute-optimal N_opt ∝ C^{a:.3f}, D_opt ∝ C^{1 - a:.3f}"]
    return lines, [warn(note) for note in notes]


def cmd_fit(cfg, paths):
    if cfg.law_out:
        configurator.check_writable(cfg.law_out, "law_out")
    points = load_points(paths, cfg.drop_highest)
    result = fit_law(points, cfg.huber_delta, cfg.bootstrap)
    try:  # Approach 2 where the points form isoFLOP profiles, to check the fit's exponent against
        iso = result["isoflop"] = isoflop_fit(points)
    except UserError:
        iso = None
    lines, result["warnings"] = checked(result, iso)
    if cfg.law_out:
        write_atomically(cfg.law_out, json.dumps(result["law"], indent=1))
    lines = (report.isoflop_lines(iso) if iso else []) + lines
    print(json.dumps(result, indent=1) if cfg.json else "\n".join(lines))


def resolve_law(name):
    if name in LAWS:
        return LAWS[name]
    if not os.path.isfile(name):
        raise UserError(f"law must be approach1, {', '.join(LAWS)} or a JSON file from "
                        f"`fit --law_out`; {name!r} is none")
    try:
        with open(name) as f:
            law = json.load(f)
    except ValueError as e:
        raise UserError(f"{name} is not JSON ({e}); give a file written by `fit --law_out`") from e
    if not (isinstance(law, dict) and all(isinstance(law.get(k), (int, float)) and law[k] > 0
                                          for k in ("E", "A", "B", "alpha", "beta"))):
        raise UserError(f"{name} must hold E, A, B, alpha and beta as positive numbers")
    return law


def cmd_table(cfg, _):
    law = None if cfg.law == "approach1" else resolve_law(cfg.law)
    if law:
        G, a = optimal_split(law)
    else:  # the paper's a = 0.50 is rounded: its Table 3 follows N = G (C/6)^a through its first
        (n0, c0, _), (n1, c1, _) = APPROACH1_TABLE[0], APPROACH1_TABLE[-1]  # and last rows
        a = math.log(n1 / n0) / math.log(c1 / c0)
        G = 6 ** a * n0 / c0 ** a
    rows = [dict(N=n, C=6 * (n / G) ** (1 / a), D=(n / G) ** (1 / a) / n)
            for n in map(float, cfg.sizes)]
    for row in rows if law else ():
        row["loss"] = predicted_loss(law, row["N"], row["D"])
    if cfg.json:
        return print(json.dumps(dict(law=cfg.law, rows=rows), indent=1))
    print(f"compute-optimal training under {cfg.law}:\n{'params':>10} {'FLOPs':>10} {'tokens':>10} "
          f"{'tok/param':>9}" + "  loss" * bool(law))
    for r in rows:
        print(f"{r['N']:10.3g} {r['C']:10.3g} {r['D']:10.4g} {r['D'] / r['N']:9.1f}"
              + (f" {r['loss']:6.3f}" if law else ""))


def cmd_sweep(cfg, argv):
    """Every budget x shape as a train.py run stopped by --max_flops, `jobs` at a time, then one
    report in sweep_dir. Finished runs are kept: rerunning resumes the sweep."""
    os.makedirs(cfg.sweep_dir, exist_ok=True)
    plot = configurator.check_writable(cfg.plot or os.path.join(cfg.sweep_dir, "isoflop.png"),
                                       "plot")
    out = sys.stderr if cfg.json else sys.stdout  # with --json, stdout holds the JSON alone
    own = set(ScalingConfig.__dataclass_fields__)  # the other keys go to prepare.py and train.py
    passthrough = [a for a in argv if a.endswith(".py") or a[2:].split("=")[0] not in own]
    grid = {os.path.join(cfg.sweep_dir, f"C{c:.0e}_L{layers}_E{width}"): (float(c), layers, width)
            for c in cfg.budgets for layers, width in cfg.shapes}
    with locked_folder(cfg.sweep_dir, "scaling.py sweep"):
        todo = [run for run in grid if not finished(run)]
        for run in todo:  # a live train.py here is refused before its train.log is touched
            with locked_folder(run, "scaling.py sweep"):
                pass
        print(f"sweep: {len(grid)} runs in {cfg.sweep_dir} ({len(grid) - len(todo)} already done)",
              file=out, flush=True)
        if subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *passthrough],
                          stdout=out if cfg.json else None, preexec_fn=die_with_parent).returncode:
            raise UserError("prepare.py failed (see above); the sweep trains on the data it writes")
        import torch
        cores, gpu = len(os.sched_getaffinity(0)), torch.cuda.is_available()
        jobs = cfg.jobs or (1 if gpu else cores)
        # CPU runs side by side share the cores (more threads than cores ran slower); one
        # evaluation at the end, a short warmup for runs of a few hundred steps
        defaults = ["--sample_tokens=0", "--eval_interval=1000000", "--log_interval=50",
                    "--warmup_iters=20", *([] if gpu else [f"--threads={max(1, cores // jobs)}"])]
        running = {}
        try:
            while todo or running:
                while todo and len(running) < jobs:
                    run, (c, layers, width) = todo[0], grid[todo.pop(0)]
                    os.makedirs(run, exist_ok=True)
                    with open(os.path.join(run, "train.log"), "w") as log:  # the child's own
                        running[run] = subprocess.Popen(
                            [sys.executable, os.path.join(ROOT, "train.py"), *defaults,
                             *passthrough, f"--max_flops={c}", "--max_iters=0",
                             f"--n_layer={layers}", f"--n_embd={width}", f"--out_dir={run}",
                             "--overwrite=True"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
                time.sleep(0.2)
                for run in [run for run, child in running.items() if child.poll() is not None]:
                    if running.pop(run).returncode:
                        raise UserError(f"train.py failed for {run}: see {run}/train.log")
                    print(f"[{len(grid) - len(todo) - len(running)}/{len(grid)}] {run}: val loss "
                          f"{read_run(run)['loss']:.4f}", file=out, flush=True)
        finally:  # the runs in flight end with the sweep, as they do when it is killed
            for child in running.values():
                child.terminate()
                child.wait()
        sweep_report(cfg, argv, grid, plot)


def sweep_report(cfg, argv, grid, plot):
    """The sweep's isoFLOP figure, its fit (also as law.json) and report.md, in sweep_dir."""
    points = load_points(list(grid))
    iso = isoflop_fit(points)
    report.draw_isoflop(iso, plot)
    try:
        fit = fit_law(points, cfg.huber_delta, cfg.bootstrap)
        write_atomically(os.path.join(cfg.sweep_dir, "law.json"), json.dumps(fit["law"], indent=1))
    except UserError as e:
        fit = dict(error=str(e))
    lines, fit["warnings"] = checked(fit, iso)
    page, command = os.path.join(cfg.sweep_dir, "report.md"), ["scaling.py", "sweep", *argv]
    write_atomically(page, report.sweep_page(cfg.sweep_dir, command, plot, grid, points, iso, lines,
                                             fit["warnings"]))
    print(json.dumps(dict(isoflop=iso, fit=fit, plot=plot, report=page), indent=1) if cfg.json
          else "\n".join(report.isoflop_lines(iso) + lines + [f"report: {page}, figure: {plot}"]))


def cmd_plan(cfg, argv):
    """GPUs x hours (or dollars) at an assumed MFU -> FLOPs -> compute-optimal N and D under a law
    -> shape, batch and learning rate -> a config file for train.py, stopped by those FLOPs."""
    import runtime
    from data import dataset_vocab, load_meta
    from model import GPTConfig
    from recipe import planned_run
    from train import TrainConfig
    if cfg.plan_out.startswith(OUT + "/"):
        os.makedirs(OUT, exist_ok=True)
    configurator.check_writable(cfg.plan_out, "plan_out")
    hours = cfg.hours or (cfg.dollars / cfg.price_per_gpu_hour / cfg.gpus
                          if cfg.price_per_gpu_hour else 0)
    if not hours:
        raise UserError("give --hours, or --dollars with --price_per_gpu_hour")
    if cfg.law == "approach1":
        raise UserError("plan needs a law that predicts loss: --law=chinchilla, epoch or a JSON "
                        "file from `fit --law_out`")
    law, overrides = resolve_law(cfg.law), configurator.parse(argv, TrainConfig, GPTConfig)
    train_cfg = configurator.build(TrainConfig, overrides)
    peak = runtime.peak_flops(cfg.gpu, train_cfg.peak_tflops)
    if not peak:
        raise UserError(f"unknown GPU {cfg.gpu!r}: name one of "
                        f"{', '.join(k for k, _ in runtime.PEAK_TFLOPS)} or set --peak_tflops")
    # --vocab_size at its word, taken out of the overrides so that it is padded as a dataset's is
    vocab, source = ((overrides.pop("vocab_size"), "--vocab_size") if "vocab_size" in overrides
                     else dataset_vocab(train_cfg.dataset))
    flops = cfg.gpus * peak * cfg.mfu * hours * 3600
    G, a = optimal_split(law)
    n_opt = G * (flops / 6) ** a
    plan = planned_run(train_cfg, overrides, vocab, flops, n_opt, cfg.plan_block_size, cfg.gpus)
    shape, n, tokens, steps = plan["shape"], plan["N"], plan["tokens"], plan["steps"]
    batch_tokens, lr = plan["settings"]["batch_tokens"], plan["settings"]["learning_rate"]
    result = dict(hours=hours, flops=flops, law=cfg.law, vocab_size=vocab, vocab_source=source,
                  N_opt=n_opt, N=n, tokens=tokens, steps=steps, shape=shape,
                  batch_tokens=batch_tokens, learning_rate=lr, config=cfg.plan_out,
                  expected_loss=predicted_loss(law, n, tokens), warnings=[])
    if source == f"data/{train_cfg.dataset}":
        result["epochs"] = tokens / load_meta(source)["train_tokens"]
        if result["epochs"] > FEW_EPOCHS:
            result["warnings"].append(warn(
                f"the plan's {tokens:.3g} tokens are {result['epochs']:,.0f} epochs of {source}: "
                f"past {FEW_EPOCHS}, repeats add little (Muennighoff et al. 2023); use more data"))
    summary = (f"{cfg.gpus} x {cfg.gpu or 'GPU'} for {hours:g} h at {100 * cfg.mfu:.0f}% MFU: "
               f"{flops:.3g} FLOPs; vocabulary {vocab:,} from {source}; under {cfg.law} N_opt is "
               f"{n_opt:.3g}: {shape['n_layer']} layers x {shape['n_embd']} = {n:,} parameters, "
               f"{tokens:.3g} tokens ({tokens / n:.0f} per parameter), {steps:,} steps of "
               f"{batch_tokens:,} tokens, lr {lr:.3g}; expected loss "
               f"{result['expected_loss']:.3f} in the law's data and tokenizer")
    write_atomically(cfg.plan_out, f"# written by: python scaling.py plan {' '.join(argv)}\n"
                     f"# {summary}\n# with a data recipe: python train.py config/gpt_51m.py "
                     f"{cfg.plan_out}\n"
                     + "".join(f"{k} = {v!r}\n" for k, v in plan["settings"].items()))
    print(json.dumps(result, indent=1) if cfg.json else f"{summary}\nwrote {cfg.plan_out}")


COMMANDS = dict(fit=cmd_fit, sweep=cmd_sweep, table=cmd_table, plan=cmd_plan)


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"first argument must be a subcommand: {', '.join(COMMANDS)} (see the top "
                        "of scaling.py)")
    paths = [a for a in argv[1:] if not a.startswith("--") and not a.endswith(".py")]
    options = [a for a in argv[1:] if a not in paths]
    if paths and argv[0] != "fit":
        raise UserError(f"{argv[0]} takes no input files, got {paths[0]!r}; set --key=value")
    cfg = configurator.build(ScalingConfig, configurator.parse(options, ScalingConfig))
    COMMANDS[argv[0]](cfg, paths if argv[0] == "fit" else options)


if __name__ == "__main__":
    configurator.run_script(main)
