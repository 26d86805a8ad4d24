"""One readable GPT, classic (GPT-2) or modern (RoPE, RMSNorm, ReLU^2 or SwiGLU, QK-norm), with an optional
DeepSeekMoE block, KV-cache generation, and the parameter and FLOP counts used to plan runs. References:
GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"); RoPE (Su et al. 2021,
"RoFormer", arXiv:2104.09864); DeepSeekMoE (Dai et al. 2024, arXiv:2401.06066) balanced as DeepSeek-V3 (arXiv:2412.19437)."""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# Architecture fields only (GPTConfig defaults equal "classic"; sizes are set apart). classic is GPT-2; modern is
# the recipe of recent open models and speedruns, where mlp="swiglu" (LLaMA) is the other choice.
PRESETS = {
    "classic": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False, tie_embeddings=True),
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", bias=False, qk_norm=True, tie_embeddings=False),
}
CHOICES = dict(pos_emb=("learned", "rope"), norm=("layernorm", "rmsnorm"), mlp=("gelu", "swiglu", "relu2"))
SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "moe_top_k", "moe_every")


def require(ok, message):
    if not ok:
        raise ValueError(message)


@dataclass
class GPTConfig:
    vocab_size: int = 50304          # GPT-2's 50,257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024           # the longest context, in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0               # 0 means n_head (plain multi-head); fewer = grouped-query attention
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                # biases in the Linear layers and LayerNorms
    pos_emb: str = "learned"         # "learned" or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"          # "layernorm" or "rmsnorm"
    mlp: str = "gelu"                # "gelu", "swiglu" or "relu2"
    mlp_hidden: int = 0              # 0 = 4*n_embd (gelu, relu2) or 8/3*n_embd rounded up to a multiple of 64 (swiglu)
    qk_norm: bool = False
    tie_embeddings: bool = True
    moe_experts: int = 0             # routed experts per MoE layer; 0 = dense everywhere
    moe_top_k: int = 2               # routed experts each token uses
    moe_shared_experts: int = 1      # experts every token uses
    moe_expert_hidden: int = 0       # 0 = mlp_hidden // 4 (fine-grained experts)
    moe_first_dense: int = 1         # the first layers stay dense
    moe_every: int = 1               # after those, every k-th layer is MoE
    moe_bias_rate: float = 1e-3      # DeepSeek-V3's gamma, the step of the balancing bias
    moe_aux_loss: float = 0.0        # coefficient of the classic auxiliary balance loss; 0 = off
    mup: bool = False                # muP (the table above GPT): learning rates tuned at mup_base_width hold at this width
    mup_base_width: int = 0          # with mup, the n_embd the hyperparameters were tuned at
    mup_base_head_dim: int = 0       # with mup, that model's head dimension; 0 = mup_base_width / n_head (the same heads)

    def __post_init__(self):
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if name in CHOICES:
                require(value in CHOICES[name], f"{name} must be one of {', '.join(map(repr, CHOICES[name]))}, got {value!r}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):  # sizes at least 1, other numbers 0
                low = 1 if name in SIZES else 0
                require(value >= low, f"{name} must be at least {low}, got {value}")
        require(self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require(self.n_head % self.kv_heads == 0, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        require(self.pos_emb != "rope" or self.head_dim % 2 == 0, f"rope needs an even head dimension, got {self.head_dim}")
        if self.moe_experts:  # the grouped products read rows of whole 16-byte units: widths in multiples of 8
            require(self.moe_top_k <= self.moe_experts, f"moe_top_k ({self.moe_top_k}) must be at most moe_experts")
            require(self.n_embd % 8 == 0 and self.expert_width % 8 == 0,
                    f"MoE needs n_embd ({self.n_embd}) and the expert width ({self.expert_width}) in multiples of 8")
            require(self.moe_first_dense < self.n_layer, f"moe_first_dense ({self.moe_first_dense}) leaves no MoE layer")
        if self.mup:
            require(self.mup_base_width > 0, "mup needs mup_base_width, the n_embd its hyperparameters were tuned at")
            require(self.mup_base_head_dim or self.mup_base_width % self.n_head == 0,
                    f"mup_base_width ({self.mup_base_width}) is no multiple of n_head ({self.n_head}): give the base "
                    "model's head dimension as mup_base_head_dim")

    # Derived sizes are properties, not fields set in __post_init__: a saved config keeps meaning "the default"
    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self):  # SwiGLU has three matrices, not two: 8/3 keeps the parameters of 4x (Shazeer 2020)
        return self.mlp_hidden or (-(-8 * self.n_embd // (3 * 64)) * 64 if self.mlp == "swiglu" else 4 * self.n_embd)

    @property
    def expert_width(self):
        return self.moe_expert_hidden or self.mlp_width // 4

    @property
    def width_ratio(self):  # muP's width multiplier m; 1 without muP, where every rule of the table is GPT-2's
        return self.n_embd / self.mup_base_width if self.mup else 1.0

    @property
    def attention_scale(self):  # None is SDPA's 1/sqrt(head_dim); muP's 1/head_dim, equal to it at the base width
        return math.sqrt(self.mup_base_head_dim or self.mup_base_width // self.n_head) / self.head_dim if self.mup else None

    def is_moe_layer(self, layer):
        return self.moe_experts > 0 and layer >= self.moe_first_dense and (layer - self.moe_first_dense) % self.moe_every == 0


def flops_per_token(config, n_active_non_embedding):
    """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, appendix B): 6N for the forward
    and backward matmuls of the N active non-embedding parameters, plus attention over T = block_size tokens."""
    return 6 * n_active_non_embedding + 12 * config.n_layer * config.n_head * config.head_dim * config.block_size


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019) computed in float32, as autocast does for LayerNorm: the statistics
    are more accurate, and input and weight share a dtype, without which torch skips the fused kernel."""
    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).type_as(x)


def make_norm(config, dim):  # RMSNorm's explicit eps: the default, finfo(dtype).eps, is large in bf16
    return nn.LayerNorm(dim, bias=config.bias) if config.norm == "layernorm" else RMSNorm(dim, eps=1e-6)


def rope_tables(head_dim, length, theta):
    """cos and sin of position * theta^(-2i/head_dim) for every position and frequency i (RoFormer), stacked."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()))  # (2, length, head_dim / 2)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x_i, x_{i + head_dim/2}) by their angles: the half-split layout of GPT-NeoX,
    the same rotation as RoFormer's interleaved pairs up to a fixed permutation of the head dimensions."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer, (n_layer, batch, n_kv_head, max_len, head_dim), preallocated so that decoding
    writes in place; the first `pos` positions are filled. `tokens` keeps the ids, to rebuild a full cache."""
    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(n_layer, batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.pos = max_len, 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # which slice of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # separate projections rather than one fused qkv matrix, so Muon orthogonalises each on its own
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # QK-norm bounds the attention logits, which otherwise can grow until training diverges (Dehghani et al. 2023)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.dropout, self.scale = config.dropout, config.attention_scale

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn_mask, is_causal = None, True  # training: no mask, so SDPA keeps its flash fast path
        if kv_cache is not None:
            start, end = kv_cache.pos, kv_cache.pos + T
            kv_cache.k[self.layer, :, :, start:end] = k
            kv_cache.v[self.layer, :, :, start:end] = v
            k, v = kv_cache.k[self.layer, :, :, :end], kv_cache.v[self.layer, :, :, :end]
            # SDPA aligns is_causal's mask to the top-left corner: with T queries over `end` keys, query i would see
            # keys 0..i only, but it sits at position start + i. A single query sees every key and needs no mask.
            is_causal = start == 0
            if start > 0 and T > 1:
                attn_mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal, scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config, hidden):
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if self.kind == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(activation(self.kind, self.c_fc(x), self.c_gate(x) if self.kind == "swiglu" else None))


def activation(kind, h, gate=None):
    """The MLP's nonlinearity on the up-projection h (and, for SwiGLU, the gate projection)."""
    if kind == "gelu":
        return F.gelu(h)
    if kind == "relu2":  # Primer (So et al. 2021): squared ReLU beats GELU at the same cost
        return F.relu(h).square()
    return F.silu(gate) * h  # SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")


class GroupedLinear(nn.Module):
    """A Linear per expert, stacked: weight (experts, in, out), bias (experts, out). Rows ends[e-1]:ends[e] of x
    go through expert e, all experts in one grouped matrix product that reads the weight as it is stored."""
    def __init__(self, experts, d_in, d_out, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_in, d_out) / d_in ** 0.5)  # GPT redraws it
        self.bias = nn.Parameter(torch.zeros(experts, d_out)) if bias else None
        # torch's grouped product is one kernel only in bf16 on compute capability 9.x and 10.x GPUs (H100, H200,
        # B200); elsewhere it runs one product per expert, and torch.compile accepts it in bf16 only: other dtypes run
        # it eagerly. Made here, not at import: torch.compiler.disable imports torch._dynamo, 1.2 s that dense models skip.
        self.eager_grouped_mm = torch.compiler.disable(F.grouped_mm)

    def forward(self, x, ends, expert_of_row):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        grouped_mm = F.grouped_mm if dtype == torch.bfloat16 else self.eager_grouped_mm
        y = grouped_mm(x.to(dtype), self.weight.to(dtype), offs=ends)
        return y if self.bias is None else y + self.bias.to(dtype)[expert_of_row]


class MoE(nn.Module):
    """DeepSeekMoE: shared experts every token uses, plus many small routed experts of which each token uses top_k,
    all of them (no capacity limit); the load is balanced by DeepSeek-V3's bias, optionally by an auxiliary loss."""
    def __init__(self, config):
        super().__init__()
        self.top_k, self.kind, self.n_experts = config.moe_top_k, config.mlp, config.moe_experts
        self.router = nn.Linear(config.n_embd, config.moe_experts, bias=False)
        C, H = config.n_embd, config.expert_width  # the routed experts: MLP's projections, stacked over experts
        shapes = dict(c_fc=(C, H), **({"c_gate": (C, H)} if self.kind == "swiglu" else {}), c_proj=(H, C))
        self.experts = nn.ModuleDict({n: GroupedLinear(self.n_experts, i, o, config.bias) for n, (i, o) in shapes.items()})
        # n shared experts are one MLP n times as wide: their outputs add up over disjoint hidden units
        self.shared = MLP(config, config.moe_shared_experts * config.expert_width) if config.moe_shared_experts else None
        # a buffer, not a parameter: set by update_moe_bias, not by the optimizer, but saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(config.moe_experts))
        self.register_buffer("expert_load", torch.zeros(config.moe_experts, dtype=torch.long), persistent=False)
        self.aux_loss = None

    def _load_from_state_dict(self, state_dict, prefix, *args):  # older checkpoints: experts.<e>.c_fc.weight, (out, in)
        old = prefix + "experts.0."
        for key in [k[len(old):] for k in state_dict if k.startswith(old)]:
            stacked = torch.stack([state_dict.pop(f"{prefix}experts.{e}.{key}") for e in range(self.n_experts)])
            state_dict[prefix + "experts." + key] = stacked.transpose(1, 2) if key.endswith("weight") else stacked
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x):
        B, T, C = x.size()
        x = x.reshape(-1, C)
        # DeepSeek-V3 section 2.1.2: sigmoid affinities; the bias only decides which experts are chosen, the
        # gates come from the un-biased affinities of the chosen ones, normalised to sum to 1
        affinity = torch.sigmoid(self.router(x).float())
        chosen = torch.topk(affinity + self.expert_bias, self.top_k, dim=-1).indices      # (N, top_k)
        gates = affinity.gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        # dispatch: sort the (token, expert) pairs by expert, so that each expert's rows are one contiguous slice
        flat_choice = chosen.view(-1)
        order = flat_choice.argsort(stable=True)
        # not bincount: its output's length depends on the data, which costs a host sync on a GPU
        counts = torch.zeros_like(self.expert_load).index_add_(0, flat_choice, torch.ones_like(flat_choice))
        self.expert_load.copy_(counts)
        groups = (counts.cumsum(0).to(torch.int32), flat_choice[order])  # where each expert's rows end, each row's expert
        rows = x[order // self.top_k]
        up = self.experts.c_fc(rows, *groups)
        gate = self.experts.c_gate(rows, *groups) if self.kind == "swiglu" else None
        out_sorted = self.experts.c_proj(activation(self.kind, up, gate), *groups)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # back to (token, choice) order: summing over a token's choices is deterministic
        y = (out.view(-1, self.top_k, C) * gates.to(out.dtype).unsqueeze(-1)).sum(1)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            # Switch Transformer's balance loss (Fedus et al. 2021): n_experts * sum_i f_i * P_i, with f_i the
            # share of choices that went to expert i and P_i its mean normalised affinity; 1 when balanced
            share = counts.float() / flat_choice.numel()
            mean_affinity = (affinity / affinity.sum(-1, keepdim=True)).mean(0)
            self.aux_loss = self.n_experts * (share * mean_affinity).sum()
        return y.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config, config.mlp_width)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), rope, kv_cache))
        return x + self.resid_dropout(self.mlp(self.ln_2(x)))


