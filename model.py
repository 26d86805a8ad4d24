"""One readable GPT: classic (GPT-2) or modern (RoPE, RMSNorm, ReLU^2 or SwiGLU, QK-norm), with an
optional DeepSeekMoE block, KV-cache generation, and the parameter and FLOP counts runs are planned
with. References: GPT-2 (Radford et al. 2019); RoPE (Su et al. 2021, arXiv:2104.09864); DeepSeekMoE
(Dai et al. 2024, arXiv:2401.06066), balanced as in DeepSeek-V3 (arXiv:2412.19437).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# classic is GPT-2 (GPTConfig's defaults); modern the recipe of recent models and speedruns
PRESETS = dict(classic=dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                            qk_norm=False, tie_embeddings=True),
               modern=dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", bias=False,
                           qk_norm=True, tie_embeddings=False))
CHOICES = dict(pos_emb=("learned", "rope"), norm=("layernorm", "rmsnorm"),
               mlp=("gelu", "swiglu", "relu2"))
SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "moe_top_k", "moe_every")


@dataclass
class GPTConfig:
    vocab_size: int = 50304       # GPT-2's 50,257 padded to a multiple of 64 for faster matmuls
    block_size: int = 1024        # the longest context, in tokens
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0 = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True             # biases in the Linear layers and LayerNorms
    pos_emb: str = "learned"      # "learned" or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"       # "layernorm" or "rmsnorm"
    mlp: str = "gelu"             # "gelu", "swiglu" or "relu2"
    mlp_hidden: int = 0           # 0 = 4 * n_embd, or for swiglu 8/3 * n_embd rounded up to 64
    qk_norm: bool = False
    tie_embeddings: bool = True
    moe_experts: int = 0          # routed experts per MoE layer; 0 = dense everywhere
    moe_top_k: int = 2            # routed experts each token uses
    moe_shared_experts: int = 1   # experts every token uses
    moe_expert_hidden: int = 0    # 0 = mlp_hidden // 4 (fine-grained experts)
    moe_first_dense: int = 1      # the first layers stay dense
    moe_every: int = 1            # after those, every k-th layer is MoE
    moe_bias_rate: float = 1e-3   # DeepSeek-V3's gamma, the step of the balancing bias
    mup: bool = False             # muP (the table above GPT): rates tuned at the base width hold
    mup_base_width: int = 0       # with mup, the n_embd the hyperparameters were tuned at
    mup_base_head_dim: int = 0    # with mup, that model's head size; 0 = mup_base_width / n_head

    def __post_init__(self):
        """Refuse a shape that would fail later, in one line, and derive the sizes that follow.
        Derived sizes are attributes, not fields: a saved config keeps meaning "the default"."""
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = [f"{k} must be one of {', '.join(v)}" for k, v in CHOICES.items()
                    if value[k] not in v]
        problems += [f"{k} must be at least {int(k in SIZES)}, got {v}" for k, v in value.items()
                     if type(v) in (int, float) and not v >= (k in SIZES)]
        if not problems:
            self.head_dim, self.kv_heads = self.n_embd // self.n_head, self.n_kv_head or self.n_head
            swiglu = -(-8 * self.n_embd // (3 * 64)) * 64  # 8/3: 4x's parameters (Shazeer 2020)
            self.mlp_width = self.mlp_hidden or dict(swiglu=swiglu).get(self.mlp, 4 * self.n_embd)
            self.expert_width = self.moe_expert_hidden or self.mlp_width // 4
            base = self.mup_base_width if self.mup and self.mup_base_width else self.n_embd
            self.width_ratio = self.n_embd / base  # muP's m
            problems = [message for wrong, message in [
                (self.dropout >= 1, "dropout must be below 1"),
                (self.n_embd % self.n_head, "n_embd must be divisible by n_head"),
                (self.n_head % self.kv_heads, "n_head must be divisible by n_kv_head"),
                (self.pos_emb == "rope" and self.head_dim % 2, "rope needs an even head dimension"),
                (self.moe_experts and self.moe_top_k > self.moe_experts, "moe_top_k > moe_experts"),
                (self.moe_experts and (self.n_embd % 8 or self.expert_width % 8),  # 16-byte rows
                 "MoE needs n_embd and the expert width in multiples of 8"),
                (self.moe_experts and self.moe_first_dense >= self.n_layer, "no MoE layer left"),
                (self.mup and not self.mup_base_width, "mup needs mup_base_width (tuned n_embd)"),
                (self.mup and not self.mup_base_head_dim and self.mup_base_width % self.n_head,
                 "mup_base_width is no multiple of n_head: give mup_base_head_dim")] if wrong]
        if problems:
            raise ValueError(f"invalid model config: {problems[0]}")
        # None is SDPA's 1/sqrt(head_dim); muP's goes as 1/head_dim, equal at the base width
        base_head_dim = self.mup_base_head_dim or self.mup_base_width // self.n_head
        self.attention_scale = math.sqrt(base_head_dim) / self.head_dim if self.mup else None

    def is_moe_layer(self, layer):
        return (self.moe_experts > 0 and layer >= self.moe_first_dense
                and (layer - self.moe_first_dense) % self.moe_every == 0)


def flops_per_token(c, n_active_non_embedding):
    """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, appendix B): the
    forward and backward matmuls of N parameters, plus attention over T = block_size tokens."""
    return 6 * n_active_non_embedding + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019) in float32, as autocast runs LayerNorm: more accurate
    statistics, and input and weight share a dtype, without which torch skips the fused kernel."""
    def forward(self, x):
        y = F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)
        return y.type_as(x)


