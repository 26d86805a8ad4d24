"""Pretraining: the raw loop, from a laptop CPU to many GPUs.

    python train.py                                   # small model on the Shakespeare default, minutes on a CPU
    python train.py config/gpt_51m.py --max_iters=1000
    python train.py config/gpt_51m.py --resume        # continue exactly where out_dir/ckpt.pt stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt_350m.py

Reads data/<dataset>/ written by prepare.py; writes out_dir/ckpt.pt (latest), best.pt (best
validation loss), config.json and log.jsonl.

Read main, launch and train first: they are the story. setup() below them makes every check and
resolves every setting before anything is written; the plumbing the loop calls by name comes after it.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import torch
import torch.distributed as dist

from configurator import UserError
from model import GPT, GPTConfig, PRESETS, is_hidden_matrix
from prepare import load_meta
from runtime import (StopSignals, ThreadTuner, autocast_to, compile_wanted, cpu_dtype, end_process, holding_out_dir,
                     load_checkpoint, load_init, load_resumed, mfu, open_run_dir, peak_flops, precision, restore_training,
                     save_checkpoint, start_process, training_snapshot, write_atomically)
from tokenizer import load_tokenizer

@dataclass
class TrainConfig:
    out_dir: str = "out"
    dataset: str = "shakespeare"       # reads data/<dataset>/, written by `python prepare.py`
    resume: bool = False               # continue from out_dir/ckpt.pt, exactly as if never stopped
    overwrite: bool = False            # start over in an out_dir that already holds a run, replacing its checkpoints and log
    init_from: str = ""                # start from these weights: a run directory (its ckpt.pt) or a .pt file,
                                       # e.g. a Hugging Face model imported by export.py; optimizer and step start afresh
    preset: str = "classic"            # architecture from model.PRESETS; model keys in the config override it
    vocab_multiple: int = 64           # pad the embedding table to a multiple of this: faster matmuls (nanoGPT's 50304)
    # batch: micro-batches of batch_size sequences, accumulated to batch_tokens per optimizer step
    batch_size: int = 16
    batch_tokens: int = 0              # over all processes; 0 = one micro-batch per process, no accumulation
    # budgets, 0 = unset: the first one reached stops the run (an isoFLOP sweep sets max_flops and --max_iters=0)
    max_iters: int = 1500
    max_tokens: int = 0
    max_flops: float = 0.0
    max_seconds: float = 0.0
    # optimizer: AdamW everywhere, or Muon for the hidden weight matrices and AdamW for the rest
    optimizer: str = "adamw"
    learning_rate: float = 2e-3        # AdamW peak
    muon_lr: float = 0.02              # Muon peak (Keller Jordan's default; Muon's own lr scale)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0             # 0 = off
    lr_schedule: str = "cosine"        # "cosine": linear warmup + cosine (the 350M article); "wsd": warmup-stable-decay
    warmup_iters: int = 100
    min_lr_ratio: float = 0.1          # the schedule ends at this fraction of the peak
    decay_fraction: float = 0.2        # wsd: the last fraction of the budget decays linearly to the minimum
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20               # fixed validation batches, the same at every evaluation and in every run
    early_stop_patience: int = 0       # stop after this many evaluations without a new best; 0 = off
    target_loss: float = 0.0           # stop once the validation loss is at or below this (a speedrun's finish line); 0 = off
    sample_tokens: int = 200           # a sample printed at each evaluation; 0 = off
    log_interval: int = 10
    wandb_project: str = ""            # set to log to Weights & Biases as well
    wandb_run_name: str = ""
    # non-finite losses: skip the step; after nan_patience in a row, roll back to ckpt.pt with a lower lr
    nan_patience: int = 3
    nan_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # system
    device: str = "auto"               # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"                # "auto": bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU
    compile: str = "auto"              # "auto" compiles on CUDA only: at CPU sizes its per-step overhead did not pay
    threads: int = 0                   # CPU threads; 0 = measured as the run goes (runtime.ThreadTuner); N pins N,
                                       # which a run needs to repeat bit for bit
    fsdp: bool = False                 # shard parameters and optimizer state over processes (FSDP2) instead of DDP
    peak_tflops: float = 0.0           # peak dense bf16 TFLOP/s per device for MFU; 0 = look it up by GPU name
    seed: int = 1337


# With no config file train.py trains this small model on the Shakespeare default. Config files
# and --key=value set any GPTConfig field (n_layer, n_embd, block_size, mlp, moe_experts, ...).
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
OPENAI_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # the names nanoGPT's --init_from takes
MODEL_KEYS = {f.name for f in dataclasses.fields(GPTConfig)} | {"preset"}  # the keys that shape the model


# ----------------------------------------------------------------------------- the story

def main(argv):
    overrides = configurator.parse(argv, TrainConfig, GPTConfig)
    cfg = configurator.build(TrainConfig, overrides)
    if cfg.init_from and cfg.resume:
        raise UserError("--init_from and --resume together: --resume continues out_dir's run from its own weights; drop one")
    if cfg.init_from in OPENAI_GPT2 and not os.path.exists(cfg.init_from):  # nanoGPT's way to OpenAI's weights
        raise UserError(f"--init_from={cfg.init_from}: import OpenAI's weights first with python export.py "
                        f"--from_hf={cfg.init_from} --to_run=out-{cfg.init_from}, then pass --init_from=out-{cfg.init_from}")
    return launch(cfg, overrides, init=load_init(cfg.init_from) if cfg.init_from else None)


def launch(cfg, overrides, data=None, init=None):
    """Train in this process, alone or as one of torchrun's. `data` gives the batches (TokenData(cfg.dataset) by
    default; sft.py passes its packed conversations); `init` is a checkpoint whose architecture and weights the
    model starts from, with a fresh optimizer and step. Returns the signal that stopped the run, or None."""
    device, rank, world = start_process(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    # Ctrl-C and SIGTERM: finish the step in flight, checkpoint, return; one run at a time in out_dir; on a CPU, the
    # thread count that trains fastest now
    with StopSignals() as stop, holding_out_dir(cfg.out_dir, rank), ThreadTuner(device, cfg.threads, say=say) as threads:
        run = setup(cfg, overrides, device, rank, world, data, init, say)
        train(run, stop, threads)
        end_process(world)
    return stop.signum


def train(run, stop, threads):
    """The loop: learning rate, micro-steps of forward and backward, clipping, the optimizer step, logging,
    evaluation and checkpoints, until a budget, a stop signal, a target loss or early stopping ends it.
    `threads` times each step, and on a CPU moves to the thread count that runs it fastest."""
    cfg, model, T = run.cfg, run.model, run.model_cfg.block_size
    state = restore(run, run.resumed) if run.resumed else TrainState()
    clock = Clock(state.elapsed)
    guard = NonfiniteGuard(run)
    if state.step == 0:
        checkpoint(run, state, clock, evaluate_first=True)
    while True:
        reason = stop_reason(run, state, stop, clock.elapsed())
        if reason:  # the steps not yet checked are checked first: a rollback among them continues the run
            state, rolled_back = guard.settle(state, clock)
            if not rolled_back:
                return finish(run, state, clock, reason, by_signal=stop.signum is not None)
            continue
        set_learning_rate(run.optimizers, learning_rate_scale(state.step, progress(run, state, clock), cfg) * state.lr_scale)

        # every process draws all processes' offsets from one generator and takes its share, so one process
        # with accumulation and N processes see the same sequences
        offsets = torch.randint(run.train_positions, (run.accum_steps * run.world, cfg.batch_size), generator=run.sampler)
        loss_sum, moe_load = torch.zeros((), device=run.device), None
        for micro in range(run.accum_steps):
            x, y = to_device(*run.data.batch("train", offsets[micro * run.world + run.rank], T), run.device)
            with gradient_sync(run, last=micro == run.accum_steps - 1), run.autocast:
                _, loss = model(x, y)
            run.scaler.scale(loss / run.accum_steps).backward()
            loss_sum += loss.detach()
            moe_load = add_load(moe_load, run.raw_model.moe_load())
        loss_sum = mean_over_processes(loss_sum, run.world)  # on the device: read only when a line is logged
        for opt in run.optimizers:
            run.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or float("inf"))

        # a non-finite step updates nothing; the guard reads its flag now or, skipped on the device, at the next line
        bad = nonfinite(run, loss_sum, grad_norm)
        guard.step_optimizers(bad)
        balance_experts(run, moe_load, bad)
        state.step += 1
        logged = state.step % cfg.log_interval == 0 or state.step == run.total_steps
        if logged or state.step % cfg.eval_interval == 0 or not guard.skips_on_device:
            state, rolled_back = guard.settle(state, clock)
            if rolled_back:
                continue
        if logged and not guard.last_skipped:
            log_progress(run, state, clock, loss_sum, grad_norm, moe_load)
        if state.step % cfg.eval_interval == 0:
            checkpoint(run, state, clock, evaluate_first=True)
        agree_on_stop(run, stop)
        threads.tick()


# ----------------------------------------------------------------------------- setup: every check, before anything is written

@dataclass
class TrainState:
    """What changes as training goes; saved in every checkpoint, so that a resumed run continues exactly."""
    step: int = 0                      # optimizer steps taken (skipped non-finite steps count)
    tokens: int = 0
    flops: float = 0.0
    elapsed: float = 0.0               # seconds of training, summed over resumes
    best_val_loss: float = float("inf")
    best_step: int = 0                 # the step best.pt holds
    evals_since_best: int = 0
    lr_scale: float = 1.0              # lowered by each rollback after non-finite losses
    rollbacks: int = 0


@dataclass
class Run:
    """Everything setup() resolved. The loop reads it and changes none of it (TrainState is what changes)."""
    cfg: TrainConfig
    model_cfg: GPTConfig
    data: object
    tokenizer: object
    model: torch.nn.Module             # what the loop calls: compiled and DDP-wrapped where that is on
    raw_model: GPT                     # the module itself: checkpoints, samples, MoE balancing
    optimizers: list
    autocast: object
    scaler: torch.amp.GradScaler
    sampler: torch.Generator           # the training offsets' generator, saved in checkpoints
    eval_offsets: torch.Tensor         # fixed validation batches: the same at every evaluation
    device: torch.device
    rank: int
    world: int
    train_positions: int
    accum_steps: int
    batch_tokens: int
    total_steps: int                   # 0 when only max_seconds bounds the run
    flops_per_token: int
    peak: float | None                 # the device's peak FLOP/s for MFU, None when unknown
    resumed: dict | None               # the checkpoint --resume continues, restored by the loop
    run_id: str                        # in config.json and every checkpoint: another run's ckpt.pt is never resumed
    log: "RunLog"
    say: object                        # print on the first process, silent on the others

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.pt")

    @property
    def best_path(self):
        return os.path.join(self.cfg.out_dir, "best.pt")


def setup(cfg, overrides, device, rank, world, data, init, say):
    """Refuse every setting that would fail or quietly do nothing, resolve the model config, the batch and the
    budget, build the model and its optimizers, and only then open the run directory."""
    check_config(cfg)
    data = data or TokenData(cfg.dataset)
    tokenizer = load_tokenizer(data.checkpoint_fields["tokenizer"])
    if not cfg.resume and not cfg.overwrite and os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise UserError(f"{cfg.out_dir} already holds a run (ckpt.pt): --resume continues it, --overwrite=True starts "
                        "it over, or choose another --out_dir")
    wandb = import_wandb() if cfg.wandb_project and rank == 0 else None
    resumed = load_resumed(cfg, data, say) if cfg.resume else None
    model_cfg = resolve_model_config(cfg, overrides, data, tokenizer, resumed or init, say)
    T = model_cfg.block_size
    train_positions, val_positions = data.positions("train", T), data.positions("val", T)
    accum_steps, batch_tokens = batch_plan(cfg, T, world)
    compile_on = compile_wanted(cfg.compile, device)
    if world > 1 and cfg.fsdp and cfg.optimizer == "muon":
        raise UserError("Muon needs whole matrices; with fsdp=True use optimizer=adamw")

    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_cfg)
    if init:
        raw_model.load_state_dict(init["model"])
    raw_model = raw_model.to(device)
    dtype, autocast, scaler = precision(cfg.dtype, device, *precision_probe(raw_model, cfg.batch_size, device))
    flops_per_token = raw_model.flops_per_token()
    total_steps = budget_steps(cfg, batch_tokens, flops_per_token * batch_tokens)
    model, optimizers = wrap_for_training(raw_model, cfg, device, world, dtype, compile_on)
    eval_gen = torch.Generator().manual_seed(cfg.seed)
    eval_offsets = torch.randint(val_positions, (cfg.eval_iters, cfg.batch_size), generator=eval_gen)[rank::world]

    log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), enabled=rank == 0, wandb=wandb)
    run_id = resumed.get("run_id") if resumed else None
    resolved = dict(run_id=run_id or uuid.uuid4().hex[:12], train=dataclasses.asdict(cfg), model=dataclasses.asdict(model_cfg))
    if rank == 0:
        open_run_dir(cfg.out_dir, resolved, log, resumed, say)
        say(json.dumps(resolved, indent=1))
    counts = raw_model.param_counts()
    say(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active_non_embedding'] / 1e6:.2f}M active non-embedding), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token; {batch_tokens:,} tokens/step "
        f"({cfg.batch_size} x {T} x {world} processes x {accum_steps} accumulation); device {device}, {dtype}, compile {compile_on}")
    peak = peak_flops(device, cfg.peak_tflops)
    if peak is None:
        say(f"MFU: no known peak for {device.type}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; "
            "set --peak_tflops to see it")
    if wandb:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=resolved, resume="allow")
    return Run(cfg=cfg, model_cfg=model_cfg, data=data, tokenizer=tokenizer, model=model, raw_model=raw_model,
               optimizers=optimizers, autocast=autocast, scaler=scaler, sampler=torch.Generator().manual_seed(cfg.seed),
               eval_offsets=eval_offsets, device=device, rank=rank, world=world, train_positions=train_positions,
               accum_steps=accum_steps, batch_tokens=batch_tokens, total_steps=total_steps,
               flops_per_token=flops_per_token, peak=peak, resumed=resumed, run_id=resolved["run_id"], log=log, say=say)


def check_config(cfg):
    """Settings that would stop a run midway, or quietly do nothing, refused before anything is written."""
    configurator.check_at_least(cfg, batch_size=1, eval_interval=1, eval_iters=1, log_interval=1, nan_patience=1,
                                batch_tokens=0, warmup_iters=0, max_iters=0, max_tokens=0, max_flops=0, max_seconds=0,
                                early_stop_patience=0, target_loss=0, sample_tokens=0, max_rollbacks=0, grad_clip=0)
    if cfg.lr_schedule not in ("cosine", "wsd"):
        raise UserError(f"lr_schedule must be cosine or wsd, got {cfg.lr_schedule!r}")
    if not 0 < cfg.decay_fraction <= 1:
        raise UserError(f"decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    for key in ("learning_rate", "muon_lr"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"{key} must be more than 0, got {getattr(cfg, key)}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    configurator.check_at_least(cfg, weight_decay=0)
    if not 0 < cfg.nan_lr_factor <= 1:
        raise UserError(f"nan_lr_factor must be in (0, 1], got {cfg.nan_lr_factor}")


def import_wandb():
    """wandb, imported before anything is written, so that a missing package costs nothing."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)") from None
    return wandb