# muP, as "The Practitioner's Guide to the Maximal Update Parameterization" (EleutherAI and Cerebras 2024) writes
# Tensor Programs V's Table 3 (Yang et al. 2022, arXiv:2203.03466), with m = n_embd / mup_base_width:
#   embeddings wte, wpe             init std 0.02            AdamW lr x 1
#   hidden matrices (in the blocks) init std 0.02 / sqrt(m)  AdamW lr / m, weight decay x m (the same decay per step)
#   output head                     init std 0.02            AdamW lr x 1, logits / m
#   attention scores                q.k / head_dim x sqrt(base head_dim), instead of q.k / sqrt(head_dim)
#   biases, norms                   as without muP
# Muon's matrices keep muon_lr: its orthogonalised update, scaled by sqrt(max(1, fan_out / fan_in)), already has
# the spectral norm muP asks for (Yang, Simon and Bernstein 2023, arXiv:2310.17813). At m = 1 this is GPT-2's init.
def is_hidden_matrix(name, p):
    return p.ndim >= 2 and name.startswith("transformer.h.") and not name.endswith("bias")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.transformer = nn.ModuleDict(dict(layers, drop=nn.Dropout(config.dropout), h=blocks,
                                              ln_f=make_norm(config, config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix reads tokens in and writes them out (Press & Wolf 2017)
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos_emb == "rope":  # not persistent: recomputed from the config, never worth saving
            self.register_buffer("rope", rope_tables(config.head_dim, config.block_size, config.rope_theta), persistent=False)
        self.moe_layers = [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]
        # GPT-2 initialisation: N(0, 0.02) for every matrix (expert stacks too), each residual branch's output scaled by
        # 1/sqrt(2 * n_layer) as 2 * n_layer branches add into the residual stream; biases 0, norms keep their 1s and 0s.
        # muP narrows the hidden matrices by sqrt(m) more (the table above).
        for name, p in self.named_parameters():
            if name.endswith("bias"):  # the experts' stacked biases are 2-D: the name, not ndim, tells them apart
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std / math.sqrt(config.width_ratio) if is_hidden_matrix(name, p) else std)

    def forward(self, idx, targets=None, kv_cache=None):
        T, start = idx.size(1), (kv_cache.pos if kv_cache is not None else 0)
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size ({self.config.block_size})")
        x = self.transformer.wte(idx)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        rope = self.rope[:, start:start + T] if self.config.pos_emb == "rope" else None  # (cos, sin)
        if kv_cache is not None:
            if start + T > kv_cache.max_len:
                raise ValueError(f"{start + T} tokens exceed the KV cache's max_len ({kv_cache.max_len})")
            kv_cache.tokens[:, start:start + T] = idx
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:  # inference: only the last position's logits are needed to sample
            return self.logits(x[:, [-1], :]).float(), None
        # the loss in float32, the logits returned as computed: a float32 copy returned makes torch.compile write one
        # more batch x block x vocab tensor per step (6.6 GB at GPT-2's shape, batch 32); a cast inside the loss fuses
        logits = self.logits(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if self.training and self.config.moe_aux_loss > 0 and self.moe_layers:
            loss = loss + self.config.moe_aux_loss * sum(moe.aux_loss for moe in self.moe_layers)
        return logits, loss

    def logits(self, x):
        logits = self.lm_head(x)
        return logits / self.config.width_ratio if self.config.mup else logits  # muP's output multiplier 1/m

    def param_counts(self):
        """Parameters in total, without the embeddings, and active per token (top_k of the routed experts). Embedding
        means the input tables (wte, wpe) only: the output head, a real matmul even when tied, counts (as in nanoGPT)."""
        total = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        embedding = self.transformer.wpe.weight.numel() if self.config.pos_emb == "learned" else 0
        if not self.config.tie_embeddings:
            embedding += self.transformer.wte.weight.numel()
        inactive = sum(sum(p.numel() for p in moe.experts.parameters()) // moe.n_experts * (moe.n_experts - moe.top_k)
                       for moe in self.moe_layers)
        return dict(total=total, non_embedding=total - embedding, active=total - inactive,
                    active_non_embedding=total - embedding - inactive)

    def flops_per_token(self):
        return flops_per_token(self.config, self.param_counts()["active_non_embedding"])

    def moe_load(self):
        """Tokens routed to each expert in the last forward, (n_moe_layers, moe_experts); None when dense."""
        return torch.stack([moe.expert_load for moe in self.moe_layers]) if self.moe_layers else None

    @torch.no_grad()
    def update_moe_bias(self, load=None):
        """DeepSeek-V3's auxiliary-loss-free balancing, after each optimizer step: raise the bias of experts below
        the mean load, lower it above, by moe_bias_rate. train.py passes the load summed over micro-steps and ranks."""
        load = self.moe_load() if load is None else load
        for moe, layer_load in zip(self.moe_layers, load.float() if self.moe_layers else ()):
            moe.expert_bias += self.config.moe_bias_rate * torch.sign(layer_load.mean() - layer_load)

    def new_kv_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """An empty cache; by default on the model's device, in the autocast dtype if autocast is on."""
        c, max_len = self.config, max_len or self.config.block_size
        if max_len > c.block_size:
            raise ValueError(f"max_len ({max_len}) must be at most block_size ({c.block_size})")
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.lm_head.weight.dtype
        return KVCache(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, device, dtype)

    def _extend(self, kv_cache, idx):
        """Run new tokens on top of the cache and return the last position's logits (B, V). A cache that would
        overflow is rebuilt from the most recent half of the context (learned positions restart at 0)."""
        if kv_cache.pos + idx.size(1) > kv_cache.max_len:
            idx = torch.cat((kv_cache.tokens[:, :kv_cache.pos], idx), dim=1)[:, -(kv_cache.max_len // 2):]
            kv_cache.pos = 0
        return self(idx, kv_cache=kv_cache)[0][:, -1]

    @torch.inference_mode()  # no_grad, and no view tracking or version counts either: 4% faster per token on a CPU
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, stop_tokens=(),
                 kv_cache=None, vocab_size=None):
        """Yield one (B,) LongTensor per new token as soon as it is sampled; the prompt `idx` (B, T) is prefilled once, on
        top of `kv_cache` if given (a conversation goes on), which in the end holds every token. temperature 0 is greedy;
        top_k 0 and top_p 1.0 are off. Stops after max_new_tokens or once every row has produced a stop token (a row
        that is done repeats it). `vocab_size` (the tokenizer's) keeps padding rows from being sampled."""
        kv_cache = kv_cache if kv_cache is not None else self.new_kv_cache(idx.size(0), device=idx.device)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        token = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        logits = self._extend(kv_cache, idx)
        for _ in range(max_new_tokens):
            token = torch.where(done, token, sample_token(logits[:, :vocab_size], temperature, top_k, top_p, generator))
            done |= torch.isin(token, stop)
            yield token
            logits = self._extend(kv_cache, token[:, None])
            if stop.numel() and done.all():
                return


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token id per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2019): keep the smallest set of tokens whose probability
        # reaches top_p; a token stays if the mass before it is still short of top_p, so the best always stays
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
