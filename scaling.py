"""Scaling laws for planning a run: fit them to your own runs, sweep, tabulate, and check MFU.

    python scaling.py fit tests/data/chinchilla_svg_extracted_data.csv --drop_highest=5
    python scaling.py fit out-sweep/*/ --law_out=law.json    # run directories written by train.py
    python scaling.py isoflop out-sweep/*/                    # Approach 2 and its PNG figure
    python scaling.py sweep                                   # tiny isoFLOP sweep with train.py (minutes on a CPU)
    python scaling.py table [--law=approach1|chinchilla|epoch|law.json]
    python scaling.py mfu config/gpt_350m.py --tok_per_sec=50000 --gpu=A100
    python scaling.py mfu --params=1e9 --n_layer=26 --n_embd=2304 --block_size=2048 --gpu=A100 --mfu=0.35
    python scaling.py plan --gpu=H100 --hours=24 --law=epoch --dataset=fineweb_edu_10bt_gpt2   # writes config/plan.py

Inputs (CSV files or run directories) are positional; every subcommand takes --json. N is the active
non-embedding parameter count, the N of train.py's FLOPs 6N + 12*L*H*Q*T (model.py), read back from a run's
logged FLOPs per token so that C = FLOPs/token x D exactly. (Chinchilla counts every parameter: at its scale
the difference is small, at ours the embeddings would dominate the smallest models.)

References: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556);
Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102); MFU: PaLM
(Chowdhery et al. 2022, appendix B).
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

from configurator import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))

# Approach 3 laws L(N, D) = E + A / N^alpha + B / D^beta, in nats per token on MassiveText.
LAWS = {
    "chinchilla": dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),  # Hoffmann et al. 2022, eq. (10)
    "epoch": dict(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),  # Besiroglu et al. 2024, their refit
}
# Hoffmann et al. 2022, Table 3 (Approach 1), as the primer quotes it: parameters, FLOPs, tokens.
APPROACH1_TABLE = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                   (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                   (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]
GOPHER_FLOPS = 5.76e23  # the table's "Gopher unit"


@dataclass
class ScalingConfig:
    json: bool = False               # print one JSON object instead of text
    # fit / isoflop: inputs are CSV files (N, D or FLOPs, loss) or train.py run directories, as positional arguments
    drop_highest: int = 0            # drop this many highest-loss points first (Besiroglu et al. drop 5 of the Chinchilla CSV)
    huber_delta: float = 1e-3        # Hoffmann et al. 2022, section 3.3
    bootstrap: int = 100             # resamples for 95% intervals; 0 = off
    law_out: str = ""                # fit: write the law as JSON here, for `table --law=`
    plot: str = ""                   # isoflop: PNG path (default isoflop.png; sweep: <sweep_dir>/isoflop.png)
    # table
    law: str = "approach1"           # approach1 | chinchilla | epoch | a JSON file from fit --law_out
    sizes: list = field(default_factory=lambda: [row[0] for row in APPROACH1_TABLE])
    # mfu: a config file (or --n_layer, --n_embd, --block_size, and --params for N) and a tokens/s or an assumed MFU
    gpu: str = ""                    # a name from runtime.PEAK_TFLOPS (or set --peak_tflops)
    params: float = 0.0              # N; 0 = count it from the model the config describes
    tok_per_sec: float = 0.0         # measured throughput per GPU -> MFU
    mfu: float = 0.0                 # assumed MFU -> GPU-days for each of `tokens`
    tokens: list = field(default_factory=lambda: [1e12, 2e12, 5e12, 1e13])
    # plan: GPUs x hours (or dollars at a price) at --mfu (default 0.4) -> a config file for train.py; uses `gpu`, `law`
    gpus: int = 1
    hours: float = 0.0
    dollars: float = 0.0
    price_per_gpu_hour: float = 0.0
    plan_block_size: int = 1024
    plan_out: str = "config/plan.py"
    # sweep: every budget x shape runs `train.py --max_flops=budget --max_iters=0`; other keys go to train.py
    sweep_dir: str = "out-sweep"
    jobs: int = 0                    # train.py runs at once; 0 = one per CPU core without a GPU, 1 with one
    # Minutes on a few CPU cores, with every budget's minimum inside the sizes (a smaller budget fell below
    # the smallest). One layer: at this scale width is the dial that matters (deeper shapes of the same size
    # reached a worse loss; RESULTS.md has the runs).
    budgets: list = field(default_factory=lambda: [5e11, 1e12, 2e12])
    shapes: list = field(default_factory=lambda: [(1, 16), (1, 24), (1, 32), (1, 48), (1, 64)])  # (n_layer, n_embd)


# ----------------------------------------------------------------------------- inputs

CSV_COLUMNS = {"N": ("n", "params", "parameters", "model size"), "D": ("d", "tokens", "training tokens"),
               "C": ("c", "flops", "training flop", "training flops"), "loss": ("loss", "val_loss"), "budget": ("budget",)}


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f, restval="")  # a short row's missing values read as "", not a number
        rows = list(reader)
        header = {name.strip().lower(): name for name in reader.fieldnames or []}  # None for an empty file
    found = {key: next((header[a] for a in aliases if a in header), None) for key, aliases in CSV_COLUMNS.items()}
    if not (found["N"] and found["loss"] and (found["D"] or found["C"])):
        raise UserError(f"{path} needs columns for N ({'/'.join(CSV_COLUMNS['N'])}), loss, and D (tokens) or C (flops); "
                        f"it has {', '.join(header.values()) or 'none'}")
    if not rows:
        raise UserError(f"{path} has its columns but no data rows")
    try:
        cols = {k: np.array([float(r[name]) for r in rows]) for k, name in found.items() if name}
    except ValueError as e:
        raise UserError(f"{path}: a value is not a number ({e})") from e
    # Without D, D = C / 6N: how Besiroglu et al. turn the Chinchilla CSV's FLOPs into tokens
    cols.setdefault("D", cols.get("C", 0) / (6 * cols["N"]))
    cols.setdefault("C", 6 * cols["N"] * cols["D"])
    cols.setdefault("budget", cols["C"])
    return cols


def attention_flops(model_config):
    """FLOPs per token beyond 6N (attention over the context): model.py's formula with no parameters."""
    from model import flops_per_token
    return flops_per_token(model_config, 0)