def resolve_model_config(cfg, overrides, data, tokenizer, start, say):
    """The architecture: a checkpoint's when resuming or starting from one (the training settings stay this
    command's), else the preset under the config's model keys, with the vocabulary padded."""
    if not start:
        return build_model_config(cfg, overrides, data.vocab_size)
    model_cfg = GPTConfig(**start["model_config"])
    ignored = sorted(overrides.keys() & MODEL_KEYS)
    if ignored:
        say(f"note: the model is the checkpoint's; {', '.join(ignored)} from this command not used")
    if start is not None and not cfg.resume:  # init_from: the weights must mean this data's tokens
        if start.get("tokenizer") and not same_tokens(load_tokenizer(start["tokenizer"]), tokenizer):
            raise UserError(f"init_from's tokenizer is not this data's (data/{cfg.dataset}): its token ids would mean "
                            "other text; prepare the data with the model's tokenizer")
        if data.vocab_size > model_cfg.vocab_size:
            raise UserError(f"the data's vocabulary ({data.vocab_size}) is larger than the starting model's embedding "
                            f"table ({model_cfg.vocab_size}): prepare the data with the model's tokenizer")
    return model_cfg


def build_model_config(cfg, overrides, vocab_size):
    if cfg.preset not in PRESETS:
        raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    configurator.check_at_least(cfg, vocab_multiple=1)
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    try:
        return configurator.build(GPTConfig, overrides, **{**PRESETS[cfg.preset], **DEFAULT_MODEL}, vocab_size=padded)
    except ValueError as e:
        raise UserError(f"invalid model config: {e}") from e


