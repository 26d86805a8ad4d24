"""Pretraining: the raw loop, from a laptop CPU to many GPUs.

    python train.py                                # a small model on Shakespeare: minutes on a CPU
    python train.py config/gpt_51m.py --max_iters=1000
    python train.py config/gpt_51m.py --resume     # go on exactly where out_dir/ckpt.pt stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt_350m.py

Reads data/<dataset>/ (prepare.py). Writes to out_dir: ckpt.pt (the latest), best.pt (the best
validation loss), config.json, log.jsonl, and at the end loss.png and report.md (report.py).
Read train() first: it is the algorithm. Run, after it, resolves every setting before anything is
written; the plumbing the loop calls by name comes last.
"""

import contextlib
import dataclasses
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch
import torch.distributed as dist
from torch import nn

import report
from checkpoint import (RunLog, build_model, load_init, load_resumed, restore_training,
                        save_checkpoint, training_snapshot)
from configurator import UserError
from data import TokenData
from engine import sample_text
from files import locked_folder
from model import GPT, GPTConfig
from recipe import batch_plan, budget_steps, make_optimizers, model_config, start_config
from runtime import (StopSignals, compile_wanted, distribute, end_process, gradient_sync,
                     mean_over_processes, mfu, peak_flops, precision, start_process, use_threads)