def make_norm(config, dim):  # RMSNorm's default eps, finfo(dtype).eps, is large in bf16
    return nn.LayerNorm(dim, bias=config.bias) if config.norm == "layernorm" else RMSNorm(dim, 1e-6)


def rope_tables(head_dim, length, theta):
    """cos and sin of position * theta^(-2i/head_dim), for every position and frequency i."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()))  # (2, length, head_dim / 2)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x_i, x_{i + head_dim/2}): RoFormer's rotation in GPT-NeoX's layout."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer, allocated once so that decoding writes in place (gpt-fast's
    static cache); `pos` positions are filled, and `tokens` keeps their ids."""
    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.pos = max_len, 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # which slice of the KV cache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # separate projections, not one fused qkv matrix, so that Muon orthogonalises each alone
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # QK-norm keeps attention logits from growing until training diverges (Dehghani et al. 2023)
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
        mask, causal = None, True  # training passes no mask, so SDPA keeps its flash kernel
        if kv_cache is not None:
            start, end = kv_cache.pos, kv_cache.pos + T
            kv_cache.k[self.layer, :, :, start:end] = k
            kv_cache.v[self.layer, :, :, start:end] = v
            k, v = kv_cache.k[self.layer, :, :, :end], kv_cache.v[self.layer, :, :, :end]
            # is_causal aligns its mask to the top left: T queries after `start` cached keys need
            # their own mask; a single query sees every key and needs none
            causal = start == 0
            if start > 0 and T > 1:
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale, enable_gqa=k.size(1) < q.size(1))
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def activation(kind, h, gate=None):
    """The MLP's nonlinearity on the up-projection h (and, for SwiGLU, the gate projection)."""
    if kind == "gelu":
        return F.gelu(h)
    if kind == "relu2":  # Primer (So et al. 2021): squared ReLU beats GELU at the same cost
        return F.relu(h).square()
    return F.silu(gate) * h  # SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer")


class MLP(nn.Module):
    def __init__(self, config, hidden):
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if self.kind == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        gate = self.c_gate(x) if self.kind == "swiglu" else None
        return self.c_proj(activation(self.kind, self.c_fc(x), gate))


class GroupedLinear(nn.Module):
    """A Linear per expert, stacked (experts, in, out): rows ends[e-1]:ends[e] go to expert e."""
    def __init__(self, experts, d_in, d_out, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_in, d_out) / d_in ** 0.5)  # GPT redraws
        self.bias = nn.Parameter(torch.zeros(experts, d_out)) if bias else None
        # torch.compile takes the grouped product in bf16 only; other dtypes run it eagerly
        self.eager_grouped_mm = torch.compiler.disable(F.grouped_mm)

    def forward(self, x, ends, expert_of_row):
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        grouped_mm = F.grouped_mm if dtype == torch.bfloat16 else self.eager_grouped_mm
        y = grouped_mm(x.to(dtype), self.weight.to(dtype), offs=ends)
        return y if self.bias is None else y + self.bias.to(dtype)[expert_of_row]