def same_tokens(a, b, probe_ids=4096):
    """Whether two tokenizers give the same ids the same text, judged on their first ids (a spec alone can
    differ in form: a Hugging Face import spells GPT-2's BPE out as ranks where prepare.py names tiktoken's)."""
    ids = range(min(a.vocab_size, probe_ids))
    return a.vocab_size == b.vocab_size and [a.decode([i]) for i in ids] == [b.decode([i]) for i in ids]


def batch_plan(cfg, block_size, world):
    """(micro-steps per optimizer step, tokens per optimizer step over all processes)."""
    micro_tokens = cfg.batch_size * block_size * world
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(f"batch_tokens={batch_tokens} is not a multiple of batch_size * block_size * processes = {micro_tokens}")
    return batch_tokens // micro_tokens, batch_tokens


def budget_steps(cfg, batch_tokens, flops_per_step):
    """Steps until the first budget that is set (max_iters, max_tokens, max_flops); 0 when only max_seconds is."""
    budgets = dict(max_iters=(cfg.max_iters, cfg.max_iters), max_tokens=(cfg.max_tokens, cfg.max_tokens // batch_tokens),
                   max_flops=(cfg.max_flops, int(cfg.max_flops // flops_per_step)))
    for name, (value, steps) in budgets.items():
        if value and not steps:
            raise UserError(f"{name}={value:g} is less than one step ({batch_tokens:,} tokens, "
                            f"{flops_per_step:.3g} FLOPs per step)")
    total_steps = min((steps for value, steps in budgets.values() if value), default=0)
    if not total_steps and not cfg.max_seconds:
        raise UserError("no budget: set max_iters, max_tokens, max_flops or max_seconds")
    return total_steps


def wrap_for_training(model, cfg, device, world, dtype, compile_on):
    """(the model the loop calls, its optimizers): FSDP2 shards parameters before the optimizers see them;
    compile comes next, and DDP wraps the compiled model."""
    if world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    optimizers = make_optimizers(model, cfg, device)
    if compile_on:
        model = torch.compile(model)
    if world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, optimizers


def precision_probe(model, batch_size, device):
    """What dtype=auto times on a CPU, and the name it is cached under: one forward and backward of this model on
    a micro-batch of random tokens, in the dtype given. bf16 pays or not by the model's shape, not just the CPU's."""
    shape = (batch_size, model.config.block_size + 1)
    tokens = torch.randint(model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step(dtype):
        with autocast_to(dtype, device):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
    shape = json.dumps(dataclasses.asdict(model.config), sort_keys=True)
    return step, f"{batch_size} x {model.config.block_size} {hashlib.sha1(shape.encode()).hexdigest()[:10]}"


def make_optimizers(model, cfg, device):
    """AdamW for everything, or Muon for the 2D weight matrices inside the blocks and AdamW for the
    embeddings, the output head, norms, biases and routers (Muon is defined for hidden matrices only)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if cfg.optimizer == "muon":
        # the MoE router is a classifier over experts, not a hidden layer: AdamW, as the embeddings
        hidden = {n: p for n, p in params.items() if is_hidden_matrix(n, p) and p.ndim == 2 and ".router." not in n}
    elif cfg.optimizer == "adamw":
        hidden = {}
    else:
        raise UserError(f"optimizer must be adamw or muon, got {cfg.optimizer!r}")
    rest = [(n, p) for n, p in params.items() if n not in hidden]
    # weight decay on matrices only, never on norms and biases (GPT-2, nanoGPT); the MoE's stacked expert
    # biases are 2-D, and the stacked expert weights 3-D, which torch's Muon does not take: AdamW.
    # muP's hidden matrices (model.py's table) are a group of their own, at lr / m and weight decay x m.
    m = model.config.width_ratio
    scaled = {n for n, p in rest if model.config.mup and is_hidden_matrix(n, p)}
    matrix = {n for n, p in rest if p.ndim >= 2 and not n.endswith(".bias")} - scaled
    groups = [{"params": [p for n, p in rest if n in matrix], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in rest if n in scaled], "lr": cfg.learning_rate / m,
               "weight_decay": cfg.weight_decay * m},
              {"params": [p for n, p in rest if n not in matrix | scaled], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                    fused=device.type == "cuda")]
    if hidden:
        if device.type == "cpu" and cpu_dtype("product") == "float32":
            torch.optim._muon._zeropower_via_newtonschulz = float32_newton_schulz
        optimizers.append(torch.optim.Muon(list(hidden.values()), lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def float32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's orthogonalisation, Keller Jordan's quintic Newton-Schulz iteration, in float32 instead of
    its fixed bf16: on a CPU whose bf16 the probe measured slower (emulated), bf16 made every Muon step seconds long."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # a spectral norm of at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


# ----------------------------------------------------------------------------- data

class TokenData:
    """Pretraining batches: windows of block_size + 1 tokens at random offsets of data/<dataset>/{split}.bin.

    The loop's data interface, which sft.py's PackedChats implements too: positions(split, block_size) counts
    what can be drawn; batch(split, offsets, block_size) gives (inputs, targets) for drawn offsets (target -1
    carries no loss); vocab_size, bytes_per_val_token (for bits per byte), checkpoint_fields (saved with the
    model: at least the tokenizer spec), and the evaluation sample's sample_prompt, sample_stop_tokens and
    sample_vocab_size."""

    def __init__(self, dataset):
        self.dir = os.path.join("data", dataset)
        self.meta = load_meta(self.dir)
        self.vocab_size = self.meta["vocab_size"]
        self.bytes_per_val_token = self.meta["val_bytes"] / self.meta["val_tokens"]
        # samples start a new document and draw from the tokenizer's ids only, never the padding rows
        self.sample_prompt, self.sample_stop_tokens, self.sample_vocab_size = [self.meta["eot_id"]], (), self.vocab_size
        self.checkpoint_fields = dict(tokenizer=self.meta["tokenizer"], dataset=dataset,
                                      data_fingerprint=self.meta.get("fingerprint"))

    def positions(self, split, block_size):
        """How many sequences can be drawn from `split`: the offsets a window of block_size + 1 fits at."""
        n = self.meta[f"{split}_tokens"]
        if n <= block_size:
            raise UserError(f"{split}.bin holds {n} tokens, fewer than block_size + 1 = {block_size + 1}: "
                            "use more data or a smaller block_size")
        return n - block_size

    def batch(self, split, offsets, block_size):
        return read_batch(os.path.join(self.dir, f"{split}.bin"), self.meta["dtype"], offsets, block_size, self.vocab_size)


def read_batch(path, dtype, offsets, block_size, vocab_size):
    """Inputs and next-token targets for sequences starting at `offsets`. A fresh memmap per batch:
    one held open across a long run grows the process's memory (nanoGPT's note)."""
    data = np.memmap(path, dtype=dtype, mode="r")
    rows = data[offsets.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)
    if rows.max() >= vocab_size:  # else an IndexError deep in the embedding, or on a GPU a device-side assert
        raise UserError(f"{path} holds token id {rows.max()}, beyond meta.json's vocabulary of {vocab_size}: the file "
                        "is damaged or another dataset's; prepare it again with --force")
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- what the loop calls

def learning_rate_scale(step, progress, cfg):
    """Multiplier on each optimizer's peak learning rate. `step` counts optimizer steps from 0;
    `progress` in [0, 1] is the share of the budget spent after warmup."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = (progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction  # wsd
    return 1 - (1 - cfg.min_lr_ratio) * min(max(decay, 0.0), 1.0)


def progress(run, state, clock):
    """The share of the budget spent after warmup: by steps, or by time under max_seconds, whichever is further."""
    cfg = run.cfg
    by_steps = (state.step - cfg.warmup_iters) / max(run.total_steps - cfg.warmup_iters, 1) if run.total_steps else 0.0
    return max(by_steps, clock.elapsed() / cfg.max_seconds if cfg.max_seconds else 0.0)


def set_learning_rate(optimizers, scale):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * scale


def gradient_sync(run, last):
    """DDP averages gradients on a step's last micro-step only; the others accumulate locally."""
    if run.world > 1 and not run.cfg.fsdp and not last:
        return run.model.no_sync()
    return contextlib.nullcontext()


def mean_over_processes(value, world):
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def add_load(total, load):
    """Tokens routed to each expert, summed over micro-steps (None for a dense model)."""
    return load if total is None else total + load


def balance_experts(run, moe_load, bad):
    """DeepSeek-V3's loss-free balancing, after the optimizer step, on the load of every process. A skipped step
    moves no bias: a load of zero on every expert is no expert above the mean, none below."""
    if moe_load is not None:
        moe_load = torch.where(bad, 0, moe_load)
        if run.world > 1:
            dist.all_reduce(moe_load)
        run.raw_model.update_moe_bias(moe_load)


def nonfinite(run, loss_sum, grad_norm):
    """One flag on the device: the step's loss, or its gradient norm, is not finite. With fp16 the scaler skips
    the steps whose gradients overflow itself; a bad loss is always ours to handle."""
    if run.world > 1 and run.cfg.fsdp:  # FSDP's norm is a DTensor, over the shards of every process
        grad_norm = grad_norm.full_tensor()
    bad = ~torch.isfinite(loss_sum)
    return bad if run.scaler.is_enabled() else bad | ~torch.isfinite(grad_norm)


class NonfiniteGuard:
    """Non-finite steps update nothing (parameters, optimizer moments and step counts, expert biases stay bit for
    bit what they were); they count as steps, each logged as skipped, and after nan_patience of them in a row the
    run rolls back to ckpt.pt with a lower learning rate.

    Where every optimizer takes a found_inf tensor (fused AdamW: CUDA), the step is skipped on the device and the
    host waits for nothing: the flags are read together at settle(), which the loop calls at every log line,
    evaluation, the last step and any stop. The rollback then comes at the first of those at or after the
    nan_patience-th bad step in a row, at most min(log_interval, eval_interval) - 1 steps after it, and is the same
    rollback: ckpt.pt was written at an evaluation, which settles first, so it predates every unread step, and the
    steps taken after the bad ones are discarded with it. (A skip before fused AdamW's first step leaves its state
    created at zero, which the next step reads exactly as no state.) Elsewhere (Muon; fp16's scaler; FSDP, whose
    sharded parameters were not tried with found_inf; the CPU's unfused AdamW, whose last bits fused would change)
    the flag is read once per step and settle() runs on every step."""

    def __init__(self, run):
        self.run, self.pending, self.in_a_row, self.last_skipped = run, [], 0, False
        # the protocol torch.amp.GradScaler drives fused optimizers by (torch/amp/grad_scaler.py, step())
        self.skips_on_device = (not run.scaler.is_enabled() and not (run.world > 1 and run.cfg.fsdp)
                                and all(getattr(opt, "_step_supports_amp_scaling", False) for opt in run.optimizers))

    def step_optimizers(self, bad):
        """Step every optimizer unless `bad`. Fused AdamW adds 1 to its step counts, updates nothing where
        found_inf is 1, and subtracts found_inf from the counts again (torch/optim/adam.py, _fused_adam)."""
        run = self.run
        if self.skips_on_device:
            found_inf = bad.float()
            for opt in run.optimizers:
                opt.found_inf = found_inf
                opt.step()
                del opt.found_inf
        else:
            bad = bad.item()  # the step's one host read
            if not bad:
                for opt in run.optimizers:
                    run.scaler.step(opt)
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        run.scaler.update()
        self.pending.append(bad)

    def settle(self, state, clock):
        """Account for the steps taken since the last call, in order: a good one's tokens, a skipped one's line. Returns
        the state to go on from and whether it is a rollback's."""
        run, first = self.run, state.step - len(self.pending) + 1
        flags = torch.stack(self.pending).tolist() if self.skips_on_device and self.pending else self.pending
        self.pending = []
        for step, bad in enumerate(flags, start=first):
            self.in_a_row, self.last_skipped = (self.in_a_row + 1 if bad else 0), bool(bad)
            if not bad:
                state.tokens += run.batch_tokens
                state.flops += run.flops_per_token * run.batch_tokens
                clock.count(run.batch_tokens)
                continue
            run.say(f"step {step}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row)")
            run.log.write(dict(step=step, skipped=True, train_loss=None, tokens=state.tokens, flops=state.flops,
                               elapsed=clock.elapsed()))
            if self.in_a_row >= run.cfg.nan_patience:
                return self.roll_back(state, step), True
        return state, False

    def roll_back(self, state, step):
        """Back to ckpt.pt with a lower learning rate, or stop when no rollback is left."""
        run = self.run
        if state.rollbacks >= run.cfg.max_rollbacks or not os.path.exists(run.ckpt_path):
            raise UserError(f"training diverged: {self.in_a_row} non-finite losses in a row at step {step}; "
                            "lower learning_rate or raise warmup_iters")
        rollbacks, lr_scale = state.rollbacks + 1, state.lr_scale * run.cfg.nan_lr_factor
        state = dataclasses.replace(restore(run, load_checkpoint(run.ckpt_path)), rollbacks=rollbacks, lr_scale=lr_scale)
        run.say(f"rolled back to step {state.step} from {run.ckpt_path}; learning rate now x{lr_scale:g}")
        self.in_a_row = 0
        return state


def stop_reason(run, state, stop, elapsed):
    """Why the run ends before this step, or None to go on."""
    cfg = run.cfg
    if stop.signum is not None:
        return f"stopped by {signal.Signals(stop.signum).name}"
    if run.total_steps and state.step >= run.total_steps:
        return "budget reached"
    if cfg.max_seconds and elapsed >= cfg.max_seconds:
        return f"time budget of {cfg.max_seconds:g}s reached"
    if cfg.target_loss and state.best_val_loss <= cfg.target_loss:
        return f"validation loss reached the target {cfg.target_loss:g}"
    if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
        return f"validation loss has not improved for {cfg.early_stop_patience} evaluations; best.pt holds the best model"
    return None


def finish(run, state, clock, reason, by_signal):
    """The last checkpoint. After a signal, no evaluation: a resumed run must carry the same state as one that
    never stopped. Otherwise the last step is evaluated if it was not yet."""
    if by_signal:
        checkpoint(run, state, clock, evaluate_first=False)
        run.say(f"{reason} at step {state.step}; " + ("continue with --resume" if state.step else
                                                       "no step was taken, so there is nothing to resume: run it again"))
        return
    if state.step % run.cfg.eval_interval:
        checkpoint(run, state, clock, evaluate_first=True)
    run.say(f"{reason} at step {state.step}")


def agree_on_stop(run, stop):
    """Every process must stop at the same step: a signal seen by one is taken by all."""
    if run.world > 1:
        flag = torch.tensor(float(stop.signum or 0), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item()) or None


# ----------------------------------------------------------------------------- evaluation, checkpoints, logs

def checkpoint(run, state, clock, evaluate_first):
    """Evaluate (and print a sample) if asked, then save ckpt.pt, and best.pt when the validation loss improved."""
    state.elapsed = clock.elapsed()
    improved = evaluate_first and evaluate_and_report(run, state)
    if state.step > 0:
        snapshot = checkpoint_snapshot(run, state)  # on every rank: with FSDP, gathering the full state is collective
        if run.rank == 0:
            save_checkpoint(run.ckpt_path, snapshot)
            if improved:
                save_checkpoint(run.best_path, snapshot)


def evaluate_and_report(run, state):
    """Validation loss and bits per byte, logged and printed; returns whether it is the best so far."""
    val_loss = evaluate(run)
    bpb = val_loss / run.data.bytes_per_val_token / math.log(2)
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
    else:
        state.evals_since_best += 1
    perplexity = math.exp(min(val_loss, 50))
    run.say(f"step {state.step}: val loss {val_loss:.4f}, {bpb:.4f} bits/byte, "
            f"perplexity {perplexity:.2f}{' (best)' if improved else ''}")
    run.log.write(dict(step=state.step, val_loss=val_loss, val_bpb=bpb, val_ppl=perplexity, tokens=state.tokens,
                       flops=state.flops, elapsed=state.elapsed))
    if run.cfg.sample_tokens:
        print_sample(run)
    return improved


@torch.no_grad()
def evaluate(run):
    """The mean loss over the fixed validation batches, split over the processes."""
    run.model.eval()
    total = torch.zeros(2, device=run.device)  # summed loss, number of batches
    for offsets in run.eval_offsets:
        x, y = to_device(*run.data.batch("val", offsets, run.model_cfg.block_size), run.device)
        with run.autocast:
            _, loss = run.model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=run.device)])
    if run.world > 1:
        dist.all_reduce(total)
    run.model.train()
    return (total[0] / total[1]).item()


def print_sample(run):
    data, model, tokenizer = run.data, run.raw_model, run.tokenizer
    model.eval()
    prompt = torch.tensor([data.sample_prompt], device=run.device)
    gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed)
    with run.autocast:
        ids = [t.item() for t in model.generate(prompt, run.cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                                                 stop_tokens=data.sample_stop_tokens, vocab_size=data.sample_vocab_size)]
    model.train()
    prompt, reply = (tokenizer.decode([i for i in part if i < tokenizer.vocab_size]) for part in (data.sample_prompt, ids))
    run.say("-" * 40 + "\n" + (prompt + "\n" if prompt else "") + reply + "\n" + "-" * 40)