@dataclass
class TrainConfig:
    out_dir: str = "out"
    dataset: str = "shakespeare"    # reads data/<dataset>/, written by python prepare.py
    resume: bool = False            # continue from out_dir/ckpt.pt, exactly as if never stopped
    overwrite: bool = False         # start over in an out_dir that already holds a run
    init_from: str = ""             # start from these weights: a run directory or a .pt file
    preset: str = "classic"         # architecture from model.PRESETS; model keys override it
    vocab_multiple: int = 64        # pad the embedding table to a multiple of this (nanoGPT: 64)
    batch_size: int = 16            # sequences per micro-batch
    batch_tokens: int = 0           # per optimizer step, over all processes; 0 = one micro-batch
    # budgets, 0 = unset: the first one reached ends the run (an isoFLOP sweep sets max_flops)
    max_iters: int = 1500
    max_tokens: int = 0
    max_flops: float = 0.0
    optimizer: str = "adamw"        # "adamw", or "muon" for the hidden matrices, AdamW elsewhere
    learning_rate: float = 2e-3     # AdamW's peak
    muon_lr: float = 0.02           # Muon's peak (Keller Jordan's default)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0 = off
    lr_schedule: str = "cosine"     # "cosine": warmup, cosine decay; "wsd": warmup-stable-decay
    warmup_iters: int = 100
    min_lr_ratio: float = 0.1       # the schedule ends at this fraction of the peak
    decay_fraction: float = 0.2     # wsd: the last fraction of the budget decays linearly
    eval_interval: int = 250
    eval_iters: int = 20            # fixed validation batches, the same at every evaluation
    early_stop_patience: int = 0    # stop after this many evaluations without a new best; 0 = off
    target_loss: float = 0.0        # stop once the validation loss reaches this; 0 = off
    sample_tokens: int = 200        # a sample printed at each evaluation; 0 = off
    log_interval: int = 10
    wandb_project: str = ""         # set to log to Weights & Biases as well
    wandb_run_name: str = ""
    nan_patience: int = 3           # non-finite steps in a row before the run stops
    device: str = "auto"            # auto picks cuda, then mps, then cpu
    dtype: str = "auto"             # auto: bfloat16 on GPUs that have it, float16 on older, float32
    compile: str = "auto"           # auto compiles on CUDA only
    threads: int = 0                # CPU threads, fixed for the run; 0 = torch's default or resumed
    fsdp: bool = False              # shard parameters and optimizer state (FSDP2) instead of DDP
    peak_tflops: float = 0.0        # peak bf16 TFLOP/s per device, for MFU; 0 = by GPU name
    seed: int = 1337

    def __post_init__(self):  # what would stop a run midway is refused before it starts
        counts = ("batch_size", "eval_interval", "eval_iters", "log_interval", "nan_patience",
                  "vocab_multiple")
        problems = [f"{k} must be at least 1" for k in counts if getattr(self, k) < 1]
        problems += [f"{k} must not be negative, got {v}" for k, v in vars(self).items()
                     if type(v) in (int, float) and v < 0]
        problems += [why for wrong, why in [
            (self.lr_schedule not in ("cosine", "wsd"), "lr_schedule must be cosine or wsd"),
            (self.fsdp and self.optimizer == "muon", "Muon needs whole matrices: fsdp needs adamw"),
            (not min(self.learning_rate, self.muon_lr) > 0, "learning rates must be above 0"),
            (max(self.beta1, self.beta2) >= 1, "beta1 and beta2 must be below 1"),
            (self.min_lr_ratio > 1, "min_lr_ratio must be at most 1"),
            (not 0 < self.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
        ] if wrong]
        if problems:
            raise ValueError(problems[0])


def main(argv):
    overrides = configurator.parse(argv, TrainConfig, GPTConfig)
    cfg = configurator.build(TrainConfig, overrides)
    start = cfg.init_from and not cfg.resume  # a resumed run's weights are its checkpoint's
    return train(cfg, overrides, init=load_init(cfg.init_from) if start else None)


def train(cfg, overrides, data=None, init=None):
    """Train in this process, alone or as one of torchrun's, on `data` (this dataset's tokens, or
    sft.py's packed conversations), from `init`'s weights if given. Returns the signal that
    stopped the run, or None."""
    device, rank, world = start_process(cfg.device)
    data = data or TokenData(cfg.dataset)
    out_dir = locked_folder(cfg.out_dir, "train.py") if rank == 0 else contextlib.nullcontext()
    # Ctrl-C and SIGTERM finish the step, checkpoint and return; one run at a time in out_dir
    with StopSignals() as stop, out_dir, data.reading():
        run = Run(cfg, overrides, device, rank, world, data, init)
        model, optimizers, scaler = run.model, run.optimizers, run.scaler
        if run.state.step == 0:  # the untrained model's loss starts the curve
            evaluate(run)
        while not (reason := stop_reason(run, stop)):
            set_learning_rate(optimizers, learning_rate_scale(run))
            loss_sum = torch.zeros((), device=device)
            for micro, (x, y) in enumerate(next_batches(run)):  # accumulate up to batch_tokens
                with gradient_sync(model, world, cfg.fsdp, last=micro == run.accum_steps - 1):
                    with run.autocast:
                        _, loss = model(x, y)
                    scaler.scale(loss / run.accum_steps).backward()
                loss_sum += loss.detach()
            loss = mean_over_processes(loss_sum / run.accum_steps, world)
            for opt in optimizers:
                scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if skipped_nonfinite(run, loss, grad_norm):  # a NaN or inf step updates nothing
                continue
            for opt in optimizers:
                scaler.step(opt)  # opt.step(), unless fp16's loss scale overflowed the gradients
            scaler.update()
            model.zero_grad(set_to_none=True)
            balance_experts(run)
            run.state.step += 1
            run.state.tokens += run.batch_tokens
            if run.state.step % cfg.log_interval == 0 or run.state.step == run.total_steps:
                log_progress(run, loss, grad_norm)
            if run.state.step % cfg.eval_interval == 0:
                evaluate(run)
                save_checkpoints(run)
        finish(run, reason, by_signal=stop.signum is not None)
        end_process(world)
    return stop.signum


# ----------------------------------------------------------------------------- setup

@dataclass
class TrainState:
    """What changes as training goes; saved in each checkpoint, so a resumed run goes on exactly."""
    step: int = 0                   # optimizer steps taken (skipped non-finite steps count)
    tokens: int = 0
    elapsed: float = 0.0            # seconds of training, summed over resumes
    best_val_loss: float = math.inf
    best_step: int = 0              # the step best.pt holds
    evals_since_best: int = 0
    nonfinite_in_a_row: int = 0


class Run:
    """Everything a run is: every setting checked and resolved, the model and its optimizers built,
    and only then the run directory opened. The loop changes `state`."""

    def __init__(self, cfg, overrides, device, rank, world, data, init):
        self.cfg, self.data, self.device, self.rank, self.world = cfg, data, device, rank, world
        self.say = print if rank == 0 else (lambda *args, **kwargs: None)
        self.log = RunLog(cfg, enabled=rank == 0)  # refuses an out_dir that holds another run
        resumed = load_resumed(cfg, data.checkpoint_fields, self.say) if cfg.resume else None
        # one thread count for the whole run, and a resumed run's own: sums split over another
        # count round differently, and the run would no longer repeat
        self.threads = use_threads(cfg.threads or (resumed or {}).get("threads", 0))
        start = resumed or init
        self.model_cfg = (start_config(cfg, overrides, data, start, self.say) if start
                          else model_config(cfg, overrides, data.vocab_size))
        block = self.model_cfg.block_size
        self.accum_steps, self.batch_tokens = batch_plan(cfg, block, world)
        self.train_positions = data.positions("train", block)
        torch.manual_seed(cfg.seed)
        self.raw_model = build_model(init, cfg.init_from) if init else GPT(self.model_cfg)
        self.raw_model.to(device)
        self.flops_per_token = self.raw_model.flops_per_token()
        self.total_steps = budget_steps(cfg, self.batch_tokens, self.flops_per_token)
        self.dtype, self.autocast, self.scaler = precision(cfg.dtype, device)
        self.model = distribute(self.raw_model, cfg.fsdp, cfg.compile, device, world, self.dtype)
        self.optimizers = make_optimizers(self.raw_model, cfg, device, self.dtype)
        self.sampler = torch.Generator().manual_seed(cfg.seed)  # draws the training offsets
        fixed = torch.Generator().manual_seed(cfg.seed)  # the same validation batches every time
        offsets = torch.randint(data.positions("val", block), (cfg.eval_iters, cfg.batch_size),
                                generator=fixed)
        self.eval_offsets = offsets[rank::world]
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak = peak_flops(gpu, cfg.peak_tflops)  # None when unknown: no MFU is printed
        self.run_id = (resumed or {}).get("run_id") or uuid.uuid4().hex[:12]
        self.state, self.moe_max_load = TrainState(), None
        self.resolved = self.log.open(self, resumed)  # config.json: the settings and the machine
        n = self.resolved["parameters"]
        self.say(f"model: {n['total'] / 1e6:.2f}M parameters, {n['active_non_embedding'] / 1e6:.2f}"
                 f"M active non-embedding, {self.flops_per_token / 1e6:.1f} MFLOPs/token; "
                 f"{self.batch_tokens:,} tokens/step ({cfg.batch_size} x {block} x {world} "
                 f"processes x {self.accum_steps}); {self.resolved['device']}, "
                 f"{self.resolved['dtype']}, {self.threads} threads, "
                 f"compile {compile_wanted(cfg.compile, device)}")
        restore(self, resumed)


# ----------------------------------------------------------------------------- what the loop calls

def learning_rate_scale(run):
    """The multiplier on each optimizer's peak: linear warmup, then cosine decay to min_lr_ratio
    (the 350M article), or warmup-stable-decay with a linear decay over the last decay_fraction."""
    cfg, step = run.cfg, run.state.step
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = min((step - cfg.warmup_iters) / max(run.total_steps - cfg.warmup_iters, 1), 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = (progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction
    return 1 - (1 - cfg.min_lr_ratio) * min(max(decay, 0.0), 1.0)


def set_learning_rate(optimizers, scale):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * scale


def next_batches(run):
    """This process's micro-batches of the next step. Every process draws all processes' offsets
    from one generator and takes its share: one process with accumulation and N processes see
    the same sequences."""
    offsets = torch.randint(run.train_positions, (run.accum_steps * run.world, run.cfg.batch_size),
                            generator=run.sampler)
    for micro in range(run.accum_steps):
        rows = offsets[micro * run.world + run.rank]
        x, y = run.data.batch("train", rows, run.model_cfg.block_size)
        if run.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        yield x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def skipped_nonfinite(run, loss, grad_norm):
    """Whether the step's loss or gradient is not finite, and the step so skipped: nothing is
    updated, and the step counts and is logged; nan_patience of them in a row stop the run. One
    read from the device per step. With fp16 the scaler skips its own overflows: only a bad loss
    is ours."""
    if run.world > 1 and run.cfg.fsdp:  # FSDP's norm is a DTensor over every process's shard
        grad_norm = grad_norm.full_tensor()
    state = run.state
    if torch.isfinite(loss if run.scaler.is_enabled() else loss + grad_norm).item():
        state.nonfinite_in_a_row = 0
        return False
    run.model.zero_grad(set_to_none=True)
    for moe in run.raw_model.moe_layers:  # a skipped step moves no expert bias
        moe.expert_load.zero_()
    state.step, state.nonfinite_in_a_row = state.step + 1, state.nonfinite_in_a_row + 1
    run.say(f"step {state.step}: non-finite loss or gradient, skipped ({state.nonfinite_in_a_row} "
            "in a row)")
    run.log.write(dict(step=state.step, skipped=True, train_loss=None, tokens=state.tokens,
                       flops=state.tokens * run.flops_per_token, elapsed=elapsed(run)))
    if state.nonfinite_in_a_row >= run.cfg.nan_patience:
        raise UserError(f"training diverged: {state.nonfinite_in_a_row} non-finite steps in a row "
                        f"at step {state.step}; ckpt.pt holds the last evaluation's weights: "
                        "--resume with a lower learning_rate or more warmup_iters")
    return True


def balance_experts(run):
    """DeepSeek-V3's loss-free balancing after the step, on the load of every process."""
    if run.raw_model.moe_layers:
        load = torch.stack([moe.expert_load for moe in run.raw_model.moe_layers])
        if run.world > 1:
            dist.all_reduce(load)
        run.moe_max_load = (load.max(-1).values / load.float().mean(-1)).max()  # 1.0 is balanced
        run.raw_model.update_moe_bias(load)


def stop_reason(run, stop):
    """Why the run ends before this step, or None to go on."""
    cfg, state = run.cfg, run.state
    if stop.agreed(run.device, run.world) is not None:
        return f"stopped by {signal.Signals(stop.signum).name}"
    if state.step >= run.total_steps:
        return "budget reached"
    if cfg.target_loss and state.best_val_loss <= cfg.target_loss:
        return f"validation loss reached the target {cfg.target_loss:g}"
    if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
        return f"no better validation loss in {cfg.early_stop_patience} evaluations"
    return None


def finish(run, reason, by_signal):
    """The last checkpoint and the run's report. After a signal there is no evaluation, so that the
    resumed run carries the same state as one that never stopped."""
    if by_signal or run.state.step % run.cfg.eval_interval:
        if not by_signal:
            evaluate(run)
        save_checkpoints(run)
    hint = "; continue with --resume" if run.state.step else "; no step was taken: run it again"
    run.say(f"{reason} at step {run.state.step}{hint if by_signal else ''}")
    if run.rank == 0:
        report.write_report(run.cfg.out_dir, say=run.say)


# ----------------------------------------------------------------------------- evaluation and logs

def elapsed(run):
    return run.state.elapsed + time.time() - run.started


@torch.no_grad()
def evaluate(run):
    """The mean loss over the fixed validation batches, logged with bits per byte, and a sample."""
    state, total = run.state, torch.zeros(2, device=run.device)  # summed loss, number of batches
    run.model.eval()
    for offsets in run.eval_offsets:
        x, y = run.data.batch("val", offsets, run.model_cfg.block_size)
        with run.autocast:
            _, loss = run.model(x.to(run.device), y.to(run.device))
        total += torch.stack([loss.float(), torch.ones((), device=run.device)])
    if run.world > 1:
        dist.all_reduce(total)
    val_loss = (total[0] / total[1]).item()
    bpb = val_loss / run.data.bytes_per_val_token / math.log(2)
    run.improved = val_loss < state.best_val_loss
    if run.improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
    else:
        state.evals_since_best += 1
    run.say(f"step {state.step}: val loss {val_loss:.4f}, {bpb:.4f} bits/byte"
            f"{' (best)' * run.improved}")
    run.log.write(dict(step=state.step, val_loss=val_loss, val_bpb=bpb, tokens=state.tokens,
                       flops=state.tokens * run.flops_per_token, elapsed=elapsed(run)))
    if run.cfg.sample_tokens:
        with run.autocast:
            text = sample_text(run.raw_model, run.data.tokenizer, run.data.sample_prompt,
                               run.cfg.sample_tokens, run.cfg.seed, run.data.sample_stop_tokens,
                               run.data.sample_vocab_size)
        run.say("-" * 40 + "\n" + text + "\n" + "-" * 40)
    run.model.train()


def save_checkpoints(run):
    """ckpt.pt, and best.pt when the last evaluation was the best."""
    if run.state.step == 0:
        return
    run.state.elapsed, run.started = elapsed(run), time.time()
    snapshot = training_snapshot(run)  # on every process: gathering is collective under FSDP
    if run.rank == 0:
        save_checkpoint(os.path.join(run.cfg.out_dir, "ckpt.pt"), snapshot)
        if run.improved and run.state.best_step == run.state.step:
            save_checkpoint(os.path.join(run.cfg.out_dir, "best.pt"), snapshot)


def restore(run, checkpoint):
    """The model, optimizers, generators and state as a snapshot left them; None starts afresh."""
    if checkpoint:
        restore_training(run, checkpoint)
        known = {f.name for f in dataclasses.fields(TrainState)}  # older checkpoints counted FLOPs
        run.state = TrainState(**{k: v for k, v in checkpoint["state"].items() if k in known})
        run.say(f"resumed from step {run.state.step}")
    run.started, run.window, run.improved = time.time(), (time.time(), run.state.tokens), False


def log_progress(run, loss, grad_norm):
    """A line of the log: the loss, the learning rate, tokens/s and MFU since the last line."""
    state, now, (then, tokens_then) = run.state, time.time(), run.window
    tok_per_sec, run.window = (state.tokens - tokens_then) / (now - then), (now, state.tokens)
    utilization = mfu(run.flops_per_token, tok_per_sec, run.peak and run.peak * run.world)
    lr = run.optimizers[0].param_groups[0]["lr"]
    record = dict(step=state.step, train_loss=loss.item(), lr=lr, grad_norm=grad_norm.item(),
                  tokens=state.tokens, flops=state.tokens * run.flops_per_token,
                  elapsed=elapsed(run), tok_per_sec=tok_per_sec, mfu=utilization)
    if run.moe_max_load is not None:  # the busiest expert's load over the mean
        record["moe_max_load"] = run.moe_max_load.item()
    run.log.write(record)
    left = (run.total_steps - state.step) * run.batch_tokens / tok_per_sec
    shown = "n/a" if utilization is None else f"{100 * utilization:.1f}%"
    run.say(f"step {state.step}/{run.total_steps} | loss "
            f"{record['train_loss']:.4f} | lr {lr:.2e} | grad {record['grad_norm']:.2f} | "
            f"{tok_per_sec:,.0f} tok/s | mfu {shown} | eta {max(left, 0) / 60:.1f} min")


if __name__ == "__main__":
    configurator.run_script(main)
