"""How a recipe's settings (a config file and --key=value) become what train.py trains: the model's
config from a preset and the data's vocabulary, the budget in steps, and the optimizers: AdamW for
everything, or Muon for the hidden weight matrices and AdamW for the rest (embeddings, output head,
norms, biases, routers), with muP's rates where it is on. bench.py, mup.py and scaling.py build
their models and optimizers here too, so that they measure what train.py runs.
"""

import dataclasses
import math

import torch

import configurator
from configurator import UserError
from model import GPT, GPTConfig, PRESETS, is_hidden_matrix

# With no config file, train.py trains this small model on the Shakespeare default. Config files
# and --key=value set any GPTConfig field (n_layer, n_embd, block_size, mlp, moe_experts, ...).
DEFAULT_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
MODEL_KEYS = {f.name for f in dataclasses.fields(GPTConfig)} | {"preset"}


def model_config(cfg, overrides, vocab_size):
    """The preset under the recipe's model keys, with the vocabulary padded to vocab_multiple."""
    if cfg.preset not in PRESETS:
        raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    base = {**PRESETS[cfg.preset], **DEFAULT_MODEL, "vocab_size": padded}
    return configurator.build(GPTConfig, overrides, **base)


def start_config(cfg, overrides, data, start, say):
    """The architecture of the checkpoint a run resumes or starts from, once its tokens are known
    to mean this data's."""
    if overrides.keys() & MODEL_KEYS:
        say("note: the model is the checkpoint's; "
            f"{', '.join(sorted(overrides.keys() & MODEL_KEYS))} from this command not used")
    model_cfg = GPTConfig(**start["model_config"])
    same = start.get("tokenizer") in (None, data.checkpoint_fields["tokenizer"])
    if not cfg.resume and (not same or data.vocab_size > model_cfg.vocab_size):
        raise UserError(f"init_from's tokenizer is not this data's (data/{cfg.dataset}): its token "
                        "ids would mean other text; prepare the data with the model's tokenizer")
    return model_cfg


def batch_plan(cfg, block_size, world):
    """(micro-steps per optimizer step, tokens per optimizer step over all processes)."""
    micro_tokens = cfg.batch_size * block_size * world
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(f"batch_tokens={batch_tokens} is not a multiple of batch_size x block_size "
                        f"x processes = {micro_tokens}")
    return batch_tokens // micro_tokens, batch_tokens