def read_run(path):
    """Final validation loss, tokens and FLOPs of a train.py run; N from its FLOPs per token."""
    log_path, config_path = os.path.join(path, "log.jsonl"), os.path.join(path, "config.json")
    for p in (log_path, config_path):
        if not os.path.isfile(p):
            raise UserError(f"{path} has no {os.path.basename(p)}: not a train.py run directory")
    try:
        with open(log_path) as f:
            evals = [r for r in map(json.loads, filter(str.strip, f)) if "val_loss" in r and r["tokens"] > 0]
        with open(config_path) as f:
            config = json.load(f)
        from model import GPTConfig
        model_config, budget = GPTConfig(**config["model"]), config["train"]["max_flops"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: log.jsonl or config.json is not train.py's ({type(e).__name__}: {e})") from e
    if not evals:
        raise UserError(f"{log_path} has no evaluation after training started: the run did not finish")
    last = evals[-1]
    n = (last["flops"] / last["tokens"] - attention_flops(model_config)) / 6  # model.flops_per_token() solved for N
    return dict(N=n, D=last["tokens"], C=last["flops"], loss=last["val_loss"], budget=budget or last["flops"])


def load_points(paths, drop_highest=0):
    if not paths:
        raise UserError("give CSV files or train.py run directories as arguments")
    parts = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} not found")
        if os.path.isdir(path):
            parts.append({k: np.array([v]) for k, v in read_run(path).items()})
        else:
            parts.append(read_csv(path))
    points = {k: np.concatenate([p[k] for p in parts]) for k in ("N", "D", "C", "loss", "budget")}
    bad = ~np.all([np.isfinite(points[k]) & (points[k] > 0) for k in ("N", "D", "loss")], axis=0)
    if bad.any():  # before drop_highest, which would count a NaN loss among the highest
        raise UserError(f"{bad.sum()} of {len(bad)} points have an N, D or loss that is not a positive finite number "
                        f"(the first is point {np.argmax(bad) + 1}); fix or remove them")
    if drop_highest < 0:
        raise UserError(f"--drop_highest must be 0 or more, got {drop_highest}")
    if drop_highest:
        keep = np.argsort(points["loss"])[:-drop_highest]
        points = {k: v[np.sort(keep)] for k, v in points.items()}
    if len(points["loss"]) < 5:
        raise UserError(f"need at least 5 points with positive N, D and loss; have {len(points['loss'])}")
    return points


# ----------------------------------------------------------------------------- Approach 3: the parametric fit