def checkpoint_snapshot(run, state):
    return training_snapshot(run.raw_model, run.optimizers, run.scaler, run.sampler, run.device,
                             model_config=dataclasses.asdict(run.model_cfg), config=dataclasses.asdict(run.cfg),
                             state=dataclasses.asdict(state), run_id=run.run_id, **run.data.checkpoint_fields)


def restore(run, checkpoint):
    """The model, optimizers and generators as a checkpoint_snapshot left them; returns its TrainState."""
    restore_training(checkpoint, run.raw_model, run.optimizers, run.scaler, run.sampler, run.device)
    state = TrainState(**checkpoint["state"])
    if checkpoint is run.resumed:
        run.say(f"resumed from {run.ckpt_path} at step {state.step}")
    return state


def log_progress(run, state, clock, loss_sum, grad_norm, moe_load):
    train_loss = loss_sum.item() / run.accum_steps  # the mean over the micro-steps of this step
    tok_per_sec, state.elapsed = clock.throughput(), clock.elapsed()
    utilization = mfu(run.flops_per_token, tok_per_sec, run.peak * run.world if run.peak else None)
    remaining = [(run.total_steps - state.step) * run.batch_tokens / tok_per_sec] if run.total_steps else []
    remaining += [run.cfg.max_seconds - state.elapsed] if run.cfg.max_seconds else []
    record = dict(step=state.step, train_loss=train_loss, lr=run.optimizers[0].param_groups[0]["lr"],
                  grad_norm=grad_norm.item(), tokens=state.tokens, flops=state.flops, elapsed=state.elapsed,
                  tok_per_sec=tok_per_sec, mfu=utilization)
    if moe_load is not None:  # the busiest expert's load over the mean: 1.0 is perfect balance
        record["moe_max_load"] = (moe_load.max(-1).values / moe_load.float().mean(-1)).max().item()
    run.log.write(record)
    run.say(f"step {state.step}{f'/{run.total_steps}' if run.total_steps else ''} | loss {train_loss:.4f} | "
            f"lr {record['lr']:.2e} | grad {record['grad_norm']:.2f} | {tok_per_sec:,.0f} tok/s | "
            f"mfu {f'{100 * utilization:.1f}%' if utilization is not None else 'n/a'} | eta {max(min(remaining), 0) / 60:.1f} min")


