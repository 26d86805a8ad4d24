"""Pretraining: the raw loop, from a laptop CPU to many GPUs.

    python train.py                                   # small model on the Shakespeare default, minutes on a CPU
    python train.py config/gpt_51m.py --max_iters=1000
    python train.py config/gpt_51m.py --resume        # continue exactly where out_dir/ckpt.pt stopped
    torchrun --standalone --nproc_per_node=8 train.py config/gpt_350m.py

Reads data/<dataset>/ written by prepare.py; writes out_dir/ckpt.pt (latest), best.pt (best
validation loss), config.json and log.jsonl as ../shared/DESIGN.md specifies.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import configurator
from configurator import UserError
from model import GPT, GPTConfig, PRESETS
from prepare import load_meta
from runtime import (CHECKPOINT_VERSION, compile_wanted, load_checkpoint, load_init, peak_flops, pick_device,
                     precision, save_checkpoint)
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
    compile: str = "auto"              # "auto" compiles on CUDA only: on this CPU it did not pay (see README)
    fsdp: bool = False                 # shard parameters and optimizer state over processes (FSDP2) instead of DDP
    peak_tflops: float = 0.0           # peak dense bf16 TFLOP/s per device for MFU; 0 = look it up by GPU name
    seed: int = 1337


# With no config file train.py trains this small model on the Shakespeare default. Config files
# and --key=value set any GPTConfig field (n_layer, n_embd, block_size, mlp, moe_experts, ...).
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
MODEL_KEYS = {f.name for f in dataclasses.fields(GPTConfig)} | {"preset"}  # the keys that shape the model


# ----------------------------------------------------------------------------- setup

def build_model_config(cfg, overrides, vocab_size):
    if cfg.preset not in PRESETS:
        raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    configurator.check_at_least(cfg, vocab_multiple=1)
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    try:
        return configurator.build(GPTConfig, overrides, **{**PRESETS[cfg.preset], **DEFAULT_MODEL}, vocab_size=padded)
    except ValueError as e:
        raise UserError(f"invalid model config: {e}") from e


def make_optimizers(model, cfg, device):
    """AdamW for everything, or Muon for the 2D weight matrices inside the blocks and AdamW for the
    embeddings, the output head, norms, biases and routers (Muon is defined for hidden matrices only)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if cfg.optimizer == "muon":
        # the MoE router is a classifier over experts, not a hidden layer: AdamW, as the embeddings
        hidden = {n: p for n, p in params.items() if p.ndim == 2 and n.startswith("transformer.h.") and ".router." not in n}
    elif cfg.optimizer == "adamw":
        hidden = {}
    else:
        raise UserError(f"optimizer must be adamw or muon, got {cfg.optimizer!r}")
    rest = [(n, p) for n, p in params.items() if n not in hidden]
    # weight decay on matrices only, never on norms and biases (GPT-2, nanoGPT)
    groups = [{"params": [p for n, p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in rest if p.ndim < 2], "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                    fused=device.type == "cuda")]
    if hidden:
        optimizers.append(torch.optim.Muon(list(hidden.values()), lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def same_tokens(a, b, probe_ids=4096):
    """Whether two tokenizers give the same ids the same text, judged on their first ids (a spec alone can
    differ in form: a Hugging Face import spells GPT-2's BPE out as ranks where prepare.py names tiktoken's)."""
    ids = range(min(a.vocab_size, probe_ids))
    return a.vocab_size == b.vocab_size and [a.decode([i]) for i in ids] == [b.decode([i]) for i in ids]


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


# ----------------------------------------------------------------------------- data

class TokenData:
    """Pretraining batches: windows of block_size + 1 tokens at random offsets of data/<dataset>/{split}.bin.
    sft.py hands run() another object with the same attributes and methods (packed, masked conversations)."""

    def __init__(self, dataset):
        self.dir = os.path.join("data", dataset)
        self.meta = load_meta(self.dir)
        self.vocab_size = self.meta["vocab_size"]
        self.bytes_per_val_token = self.meta["val_bytes"] / self.meta["val_tokens"]  # for bits per byte
        # samples start a new document and draw from the tokenizer's ids only, never the padding rows
        self.sample_prompt, self.sample_stop_tokens, self.sample_vocab_size = [self.meta["eot_id"]], (), self.vocab_size
        self.checkpoint_fields = dict(tokenizer=self.meta["tokenizer"], dataset=dataset)

    def positions(self, split, block_size):
        """How many sequences can be drawn from `split`: the offsets a window of block_size + 1 fits at."""
        n = self.meta[f"{split}_tokens"]
        if n <= block_size:
            raise UserError(f"{split}.bin holds {n} tokens, fewer than block_size + 1 = {block_size + 1}: "
                            "use more data or a smaller block_size")
        return n - block_size

    def batch(self, split, offsets, block_size):
        return read_batch(os.path.join(self.dir, f"{split}.bin"), self.meta["dtype"], offsets, block_size)


def read_batch(path, dtype, offsets, block_size):
    """Inputs and next-token targets for sequences starting at `offsets`. A fresh memmap per batch:
    one held open across a long run grows the process's memory (nanoGPT's note)."""
    data = np.memmap(path, dtype=dtype, mode="r")
    rows = data[offsets.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def to_device(x, y, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- the run

def main(argv):
    overrides = configurator.parse(argv, TrainConfig, GPTConfig)
    cfg = configurator.build(TrainConfig, overrides)
    if cfg.init_from and cfg.resume:
        raise UserError("--init_from and --resume together: --resume continues out_dir's run from its own weights; drop one")
    return launch(cfg, overrides, init=load_init(cfg.init_from) if cfg.init_from and not cfg.resume else None)


def launch(cfg, overrides, **run_options):
    """Set up the process (alone, or one of torchrun's), route Ctrl-C and SIGTERM to a clean stop, and run.
    Returns the signal that stopped the run, or None when it ended by itself."""
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        device_type = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "cpu"
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if device_type == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum  # finish the step in flight, then checkpoint and exit

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(cfg, overrides, device, rank, world, stop, **run_options)
        if distributed:
            # Tear down together: a process that left while rank 0 still wrote its checkpoint died in gloo's
            # teardown ("terminate called without an active exception") in 1 of 12 runs here. And only after a
            # clean finish: destroying the group while another rank is mid-collective deadlocks (torchtitan #1342).
            dist.barrier()
            dist.destroy_process_group()
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return stop["signal"]


def run(cfg, overrides, device, rank, world, stop, data=None, init=None):
    """Train until a budget, a signal or early stopping ends the run. `data` gives the batches (by default
    TokenData(cfg.dataset)); `init` is a checkpoint whose architecture and weights the model starts from
    (sft.py fine-tunes a pretrained model this way; its optimizer state and step are not taken)."""
    # imported here, not at the top: it costs half a second, and sft.py, bench.py and scaling.py import this module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    check_config(cfg)
    data = data or TokenData(cfg.dataset)
    tokenizer = load_tokenizer(data.checkpoint_fields["tokenizer"])
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if not cfg.resume and not cfg.overwrite and os.path.exists(ckpt_path):
        raise UserError(f"{cfg.out_dir} already holds a run (ckpt.pt): --resume continues it, --overwrite=True starts "
                        "it over, or choose another --out_dir")
    wandb = None
    if cfg.wandb_project and master:  # imported before anything is written, so that a missing package costs nothing
        try:
            import wandb
        except ImportError:
            raise UserError("wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)") from None

    resumed = load_checkpoint(ckpt_path) if cfg.resume else None
    if resumed and resumed["tokenizer"] != data.checkpoint_fields["tokenizer"]:
        raise UserError(f"{ckpt_path} was trained on other tokens (dataset {resumed.get('dataset')!r}): --resume needs "
                        "the same data; to train on new data start from it with --init_from instead")
    if resumed or init:  # the architecture is the checkpoint's; the training settings are this command's
        model_cfg = GPTConfig(**(resumed or init)["model_config"])
        ignored = sorted(overrides.keys() & MODEL_KEYS)
        if ignored:
            say(f"note: the model is the checkpoint's; {', '.join(ignored)} from this command not used")
    else:
        model_cfg = build_model_config(cfg, overrides, data.vocab_size)
    if init and init.get("tokenizer") and not same_tokens(load_tokenizer(init["tokenizer"]), tokenizer):
        raise UserError(f"init_from's tokenizer is not this data's (data/{cfg.dataset}): its token ids would mean other "
                        "text; prepare the data with the model's tokenizer")
    if init and data.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the data's vocabulary ({data.vocab_size}) is larger than the starting model's embedding "
                        f"table ({model_cfg.vocab_size}): prepare the data with the model's tokenizer")
    T = model_cfg.block_size
    train_positions, val_positions = data.positions("train", T), data.positions("val", T)

    micro_tokens = cfg.batch_size * T * world
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(f"batch_tokens={batch_tokens} is not a multiple of batch_size * block_size * processes = {micro_tokens}")
    accum_steps = batch_tokens // micro_tokens

    dtype, autocast, scaler = precision(cfg.dtype, device)

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if init and not resumed:
        model.load_state_dict(init["model"])
    model = model.to(device)
    raw_model = model
    counts = model.param_counts()
    flops_per_token = model.flops_per_token()
    flops_per_step = flops_per_token * batch_tokens
    budgets = [cfg.max_iters, cfg.max_tokens // batch_tokens, int(cfg.max_flops // flops_per_step)]
    budget_set = [cfg.max_iters, cfg.max_tokens, cfg.max_flops]
    total_steps = min((b for b, s in zip(budgets, budget_set) if s), default=0)
    too_small = [(name, value) for name, value, steps in zip(("max_iters", "max_tokens", "max_flops"), budget_set, budgets)
                 if value and not steps]
    if too_small:
        raise UserError(f"{too_small[0][0]}={too_small[0][1]:g} is less than one step ({batch_tokens:,} tokens, "
                        f"{flops_per_step:.3g} FLOPs per step)")
    if not total_steps and not cfg.max_seconds:
        raise UserError("no budget: set max_iters, max_tokens, max_flops or max_seconds")

    if world > 1 and cfg.fsdp:
        if cfg.optimizer == "muon":
            raise UserError("Muon needs whole matrices; with fsdp=True use optimizer=adamw")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    optimizers = make_optimizers(model, cfg, device)
    compile_on = compile_wanted(cfg.compile, device)
    if compile_on:
        model = torch.compile(model)
    if world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # The sampler draws every process's offsets from one generator, the same on all ranks, and each
    # rank takes its share: 1 process with accumulation and N processes see the same sequences.
    sampler = torch.Generator().manual_seed(cfg.seed)
    state = dict(step=0, tokens=0, flops=0.0, elapsed=0.0, best_val_loss=float("inf"), evals_since_best=0,
                 lr_scale=1.0, rollbacks=0)

    def checkpoint_now():
        model_state, optim_state = get_state_dict(raw_model, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dict(version=CHECKPOINT_VERSION, model=model_state, optimizers=optim_state,
                    model_config=dataclasses.asdict(model_cfg), config=dataclasses.asdict(cfg),
                    **data.checkpoint_fields, state=dict(state), scaler=scaler.state_dict(),
                    rng=dict(torch=torch.get_rng_state(), sampler=sampler.get_state(),
                             cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else []))

    def restore(checkpoint):
        # full_state_dict: the checkpoint holds whole tensors, which FSDP must shard again as it loads them
        set_state_dict(raw_model, optimizers, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizers"],
                       options=StateDictOptions(full_state_dict=True))
        state.update(checkpoint["state"])
        if scaler.is_enabled() and checkpoint.get("scaler"):  # fp16's loss scale: empty when saved without fp16
            scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        sampler.set_state(checkpoint["rng"]["sampler"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    if resumed:
        restore(resumed)
        say(f"resumed from {ckpt_path} at step {state['step']}")
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create out_dir {cfg.out_dir}: {e.strerror}") from None
        resolved = dict(train=dataclasses.asdict(cfg), model=dataclasses.asdict(model_cfg))
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        say(json.dumps(resolved, indent=1))
        if resumed and os.path.exists(log_path):  # drop lines the interrupted run wrote after its last checkpoint
            with open(log_path) as f:  # a crash while appending may have left a half-written last line
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= state["step"]]
            with open(log_path, "w") as f:
                f.writelines(kept)
        elif not resumed:
            open(log_path, "w").close()
    say(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active_non_embedding'] / 1e6:.2f}M active non-embedding), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token; {batch_tokens:,} tokens/step "
        f"({cfg.batch_size} x {T} x {world} processes x {accum_steps} accumulation); device {device}, {dtype}, compile {compile_on}")
    peak = peak_flops(device, cfg.peak_tflops)
    if peak is None:
        say(f"MFU: no known peak for {device.type}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; "
            "set --peak_tflops to see it")

    if wandb:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=resolved, resume="allow")

    def log(record):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=record["step"])

    # fixed validation batches: same offsets at every evaluation, split over the processes
    eval_gen = torch.Generator().manual_seed(cfg.seed)
    eval_offsets = torch.randint(val_positions, (cfg.eval_iters, cfg.batch_size), generator=eval_gen)[rank::world]

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros(2, device=device)  # summed loss, number of batches
        for offsets in eval_offsets:
            x, y = to_device(*data.batch("val", offsets, T), device)
            with autocast:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def print_sample():
        raw_model.eval()
        prompt = torch.tensor([data.sample_prompt], device=device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast:
            ids = [t.item() for t in raw_model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen,
                                                     stop_tokens=data.sample_stop_tokens, vocab_size=data.sample_vocab_size)]
        raw_model.train()
        prompt, reply = (tokenizer.decode([i for i in part if i < tokenizer.vocab_size]) for part in (data.sample_prompt, ids))
        say("-" * 40 + "\n" + (prompt + "\n" if prompt else "") + reply + "\n" + "-" * 40)

    nonfinite_in_a_row = 0
    run_start = time.time() - state["elapsed"]
    window_start, window_tokens = time.time(), 0

    def checkpoint(evaluate_first):
        improved = False
        state["elapsed"] = time.time() - run_start
        if evaluate_first:
            val_loss = evaluate()
            bpb = val_loss / data.bytes_per_val_token / math.log(2)
            improved = val_loss < state["best_val_loss"]
            if improved:
                state["best_val_loss"], state["evals_since_best"] = val_loss, 0
            else:
                state["evals_since_best"] += 1
            say(f"step {state['step']}: val loss {val_loss:.4f}, {bpb:.4f} bits/byte, "
                f"perplexity {math.exp(min(val_loss, 50)):.2f}{' (best)' if improved else ''}")
            log(dict(step=state["step"], val_loss=val_loss, val_bpb=bpb, val_ppl=math.exp(min(val_loss, 50)),
                     tokens=state["tokens"], flops=state["flops"], elapsed=state["elapsed"]))
            if cfg.sample_tokens:
                print_sample()
        if state["step"] > 0:
            snapshot = checkpoint_now()  # on every rank: with FSDP, gathering the full state is collective
            if master:
                save_checkpoint(ckpt_path, snapshot)
                if improved:
                    save_checkpoint(best_path, snapshot)

    if state["step"] == 0:
        checkpoint(evaluate_first=True)
    while True:
        step, elapsed = state["step"], time.time() - run_start
        if stop["signal"] is not None:
            # no evaluation here: a resumed run must carry the same state as one that never stopped
            checkpoint(evaluate_first=False)
            say(f"stopped by {signal.Signals(stop['signal']).name} at step {step}; continue with --resume")
            return
        reason = None
        if total_steps and step >= total_steps:
            reason = "budget reached"
        elif cfg.max_seconds and elapsed >= cfg.max_seconds:
            reason = f"time budget of {cfg.max_seconds:g}s reached"
        elif cfg.target_loss and state["best_val_loss"] <= cfg.target_loss:
            reason = f"validation loss reached the target {cfg.target_loss:g}"
        elif cfg.early_stop_patience and state["evals_since_best"] >= cfg.early_stop_patience:
            reason = f"validation loss has not improved for {cfg.early_stop_patience} evaluations; best.pt holds the best model"
        if reason:
            if step % cfg.eval_interval:  # the last step was not evaluated yet
                checkpoint(evaluate_first=True)
            say(f"{reason} at step {step}")
            return

        progress = max((step - cfg.warmup_iters) / max(total_steps - cfg.warmup_iters, 1) if total_steps else 0.0,
                       elapsed / cfg.max_seconds if cfg.max_seconds else 0.0)
        lr_scale = learning_rate_scale(step, progress, cfg) * state["lr_scale"]
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr_scale

        offsets = torch.randint(train_positions, (accum_steps * world, cfg.batch_size), generator=sampler)
        loss_sum = torch.zeros((), device=device)
        moe_load = None
        for micro in range(accum_steps):
            x, y = to_device(*data.batch("train", offsets[micro * world + rank], T), device)
            # DDP averages gradients on the last micro-step only; the others accumulate locally
            skip_sync = world > 1 and not cfg.fsdp and micro < accum_steps - 1
            with (model.no_sync() if skip_sync else contextlib.nullcontext()), autocast:
                _, loss = model(x, y)
            scaler.scale(loss / accum_steps).backward()
            loss_sum += loss.detach()
            load = raw_model.moe_load()
            if load is not None:
                moe_load = load if moe_load is None else moe_load + load
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        train_loss = loss_sum.item() / accum_steps

        # with fp16 the scaler itself skips steps whose gradients overflow; a bad loss is always ours to handle
        if not math.isfinite(train_loss) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            scaler.update()
            nonfinite_in_a_row += 1
            state["step"] += 1
            say(f"step {state['step']}: non-finite loss or gradient, step skipped ({nonfinite_in_a_row} in a row)")
            log(dict(step=state["step"], skipped=True, train_loss=None, tokens=state["tokens"],
                     flops=state["flops"], elapsed=time.time() - run_start))
            if nonfinite_in_a_row >= cfg.nan_patience:
                if state["rollbacks"] >= cfg.max_rollbacks or not os.path.exists(ckpt_path):
                    raise UserError(f"training diverged: {nonfinite_in_a_row} non-finite losses in a row at step "
                                    f"{state['step']}; lower learning_rate or raise warmup_iters")
                rollbacks, lower_lr_scale = state["rollbacks"] + 1, state["lr_scale"] * cfg.nan_lr_factor
                restore(load_checkpoint(ckpt_path))
                state.update(rollbacks=rollbacks, lr_scale=lower_lr_scale)
                nonfinite_in_a_row = 0
                say(f"rolled back to step {state['step']} from {ckpt_path}; learning rate now x{lower_lr_scale:g}")
            continue

        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        if moe_load is not None:
            if world > 1:
                dist.all_reduce(moe_load)
            raw_model.update_moe_bias(moe_load)
        nonfinite_in_a_row = 0
        state["step"] += 1
        state["tokens"] += batch_tokens
        state["flops"] += flops_per_step
        window_tokens += batch_tokens

        if state["step"] % cfg.log_interval == 0 or state["step"] == total_steps:
            now = time.time()
            tok_per_sec = window_tokens / (now - window_start)
            mfu = flops_per_token * tok_per_sec / (peak * world) if peak else None
            state["elapsed"] = now - run_start
            remaining = [(total_steps - state["step"]) * batch_tokens / tok_per_sec] if total_steps else []
            remaining += [cfg.max_seconds - state["elapsed"]] if cfg.max_seconds else []
            record = dict(step=state["step"], train_loss=train_loss, lr=optimizers[0].param_groups[0]["lr"],
                          grad_norm=grad_norm.item(), tokens=state["tokens"], flops=state["flops"],
                          elapsed=state["elapsed"], tok_per_sec=tok_per_sec, mfu=mfu)
            if moe_load is not None:  # the busiest expert's load over the mean: 1.0 is perfect balance
                record["moe_max_load"] = (moe_load.max(-1).values / moe_load.float().mean(-1)).max().item()
            log(record)
            say(f"step {state['step']}{f'/{total_steps}' if total_steps else ''} | loss {train_loss:.4f} | "
                f"lr {record['lr']:.2e} | grad {record['grad_norm']:.2f} | {tok_per_sec:,.0f} tok/s | "
                f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | eta {max(min(remaining), 0) / 60:.1f} min")
            window_start, window_tokens = now, 0

        if state["step"] % cfg.eval_interval == 0:
            checkpoint(evaluate_first=True)
        if world > 1:  # every process must agree to stop at the same step
            flag = torch.tensor(float(stop["signal"] or 0), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = int(flag.item()) or None


if __name__ == "__main__":
    configurator.run_script(main)
