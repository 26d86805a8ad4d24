"""The model: causality, KV cache against full recompute, parameter and FLOP counts, the MoE block
(routing by hand, load balancing), initial loss, overfitting, gradients, masking, and sampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, PRESETS, GPTConfig, MLP, MoE, flops_per_token, sample_token


def tiny_config(preset="modern", **overrides):
    sizes = dict(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**PRESETS[preset], **sizes, **overrides})


def tiny_model(preset="modern", seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(preset, **overrides)).eval()


MOE = dict(moe_experts=8, moe_top_k=2, moe_shared_experts=1, moe_expert_hidden=16, moe_first_dense=1)
VARIANTS = {
    "classic": ("classic", {}),
    "modern": ("modern", {}),
    "modern-gqa": ("modern", dict(n_kv_head=2)),
    "classic-moe": ("classic", MOE),
    "modern-moe-gqa-swiglu": ("modern", dict(MOE, n_kv_head=1, mlp="swiglu")),
}


def all_logits(model, idx):
    """Logits at every position (passing targets asks for all of them)."""
    return model(idx, targets=torch.zeros_like(idx))[0]


def expert_as_mlp(moe, config, e):
    """Routed expert e as a dense MLP, its weights cut out of the stacked (experts, in, out) parameters by hand."""
    mlp = MLP(config, config.expert_width)
    mlp.load_state_dict({f"{name}.{kind}": p[e].T if kind == "weight" else p[e]
                         for name, layer in moe.experts.items() for kind, p in layer.named_parameters()})  # strict
    return mlp


# ----------------------------------------------------------------------------- configuration

def test_defaults_are_the_classic_preset_and_presets_hold_architecture_only():
    config = GPTConfig()
    assert all(getattr(config, key) == value for key, value in PRESETS["classic"].items())
    assert PRESETS["classic"].keys() == PRESETS["modern"].keys()


@pytest.mark.parametrize("overrides, message", [
    (dict(pos_emb="alibi"), "pos_emb must be one of learned, rope"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="GELU"), "mlp must be one of gelu, swiglu, relu2"),
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(pos_emb="rope", n_embd=12, n_head=4), "even head dimension"),
    (dict(moe_experts=4, moe_top_k=5), "moe_top_k > moe_experts"),
    (dict(moe_experts=4, moe_first_dense=2), "no MoE layer left"),
    (dict(moe_experts=4, moe_expert_hidden=12), "multiples of 8"),
    (dict(dropout=1.0), "dropout"),
    (dict(moe_every=0), "moe_every must be at least 1"),
    (dict(n_layer=0), "n_layer must be at least 1, got 0"),
    (dict(moe_bias_rate=-1e-3), "moe_bias_rate must be at least 0, got -0.001"),
])
def test_invalid_configs_are_rejected_with_one_clear_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32), **overrides})


def test_widths_follow_the_mlp_kind():
    assert GPTConfig(n_embd=768).mlp_width == 3072
    assert GPTConfig(n_embd=768, mlp="swiglu").mlp_width == 2048
    assert GPTConfig(n_embd=512, n_head=8, mlp="swiglu").mlp_width == 1408  # 1365.3 rounded up to a multiple of 64
    assert GPTConfig(n_embd=768, moe_experts=8).expert_width == 768
    assert GPTConfig(n_layer=6, moe_experts=8, moe_first_dense=1, moe_every=2).is_moe_layer(3)
    assert not GPTConfig(n_layer=6, moe_experts=8, moe_first_dense=1, moe_every=2).is_moe_layer(2)


def test_initialisation_is_deterministic_and_tying_shares_one_matrix():
    a, b = tiny_model("classic", seed=3), tiny_model("classic", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.lm_head.weight is a.transformer.wte.weight
    untied = tiny_model("modern")
    assert untied.lm_head.weight is not untied.transformer.wte.weight and "wpe" not in untied.transformer


# ----------------------------------------------------------------------------- counts

def test_classic_preset_has_gpt2_small_parameter_count_and_flops():
    with torch.device("meta"):
        model = GPT(GPTConfig(**PRESETS["classic"], n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024))
    counts = model.param_counts()
    assert counts["total"] == 124_439_808
    assert counts["non_embedding"] == 124_439_808 - 1024 * 768  # the tied head counts, wpe does not
    assert counts["active"] == counts["total"] and counts["active_non_embedding"] == counts["non_embedding"]
    assert model.flops_per_token() == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(model.config, 123_653_376) == model.flops_per_token()  # from the config, no model needed


def test_moe_counts_only_top_k_routed_experts_as_active():
    model = tiny_model("modern", n_layer=3, **MOE)  # layers 1 and 2 are MoE
    expert = 2 * 32 * 16  # relu2, no biases: c_fc (n_embd x expert_hidden) and c_proj (expert_hidden x n_embd)
    assert sum(p.numel() for p in model.transformer.h[1].mlp.experts.parameters()) == 8 * expert
    counts = model.param_counts()
    embedding = model.transformer.wte.weight.numel()  # untied: wte is embedding, lm_head is not
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - embedding
    assert counts["active"] == counts["total"] - 2 * (8 - 2) * expert
    assert counts["active_non_embedding"] == counts["active"] - embedding
    assert model.flops_per_token() == 6 * counts["active_non_embedding"] + 12 * 3 * 4 * 8 * 128


# ----------------------------------------------------------------------------- forward and loss

@pytest.mark.parametrize("variant", ["classic", "modern-moe-gqa-swiglu"])
def test_changing_a_token_never_changes_earlier_logits(variant):
    preset, overrides = VARIANTS[variant]
    model = tiny_model(preset, **overrides)
    idx = torch.randint(0, 64, (2, 24))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    before, after = all_logits(model, idx), all_logits(model, changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_inference_returns_last_position_logits_only():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 12))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 64) and loss is None
    torch.testing.assert_close(logits[:, 0], all_logits(model, idx)[:, -1])


@pytest.mark.parametrize("preset", ["classic", "modern"])
def test_initial_loss_on_random_tokens_is_close_to_uniform(preset):
    model = tiny_model(preset, vocab_size=512, n_layer=4, n_embd=64)
    idx = torch.randint(0, 512, (4, 64))
    _, loss = model(idx, torch.randint(0, 512, (4, 64)))
    assert abs(loss.item() - math.log(512)) < 0.05 * math.log(512)


def test_ignored_targets_do_not_count_in_the_loss():
    model = tiny_model()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    targets[0, :5] = -1
    targets[1, 9:] = -1
    logits, loss = model(idx, targets)
    kept = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[kept], targets[kept]))


def test_under_bf16_autocast_the_loss_is_taken_in_float32_and_the_logits_come_back_in_bf16():
    model = tiny_model()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # the float32 cross-entropy of exactly the bf16 logits returned, not of a bf16 softmax
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().view(-1, 64), targets.view(-1)), rtol=0, atol=1e-6)


def test_a_tiny_model_overfits_a_fixed_batch():
    model = tiny_model("modern", block_size=32).train()
    idx, targets = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("variant", ["classic", "modern-gqa", "modern-moe-gqa-swiglu"])
def test_gradients_reach_every_parameter(variant):
    preset, overrides = VARIANTS[variant]
    model = tiny_model(preset, **overrides).train()
    idx = torch.randint(0, 64, (4, 32))
    _, loss = model(idx, torch.randint(0, 64, (4, 32)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_recompute_over_generation_and_a_second_prefill(variant):
    preset, overrides = VARIANTS[variant]
    model = tiny_model(preset, **overrides)
    sequence = torch.randint(0, 64, (2, 7 + 50 + 6 + 3))
    full = all_logits(model, sequence)
    cache = model.new_kv_cache(batch_size=2)
    logits, _ = model(sequence[:, :7], kv_cache=cache)  # prefill the prompt
    torch.testing.assert_close(logits[:, 0], full[:, 6], rtol=0, atol=1e-5)
    for t in range(7, 57):  # one token at a time
        logits, _ = model(sequence[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    # the next turn of a conversation: several tokens at once on top of the cache, every position checked
    chunk = sequence[:, 57:63]
    logits, _ = model(chunk, targets=chunk, kv_cache=cache)
    torch.testing.assert_close(logits, full[:, 57:63], rtol=0, atol=1e-5)
    for t in range(63, 66):
        logits, _ = model(sequence[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.pos == 66 and torch.equal(cache.tokens[:, :66], sequence)


def greedy_by_recompute(model, idx, n):
    for _ in range(n):
        idx = torch.cat((idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("variant", ["classic", "modern-moe-gqa-swiglu"])
def test_generate_continues_a_conversation_from_its_cache(variant):
    preset, overrides = VARIANTS[variant]
    model = tiny_model(preset, **overrides)
    first, second = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 4))
    cache = model.new_kv_cache(batch_size=1)
    reply = torch.stack(list(model.generate(first, 10, temperature=0, kv_cache=cache)), dim=1)
    assert cache.pos == 15  # the prompt and every generated token, the last one included
    answer = torch.stack(list(model.generate(second, 10, temperature=0, kv_cache=cache)), dim=1)
    expected = greedy_by_recompute(model, torch.cat((first, reply, second), dim=1), 10)
    assert torch.equal(torch.cat((first, reply, second, answer), dim=1), expected)


def test_generation_goes_on_past_a_full_cache():
    model = tiny_model("classic", block_size=16)
    tokens = list(model.generate(torch.randint(0, 64, (2, 10)), 30, temperature=0))
    assert len(tokens) == 30 and all(t.shape == (2,) for t in tokens)


# ----------------------------------------------------------------------------- sampling

def test_same_seed_gives_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 64, (2, 4))

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack(list(model.generate(prompt, 20, temperature=1.5, generator=generator)))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_top_k_and_top_p_restrict_sampling():
    logits = torch.randn(1, 64).expand(2000, 64)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_token(logits, 1.0, top_k=1, generator=generator), logits.argmax(-1))
    assert torch.equal(sample_token(logits, 1.0, top_p=1e-6, generator=generator), logits.argmax(-1))
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(sample_token(logits, 5.0, top_k=3, generator=generator).tolist()) == top3
    probs = logits[0].softmax(-1)
    ranked = probs.argsort(descending=True)
    nucleus = set(ranked[:int((probs[ranked].cumsum(0) < 0.5).sum()) + 1].tolist())
    assert set(sample_token(logits, 1.0, top_p=0.5, generator=generator).tolist()) == nucleus
    model = tiny_model()
    prompt = torch.randint(0, 64, (2, 4))
    greedy = torch.stack(list(model.generate(prompt, 8, temperature=0)))
    assert torch.equal(torch.stack(list(model.generate(prompt, 8, top_k=1))), greedy)


def test_generation_stops_once_every_row_has_produced_a_stop_token():
    model = tiny_model()
    prompt = torch.randint(0, 64, (1, 4))
    greedy = [t.item() for t in model.generate(prompt, 12, temperature=0)]
    stop = greedy[5]
    stopped = [t.item() for t in model.generate(prompt, 12, temperature=0, stop_tokens=(stop,))]
    assert stopped == greedy[:greedy.index(stop) + 1]


# ----------------------------------------------------------------------------- mixture of experts

def test_moe_with_one_expert_top1_and_no_shared_expert_equals_a_dense_mlp():
    torch.manual_seed(0)
    config = tiny_config("modern", moe_experts=1, moe_top_k=1, moe_shared_experts=0, moe_expert_hidden=128)
    moe = MoE(config)
    dense = expert_as_mlp(moe, config, 0)
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize("preset, mlp", [("classic", "gelu"), ("modern", "swiglu")])
def test_moe_in_bf16_runs_the_same_experts_as_in_fp32(preset, mlp):
    """bf16 takes the grouped-product path, other dtypes run it outside torch.compile: the same function."""
    torch.manual_seed(0)
    moe = MoE(tiny_config(preset, mlp=mlp, moe_experts=8, moe_top_k=2, moe_expert_hidden=16))
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", torch.bfloat16):
        y_bf16 = moe(x)
    assert y_bf16.dtype == torch.bfloat16
    y = moe(x)
    assert ((y_bf16.float() - y).norm() / y.norm()).item() < 2e-2


@pytest.mark.parametrize("dtype, fullgraph", [(torch.float32, False), (torch.bfloat16, True)])
def test_moe_model_compiles_and_matches_eager(dtype, fullgraph):
    """bf16 compiles to one graph (no host sync, no loop over experts); fp32 leaves the expert products to eager."""
    torch._dynamo.reset()
    model = tiny_model("modern", **MOE).train()
    x, y = torch.randint(64, (2, 32)), torch.randint(64, (2, 32))
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        _, eager = model(x, y)
        _, compiled = torch.compile(model, fullgraph=fullgraph)(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=0)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("preset, mlp", [("classic", "gelu"), ("modern", "swiglu")])
def test_moe_output_is_the_gate_weighted_sum_of_the_chosen_experts(preset, mlp):
    torch.manual_seed(0)
    config = tiny_config(preset, mlp=mlp, moe_experts=8, moe_top_k=3, moe_shared_experts=2, moe_expert_hidden=16)
    moe = MoE(config)
    with torch.no_grad():  # biases too (classic has them), so that each expert's slice of every stack is checked
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    moe.expert_bias.copy_(torch.randn(8))  # the bias changes which experts are chosen, never the gates
    experts = [expert_as_mlp(moe, config, e) for e in range(8)]
    x = torch.randn(2, 10, 32)
    y = moe(x)
    for b in range(2):
        for t in range(10):
            token = x[b, t]
            affinity = torch.sigmoid(moe.router(token))
            chosen = (affinity + moe.expert_bias).topk(3).indices
            gates = affinity[chosen] / affinity[chosen].sum()
            expected = sum(g * experts[e](token) for g, e in zip(gates, chosen)) + moe.shared(token)
            torch.testing.assert_close(y[b, t], expected, rtol=1e-5, atol=1e-6)
    load = torch.bincount((torch.sigmoid(moe.router(x.view(-1, 32))) + moe.expert_bias).topk(3).indices.view(-1),
                          minlength=8)
    assert torch.equal(moe.expert_load, load)


def test_expert_weights_are_stacked_and_initialised_like_gpt2():
    model = tiny_model("classic", n_layer=4, n_embd=64, **{**MOE, "mlp": "swiglu", "moe_expert_hidden": 64})
    experts = model.transformer.h[1].mlp.experts
    assert {name: tuple(p.shape) for name, p in experts.named_parameters()} == {
        "c_fc.weight": (8, 64, 64), "c_fc.bias": (8, 64), "c_gate.weight": (8, 64, 64), "c_gate.bias": (8, 64),
        "c_proj.weight": (8, 64, 64), "c_proj.bias": (8, 64)}
    for name, std in (("c_fc", 0.02), ("c_gate", 0.02), ("c_proj", 0.02 / math.sqrt(2 * 4))):
        assert abs(experts[name].weight.std().item() / std - 1) < 0.05, name
        assert abs(experts[name].weight.mean().item()) < 0.05 * std and not experts[name].bias.any()


def test_balancing_bias_moves_load_toward_idle_experts():
    model = tiny_model("modern", **{**MOE, "moe_bias_rate": 0.005})
    router = model.transformer.h[1].mlp.router
    with torch.no_grad():  # a router that sends almost every token to experts 0 and 1
        router.weight[:2] += 20 * model.transformer.h[1].ln_2(model.transformer.wte.weight).mean(0)
    idx = torch.randint(0, 64, (4, 32))
    loads = []
    model.train()
    for _ in range(200):
        model(idx)  # in training, each forward adds the tokens routed to each expert to its load
        load = torch.stack([moe.expert_load for moe in model.moe_layers])
        loads.append(load[0].float())
        model.update_moe_bias(load)  # and the bias update counts afresh
        assert not model.moe_layers[0].expert_load.any()
    mean = 4 * 32 * 2 / 8
    assert loads[0].max() > 2.5 * mean and loads[0].min() < 0.5 * mean
    # a fixed step makes the bias oscillate around the balance point, so look at the recent average
    recent = torch.stack(loads[-50:]).mean(0)
    assert recent.max() < 1.5 * mean and recent.min() > 0.5 * mean
    assert (recent[loads[0] < mean] > loads[0][loads[0] < mean]).all()
    assert "transformer.h.1.mlp.expert_bias" in model.state_dict()
    assert not any("expert_bias" in name for name, _ in model.named_parameters())


def test_dense_models_have_no_moe_layers_and_evaluation_counts_no_load():
    assert tiny_model().moe_layers == []
    model = tiny_model("modern", **MOE).eval()
    model(torch.randint(0, 64, (1, 8)))
    assert not any(moe.expert_load.any() for moe in model.moe_layers)
