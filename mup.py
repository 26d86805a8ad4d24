"""muP in practice: check the parametrization, then see the best learning rate stay put as the model widens.

    python mup.py coord                  # coordinate check: each layer's activations after a few steps, by width
    python mup.py sweep                  # learning rate x width, standard and muP, each a train.py run
    python train.py --mup=True --mup_base_width=64 --n_embd=1024 --learning_rate=<the best at width 64>

muP's rules live in model.py (the table above GPT) and train.py's make_optimizers; this file measures them.
The coordinate check is Tensor Programs V's (Yang et al. 2022, arXiv:2203.03466): under the standard
parametrization a few Adam steps make the logits and the attention outputs grow with width; under muP every
layer's typical entry stays the same size. The sweep shows what that buys: a learning rate tuned on the
narrow model is the best one on the wide model too. Keys of train.py (--preset=modern, --optimizer=muon,
--dataset=..., --batch_size=...) go to the models; the sweep runs prepare.py first, as scaling.py sweep does.
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import torch

import train
from configurator import UserError
from model import GPT, GPTConfig
from runtime import pick_device, replace_atomically
from scaling import finished_run, prepare_for_sweep, train_runs

# The small proxies: 2 layers, and 4 heads at every width, so that the head dimension grows with the width
# as model.py's muP attention scale expects. One run of 300 steps at width 512 takes about a minute on one CPU core.
PROXY = dict(n_layer=2, n_head=4, block_size=64, batch_size=16, max_iters=300, warmup_iters=30, grad_clip=0.0,
             weight_decay=0.0, eval_interval=1_000_000, eval_iters=20, log_interval=50, sample_tokens=0)


@dataclass
class MupConfig:
    json: bool = False                # print one JSON object instead of text
    base_width: int = 64              # every muP model's mup_base_width: the width its learning rate is tuned at
    # coord: coord_steps AdamW steps at coord_lr on the same batches at every width, then each layer's mean |x|
    coord_widths: list = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    coord_steps: int = 4
    coord_lr: float = 1e-2
    coord_plot: str = "mup_coord.png"
    # sweep: every width x learning rate x parametrization is a train.py run of PROXY's steps and tokens
    widths: list = field(default_factory=lambda: [64, 128, 256, 512])
    learning_rates: list = field(default_factory=lambda: [2.0 ** -k for k in range(12, 2, -1)])  # 2^-12 .. 2^-3
    sweep_dir: str = "out-mup"
    sweep_plot: str = ""              # default <sweep_dir>/mup_sweep.png
    jobs: int = 0                     # train.py runs at once; 0 = one per CPU core without a GPU


# ----------------------------------------------------------------------------- coordinate check

def cmd_coord(cfg, argv):
    configurator.check_writable(cfg.coord_plot, "coord_plot")
    overrides = configurator.parse(argv, train.TrainConfig, GPTConfig)
    train_cfg = configurator.build(train.TrainConfig, overrides, **proxy_of(train.TrainConfig), learning_rate=cfg.coord_lr)
    data, device = train.TokenData(train_cfg.dataset), pick_device(train_cfg.device)
    result = dict(widths=cfg.coord_widths, steps=cfg.coord_steps, learning_rate=train_cfg.learning_rate)
    for name, mup in (("standard", False), ("mup", True)):
        sizes = [coordinates(model_config(train_cfg, overrides, data, width, mup, cfg.base_width), train_cfg, data,
                             cfg.coord_steps, device)[-1] for width in cfg.coord_widths]
        result[name] = {layer: [s[layer] for s in sizes] for layer in sizes[0]}
        result[name + "_spread"] = {layer: max(v) / min(v) for layer, v in result[name].items()}
    save_plot(cfg.coord_plot, lambda file: plot_coordinates(result, file))
    if cfg.json:
        return result
    print(f"mean |x| of each layer's output after {cfg.coord_steps} steps at lr {train_cfg.learning_rate:g}, "
          f"widths {', '.join(map(str, cfg.coord_widths))}; spread = largest / smallest over the widths")
    for layer in result["standard"]:
        print(f"  {layer:12s} standard {fmt(result['standard'][layer])}  spread {result['standard_spread'][layer]:7.2f}"
              f"  |  muP {fmt(result['mup'][layer])}  spread {result['mup_spread'][layer]:5.2f}")
    print(f"wrote {cfg.coord_plot}")


def proxy_of(config_class):
    return {k: v for k, v in PROXY.items() if k in {f.name for f in dataclasses.fields(config_class)}}


def model_config(train_cfg, overrides, data, width, mup, base_width):
    shape = {**proxy_of(GPTConfig), **overrides, "n_embd": width, "mup": mup, "mup_base_width": base_width if mup else 0}
    return train.build_model_config(train_cfg, shape, data.vocab_size)


def coordinates(model_cfg, train_cfg, data, steps, device):
    """Mean |x| of the embeddings', every attention's and MLP's output and the logits, at each of steps + 1 forward
    passes with an optimizer step between them: index t is after t steps. The batches are the same at every width."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(device)
    optimizers = train.make_optimizers(model, train_cfg, device)
    watched = {"embeddings": model.transformer.drop}
    for i, block in enumerate(model.transformer.h):
        watched.update({f"attention {i}": block.attn, f"mlp {i}": block.mlp})
    seen = {}
    hooks = [module.register_forward_hook(lambda _, __, out, name=name: seen.__setitem__(name, out.abs().mean().item()))
             for name, module in watched.items()]
    batches, history = torch.Generator().manual_seed(train_cfg.seed), []
    for _ in range(steps + 1):
        offsets = torch.randint(data.positions("train", model_cfg.block_size), (train_cfg.batch_size,), generator=batches)
        x, y = (t.to(device) for t in data.batch("train", offsets, model_cfg.block_size))
        logits, loss = model(x, y)
        history.append({**seen, "logits": logits.abs().mean().item()})
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return history