def budget_steps(cfg, batch_tokens, flops_per_token):
    """Steps until the first budget that is set: max_iters, max_tokens or max_flops."""
    flops_per_step = flops_per_token * batch_tokens
    budgets = dict(max_iters=(cfg.max_iters, cfg.max_iters),
                   max_tokens=(cfg.max_tokens, cfg.max_tokens // batch_tokens),
                   max_flops=(cfg.max_flops, int(cfg.max_flops // flops_per_step)))
    for name, (value, steps) in budgets.items():
        if value and not steps:
            raise UserError(f"{name}={value:g} is less than one step ({batch_tokens:,} tokens, "
                            f"{flops_per_step:.3g} FLOPs per step)")
    if not any(value for value, _ in budgets.values()):
        raise UserError("no budget: set max_iters, max_tokens or max_flops")
    return min(steps for value, steps in budgets.values() if value)


# Keller Jordan's quintic Newton-Schulz coefficients, chosen to orthogonalise in few steps
NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.775, 2.0315), 5


def make_optimizers(model, cfg, device, dtype):
    """The optimizers for `model` (before torch.compile or DDP wrap it), as cfg.optimizer says."""
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer must be adamw or muon, got {cfg.optimizer!r}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # Muon is for hidden layers: the router, a classifier over experts, and the experts' stacked
    # 3-D weights stay with AdamW
    hidden = {n: p for n, p in params.items() if cfg.optimizer == "muon" and is_hidden_matrix(n, p)
              and p.ndim == 2 and ".router." not in n}
    rest = [(n, p) for n, p in params.items() if n not in hidden]
    # weight decay on matrices only, never on norms and biases (GPT-2, nanoGPT); muP's hidden
    # matrices (model.py's table) are a group of their own, at lr / m and weight decay x m
    m = model.config.width_ratio
    scaled = {n for n, p in rest if model.config.mup and is_hidden_matrix(n, p)}
    matrix = {n for n, p in rest if p.ndim >= 2 and not n.endswith(".bias")} - scaled
    groups = [dict(params=[p for n, p in rest if n in matrix], weight_decay=cfg.weight_decay),
              dict(params=[p for n, p in rest if n in scaled], lr=cfg.learning_rate / m,
                   weight_decay=cfg.weight_decay * m),
              dict(params=[p for n, p in rest if n not in matrix | scaled], weight_decay=0.0)]
    optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                    betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")]
    if hidden:  # the iteration in bf16 where the run computes in it, else in float32
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        optimizers.append(Muon(list(hidden.values()), lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                               orthogonalise_in=ns_dtype))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks"): SGD
    with Nesterov momentum whose update is orthogonalised by a Newton-Schulz iteration, scaled by
    sqrt(max(1, rows / cols)), with decoupled weight decay: torch.optim.Muon's algorithm and
    defaults, with the iteration in a dtype of our choice. torch's runs it in bf16, which a CPU
    without bf16 instructions emulates, many times slower (measured in RESULTS.md)."""

    def __init__(self, params, lr, weight_decay, momentum=0.95, orthogonalise_in=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.orthogonalise_in = orthogonalise_in

    @torch.no_grad()
    def step(self, closure=None):  # the Optimizer interface; Muon needs no closure
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.lerp_(p.grad, 1 - momentum)
                update = orthogonalise(p.grad.lerp(buffer, momentum), self.orthogonalise_in)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def orthogonalise(grad, dtype, eps=1e-7):
    """The nearest semi-orthogonal matrix to `grad`, roughly (its singular values end up between
    about 0.5 and 1.5, which trains as well): the quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X
    on the wide orientation, from X scaled to a spectral norm of at most 1."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def planned_run(cfg, overrides, vocab_size, flops, n_opt, block_size, gpus):
    """scaling.py plan's run of `flops` near n_opt parameters: its shape, tokens, steps and the
    settings of its config file (batch, learning rate, warmup, the FLOPs that stop it)."""
    def shaped(depth):  # nanochat's single dial: width 64 x depth, with 64-wide heads
        shape = dict(n_layer=depth, n_embd=64 * depth, n_head=depth, block_size=block_size)
        with torch.device("meta"):
            model = GPT(model_config(cfg, {**overrides, **shape}, vocab_size))
        return shape, model.param_counts()["active_non_embedding"], model.flops_per_token()
    # the blocks hold about 12 L d^2 = 49,152 L^3 parameters: the depths around that are counted
    guess = max(1, round((n_opt / 49152) ** (1 / 3)))
    shape, n, per_token = min((shaped(d) for d in range(max(1, guess - 3), guess + 2)),
                              key=lambda s: abs(math.log(s[1] / n_opt)))
    # DeepSeek LLM's fits of the best batch (tokens) and AdamW learning rate against compute
    # (arXiv:2401.02954, eq. 1)
    best_batch = 0.292 * flops ** 0.3271
    micro = block_size * min(16, max(1, int(best_batch) // block_size)) * gpus
    batch_tokens = max(1, round(best_batch / micro)) * micro
    tokens = flops / per_token
    steps = int(tokens // batch_tokens)
    settings = {**shape, "batch_size": micro // block_size // gpus, "batch_tokens": batch_tokens,
                "learning_rate": float(f"{0.3118 * flops ** -0.125:.3g}"), "max_iters": 0,
                "max_tokens": 0, "warmup_iters": max(1, min(1000, steps // 20)),
                "max_flops": float(f"{flops:.4g}")}
    return dict(shape=shape, N=n, tokens=tokens, steps=steps, settings=settings)
