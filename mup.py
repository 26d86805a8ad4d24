"""muP in practice: check the parametrization, then see the best learning rate stay put.

    python mup.py coord    # coordinate check: each layer's activations after a few steps, by width
    python mup.py sweep    # learning rate x width, standard and muP, each a train.py run
    python train.py --mup=True --mup_base_width=64 --n_embd=1024 --learning_rate=<best at 64>

The rules live in model.py and recipe.py; this file measures them, as Tensor Programs V does (Yang
et al. 2022, arXiv:2203.03466). train.py's keys (--preset=modern, --dataset=...) go to the models.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import report
import torch

from configurator import UserError
from data import TokenData
from files import locked_folder, read_log
from model import GPT, GPTConfig
from recipe import make_optimizers, model_config
from runtime import pick_device
from train import TrainConfig

# Small proxies: 2 layers and 4 heads at every width, so that the head dimension grows with the
# width as model.py's muP attention scale expects
PROXY = dict(n_layer=2, n_head=4, block_size=64, batch_size=16, max_iters=300, warmup_iters=30,
             grad_clip=0.0, weight_decay=0.0, eval_interval=1_000_000, eval_iters=20,
             log_interval=50, sample_tokens=0)


@dataclass
class MupConfig:
    json: bool = False          # print one JSON object instead of text
    base_width: int = 64        # every muP model's mup_base_width: where its rate is tuned
    # coord: coord_steps AdamW steps at coord_lr on the same batches at every width
    coord_widths: list = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    coord_steps: int = 4
    coord_lr: float = 1e-2
    coord_plot: str = "out-mup/mup_coord.png"
    # sweep: every width x learning rate x parametrization is a train.py run of PROXY's steps
    widths: list = field(default_factory=lambda: [64, 128, 256, 512])
    learning_rates: list = field(default_factory=lambda: [2.0 ** -k for k in range(12, 2, -1)])
    sweep_dir: str = "out-mup"  # and its mup_sweep.png

    def __post_init__(self):
        if not (self.base_width >= 1 and self.coord_steps >= 1 and self.coord_widths
                and self.widths and self.learning_rates and min(self.learning_rates) > 0):
            raise ValueError("base_width and coord_steps must be at least 1; coord_widths, widths "
                             "and learning_rates must be non-empty lists of positive numbers")


def cmd_coord(cfg, argv):
    """Tensor Programs V's coordinate check: a few Adam steps make the standard parametrization's
    logits and attention outputs grow with width; under muP each layer's typical entry stays put."""
    if cfg.coord_plot == MupConfig.coord_plot:
        os.makedirs(os.path.dirname(cfg.coord_plot), exist_ok=True)
    configurator.check_writable(cfg.coord_plot, "coord_plot")
    overrides = configurator.parse(argv, TrainConfig, GPTConfig)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_cfg = configurator.build(TrainConfig, overrides, learning_rate=cfg.coord_lr,
                                   **{k: v for k, v in PROXY.items() if k in train_names})
    data, device = TokenData(train_cfg.dataset), pick_device(train_cfg.device)
    result = dict(widths=cfg.coord_widths, steps=cfg.coord_steps, learning_rate=cfg.coord_lr)
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    for name, mup in (("standard", False), ("mup", True)):
        sizes = []
        for width in cfg.coord_widths:
            shape = {k: v for k, v in {**PROXY, **overrides}.items() if k in model_keys}
            shape.update(n_embd=width, mup=mup, mup_base_width=cfg.base_width if mup else 0)
            sizes.append(coordinates(model_config(train_cfg, shape, data.vocab_size), train_cfg,
                                     data, cfg.coord_steps, device))
        result[name] = {layer: [s[layer] for s in sizes] for layer in sizes[0]}
        result[name + "_spread"] = {layer: max(v) / min(v) for layer, v in result[name].items()}
    report.draw_panels(cfg.coord_plot, "width (n_embd)", "mean |x| of the layer's output",
         lambda name: ((cfg.coord_widths, y, layer, None) for layer, y in result[name].items()))
    if cfg.json:
        return result
    print(f"spread of mean |x| (largest / smallest over widths {cfg.coord_widths}) after "
          f"{cfg.coord_steps} steps:\n" + "\n".join(
              f"  {layer:12s} standard {result['standard_spread'][layer]:7.2f}  muP "
              f"{result['mup_spread'][layer]:5.2f}" for layer in result["standard"]))


