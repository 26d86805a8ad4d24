"""model.py's GPT as a Hugging Face folder (AutoModelForCausalLM + AutoTokenizer, no custom code):
classic -> GPT2LMHeadModel (Conv1D weights transposed); rope + rmsnorm + swiglu -> LlamaForCausalLM,
with qk_norm and bias=False -> Qwen3ForCausalLM. muP is folded into the weights; padding rows are
special tokens generate() never picks (suppress_tokens). Tokenizers keep our ids: char -> a BPE
without merges, spaces as U+2581; sp -> Llama's plus tokenizer.model; tiktoken -> GPT-2's
byte-level BPE. A chat template becomes a Jinja chat_template."""

import base64
import dataclasses
import json
import math
import os
import tempfile

import torch

from configurator import UserError
from model import GPT
from tokenizer import EOT_TEXT, GPT2_PATTERN, chat_template_jinja

SPACE = "\u2581"  # SentencePiece's visible space, which Llama-style vocabularies spell spaces with
EXPORTABLE = ("exportable: classic (learned positions, layernorm, gelu) as GPT-2; rope + rmsnorm "
              "+ swiglu as Llama, with qk_norm and bias=False as Qwen3; dense only")


def architecture(c):
    """The Hugging Face model_type that computes exactly what GPTConfig `c` does, or a UserError."""
    shape = (c.pos_emb, c.norm, c.mlp, c.qk_norm)
    if c.moe_experts == 0 and shape == ("learned", "layernorm", "gelu", False):
        return "gpt2"
    if c.moe_experts == 0 and shape[:3] == ("rope", "rmsnorm", "swiglu"):
        if not (c.qk_norm and c.bias):  # Qwen3's MLP has no biases (Qwen3MLP)
            return "qwen3" if c.qk_norm else "llama"
    found = (f"{c.pos_emb} + {c.norm} + {c.mlp}{' + qk_norm' if c.qk_norm else ''}"
             f"{' + bias' if c.bias else ''}{' + MoE' if c.moe_experts else ''}")
    raise UserError(f"{found} has no standard Hugging Face architecture; {EXPORTABLE}")


def weight_map(c, arch):
    """{our key: (HF key, transposed)}; GPT-2's fused c_attn is apart, its Conv1D (in, out)."""
    if arch == "gpt2":
        top = [(n, n, False) for n in ("transformer.wte", "transformer.wpe", "transformer.ln_f")]
        layer = [(n, n, "." in n)  # Conv1D: every Linear is transposed
                 for n in ("ln_1", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")]
        hf_layer = "transformer.h.{}."
    else:  # Llama/Qwen3DecoderLayer; SwiGLU: silu(gate) * up, as silu(c_gate) * c_fc here
        top = [("transformer.wte", "model.embed_tokens", False),
               ("transformer.ln_f", "model.norm", False)]
        names = [("ln_1", "input_layernorm"), ("attn.q_proj", "self_attn.q_proj"),
                 ("attn.k_proj", "self_attn.k_proj"), ("attn.v_proj", "self_attn.v_proj"),
                 ("attn.c_proj", "self_attn.o_proj"), ("ln_2", "post_attention_layernorm"),
                 ("mlp.c_gate", "mlp.gate_proj"), ("mlp.c_fc", "mlp.up_proj"),
                 ("mlp.c_proj", "mlp.down_proj")]
        names += [("attn.q_norm", "self_attn.q_norm"),
                  ("attn.k_norm", "self_attn.k_norm")] * c.qk_norm
        layer, hf_layer = [(o, h, False) for o, h in names], "model.layers.{}."
    pairs = top + [(f"transformer.h.{i}.{o}", hf_layer.format(i) + h, t)
                   for i in range(c.n_layer) for o, h, t in layer]
    pairs.append(("lm_head", "lm_head", False))  # a tied head is under both names in both
    return {f"{o}.{s}": (f"{h}.{s}", t and s == "weight")
            for o, h, t in pairs for s in ("weight", "bias")}


def hf_config(c, arch, eps, special):
    # No permutation of q and k: model.py's apply_rope rotates the half-split pairs, as Llama's
    # rotate_half in transformers does; the inverse frequencies theta^(-2i/d) are its "default".
    from transformers import GPT2Config, LlamaConfig, Qwen3Config
    if arch == "gpt2":  # exact GELU ("gelu"), not OpenAI's gelu_new; n_ctx as llama.cpp reads it
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size,
                          n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.mlp_width,
                          activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                          layer_norm_epsilon=eps, tie_word_embeddings=c.tie_embeddings,
                          architectures=["GPT2LMHeadModel"], **special)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_width,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
                  max_position_embeddings=c.block_size, rms_norm_eps=eps, hidden_act="silu",
                  rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),
                  attention_bias=c.bias, tie_word_embeddings=c.tie_embeddings, **special)
    if arch == "llama":
        return LlamaConfig(mlp_bias=c.bias, architectures=["LlamaForCausalLM"], **common)
    return Qwen3Config(use_sliding_window=False, architectures=["Qwen3ForCausalLM"], **common)


