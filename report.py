"""A run's report: loss.png (its curves) and report.md (one page: what it was and what it reached),
drawn from out_dir/log.jsonl and its checkpoint alone, so any run, old or unfinished, can be drawn
again. train.py and sft.py write it at the end of every run. Every figure of the project is drawn
here: scaling.py's isoFLOP profiles and mup.py's panels too.

    python report.py --out_dir=out
"""

import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
from configurator import UserError
from files import replace_atomically, write_atomically

PLOT_SIZE = (8, 4.5)   # inches, at 100 dpi: an 800 x 450 PNG
PLOT_POINTS = 2000     # training points drawn at most: a long log is thinned, evenly


@dataclass
class ReportConfig:
    out_dir: str = "out"


def main(argv):
    cfg = configurator.build(ReportConfig, configurator.parse(argv, ReportConfig))
    if not os.path.isfile(os.path.join(cfg.out_dir, "log.jsonl")):
        raise UserError(f"{cfg.out_dir} has no log.jsonl: give the out_dir of a train.py or "
                        "sft.py run")
    write_report(cfg.out_dir)


def write_report(out_dir, say=print, samples=True):
    """loss.png and report.md in out_dir. What cannot be drawn (no matplotlib, no checkpoint yet)
    is said in one line of the report; a failure to write them is one line here, never a crash."""
    start = time.perf_counter()
    try:
        log = read_for_report(out_dir)
        checkpoint, info = newest_checkpoint(out_dir)
        summary = summarize(log)
        plot = draw_loss(log, os.path.join(out_dir, "loss.png"), summary,
                         sft="sft" in (checkpoint or {}))
        seconds = time.perf_counter() - start  # the samples that follow run the model: not counted
        texts = sample_texts(out_dir, checkpoint) if samples and checkpoint else []
        page = markdown(out_dir, summary, info, plot, texts)
        write_atomically(os.path.join(out_dir, "report.md"), page)
    except Exception as e:  # the run itself is done and saved: a report is never worth a crash
        say(f"report not written: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return
    curves = f", curves: {out_dir}/loss.png" if plot is None else f" ({plot})"
    say(f"report: {out_dir}/report.md{curves} (read and drawn in {seconds:.2f} s)")


def newest_checkpoint(out_dir):
    """(best.pt, or else ckpt.pt, as a dict or None) and what the run recorded of itself: the
    checkpoint's "run" entry, or config.json's."""
    checkpoint = None
    for name in ("best.pt", "ckpt.pt"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            import torch
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            break
    info = (checkpoint or {}).get("run")
    if info is None and os.path.isfile(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            info = json.load(f)
    return checkpoint, info or {}


def read_for_report(out_dir):
    """What the report needs of log.jsonl (the format in DESIGN.md; a torn last line is skipped):
    every evaluation and skipped step, the last line, an even sample of PLOT_POINTS training lines,
    and the speed and MFU of every step. json.loads of each of 100k lines takes 0.6 s, most of
    the report's second, so the per-step fields are read by their pattern in json.dumps' output."""
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    text, every = "".join(lines), math.ceil(len(lines) / PLOT_POINTS) or 1
    number = r'": (-?[0-9.]+(?:e[-+][0-9]+)?)'
    return dict(
        evals=[json.loads(line) for line in lines if '"val_loss"' in line],
        trains=[r for r in map(json.loads, lines[::every]) if r.get("train_loss") is not None],
        last=json.loads(lines[-1]) if lines else {},
        last_train=next((r for r in map(json.loads, reversed(lines))
                         if r.get("train_loss") is not None), {}),
        skipped=sum('"skipped"' in line for line in lines),
        **{key: [float(v) for v in re.findall(f'"{key}{number}', text)]
           for key in ("tok_per_sec", "mfu")})


def summarize(log):
    """The run's figures, every one from log.jsonl (the last line's counts cover every segment of a
    resumed run: its lines up to the checkpoint are kept, the rest trained again)."""
    evals, last = log["evals"], log["last"]
    summary = dict(steps=last.get("step", 0), tokens=last.get("tokens", 0),
                   flops=last.get("flops", 0.0), seconds=last.get("elapsed", 0.0),
                   skipped=log["skipped"], evaluations=len(evals),
                   train_loss=log["last_train"].get("train_loss"))
    if summary["seconds"]:
        summary["tok_per_sec"] = summary["tokens"] / summary["seconds"]
    speeds, mfus = [s for s in log["tok_per_sec"] if s], log["mfu"]
    summary["median_tok_per_sec"] = statistics.median(speeds) if speeds else None
    summary["median_mfu"] = statistics.median(mfus) if mfus else None
    if evals:
        summary.update(final=evals[-1], best=min(evals, key=lambda r: r["val_loss"]))
    if summary["tokens"] and summary["flops"]:
        summary["flops_per_token"] = summary["flops"] / summary["tokens"]
    return summary


def figure(panels=1, size=PLOT_SIZE, **options):
    """A matplotlib Figure of its own and its axes, not pyplot's (no window, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("drawing needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=size, dpi=100)
    return fig, fig.subplots(1, panels, **options)


def save(fig, path, dpi=100):
    fig.tight_layout()
    replace_atomically(path, lambda f: fig.savefig(f, dpi=dpi, format="png"), "wb")


def draw_loss(log, path, summary, sft=False):
    """The training and validation losses against tokens, the best evaluation starred; None once
    drawn, else why not (one line)."""
    try:
        fig, ax = figure()
    except UserError:
        return "no loss.png: pip install matplotlib to draw it"
    trains, evals = log["trains"], log["evals"]
    what = "loss on the assistant's tokens" if sft else "loss"
    ax.plot([r["tokens"] for r in trains], [r["train_loss"] for r in trains], lw=1,
            label=f"train {what}")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
            label=f"validation {what}")
    if "best" in summary:
        best = summary["best"]
        ax.plot([best["tokens"]], [best["val_loss"]], "*", ms=14, color="C3",
                label=f"best.pt: {best['val_loss']:.4f} at step {best['step']}")
    ax.set(xlabel="tokens seen", ylabel="loss (nats per token)", title=os.path.dirname(path) or ".")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
    return None


def draw_isoflop(result, path):
    """scaling.py's isoFLOP profiles (a parabola per budget, its least starred), N_opt against C."""
    import numpy as np
    from matplotlib import colormaps
    fig, (left, right) = figure(2, (11, 4.5))
    colors = colormaps["viridis"](np.linspace(0, 0.9, len(result["budgets"])))
    for b, color in zip(result["budgets"], colors):
        n = np.array(b["points"]["N"])
        x = np.linspace(np.log(n).min(), np.log(n).max(), 100)
        left.scatter(n, b["points"]["loss"], color=color, s=18)
        left.plot(np.exp(x), np.polyval(b["N_parabola"], x), color=color, label=f"C = {b['C']:.1e}")
        if b["N_inside"]:
            left.scatter(b["N_opt"], b["loss_opt"], color=color, marker="*", s=150, edgecolor="k")
    used = [b for b in result["budgets"] if b["N_inside"]]
    c, law = np.array([b["C"] for b in used]), result["power_laws"].get("N")
    right.scatter(c, [b["N_opt"] for b in used], label="N_opt")
    if law:
        line = np.geomspace(c.min() / 3, c.max() * 3, 50)
        right.plot(line, law["coefficient"] * line ** law["exponent"],
                   label=f"N_opt ∝ C^{law['exponent']:.2f}")
    left.set(xscale="log", xlabel="parameters N (non-embedding)", ylabel="validation loss",
             title="isoFLOP profiles")
    right.set(xlabel="training FLOPs C", ylabel="optimal N", title="no minimum inside the sizes")
    if used:  # log axes of no data fail
        right.set(xscale="log", yscale="log", title="compute-optimal size")
    for panel in (left, right) if used else (left,):
        panel.legend(fontsize=8)
    save(fig, path, dpi=120)


def draw_panels(path, xlabel, ylabel, lines):
    """mup.py's two panels, standard and muP: lines(name) yields (x, y, label, best or None)."""
    fig, panels = figure(2, (11, 4.5), sharey=True)
    for panel, name in zip(panels, ("standard", "mup")):
        for x, y, label, best in lines(name):
            drawn = panel.plot(x, y, marker="o", label=label)[0]
            if best:
                panel.scatter([best["lr"]], [best["loss"]], color=drawn.get_color(), marker="*",
                              s=150, edgecolor="k", zorder=3)
        panel.set(xscale="log", yscale="log", xlabel=xlabel, title=name)
    panels[0].set_ylabel(ylabel)
    panels[1].legend(fontsize=8)
    save(fig, path, dpi=120)


def isoflop_lines(result):
    """scaling.isoflop_fit's result in words: each budget's least, then N_opt against C."""
    lines = [f"C = {b['C']:.2e}: {b['runs']} runs, " + (
        f"N_opt = {b['N_opt']:.3g}, loss {b['loss_opt']:.4f}" if b["N_opt"] else "no minimum")
        + ("" if b["N_inside"] else " (outside the sizes: not used)") for b in result["budgets"]]
    for key, law in result["power_laws"].items():
        lines.append(f"{key}_opt = {law['coefficient']:.3g} * C^{law['exponent']:.3f}" + (
            "  95% CI [{:.3f}, {:.3f}]".format(*law["ci95"]) if "ci95" in law else ""))
    return lines + [f"no power law: {result['budgets_used']} budget(s) have their minimum inside "
                    "the sampled sizes, 2 are needed; widen or shift the sizes"] * (
                        not result["power_laws"])


def sweep_page(sweep_dir, command, plot, runs, points, isoflop, fit_lines, warnings):
    """scaling.py's sweep on one page: the figure, each run's N, D, C and loss, both fits."""
    return "\n".join([
        f"# isoFLOP sweep: {sweep_dir}", "", f"`python {' '.join(command)}`", "",
        f"![isoFLOP profiles]({os.path.relpath(plot, sweep_dir)})", "",
        "| run | N | D (tokens) | C (FLOPs) | val loss |", "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {os.path.basename(run)} | {points['N'][i]:,.0f} | {points['D'][i]:.3g} | "
          f"{points['C'][i]:.3g} | {points['loss'][i]:.4f} |" for i, run in enumerate(runs)),
        "", "## Approach 2: isoFLOP profiles", "", "```", *isoflop_lines(isoflop), "```", "",
        "## Approach 3: the parametric fit", "", "```", *fit_lines, "```", "",
        *(f"**Warning:** {note}\n" for note in warnings)])


def sample_texts(out_dir, checkpoint, count=2, tokens=100):
    """A few samples of the checkpoint, or for a fine-tuned one a short greedy chat."""
    import torch
    from checkpoint import build_model
    from engine import Chat, sample_text
    from tokenizer import load_tokenizer
    model = build_model(checkpoint, out_dir).eval()
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    template = checkpoint.get("chat_template")
    if template:
        chat = Chat(model, tokenizer, template)
        questions = ["Hello!", "Who are you?", "Add 2 and 3."]
        with torch.no_grad():
            return [f"> {q}\n{''.join(chat.respond(q, tokens, temperature=0))}" for q in questions]
    return [sample_text(model, tokenizer, [tokenizer.eot_id], tokens, seed,
                        vocab_size=tokenizer.vocab_size) for seed in range(count)]


def parameters(n):
    """The parameter counts that the run recorded (config.json's "parameters")."""
    if not n:
        return "n/a (not recorded: a run of older code)"
    active = f", {n['active']:,} active per token" if n["active"] != n["total"] else ""
    return f"{n['total']:,} ({n['non_embedding']:,} without the embeddings{active})"


def markdown(out_dir, summary, info, plot, samples):
    """report.md: the command, the model, what the run spent and reached, the machine, samples."""
    model, train = info.get("model", {}), info.get("train", {})
    fmt = lambda value, spec: "n/a" if value is None else format(value, spec)  # noqa: E731
    lines = [f"# {os.path.basename(os.path.abspath(out_dir))}", "",
             f"`{info.get('command', 'command not recorded (a run of older code)')}`", "",
             "![loss](loss.png)" if plot is None else f"*{plot}*", "", "| | |", "|---|---|"]
    rows = [("model", f"{model.get('n_layer', '?')} layers x {model.get('n_embd', '?')} wide, "
                      f"{model.get('pos_emb', '?')} positions, {model.get('mlp', '?')} MLP"
                      + (f", {model['moe_experts']} experts" if model.get("moe_experts") else "")),
            ("parameters", parameters(info.get("parameters"))),
            ("FLOPs per token", fmt(summary.get("flops_per_token"), ".4g")),
            ("steps", f"{summary['steps']:,}"
                      + (f" ({summary['skipped']} skipped)" if summary["skipped"] else "")),
            ("tokens seen", f"{summary['tokens']:,}"),
            ("FLOPs spent", fmt(summary["flops"], ".3g")),
            ("wall time", f"{summary['seconds']:.1f} s"),
            ("tokens/s", f"{fmt(summary.get('tok_per_sec'), ',.0f')} over the run, "
                         f"{fmt(summary['median_tok_per_sec'], ',.0f')} median while training"),
            ("MFU", "n/a (no known peak)" if summary["median_mfu"] is None else
             f"{100 * summary['median_mfu']:.1f}% median"),
            ("last training loss", fmt(summary["train_loss"], ".4f"))]
    evaluated = [(f"{key} validation", f"loss {r['val_loss']:.4f}, {r['val_bpb']:.4f} bits/byte "
                  f"(step {r['step']})") for key, r in summary.items() if key in ("final", "best")]
    rows += evaluated or [("validation", "no evaluation yet")]
    rows += [("machine", f"torch {info.get('torch', '?')}, {info.get('device', '?')}, "
                         f"{info.get('threads', '?')} threads, {info.get('dtype', '?')}"),
             ("settings", f"optimizer {train.get('optimizer', '?')}, "
                          f"lr {train.get('learning_rate', '?')}, "
                          f"batch {train.get('batch_size', '?')}, seed {train.get('seed', '?')}")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if samples:
        lines += ["", "## Samples", ""] + [f"```\n{s.strip()}\n```" for s in samples]
    lines += ["", "## Resolved config", "", "```json", json.dumps(train, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    configurator.run_script(main)