def coordinates(model_cfg, train_cfg, data, steps, device):
    """Mean |x| of the embeddings', each attention's and MLP's output and the logits, after `steps`
    optimizer steps on the same batches at every width."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(device)
    optimizers = make_optimizers(model, train_cfg, device, torch.float32)
    watched = {"embeddings": model.transformer.drop, **{
        f"{kind} {i}": getattr(block, part) for i, block in enumerate(model.transformer.h)
        for kind, part in (("attention", "attn"), ("mlp", "mlp"))}}
    seen = {}
    for name, module in watched.items():
        module.register_forward_hook(
            lambda _, __, out, name=name: seen.__setitem__(name, out.abs().mean().item()))
    batches = torch.Generator().manual_seed(train_cfg.seed)
    for step in range(steps + 1):
        offsets = torch.randint(data.positions("train", model_cfg.block_size),
                                (train_cfg.batch_size,), generator=batches)
        x, y = (t.to(device) for t in data.batch("train", offsets, model_cfg.block_size))
        logits, loss = model(x, y)
        if step == steps:
            break
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {**seen, "logits": logits.abs().mean().item()}


def cmd_sweep(cfg, argv):
    """Each width x rate x parametrization as train.main in this process, its output in its run's
    train.log. Finished and diverged runs are kept: rerunning resumes the sweep."""
    import prepare
    import train
    plot = os.path.join(cfg.sweep_dir, "mup_sweep.png")
    out = sys.stderr if cfg.json else sys.stdout
    own = set(MupConfig.__dataclass_fields__)  # the other keys go to prepare.py and train.py
    passthrough = [a for a in argv if a.endswith(".py") or a[2:].split("=")[0] not in own]
    grid = {(name, w, lr): os.path.join(cfg.sweep_dir, f"{name}_E{w}_lr{lr:.3g}")
            for name in ("standard", "mup") for w in cfg.widths for lr in cfg.learning_rates}
    losses = {key: final_loss(run) for key, run in grid.items()}
    print(f"sweep: {len(grid)} runs in {cfg.sweep_dir} "
          f"({sum(v is not None for v in losses.values())} already done)", file=out, flush=True)
    for key in (key for key in grid if losses[key] is None):
        with locked_folder(grid[key], "mup.py"):  # a live train.py is refused before its log
            pass
    with contextlib.redirect_stdout(out):
        prepare.main(passthrough)
    for (name, w, lr), run in grid.items():
        if losses[name, w, lr] is not None:
            continue
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "train.log"), "w") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train.main([*(f"--{k}={v}" for k, v in PROXY.items()), *passthrough,
                            f"--n_embd={w}", f"--learning_rate={lr}", f"--mup={name == 'mup'}",
                            f"--mup_base_width={cfg.base_width}", f"--out_dir={run}",
                            "--overwrite=True"])
            except UserError as e:
                print(f"error: {e}")
                if "diverged" not in str(e):
                    raise UserError(f"train.py failed for {run}: {e}") from None
        losses[name, w, lr] = final_loss(run)
        print(f"{run}: val loss {losses[name, w, lr]:.4f}", file=out, flush=True)
    rates = sorted(cfg.learning_rates)
    result = dict(widths=cfg.widths, base_width=cfg.base_width, learning_rates=rates)
    for name in ("standard", "mup"):
        curves = {str(w): [losses[name, w, lr] for lr in rates] for w in cfg.widths}
        best = {w: dict(lr=rates[int(np.argmin(c))], loss=min(c)) for w, c in curves.items()}
        moved = best[str(cfg.widths[-1])]["lr"] / best[str(cfg.widths[0])]["lr"]
        result[name] = dict(curves=curves, best=best, moved=moved)
    report.draw_panels(plot, "learning rate (AdamW peak)", "final validation loss",
         lambda name: ((rates, np.array(result[name]["curves"][str(w)]), f"width {w}",
                        result[name]["best"][str(w)]) for w in cfg.widths))
    if cfg.json:
        return result
    print("best learning rate by width (val loss); a diverged run counts as inf:")
    for name in ("standard", "mup"):
        best = result[name]["best"]
        print(f"  {name:8s} " + "  ".join(f"{w}: {best[w]['lr']:.3g} ({best[w]['loss']:.4f})"
                                          for w in best) + f"  -> x{result[name]['moved']:g}")


def final_loss(run):
    """The run's last validation loss: inf when train.py stopped it as diverged, None unfinished."""
    log = os.path.join(run, "train.log")
    if os.path.exists(log) and "training diverged" in open(log, errors="replace").read():
        return math.inf
    try:
        return [r["val_loss"] for r in read_log(run) if "val_loss" in r and r["tokens"] > 0][-1]
    except (OSError, IndexError, ValueError):
        return None


def main(argv):
    commands = dict(coord=cmd_coord, sweep=cmd_sweep)
    if not argv or argv[0] not in commands:
        raise UserError("first argument must be a subcommand: coord or sweep (see mup.py's top)")
    cfg = configurator.build(MupConfig, configurator.parse(argv[1:], MupConfig))
    result = commands[argv[0]](cfg, argv[1:])  # the options not MupConfig's go to the models
    if cfg.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    configurator.run_script(main)