class RunLog:
    """out_dir/log.jsonl, one JSON object per line, written by the first process (and to wandb if set)."""

    def __init__(self, path, enabled, wandb=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb

    def start(self, resumed_step):
        """Empty for a new run; for a resumed one, the lines up to its checkpoint's step, replaced atomically. A crash
        while appending may have left a half-written last line, which is dropped."""
        kept = []
        if resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
        write_atomically(self.path, "".join(kept))

    def write(self, record):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: ckpt.pt still holds the last checkpoint
                raise UserError(f"could not write {self.path}: {e.strerror}; ckpt.pt holds the last checkpoint: "
                                "fix that and --resume") from None
            if self.wandb:
                self.wandb.log(record, step=record["step"])


class Clock:
    """Seconds of training (resumes included) and tokens per second since the last log line."""

    def __init__(self, elapsed_before):
        self.start = time.time() - elapsed_before
        self.window_start, self.window_tokens = time.time(), 0

    def elapsed(self):
        return time.time() - self.start

    def count(self, tokens):
        self.window_tokens += tokens

    def throughput(self):
        now = time.time()
        tok_per_sec = self.window_tokens / (now - self.window_start)
        self.window_start, self.window_tokens = now, 0
        return tok_per_sec


if __name__ == "__main__":
    configurator.run_script(main)