def huber(r, delta):
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def huber_objective(p, lN, lD, lL, delta):
    """Huber loss between log L and its prediction LSE(a - alpha log N, b - beta log D, e), where A = e^a,
    B = e^b, E = e^e (Hoffmann et al. 2022, eq. 3, D.2), with its gradient in p = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = p
    terms = np.stack([a - alpha * lN, b - beta * lD, np.full_like(lN, e)])
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    r = top + np.log(total) - lL
    weights /= total
    g = np.where(np.abs(r) <= delta, r, delta * np.sign(r))
    return huber(r, delta).sum(), np.array([g @ weights[0], g @ weights[1], g @ weights[2], -(g * lN) @ weights[0], -(g * lD) @ weights[1]])


def minimize_from(start, data):
    from scipy.optimize import minimize
    # Tight tolerances: with scipy's defaults L-BFGS stopped here after 10-17 steps, exponents 0.01 off; Besiroglu
    # et al. trace the original fit's bias to such an early stop (its loss scale made the optimizer quit).
    return minimize(huber_objective, start, args=data, jac=True, method="L-BFGS-B",
                    options=dict(ftol=1e-15, gtol=1e-12, maxiter=2000))


def starting_points(lN, lD, lL, delta, count=10):
    """The paper starts L-BFGS from a grid of 4,500 points, which takes minutes. For fixed exponents the law is
    linear in (E, A, B), so a grid over (alpha, beta) alone with least squares on the relative error fills in
    the rest; the `count` best grid points start L-BFGS. All of them reach the same optimum on the Chinchilla data."""
    exponents = np.arange(0.02, 1.5, 0.03)
    L = np.exp(lL)
    candidates = []
    for alpha in exponents:
        X = np.stack([np.ones((len(exponents), len(lN))), np.broadcast_to(np.exp(-alpha * lN), (len(exponents), len(lN))),
                      np.exp(-exponents[:, None] * lD)], -1)  # (beta, point, [E, A, B])
        Xw = X / L[:, None]
        coef = np.linalg.solve(np.einsum("kni,knj->kij", Xw, Xw) + 1e-12 * np.eye(3), np.einsum("kni->ki", Xw)[..., None])[..., 0]
        coef = np.maximum(coef, 1e-12)
        r = np.log(np.einsum("kni,ki->kn", X, coef)) - lL
        h = huber(r, delta).sum(1)
        candidates += [(h[k], [math.log(coef[k, 1]), math.log(coef[k, 2]), math.log(coef[k, 0]), alpha, exponents[k]])
                       for k in range(len(exponents))]
    candidates.sort(key=lambda c: c[0])
    return [c[1] for c in candidates[:count]]


def law_of(p):
    a, b, e, alpha, beta = p
    return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def fit_law(points, delta=1e-3, bootstrap=0, seed=0):
    import scipy.optimize  # noqa: F401  (before the limit below: threadpoolctl limits the BLAS already loaded)
    from threadpoolctl import threadpool_limits
    data = tuple(np.log(points[k]) for k in ("N", "D", "loss")) + (delta,)
    # One BLAS thread: on these tiny matrices OpenBLAS's threads made each L-BFGS-B fit about 100x slower
    with threadpool_limits(1, "blas"):
        best = min((minimize_from(s, data) for s in starting_points(*data)), key=lambda r: r.fun)
        rng = np.random.default_rng(seed)
        resamples = [rng.integers(0, len(data[0]), len(data[0])) for _ in range(bootstrap)]
        # bootstrap: refit from the optimum on resampled points; 95% percentile intervals
        laws = [law_of(minimize_from(best.x, tuple(d[i] for d in data[:3]) + (delta,)).x) for i in resamples]
    result = dict(law=law_of(best.x), huber=float(best.fun), points=len(points["loss"]))
    if laws:
        result["ci95"] = {k: [float(np.percentile([l[k] for l in laws], q)) for q in (2.5, 97.5)] for k in laws[0]}
    return result


def optimal_split(law):
    """G and a of the compute-optimal N_opt = G (C/6)^a, D_opt = (C/6)^(1-a) / G for C = 6ND under an
    Approach 3 law (Hoffmann et al. 2022, eq. 4)."""
    a = law["beta"] / (law["alpha"] + law["beta"])
    return (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / (law["alpha"] + law["beta"])), a


def predicted_loss(law, n, d):
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


# ----------------------------------------------------------------------------- Approach 2: isoFLOP profiles

def group_budgets(budget):
    """Points whose budgets lie within 10% of the smallest in their group form one isoFLOP profile. A run's
    budget is its max_flops (it stops within one step of it); a CSV's is its budget column, or else C."""
    groups, first = [], None
    for i in np.argsort(budget):
        if first is None or budget[i] > 1.1 * first:
            groups.append([])
            first = budget[i]
        groups[-1].append(i)
    return [np.array(g) for g in groups]