class MoE(nn.Module):
    """DeepSeekMoE: shared experts every token uses, and many small routed experts of which each
    token uses top_k, with no capacity limit; the load is balanced by DeepSeek-V3's bias."""
    def __init__(self, config):
        super().__init__()
        self.top_k, self.kind, self.n_experts = config.moe_top_k, config.mlp, config.moe_experts
        self.router = nn.Linear(config.n_embd, config.moe_experts, bias=False)
        C, H = config.n_embd, config.expert_width  # MLP's projections, stacked over experts
        gate = {"c_gate": (C, H)} if self.kind == "swiglu" else {}
        shapes = dict(c_fc=(C, H), **gate, c_proj=(H, C))
        self.experts = nn.ModuleDict({name: GroupedLinear(self.n_experts, *shape, config.bias)
                                      for name, shape in shapes.items()})
        # n shared experts are one MLP n times as wide: their outputs add up over disjoint units
        width = config.moe_shared_experts * config.expert_width
        self.shared = MLP(config, width) if config.moe_shared_experts else None
        # buffers, not parameters: the bias is set by update_moe_bias, the load counted in training
        self.register_buffer("expert_bias", torch.zeros(config.moe_experts))
        self.register_buffer("expert_load", torch.zeros(config.moe_experts, dtype=torch.long),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        x = x.reshape(-1, C)
        # DeepSeek-V3 section 2.1.2: sigmoid affinities; the bias only decides which experts are
        # chosen, the gates are the chosen ones' unbiased affinities, normalised to sum to 1
        affinity = torch.sigmoid(self.router(x).float())
        chosen = torch.topk(affinity + self.expert_bias, self.top_k, dim=-1).indices  # (N, top_k)
        gates = affinity.gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        # dispatch: sort the (token, expert) pairs by expert, so each expert's rows are one slice
        flat_choice = chosen.view(-1)
        order = flat_choice.argsort(stable=True)
        # not bincount: its output's length depends on the data, which costs a host sync on a GPU
        ones = torch.ones_like(flat_choice)
        counts = torch.zeros_like(self.expert_load).index_add_(0, flat_choice, ones)
        groups = (counts.cumsum(0).to(torch.int32), flat_choice[order])  # where each expert ends
        rows = x[order // self.top_k]
        gate = self.experts.c_gate(rows, *groups) if self.kind == "swiglu" else None
        hidden = activation(self.kind, self.experts.c_fc(rows, *groups), gate)
        out_sorted = self.experts.c_proj(hidden, *groups)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # back to (token, choice) order: a deterministic sum over choices
        y = (out.view(-1, self.top_k, C) * gates.to(out.dtype).unsqueeze(-1)).sum(1)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self.expert_load += counts  # summed over a step's micro-batches for update_moe_bias
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


# muP as "The Practitioner's Guide to the Maximal Update Parameterization" (EleutherAI and Cerebras
# 2024) writes Tensor Programs V's Table 3 (Yang et al. 2022, arXiv:2203.03466), m = n_embd / base:
#   embeddings wte, wpe       init std 0.02            AdamW lr x 1
#   hidden matrices (blocks)  init std 0.02 / sqrt(m)  AdamW lr / m, weight decay x m
#   output head               init std 0.02            AdamW lr x 1, logits / m
#   attention scores          q.k / head_dim x sqrt(base head_dim), instead of q.k / sqrt(head_dim)
# Muon's orthogonal update already has the norm muP asks for (Yang et al. 2023, arXiv:2310.17813).
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
        if config.tie_embeddings:  # one matrix reads tokens and writes them (Press & Wolf 2017)
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos_emb == "rope":  # recomputed from the config, never worth saving
            tables = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope", tables, persistent=False)
        self.moe_layers = [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]
        # GPT-2's initialisation: N(0, 0.02), each residual branch's output by 1/sqrt(2 * n_layer)
        # as 2 * n_layer branches add up, biases 0 (the name tells the experts' 2-D biases apart)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                residual = name.endswith("c_proj.weight")
                std = 0.02 / math.sqrt(2 * config.n_layer) if residual else 0.02
                hidden = is_hidden_matrix(name, p)
                nn.init.normal_(p, std=std / math.sqrt(config.width_ratio) if hidden else std)

    def forward(self, idx, targets=None, kv_cache=None):
        T, start = idx.size(1), (kv_cache.pos if kv_cache is not None else 0)
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens exceed block_size ({self.config.block_size})")
        x = self.transformer.wte(idx)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        rope = self.rope[:, start:start + T] if self.config.pos_emb == "rope" else None
        if kv_cache is not None:
            kv_cache.tokens[:, start:start + T] = idx
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:  # inference: only the last position's logits are needed to sample
            return self.logits(x[:, [-1], :]).float(), None
        # the loss in float32, the logits returned as computed: a cast inside the loss fuses, while
        # a float32 copy returned would make torch.compile write a batch x block x vocab tensor more
        logits = self.logits(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def logits(self, x):
        logits = self.lm_head(x)
        return logits / self.config.width_ratio if self.config.mup else logits  # muP's 1/m

    def param_counts(self):
        """Parameters in total, without the embeddings, and active per token (top_k of the routed
        experts). The embeddings are the input tables only: the output head is a real matmul."""
        total = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        embedding = self.transformer.wpe.weight.numel() if self.config.pos_emb == "learned" else 0
        if not self.config.tie_embeddings:
            embedding += self.transformer.wte.weight.numel()
        inactive = sum(sum(p.numel() for p in moe.experts.parameters()) // moe.n_experts
                       * (moe.n_experts - moe.top_k) for moe in self.moe_layers)
        return dict(total=total, non_embedding=total - embedding, active=total - inactive,
                    active_non_embedding=total - embedding - inactive)

    def flops_per_token(self):
        return flops_per_token(self.config, self.param_counts()["active_non_embedding"])

    @torch.no_grad()
    def update_moe_bias(self, load):
        """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step: raise the bias of
        the experts below the mean `load` (tokens routed to each since the last call), lower the
        others, by moe_bias_rate; then count afresh."""
        for moe, layer_load in zip(self.moe_layers, load.float()):
            moe.expert_bias += self.config.moe_bias_rate * (layer_load.mean() - layer_load).sign()
            moe.expert_load.zero_()

    def new_kv_cache(self, batch_size):
        """An empty cache on the model's device, in the dtype its keys will be computed in."""
        device, dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return KVCache(self.config, batch_size, self.config.block_size, device, dtype)

    def extend(self, kv_cache, idx):
        """Run new tokens on top of the cache; the last position's logits (B, V). A cache that would
        overflow is rebuilt from the latest half of the context (learned positions restart at 0)."""
        if kv_cache.pos + idx.size(1) > kv_cache.max_len:
            idx = torch.cat((kv_cache.tokens[:, :kv_cache.pos], idx), dim=1)
            idx, kv_cache.pos = idx[:, -(kv_cache.max_len // 2):], 0
        return self(idx, kv_cache=kv_cache)[0][:, -1]

    @torch.inference_mode()  # no_grad, and no view tracking or version counts either
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                 stop_tokens=(), kv_cache=None, vocab_size=None):
        """Yield one (B,) tensor per new token as it is sampled, after the prompt idx (B, T) is
        prefilled on top of kv_cache (a conversation goes on). temperature 0 is greedy, top_k 0
        and top_p 1 are off; every row stops at a stop token. vocab_size keeps padding undrawn."""
        kv_cache = kv_cache if kv_cache is not None else self.new_kv_cache(idx.size(0))
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        token = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        logits = self.extend(kv_cache, idx)
        for _ in range(max_new_tokens):
            new = sample_token(logits[:, :vocab_size], temperature, top_k, top_p, generator)
            token = torch.where(done, token, new)
            done |= torch.isin(token, stop)
            yield token
            logits = self.extend(kv_cache, token[:, None])
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
        # nucleus sampling (Holtzman et al. 2019): keep the fewest tokens whose probability reaches
        # top_p; a token stays while the mass before it is short of top_p, so the best always stays
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