def without_mup(model):
    """A muP model as a plain GPT: 1/m into the (untied) head, the attention scale into the queries
    (into q_norm with QK-norm, which would undo a scaled projection)."""
    c = model.config
    if not c.mup:
        return model
    plain = GPT(dataclasses.replace(c, mup=False, mup_base_width=0, tie_embeddings=False))
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    weights["lm_head.weight"] /= c.width_ratio
    query = c.attention_scale * math.sqrt(c.head_dim)  # transformers scores q.k / sqrt(head_dim)
    names = ("q_norm.weight", "q_norm.bias") if c.qk_norm else ("q_proj.weight", "q_proj.bias")
    for key in [f"transformer.h.{i}.attn.{n}" for i in range(c.n_layer) for n in names]:
        if key in weights:
            weights[key] *= query
    plain.load_state_dict(weights)
    return plain.eval()


def without_padding(model, rows):
    """The model with its first `rows` vocabulary rows only: the padding rows past the tokenizer
    and the chat markers were never a token, and llama.cpp would sample them."""
    if rows == model.config.vocab_size:
        return model
    plain = GPT(dataclasses.replace(model.config, vocab_size=rows))
    plain.load_state_dict({k: v[:rows] if k in ("transformer.wte.weight", "lm_head.weight") else v
                           for k, v in model.state_dict().items()})
    return plain.eval()


def to_hf(model, arch, special):
    """A transformers model holding `model`'s weights exactly (float32)."""
    from transformers import AutoModelForCausalLM
    c, ours = model.config, model.state_dict()
    eps = model.transformer.ln_f.eps  # nn.LayerNorm's 1e-5, or model.py's RMSNorm(eps=1e-6)
    hf = AutoModelForCausalLM.from_config(hf_config(c, arch, eps, special), dtype=torch.float32)
    target = hf.state_dict()
    new = {h: ours[o].T if t else ours[o] for o, (h, t) in weight_map(c, arch).items() if o in ours}
    for i in range(c.n_layer * (arch == "gpt2")):  # c_attn = [q | k | v]; no GQA: repeat kv heads
        a, repeat = f"transformer.h.{i}.attn.", c.n_head // c.kv_heads
        for s in ("weight", "bias")[:1 + c.bias]:
            kv = [ours[a + n + "." + s].view(c.kv_heads, -1, *ours[a + n + "." + s].shape[1:])
                  .repeat_interleave(repeat, 0).flatten(0, 1) for n in ("k_proj", "v_proj")]
            fused = torch.cat([ours[a + "q_proj." + s]] + kv)
            new[a + "c_attn." + s] = fused.T if s == "weight" else fused
    params = dict(hf.named_parameters(remove_duplicate=False))
    for key in target.keys() - new.keys():  # GPT-2 always has biases: bias=False is zeros there
        new[key] = torch.zeros_like(target[key]) if key in params else target[key]
    hf.load_state_dict(new, strict=True)
    return hf.eval()


def ranks_text(tok):
    """The BPE ranks as .tiktoken text ("<base64 bytes> <rank>" lines): ids below end-of-text."""
    tokens = map(tok.enc.decode_single_token_bytes, range(tok.eot_id))
    return "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens))