def plot_coordinates(result, file):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, panels = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for panel, (name, title) in zip(panels, (("standard", "standard parametrization"), ("mup", "muP"))):
        for layer, sizes in result[name].items():
            panel.plot(result["widths"], sizes, marker="o", label=layer)
        panel.set(xscale="log", yscale="log", xlabel="width (n_embd)", title=f"{title}, after {result['steps']} steps")
    panels[0].set_ylabel("mean |x| of the layer's output")
    panels[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- learning-rate sweep

def cmd_sweep(cfg, argv):
    if cfg.sweep_plot:
        configurator.check_writable(cfg.sweep_plot, "sweep_plot")
    os.makedirs(cfg.sweep_dir, exist_ok=True)
    plot = cfg.sweep_plot or os.path.join(cfg.sweep_dir, "mup_sweep.png")
    passthrough = prepare_for_sweep(argv, MupConfig, cfg.json)
    out = sys.stderr if cfg.json else sys.stdout
    grid = {os.path.join(cfg.sweep_dir, f"{name}_E{width}_lr{lr:.3g}"): (name, width, lr)
            for name in ("standard", "mup") for width in cfg.widths for lr in cfg.learning_rates}
    runs = {run_dir: [*(f"--{k}={v}" for k, v in PROXY.items()), *passthrough, f"--n_embd={width}",
                      f"--learning_rate={lr}", f"--mup={name == 'mup'}", f"--mup_base_width={cfg.base_width}"]
            for run_dir, (name, width, lr) in grid.items()}
    todo = {run_dir: args for run_dir, args in runs.items() if finished_run(run_dir) is None and not diverged(run_dir)}
    print(f"sweep: {len(runs)} runs in {cfg.sweep_dir} ({len(runs) - len(todo)} already done)", file=out, flush=True)
    for count, (run_dir, returncode) in enumerate(train_runs(todo, cfg.jobs), len(runs) - len(todo) + 1):
        if returncode and not diverged(run_dir):
            raise UserError(f"train.py failed for {run_dir}: see {run_dir}/train.log")
        print(f"[{count}/{len(runs)}] {run_dir}: val loss {final_loss(run_dir):.4f}", file=out, flush=True)
    result = best_rates(cfg, {key: final_loss(run_dir) for run_dir, key in grid.items()})
    save_plot(plot, lambda file: plot_sweep(result, file))
    if cfg.json:
        return result
    print("best learning rate by width (val loss); a diverged run counts as inf:")
    for name in ("standard", "mup"):
        best = result[name]["best"]
        print(f"  {name:8s} " + "  ".join(f"{w}: {best[str(w)]['lr']:.3g} ({best[str(w)]['loss']:.4f})" for w in cfg.widths)
              + f"  -> x{result[name]['moved']:g} from width {cfg.widths[0]} to {cfg.widths[-1]}")
    print(f"wrote {plot}")


def diverged(run_dir):
    """Whether train.py stopped this run because its loss stayed non-finite (a learning rate too high)."""
    log = os.path.join(run_dir, "train.log")
    return os.path.exists(log) and "training diverged" in open(log, errors="replace").read()


def final_loss(run_dir):
    return math.inf if diverged(run_dir) else finished_run(run_dir)["loss"]


def best_rates(cfg, losses):
    """The loss curves and, per parametrization and width, the best learning rate of the grid; by what factor the
    best moved from the narrowest to the widest model."""
    rates = sorted(cfg.learning_rates)
    result = dict(widths=cfg.widths, learning_rates=rates, base_width=cfg.base_width)
    for name in ("standard", "mup"):
        curves = {str(w): [losses[(name, w, lr)] for lr in rates] for w in cfg.widths}
        best = {w: dict(lr=rates[int(np.argmin(c))], loss=min(c)) for w, c in curves.items()}
        moved = best[str(cfg.widths[-1])]["lr"] / best[str(cfg.widths[0])]["lr"]
        result[name] = dict(curves=curves, best=best, moved=moved)
    return result


def plot_sweep(result, file):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, panels = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result["widths"])))
    for panel, (name, title) in zip(panels, (("standard", "standard parametrization"), ("mup", "muP"))):
        for width, color in zip(result["widths"], colors):
            losses = np.array(result[name]["curves"][str(width)])
            panel.plot(result["learning_rates"], np.where(np.isfinite(losses), losses, np.nan), marker="o",
                       color=color, label=f"width {width}")
            best = result[name]["best"][str(width)]
            panel.scatter([best["lr"]], [best["loss"]], color=color, marker="*", s=150, edgecolor="k", zorder=3)
        panel.set(xscale="log", xlabel="learning rate (AdamW peak)", title=title)
    panels[0].set_ylabel("final validation loss")
    panels[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- shared

def fmt(values):
    return " ".join(f"{v:8.3g}" for v in values)


def save_plot(path, draw):
    """draw(file) into a temporary file renamed onto `path`: an earlier plot is never left half-written."""
    replace_atomically(path, draw, "wb")


COMMANDS = dict(coord=cmd_coord, sweep=cmd_sweep)


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"first argument must be a subcommand: {', '.join(COMMANDS)} (see the top of mup.py)")
    options = argv[1:]
    cfg = configurator.build(MupConfig, configurator.parse(options, MupConfig))
    configurator.check_at_least(cfg, base_width=1, coord_steps=1, jobs=0)
    if not cfg.coord_widths or not cfg.widths or not cfg.learning_rates or min(cfg.learning_rates) <= 0:
        raise UserError("coord_widths, widths and learning_rates must be non-empty lists of positive numbers")
    result = COMMANDS[argv[0]](cfg, options)  # the options that are not MupConfig's go to the models
    if cfg.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    configurator.run_script(main)