def isoflop_fit(points):
    budgets = []
    for idx in group_budgets(points["budget"]):
        if len(np.unique(points["N"][idx])) < 3:
            continue
        entry = dict(C=float(np.median(points["C"][idx])), runs=len(idx))
        for key in ("N", "D"):  # one parabola in log N and one in log D: no C = 6ND assumed (Hoffmann et al., 3.2)
            x = np.log(points[key][idx])
            c2, c1, c0 = np.polyfit(x, points["loss"][idx], 2)
            vertex = -c1 / (2 * c2) if c2 > 0 else None  # None: the loss does not turn up within the sizes
            entry[key + "_opt"] = math.exp(vertex) if vertex is not None else None
            entry[key + "_inside"] = bool(vertex is not None and x.min() <= vertex <= x.max())
            entry[key + "_parabola"] = [c2, c1, c0]
            if key == "N":
                entry["loss_opt"] = float(c0 - c1 * c1 / (4 * c2)) if vertex is not None else None
        entry["points"] = dict(N=points["N"][idx].tolist(), loss=points["loss"][idx].tolist())
        budgets.append(entry)
    if not budgets:
        raise UserError("no compute budget has runs of 3 or more model sizes, the least an isoFLOP parabola needs")
    # A minimum outside the sampled sizes is an extrapolation: it is shown but does not enter the power laws
    used = [b for b in budgets if b["N_inside"] and b["D_inside"]]
    laws = {}
    for key in ("N", "D") if len(used) >= 2 else ():  # N_opt = k C^a: Hoffmann et al. find a = 0.49 (Approach 2)
        slope, intercept = np.polyfit(np.log([b["C"] for b in used]), np.log([b[key + "_opt"] for b in used]), 1)
        laws[key] = dict(exponent=float(slope), coefficient=float(math.exp(intercept)))
    return dict(budgets=budgets, power_laws=laws, budgets_used=len(used))