def hf_tokenizer(tok):
    """A transformers tokenizer that encodes text to `tok`'s ids (tokenizer.py), or None."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    kind, ends = tok.spec["kind"], dict(bos_token=EOT_TEXT, eos_token=EOT_TEXT)
    if kind == "char":
        if SPACE in tok.chars:  # it would stand for two characters
            return None
        backend = Tokenizer(models.BPE({SPACE if ch == " " else ch: i
                                        for i, ch in enumerate(tok.chars)}, [], byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
        backend.add_special_tokens([EOT_TEXT])
        return PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=True, **ends)
    if kind == "sp":
        # Llama's tokenizer is a BPE with byte fallback; SentencePiece applies merges by piece
        # score, so they are ranked by score (transformers' SentencePieceExtractor does the same)
        from transformers.tokenization_utils_base import generate_merges
        sp, n = tok.sp, tok.sp.get_piece_size()
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
        if not all(float(v).is_integer() for v in scores.values()):
            return None  # a unigram model: its scores are log-probabilities, it has no merges
        eot = sp.id_to_piece(tok.eot_id)
        return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores),
                              add_prefix_space=False, legacy=False, add_bos_token=True,
                              unk_token=sp.id_to_piece(sp.unk_id()), bos_token=eot, eos_token=eot)
    from transformers.convert_slow_tokenizer import TikTokenConverter
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "ranks.tiktoken"), "w") as f:
            f.write(ranks_text(tok))
        backend = TikTokenConverter(f.name, pattern=GPT2_PATTERN,
                                    extra_special_tokens=[EOT_TEXT]).converted()
    # no end-of-text first, and no ByteLevel post-processor, which llama.cpp reads as "no BOS"
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **ends)


def save_hf(model, tok, template, folder):
    """A GPT, its tokenizer and chat template ({} for none) as a folder: (hf, notes)."""
    from tokenizers import AddedToken
    from transformers import GenerationConfig
    c, kind = model.config, tok.spec["kind"]
    specials = {tok.eot_id: tok.sp.id_to_piece(tok.eot_id) if kind == "sp" else EOT_TEXT}
    for role, marker in template.items():  # chat markers given as ids in the padding rows
        ids = [m for m in (marker if isinstance(marker, list) else []) if m >= tok.vocab_size]
        for n, i in enumerate(ids):
            specials.setdefault(i, f"<|{role}{'_' + str(n) if n else ''}|>")
    end = template.get("end_of_turn")
    stop = [tok.eot_id] + ([end[0]] if isinstance(end, list) and len(end) == 1 else [])
    rows = max(tok.vocab_size, *(i + 1 for i in specials))
    hf = to_hf(without_padding(without_mup(model), rows), architecture(c),
               dict(bos_token_id=tok.eot_id, eos_token_id=stop[0]))
    # rows between the chat markers were never a token: keep generate() off them, as sample.py does
    gaps = [i for i in range(tok.vocab_size, rows) if i not in specials] or None
    hf.generation_config = GenerationConfig(bos_token_id=tok.eot_id, suppress_tokens=gaps,
                                            eos_token_id=stop if stop[1:] else stop[0])
    hf.save_pretrained(folder)  # config.json, generation_config.json, model.safetensors
    hf_tok, notes = hf_tokenizer(tok), []
    if hf_tok is None:
        notes.append(f"this {kind} tokenizer has no transformers equivalent (a unigram "
                     f"SentencePiece model, or chars holding {SPACE}): tokenizer not exported")
    else:  # one token for every row, as llama.cpp's Llama vocabularies have
        extra = [specials.get(i, f"<|unused_{i}|>") for i in range(tok.vocab_size, rows)]
        hf_tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], True)
        assert all(hf_tok.convert_tokens_to_ids(t) == i for i, t in specials.items()), "ids moved"
        if template:
            hf_tok.chat_template = chat_template_jinja(template, tok, specials)
            if hf_tok.chat_template is None:
                notes.append("a chat marker gives a regular token by id, which Jinja text cannot: "
                             "no chat template")
            elif any(isinstance(m, str) for m in template.values()) and kind != "char":
                notes.append("text chat markers are tokenized with their neighbours by "
                             "transformers, apart by sample.py: BPE may merge across the boundary")
        hf_tok.save_pretrained(folder)
        # settings that llama.cpp's converter reads and transformers' generic tokenizer leaves be
        path, extra = os.path.join(folder, "tokenizer_config.json"), dict(
            char=dict(add_prefix_space=False), tiktoken=dict(add_bos_token=True)).get(kind)
        if extra:
            with open(path, encoding="utf-8") as f:
                config = dict(json.load(f), **extra)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
    if kind == "sp":
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(base64.b64decode(tok.spec["model"]))
    return hf, notes