def plot_isoflop(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result["budgets"])))
    for b, color in zip(result["budgets"], colors):
        n = np.array(b["points"]["N"])
        left.scatter(n, b["points"]["loss"], color=color, s=18)
        x = np.linspace(np.log(n).min(), np.log(n).max(), 100)
        left.plot(np.exp(x), np.polyval(b["N_parabola"], x), color=color, label=f"C = {b['C']:.1e}")
        if b["N_inside"]:
            left.scatter([b["N_opt"]], [b["loss_opt"]], color=color, marker="*", s=150, edgecolor="k", zorder=3)
    left.set(xscale="log", xlabel="parameters N (non-embedding)", ylabel="validation loss", title="isoFLOP profiles")
    left.legend(fontsize=8)
    used = [b for b in result["budgets"] if b["N_inside"] and b["D_inside"]]
    c = np.array([b["C"] for b in used])
    for key, marker in (("N", "o"), ("D", "s")) if used else ():
        right.scatter(c, [b[key + "_opt"] for b in used], marker=marker, label=f"{key}_opt")
        if key in result["power_laws"]:
            law, line = result["power_laws"][key], np.geomspace(c.min() / 3, c.max() * 3, 50)
            right.plot(line, law["coefficient"] * line ** law["exponent"], label=f"{key}_opt ∝ C^{law['exponent']:.2f}")
    if used:
        right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="optimal N, D", title="compute-optimal allocation")
        right.legend()
    else:
        right.text(0.5, 0.5, "no loss minimum inside the sampled sizes", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the subcommands

def cmd_fit(cfg, paths):
    if cfg.law_out:
        configurator.check_writable(cfg.law_out, "law_out")
    points = load_points(paths, cfg.drop_highest)
    start = time.time()
    result = fit_law(points, cfg.huber_delta, cfg.bootstrap)
    result["seconds"] = time.time() - start
    if cfg.law_out:
        with open(cfg.law_out, "w") as f:
            json.dump(result["law"], f, indent=1)
    if cfg.json:
        return result
    law, ci = result["law"], result.get("ci95", {})
    print(f"L(N, D) = E + A / N^alpha + B / D^beta from {result['points']} points ({result['seconds']:.1f} s):")
    for k, v in law.items():
        print(f"  {k:5s} = {v:10.4f}" + (f"   95% CI [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if ci else ""))
    a = law["beta"] / (law["alpha"] + law["beta"])
    print(f"compute-optimal N_opt ∝ C^{a:.3f}, D_opt ∝ C^{1 - a:.3f}" + (f"; law written to {cfg.law_out}" if cfg.law_out else ""))


def cmd_isoflop(cfg, paths):
    configurator.check_writable(cfg.plot or "isoflop.png", "plot")
    result = isoflop_fit(load_points(paths, cfg.drop_highest))
    result["plot"] = cfg.plot or "isoflop.png"
    plot_isoflop(result, result["plot"])
    if cfg.json:
        return result
    for b in result["budgets"]:
        found = (f"N_opt = {b['N_opt']:.3g}, D_opt = {b['D_opt']:.3g}, loss {b['loss_opt']:.4f}" if b["N_opt"] and b["D_opt"] else "no minimum")
        print(f"C = {b['C']:.2e}: {b['runs']} runs, {found}{'' if b['N_inside'] and b['D_inside'] else ' (outside the sizes: not used)'}")
    for key, law in result["power_laws"].items():
        print(f"{key}_opt = {law['coefficient']:.3g} * C^{law['exponent']:.3f}")
    if not result["power_laws"]:
        print(f"no power law: {result['budgets_used']} budget(s) have their minimum inside the sampled sizes, "
              "2 are needed; widen or shift the sizes")
    print(f"figure: {result['plot']}")


def resolve_law(name):
    if name in LAWS:
        return LAWS[name]
    if not os.path.isfile(name):
        raise UserError(f"law must be approach1, {', '.join(LAWS)} or a JSON file from `fit --law_out`; {name!r} is none")
    try:
        with open(name) as f:
            law = json.load(f)
    except ValueError as e:
        raise UserError(f"{name} is not JSON ({e}); give a file written by `fit --law_out`") from e
    keys = ("E", "A", "B", "alpha", "beta")
    if not (isinstance(law, dict) and all(isinstance(law.get(k), (int, float)) and law[k] > 0 for k in keys)):
        raise UserError(f"{name} must hold E, A, B, alpha and beta as positive numbers")
    return law


def cmd_table(cfg, _):
    if cfg.law == "approach1":
        # The paper gives a = 0.50, rounded; its Table 3 follows N = G C^a with C = 6ND, G and a read off its
        # first and last rows (a = 0.498). The 67B row departs from C = 6ND itself: 1.43T tokens, printed 1.5T.
        (n0, c0, _), (n1, c1, _) = APPROACH1_TABLE[0], APPROACH1_TABLE[-1]
        law, a = None, math.log(n1 / n0) / math.log(c1 / c0)
        G = 6 ** a * n0 / c0 ** a  # in the form N = G (C/6)^a
    else:
        law = resolve_law(cfg.law)
        G, a = optimal_split(law)
    rows = []
    reference = {row[0]: row for row in APPROACH1_TABLE}
    for n in map(float, cfg.sizes):
        c = 6 * (n / G) ** (1 / a)
        row = dict(N=n, C=c, D=c / (6 * n))
        if law:
            row["loss"] = predicted_loss(law, n, row["D"])
        if n in reference and not law:
            row["paper_C"], row["paper_D"] = reference[n][1], reference[n][2]
        rows.append(row)
    if cfg.json:
        return dict(law=cfg.law, rows=rows)
    print(f"compute-optimal training under {cfg.law}:")
    print(f"{'params':>10} {'FLOPs':>10} {'Gopher':>10} {'tokens':>10} {'tok/param':>9}" + ("  loss" if "loss" in rows[0] else ""))
    for r in rows:
        vs = f"  (Table 3: {r['paper_C']:.3g}, {r['paper_D']:.3g})" if "paper_C" in r else ""
        loss = f" {r['loss']:6.3f}" if "loss" in r else ""
        print(f"{r['N']:10.3g} {r['C']:10.3g} {r['C'] / GOPHER_FLOPS:10.4g} {r['D']:10.4g} {r['D'] / r['N']:9.1f}{loss}{vs}")


def gpu_peak_tflops(gpu, override):
    import runtime
    peak = override or (gpu and runtime.table_peak_tflops(gpu))
    if not peak:
        raise UserError(f"unknown GPU {gpu!r}: name one of {', '.join(k for k, _ in runtime.PEAK_TFLOPS)} or set --peak_tflops")
    return peak


def planned_vocab(train_cfg, overrides):
    """The vocabulary a planned model is shaped for and where it comes from: --vocab_size at its word (taken out of
    `overrides`, so that it is padded as train.py pads a dataset's), else data/<dataset>'s when prepared here, else
    GPT-2's."""
    import prepare
    if "vocab_size" in overrides:
        return overrides.pop("vocab_size"), "--vocab_size"
    return prepare.dataset_vocab(train_cfg.dataset, gpt2_fallback=True)


def cmd_mfu(cfg, argv):
    """MFU = (6N + 12*L*H*Q*T) * tokens/s / peak (runtime.mfu; PaLM, appendix B), as train.py prints it. torch,
    model.py and train.py are imported here only, for the model they build: the other subcommands stay light."""
    import torch
    import runtime
    import train
    from model import GPT, GPTConfig
    overrides = configurator.parse(argv, train.TrainConfig, GPTConfig)
    train_cfg = configurator.build(train.TrainConfig, overrides)
    vocab, vocab_source = planned_vocab(train_cfg, overrides)
    model_cfg = train.build_model_config(train_cfg, overrides, vocab)
    attention = attention_flops(model_cfg)
    if cfg.params:
        n = cfg.params
    else:
        with torch.device("meta"):  # counts without allocating
            n = GPT(model_cfg).param_counts()["active_non_embedding"]
    peak = gpu_peak_tflops(cfg.gpu, train_cfg.peak_tflops)
    per_token = 6 * n + attention
    result = dict(N=n, flops_per_token=per_token, attention_share=attention / per_token, peak_tflops=peak)
    if not (cfg.tok_per_sec or cfg.mfu):
        raise UserError("give --tok_per_sec (measured, gives the MFU) or --mfu (assumed, gives the training days)")
    if cfg.tok_per_sec < 0 or cfg.params < 0 or not 0 <= cfg.mfu <= 1:
        raise UserError(f"--tok_per_sec and --params must not be negative, and --mfu is a fraction from 0 to 1; got "
                        f"{cfg.tok_per_sec:g}, {cfg.params:g} and {cfg.mfu:g}")
    if cfg.tok_per_sec:
        result.update(tok_per_sec=cfg.tok_per_sec, mfu=runtime.mfu(per_token, cfg.tok_per_sec, peak * 1e12))
    if cfg.mfu:
        result["gpu_days"] = {f"{t:g}": t * per_token / (peak * 1e12 * cfg.mfu) / 86400 for t in map(float, cfg.tokens)}
    if cfg.json:
        return result
    print(f"N = {n:,.0f} non-embedding parameters; {per_token:.4g} FLOPs/token "
          f"(attention {100 * result['attention_share']:.1f}%); peak {peak:g} TFLOP/s")
    if cfg.tok_per_sec:
        print(f"{cfg.tok_per_sec:,.0f} tokens/s -> MFU {100 * result['mfu']:.1f}%")
    for t, days in result.get("gpu_days", {}).items():
        print(f"{float(t):.3g} tokens at {100 * cfg.mfu:.0f}% MFU: {days:,.{0 if days >= 100 else 2}f} GPU-days")


def finished_run(path):
    try:
        return read_run(path)
    except UserError:
        return None


def cmd_sweep(cfg, argv):
    """Every budget x shape as its own train.py run, stopped by --max_flops, then Approach 2 on the results.
    Runs that finished are kept, so rerunning the command resumes a sweep (delete sweep_dir to start over)."""
    if cfg.plot:
        configurator.check_writable(cfg.plot, "plot")
    passthrough = prepare_for_sweep(argv, ScalingConfig, cfg.json)
    # sweep defaults first, so that the user's own keys (a config file, --learning_rate=...) override them;
    # one evaluation at the end (eval_interval beyond any run), short warmup for runs of a few hundred steps
    defaults = ["--sample_tokens=0", "--eval_interval=1000000", "--log_interval=50", "--warmup_iters=20"]
    grid = {os.path.join(cfg.sweep_dir, f"C{c:.0e}_L{layers}_E{width}"): (float(c), layers, width)
             for c in cfg.budgets for layers, width in cfg.shapes}
    runs = {run_dir: [*defaults, *passthrough, f"--max_flops={c}", "--max_iters=0", f"--n_layer={layers}",
                      f"--n_embd={width}"] for run_dir, (c, layers, width) in grid.items()}
    flops = {run_dir: c for run_dir, (c, _, _) in grid.items()}
    todo = {out: args for out, args in runs.items() if finished_run(out) is None}
    out = sys.stderr if cfg.json else sys.stdout  # with --json, stdout holds the JSON alone
    print(f"sweep: {len(runs)} runs in {cfg.sweep_dir} ({len(runs) - len(todo)} already done)", file=out)
    start, done_flops, left_flops, count = time.time(), 0.0, sum(flops[run] for run in todo), len(runs) - len(todo)
    for run_dir, returncode in train_runs(todo, cfg.jobs):
        if returncode:
            raise UserError(f"train.py failed for {run_dir}: see {run_dir}/train.log")
        done_flops += flops[run_dir]
        count += 1
        left = (time.time() - start) / done_flops * (left_flops - done_flops)
        print(f"[{count}/{len(runs)}] {run_dir}: val loss {read_run(run_dir)['loss']:.4f}; "
              f"{time.time() - start:.0f} s, about {left / 60:.1f} min left", file=out, flush=True)
    cfg.plot = cfg.plot or os.path.join(cfg.sweep_dir, "isoflop.png")
    return cmd_isoflop(cfg, list(runs))


def prepare_for_sweep(argv, own_config, quiet):
    """Run prepare.py with the arguments that are not the sweep's own (they go on to every train.py run, which
    reads the same keys: a config file, --dataset=...); returns those arguments."""
    own = set(own_config.__dataclass_fields__)
    passthrough = [a for a in argv if a.endswith(".py") or a[2:].partition("=")[0].replace("-", "_") not in own]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *passthrough],
                          stdout=sys.stderr if quiet else None)
    if done.returncode:
        raise UserError("prepare.py failed (see above); the sweep trains on the data it writes")
    return passthrough


def train_runs(runs, jobs=0):
    """Train each {run_dir: [train.py arguments]} as a train.py process of its own, `jobs` at a time (0: one per CPU
    core without a GPU, one with it), its output in run_dir/train.log; yields (run_dir, exit status) as each ends.
    A run left unfinished by an interrupted sweep starts over (--overwrite)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch
    gpu = torch.cuda.is_available()
    jobs = jobs or (1 if gpu else len(os.sched_getaffinity(0)))
    env = dict(os.environ)
    if not gpu:  # one thread per run: at these sizes runs sharing the cores with more threads ran several times slower
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // jobs)))

    def train_one(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        command = [sys.executable, os.path.join(ROOT, "train.py"), *runs[run_dir], f"--out_dir={run_dir}", "--overwrite=True"]
        with open(os.path.join(run_dir, "train.log"), "w") as f:
            return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode

    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(train_one, run_dir): run_dir for run_dir in runs}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:  # a failed run, or a failure reading one, stops the queue: only the runs in flight finish
            pool.shutdown(cancel_futures=True)


def cmd_plan(cfg, argv):
    """GPUs x hours (or dollars) -> FLOPs at an assumed MFU -> compute-optimal N and D under a law -> a model
    shape, batch and learning rate -> a config file for train.py, stopped by that FLOP budget."""
    import torch
    import train
    from model import GPT, GPTConfig
    for key in ("hours", "dollars", "price_per_gpu_hour"):
        if not 0 <= getattr(cfg, key) < math.inf:
            raise UserError(f"--{key} must be a finite number, at least 0, got {getattr(cfg, key)}")
    configurator.check_at_least(cfg, gpus=1, plan_block_size=1)
    if not 0 <= cfg.mfu <= 1:
        raise UserError(f"--mfu is a fraction of the peak, from 0 (the default, 0.4) to 1, got {cfg.mfu}")
    configurator.check_writable(cfg.plan_out, "plan_out")
    hours = cfg.hours or (cfg.dollars / (cfg.price_per_gpu_hour * cfg.gpus) if cfg.dollars and cfg.price_per_gpu_hour else 0)
    if not hours:
        raise UserError("give --hours, or --dollars with --price_per_gpu_hour")
    overrides = configurator.parse(argv, train.TrainConfig, GPTConfig)
    train_cfg = configurator.build(train.TrainConfig, overrides)
    vocab, vocab_source = planned_vocab(train_cfg, overrides)
    mfu = cfg.mfu or 0.4  # what a well-tuned small-model run reaches on A100/H100-class GPUs; measure yours with `mfu`
    flops = cfg.gpus * gpu_peak_tflops(cfg.gpu, train_cfg.peak_tflops) * 1e12 * mfu * hours * 3600
    if cfg.law == "approach1":
        raise UserError("plan needs a law that predicts loss: --law=chinchilla, epoch or a JSON file from `fit --law_out`")
    law = resolve_law(cfg.law)
    G, a = optimal_split(law)
    n_opt = G * (flops / 6) ** a
    mup = transferred_mup(overrides)
    overrides = {**overrides, **mup}
    # Shape: nanochat's single dial, width = 64 x depth with 64-wide heads; the blocks hold about 12 L d^2 =
    # 49,152 L^3 parameters, so L follows from N. The head counts too, so the depths around that are counted.
    def shaped(depth):
        shape = dict(n_layer=depth, n_embd=64 * depth, n_head=depth, block_size=cfg.plan_block_size)
        with torch.device("meta"):
            return shape, GPT(train.build_model_config(train_cfg, {**overrides, **shape}, vocab))
    guess = max(1, round((n_opt / 49152) ** (1 / 3)))
    candidates = [shaped(depth) for depth in range(max(1, guess - 3), guess + 2)]
    shape, model = min(candidates, key=lambda c: abs(math.log(c[1].param_counts()["active_non_embedding"] / n_opt)))
    depth, n, per_token = shape["n_layer"], model.param_counts()["active_non_embedding"], model.flops_per_token()
    tokens = flops / per_token
    # DeepSeek LLM's fits of the best batch (tokens) and AdamW learning rate against compute (arXiv:2401.02954, eq. 1)
    micro = cfg.plan_block_size * min(16, max(1, int(0.292 * flops ** 0.3271) // cfg.plan_block_size)) * cfg.gpus
    batch_tokens = max(1, round(0.292 * flops ** 0.3271 / micro)) * micro
    learning_rate = train_cfg.learning_rate if mup else 0.3118 * flops ** -0.125
    steps = int(tokens // batch_tokens)
    result = dict(hours=hours, flops=flops, mfu=mfu, law=cfg.law, vocab_size=vocab, vocab_source=vocab_source,
                  N_opt=n_opt, N=n, tokens=tokens, steps=steps,
                  batch_tokens=batch_tokens, learning_rate=learning_rate, shape=shape, mup=mup,
                  expected_loss=predicted_loss(law, n, tokens), config=cfg.plan_out)
    from runtime import write_atomically
    settings = {**shape, "batch_size": micro // cfg.plan_block_size // cfg.gpus, "batch_tokens": batch_tokens,
                "learning_rate": float(f"{learning_rate:.3g}"), "warmup_iters": max(1, min(1000, steps // 20)),
                "max_iters": 0, "max_tokens": 0, "max_flops": float(f"{flops:.4g}"), **mup}
    write_atomically(cfg.plan_out, f"# written by: python scaling.py plan {' '.join(argv)}\n"
                     f"# vocabulary {vocab:,} from {vocab_source}\n"
                     f"# {cfg.gpus} x {cfg.gpu or 'GPU'} for {hours:g} h at {100 * mfu:.0f}% MFU = {flops:.3g} FLOPs; "
                     f"law {cfg.law}: N_opt {n_opt:.3g}, this shape N = {n:,} active non-embedding parameters, "
                     f"{tokens:.3g} tokens, expected loss {result['expected_loss']:.3f} (in the law's data and tokenizer)\n"
                     f"# combine with a data recipe: python train.py config/gpt_51m.py {cfg.plan_out}\n"
                     + "".join(f"{key} = {value!r}\n" for key, value in settings.items()))
    if cfg.json:
        return result
    print(f"{cfg.gpus} x {cfg.gpu or 'GPU'} for {hours:g} h at {100 * mfu:.0f}% MFU: {flops:.3g} FLOPs")
    print(f"vocabulary {vocab:,} from {vocab_source} (--vocab_size or --dataset to plan for another)")
    print(f"compute-optimal under {cfg.law}: N {n_opt:.3g}; chosen {depth} layers x {64 * depth} wide = {n:,} parameters, "
          f"{tokens:.3g} tokens ({tokens / n:.0f} per parameter), {steps:,} steps of {batch_tokens:,} tokens, "
          f"lr {learning_rate:.3g}{mup_note(mup, shape)}; expected loss {result['expected_loss']:.3f}")
    print(f"wrote {cfg.plan_out}")


def transferred_mup(overrides):
    """With --mup=True the plan keeps the learning rate given (tuned on the muP proxy of width mup_base_width, e.g.
    by mup.py sweep) instead of DeepSeek's fit, and the proxy's head dimension, since the plan's heads are 64 wide.
    muP transfers across width; the batch and the length of training still come from the fits above."""
    import train
    if not overrides.get("mup"):
        return {}
    if "learning_rate" not in overrides or not overrides.get("mup_base_width"):
        raise UserError("--mup=True plans with what a muP proxy was tuned at: give --mup_base_width (its n_embd) and "
                        "--learning_rate (its best, e.g. from python mup.py sweep)")
    base_width, heads = overrides["mup_base_width"], overrides.get("n_head", train.DEFAULT_MODEL["n_head"])
    if not overrides.get("mup_base_head_dim") and base_width % heads:
        raise UserError(f"--mup_base_width={base_width} is no multiple of the proxy's n_head ({heads}): "
                        "give --mup_base_head_dim")
    return dict(mup=True, mup_base_width=base_width, mup_base_head_dim=overrides.get("mup_base_head_dim") or base_width // heads)


def mup_note(mup, shape):
    if not mup:
        return ""
    return f" tuned at width {mup['mup_base_width']} under muP (hidden matrices at lr x {mup['mup_base_width']}/{shape['n_embd']})"


COMMANDS = dict(fit=cmd_fit, isoflop=cmd_isoflop, sweep=cmd_sweep, table=cmd_table, mfu=cmd_mfu, plan=cmd_plan)


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"first argument must be a subcommand: {', '.join(COMMANDS)} (see the top of scaling.py)")
    command, args = argv[0], argv[1:]
    paths = [a for a in args if not a.startswith("--") and not a.endswith(".py")]
    options = [a for a in args if a not in paths]
    if paths and command not in ("fit", "isoflop"):
        raise UserError(f"{command} takes no input files, got {paths[0]!r}; set options as --key=value")
    cfg = configurator.build(ScalingConfig, configurator.parse(options, ScalingConfig))
    result = COMMANDS[command](cfg, paths if command in ("fit", "isoflop") else options)
    if cfg.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    configurator.run_script(main)
