"""Publish a checkpoint in Hugging Face format, and load a Hugging Face model back as a checkpoint.

    python export.py --out_dir=out --to=hf/my-model             # out/ckpt.pt -> hf/my-model/ (--ckpt=best.pt for the best)
    hf upload <user>/<repo> hf/my-model                          # the Hub's CLI publishes the folder
    python export.py --from_hf=hf/my-model --to_run=out-hf       # a local HF folder -> out-hf/ckpt.pt
    python export.py --from_hf=gpt2 --to_run=out-gpt2            # or the Hub's (then train.py --init_from=out-gpt2)

The folder holds config.json, generation_config.json, model.safetensors and the tokenizer, and loads with
transformers.AutoModelForCausalLM / AutoTokenizer, no custom code. What maps where:

    classic (learned positions, LayerNorm, GELU)             -> GPT2LMHeadModel (Conv1D weights are transposed)
    rope + rmsnorm + swiglu                                  -> LlamaForCausalLM
    rope + rmsnorm + swiglu + qk_norm, bias=False            -> Qwen3ForCausalLM

A muP model's multipliers are folded into its weights first (without_mup), so transformers computes the
same logits. Anything else (ReLU^2, MoE, mixed choices) has no standard architecture and is refused. config.json's
vocab_size is the padded embedding table; generation_config.json suppresses the padding rows that are not
special tokens, as sample.py does. Tokenizers: char -> a BPE with no merges, SentencePiece -> the Llama
tokenizer, tiktoken -> the GPT-2 byte-level BPE; an SFT chat template -> the tokenizer's Jinja chat_template, and its
markers as they are in chat_markers.json, which import reads back.
"""

import base64
import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch

from configurator import UserError, temp_path
from model import GPT, GPTConfig
from tokenizer import EOT_TEXT, chat_template_jinja, load_tokenizer
from runtime import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint


@dataclass
class ExportConfig:
    out_dir: str = "out"             # export: the run to read (shared with train.py and sample.py)
    ckpt: str = "ckpt.pt"            # export: "best.pt" for the best by validation loss
    to: str = ""                     # export: the Hugging Face folder to write
    from_hf: str = ""                # import: a Hugging Face folder (GPT-2, Llama or Qwen3), local or on the Hub
    to_run: str = ""                 # import: the run directory to write ckpt.pt into
    overwrite: bool = False          # replace an earlier export in --to, or the --to_run checkpoint


CHAT_MARKERS = "chat_markers.json"  # a fine-tuned model's chat template as tokenizer.py holds it (a dict of markers)
EXPORTABLE = ("exportable: classic (learned positions, layernorm, gelu) as GPT-2; rope + rmsnorm + swiglu as Llama, "
              "with qk_norm and bias=False as Qwen3; dense only")


def architecture(c):
    """The Hugging Face model_type that computes exactly what GPTConfig `c` computes, or a UserError."""
    shape = (c.pos_emb, c.norm, c.mlp, c.qk_norm)
    if c.moe_experts == 0 and shape == ("learned", "layernorm", "gelu", False):
        return "gpt2"
    if c.moe_experts == 0 and shape[:3] == ("rope", "rmsnorm", "swiglu") and not (c.qk_norm and c.bias):
        return "qwen3" if c.qk_norm else "llama"  # Qwen3's MLP has no biases (Qwen3MLP)
    found = f"{c.pos_emb} + {c.norm} + {c.mlp}{' + qk_norm' if c.qk_norm else ''}{' + bias' if c.bias else ''}" \
            f"{' + MoE' if c.moe_experts else ''}"
    raise UserError(f"{found} has no standard Hugging Face architecture; {EXPORTABLE}")


def weight_map(c, arch):
    """{our state-dict key: (HF key, transposed)} for every tensor that maps one to one. GPT-2 fuses q, k, v
    into one c_attn (handled apart) and stores Linear weights as Conv1D, (in, out): transposed."""
    if arch == "gpt2":
        top = [("transformer.wte", "transformer.wte", False), ("transformer.wpe", "transformer.wpe", False),
               ("transformer.ln_f", "transformer.ln_f", False)]
        layer = [("ln_1", "ln_1", False), ("attn.c_proj", "attn.c_proj", True), ("ln_2", "ln_2", False),
                 ("mlp.c_fc", "mlp.c_fc", True), ("mlp.c_proj", "mlp.c_proj", True)]
        hf_layer = "transformer.h.{}."
    else:  # LlamaDecoderLayer / Qwen3DecoderLayer; SwiGLU: silu(gate) * up, as silu(c_gate) * c_fc here
        top = [("transformer.wte", "model.embed_tokens", False), ("transformer.ln_f", "model.norm", False)]
        layer = [("ln_1", "input_layernorm", False), ("attn.q_proj", "self_attn.q_proj", False),
                 ("attn.k_proj", "self_attn.k_proj", False), ("attn.v_proj", "self_attn.v_proj", False),
                 ("attn.c_proj", "self_attn.o_proj", False), ("ln_2", "post_attention_layernorm", False),
                 ("mlp.c_gate", "mlp.gate_proj", False), ("mlp.c_fc", "mlp.up_proj", False),
                 ("mlp.c_proj", "mlp.down_proj", False)]
        layer += [("attn.q_norm", "self_attn.q_norm", False), ("attn.k_norm", "self_attn.k_norm", False)] * c.qk_norm
        hf_layer = "model.layers.{}."
    pairs = top + [(f"transformer.h.{i}.{o}", hf_layer.format(i) + h, t) for i in range(c.n_layer) for o, h, t in layer]
    pairs.append(("lm_head", "lm_head", False))  # a tied head appears under both names in either state dict
    return {f"{o}.{s}": (f"{h}.{s}", t and s == "weight") for o, h, t in pairs for s in ("weight", "bias")}


def hf_config(c, arch, eps, special):
    # No permutation of q and k: model.py's apply_rope rotates the half-split pairs (x_i, x_{i+d/2}), which is
    # Llama's rotate_half in transformers (the permutation in convert_llama_weights_to_hf.py is for Meta's
    # interleaved layout). The inverse frequencies theta^(-2i/d) are the "default" rope of both.
    from transformers import GPT2Config, LlamaConfig, Qwen3Config
    if arch == "gpt2":
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_ctx=c.block_size,  # as OpenAI's config.json has it, which llama.cpp's converter reads
                          n_head=c.n_head, n_inner=c.mlp_width, activation_function="gelu",  # exact GELU, not gelu_new
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=eps,
                          tie_word_embeddings=c.tie_embeddings, architectures=["GPT2LMHeadModel"], **special)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_width,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                  head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=eps, hidden_act="silu",
                  rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta), attention_bias=c.bias,
                  tie_word_embeddings=c.tie_embeddings, **special)
    if arch == "llama":
        return LlamaConfig(mlp_bias=c.bias, architectures=["LlamaForCausalLM"], **common)
    return Qwen3Config(use_sliding_window=False, architectures=["Qwen3ForCausalLM"], **common)


def without_mup(model):
    """A muP model's function in a GPT without muP, which transformers' architectures have no place for: the
    logits' 1/m goes into the output head (untied from the embeddings, which keep theirs), the attention scale into
    the queries (with QK-norm into q_norm, which would undo a scaled projection; RoPE, linear, commutes with it)."""
    c = model.config
    if not c.mup:
        return model
    plain = GPT(dataclasses.replace(c, mup=False, mup_base_width=0, tie_embeddings=False))
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    weights["lm_head.weight"] /= c.width_ratio
    query = c.attention_scale * math.sqrt(c.head_dim)  # transformers scores q.k / sqrt(head_dim)
    for i in range(c.n_layer):
        for name in ("q_norm.weight", "q_norm.bias") if c.qk_norm else ("q_proj.weight", "q_proj.bias"):
            if f"transformer.h.{i}.attn.{name}" in weights:
                weights[f"transformer.h.{i}.attn.{name}"] *= query
    plain.load_state_dict(weights)
    return plain.eval()


def to_hf(model, arch, special=None):
    """A transformers model holding `model`'s weights exactly (float32)."""
    from transformers import AutoModelForCausalLM
    c, ours = model.config, model.state_dict()
    eps = model.transformer.ln_f.eps  # nn.LayerNorm's 1e-5, or model.py's RMSNorm(eps=1e-6)
    special = dict(dict(bos_token_id=None, eos_token_id=None), **(special or {}))  # not GPT-2's 50256 by default
    hf = AutoModelForCausalLM.from_config(hf_config(c, arch, eps, special), dtype=torch.float32)
    target = hf.state_dict()
    new = {h: (ours[o].T if t else ours[o]) for o, (h, t) in weight_map(c, arch).items() if o in ours}
    if arch == "gpt2":
        for i in range(c.n_layer):  # c_attn = [q | k | v] as Conv1D; GPT-2 has no GQA: repeat each kv head
            a, repeat = f"transformer.h.{i}.attn.", c.n_head // c.kv_heads
            kv = [ours[a + n + ".weight"].view(c.kv_heads, -1, c.n_embd).repeat_interleave(repeat, 0).flatten(0, 1)
                  for n in ("k_proj", "v_proj")]
            new[a + "c_attn.weight"] = torch.cat([ours[a + "q_proj.weight"]] + kv).T
            if c.bias:
                kv = [ours[a + n + ".bias"].view(c.kv_heads, -1).repeat_interleave(repeat, 0).flatten()
                      for n in ("k_proj", "v_proj")]
                new[a + "c_attn.bias"] = torch.cat([ours[a + "q_proj.bias"]] + kv)
    params = dict(hf.named_parameters(remove_duplicate=False))
    for key in target.keys() - new.keys():  # GPT-2 always has biases: bias=False is zeros there
        if key in params and not key.endswith(".bias"):
            raise RuntimeError(f"no weight for {key}")  # a gap in weight_map: a bug, not bad input
        new[key] = torch.zeros_like(target[key]) if key in params else target[key]
    hf.load_state_dict(new, strict=True)
    return hf.eval()


# ----------------------------------------------------------------------------- tokenizer

def hf_tokenizer(tok):
    """A transformers tokenizer that encodes text to the same ids as `tok` (tokenizer.py), or None. It puts the
    end-of-text token first (add_bos_token, a post-processor in tokenizer.json), as every training document starts
    with it: pipeline("text-generation") on a raw prompt then continues as sample.py --prompt does."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    kind = tok.spec["kind"]
    if kind == "char":  # every character is a token: a BPE with no merges, the end-of-text token after it
        backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(tok.chars)}, [], ignore_merges=True))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([EOT_TEXT])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT_TEXT, eos_token=EOT_TEXT, add_bos_token=True)
    if kind == "sp":
        # Llama's tokenizer is a BPE with byte fallback; SentencePiece BPE applies merges by piece score, so the
        # merges are ranked by score (as transformers' SentencePieceExtractor does). A unigram model has no merges.
        from transformers.tokenization_utils_base import generate_merges
        sp, n = tok.sp, tok.sp.get_piece_size()
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
        if not all(float(v).is_integer() for v in scores.values()):
            return None  # unigram scores are log-probabilities
        return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), add_prefix_space=False, legacy=False,
                              unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(tok.eot_id),
                              eos_token=sp.id_to_piece(tok.eot_id), add_bos_token=True)
    # tiktoken: ranks -> byte-level BPE vocab and merges (TikTokenConverter), with this encoding's split pattern
    import tempfile
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = tok.enc._mergeable_ranks
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks.tiktoken")
        with open(path, "w") as f:
            f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
        backend = TikTokenConverter(path, pattern=tok.enc._pat_str, extra_special_tokens=[EOT_TEXT]).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT_TEXT, eos_token=EOT_TEXT, add_bos_token=True)


def export(cfg):
    run, to = os.path.realpath(cfg.out_dir), os.path.realpath(cfg.to)
    if os.path.commonpath([run, to]) in (run, to):  # --overwrite would delete the run's checkpoints and log
        raise UserError(f"--to={cfg.to} overlaps the run {cfg.out_dir} (is it, inside it or holds it); "
                        "export to a folder outside it")
    if os.path.exists(cfg.to) and not os.path.isdir(cfg.to):
        raise UserError(f"--to={cfg.to} is a file; give a folder")
    if os.path.isdir(cfg.to) and os.listdir(cfg.to):
        if not cfg.overwrite:
            raise UserError(f"{cfg.to} exists and is not empty; pick another --to or pass --overwrite")
        if not {"config.json", "model.safetensors"} <= set(os.listdir(cfg.to)):  # --overwrite deletes the folder
            raise UserError(f"{cfg.to} is not an earlier export (no config.json and model.safetensors); "
                            "--overwrite replaces only an export: pick another --to")
    with staged_folder(cfg.to) as folder:
        hf, hf_tok, arch = write_export(cfg, folder)
    print(f"wrote {cfg.to} ({arch}, {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M parameters); "
          f"publish it with: hf upload <user>/<repo> {cfg.to}")
    return hf, hf_tok


@contextlib.contextmanager
def staged_folder(path):
    """A folder written beside `path` and renamed onto it whole at the end: a failure (a read-only or full disk)
    leaves no half-written export, and an earlier one as it was until the new one is complete."""
    staging, old = temp_path(os.path.normpath(path)), temp_path(os.path.normpath(path) + ".old")
    try:
        os.makedirs(staging)
        yield staging
        if os.path.isdir(path):
            os.rename(path, old)
        os.rename(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_note(spec, arch):
    """What llama.cpp's convert_hf_to_gguf.py (checked: llama-cpp-python 0.3.36's copy) would get wrong, or None.
    It knows a BPE tokenizer by the ids that it gives a probe text, so only a published model's vocabulary."""
    advice = "for a GGUF, prepare the data with --tokenizer=sp and export a Llama (rope, rmsnorm, swiglu, no qk_norm)"
    if spec["kind"] == "sp" and arch == "llama":
        return None
    if spec["kind"] == "sp" and arch == "qwen3":  # its Llama converter reads add_prefix_space, its Qwen3 one not
        return f"llama.cpp's converter drops add_prefix_space=false for Qwen3: llama.cpp would put a space first; {advice}"
    if spec["kind"] == "sp":
        return f"llama.cpp's converter reads GPT-2's tokenizer as a BPE and does not know this one; {advice}"
    if spec.get("name") != "gpt2":
        return f"llama.cpp's converter does not know this {spec['kind']} tokenizer's BPE pre-tokenizer; {advice}"
    return None


def write_export(cfg, folder):
    """out_dir's checkpoint as a Hugging Face model and tokenizer in `folder`; returns them and the architecture."""
    from transformers import GenerationConfig
    checkpoint = load_checkpoint(os.path.join(cfg.out_dir, cfg.ckpt))
    c = GPTConfig(**checkpoint["model_config"])
    arch = architecture(c)
    hook = checkpoint["tokenizer"].get("pretokenize")
    if hook:  # a Hugging Face tokenizer runs no Python hook, such as a morpheme analyser
        raise UserError(f"this model's tokenizer cuts text with the pretokenize hook {hook} before encoding, which "
                        "transformers cannot run: it would encode other ids; only a tokenizer without a hook exports")
    model = GPT(c)
    model.load_state_dict(checkpoint["model"])
    model = without_mup(model)
    tok = load_tokenizer(checkpoint["tokenizer"])
    # special ids: end-of-text, and chat markers given as ids in the embedding's padding rows
    template = checkpoint.get("chat_template") or {}
    specials = {tok.eot_id: tok.sp.id_to_piece(tok.eot_id) if tok.spec["kind"] == "sp" else EOT_TEXT}
    for role, marker in template.items():
        for n, i in enumerate(m for m in (marker if isinstance(marker, list) else []) if m >= tok.vocab_size):
            specials.setdefault(i, f"<|{role}{'_' + str(n) if n else ''}|>")
    end = template.get("end_of_turn")
    stop = [tok.eot_id] + ([end[0]] if isinstance(end, list) and len(end) == 1 else [])
    hf = to_hf(model, arch, dict(bos_token_id=tok.eot_id, eos_token_id=stop[0]))
    # padding rows were never a token: keep generate() off them, as sample.py's vocab_size does
    hf.generation_config = GenerationConfig(bos_token_id=tok.eot_id, eos_token_id=stop if len(stop) > 1 else stop[0],
                                            suppress_tokens=[i for i in range(tok.vocab_size, c.vocab_size) if i not in specials] or None)
    hf.save_pretrained(folder)  # config.json, generation_config.json, model.safetensors
    hf_tok, notes = hf_tokenizer(tok), []
    if tok.spec["kind"] == "char":
        notes.append("char tokenizer exported as a BPE with no merges, the same ids; characters outside its "
                     "vocabulary are dropped by it, refused by tokenizer.py")
    notes += [gguf_note(tok.spec, arch)] if gguf_note(tok.spec, arch) else []
    if hf_tok is None:
        notes.append("a unigram SentencePiece model has no Llama (BPE) equivalent: tokenizer not exported")
    else:
        from tokenizers import AddedToken
        # chat markers in the padding rows become special tokens at their own ids (gaps filled with unused ones)
        extra = [specials.get(i, f"<|unused_{i}|>") for i in range(tok.vocab_size, max(specials) + 1)]
        hf_tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
        assert all(hf_tok.convert_tokens_to_ids(t) == i for i, t in specials.items()), "special ids moved"
        if template:
            hf_tok.chat_template = chat_template_jinja(template, tok, specials)
            if hf_tok.chat_template is None:
                notes.append("a chat marker gives a regular token by id, which Jinja text cannot: no chat template")
            elif any(isinstance(m, str) for m in template.values()) and tok.spec["kind"] != "char":
                notes.append("text chat markers are tokenized with their neighbours by transformers, apart by "
                             "sample.py: BPE may merge across the boundary")
        hf_tok.save_pretrained(folder)
    if template:  # the markers themselves, which Jinja cannot give back: import and sample.py read them
        with open(os.path.join(folder, CHAT_MARKERS), "w") as f:
            json.dump(template, f, ensure_ascii=False)
    if tok.spec["kind"] == "sp":  # the original model too, as Llama repositories ship it; import reads it back
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(base64.b64decode(tok.spec["model"]))
    for note in notes:
        print(f"note: {note}")
    return hf, hf_tok, arch


# ----------------------------------------------------------------------------- import

def gpt_config_from_hf(h):
    c = _gpt_config_from_hf(h)  # mlp_hidden 0 where the width is model.py's default, as train.py writes it
    return dataclasses.replace(c, mlp_hidden=0) if dataclasses.replace(c, mlp_hidden=0).mlp_width == c.mlp_width else c


def _gpt_config_from_hf(h):
    arch = h.model_type
    if arch == "gpt2":
        if h.activation_function != "gelu":  # OpenAI's GPT-2 uses gelu_new, the tanh approximation
            print(f"note: {arch} uses {h.activation_function}; model.py's exact GELU differs from it by ~1e-3")
        return GPTConfig(vocab_size=h.vocab_size, block_size=h.n_positions, n_layer=h.n_layer, n_head=h.n_head,
                         n_embd=h.n_embd, mlp_hidden=h.n_inner or 0, bias=True, tie_embeddings=h.tie_word_embeddings)
    if arch not in ("llama", "qwen3"):
        raise UserError(f"model_type {arch!r} cannot be imported; this code reads gpt2, llama and qwen3")
    rope = h.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" or getattr(h, "use_sliding_window", False) or h.hidden_act != "silu":
        raise UserError(f"{arch} with rope {rope.get('rope_type')}, sliding window or {h.hidden_act} is not model.py's")
    if h.head_dim != h.hidden_size // h.num_attention_heads:
        raise UserError(f"head_dim {h.head_dim} is not hidden_size / num_attention_heads; model.py cannot hold it")
    if h.rms_norm_eps != 1e-6:
        print(f"note: rms_norm_eps is {h.rms_norm_eps}; model.py's RMSNorm uses 1e-6, a small difference")
    return GPTConfig(vocab_size=h.vocab_size, block_size=h.max_position_embeddings, n_layer=h.num_hidden_layers,
                     n_head=h.num_attention_heads, n_kv_head=h.num_key_value_heads, n_embd=h.hidden_size,
                     bias=h.attention_bias or getattr(h, "mlp_bias", False), pos_emb="rope",
                     rope_theta=float(rope.get("rope_theta", 10000.0)), norm="rmsnorm", mlp="swiglu",
                     mlp_hidden=h.intermediate_size, qk_norm=arch == "qwen3", tie_embeddings=h.tie_word_embeddings)


def tokenizer_spec_from_hf(folder):
    """A tokenizer.py spec that encodes like the folder's tokenizer, or (None, why)."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):  # SentencePiece: carried whole
        with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
            return dict(kind="sp", model=base64.b64encode(f.read()).decode()), None
    try:
        backend = json.loads(AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str())
    except Exception as e:
        return None, f"no tokenizer loads from {folder} ({type(e).__name__})"
    model, specials = backend["model"], {t["content"]: t["id"] for t in backend["added_tokens"]}
    if model["type"] == "BPE" and not model["merges"] and EOT_TEXT in specials:  # what hf_tokenizer writes for char
        chars = "".join(sorted(model["vocab"], key=model["vocab"].get))
        if specials[EOT_TEXT] == len(chars) == len(model["vocab"]):
            return dict(kind="char", chars=chars), None
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(backend["pre_tokenizer"]) and EOT_TEXT in specials:
        to_byte = {u: b for b, u in bytes_to_unicode().items()}
        ranks = sorted((i, bytes(to_byte[ch] for ch in t)) for t, i in model["vocab"].items())
        if specials[EOT_TEXT] == len(ranks) and all(i == r for r, (i, _) in enumerate(ranks)):
            spec = dict(kind="tiktoken", ranks="".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in ranks))
            return spec, None  # tokenizer.py splits with GPT-2's pattern: checked by load_hf
    return None, f"its {model['type']} tokenizer has no tokenizer.py equivalent (char, SentencePiece, GPT-2 BPE)"


def hub_download(name):
    """The local copy of the Hub's model `name` (gpt2, Qwen/Qwen3-0.6B), downloaded once into the Hub's cache."""
    from huggingface_hub import snapshot_download
    try:  # the files import reads: configuration, weights and tokenizer, not other formats' weights
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    except Exception as e:  # no network, an unknown repository, a name that is no repository id
        raise UserError(f"--from_hf={name} is no local folder, and the Hub did not give it ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})") from e


def load_hf(folder):
    """model.py's GPT holding a local Hugging Face GPT-2, Llama or Qwen3 folder's weights, and
    info = dict(model_type, tokenizer=spec or None, note=why not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder = hub_download(folder) if not os.path.exists(folder) else folder
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder} has no config.json: give a local Hugging Face model folder")
    try:
        hf_cfg = AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises OSError, ValueError and its own errors for a broken config.json
        raise UserError(f"{folder}/config.json does not load ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
    c, arch = gpt_config_from_hf(hf_cfg), hf_cfg.model_type
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except OSError as e:  # no model.safetensors (or pytorch_model.bin) in the folder
        raise UserError(f"{folder}: {str(e).strip().splitlines()[0]}") from e
    theirs, model = hf.state_dict(), GPT(c)
    new = {}
    for key, target in model.state_dict().items():
        h, t = weight_map(c, arch).get(key, (None, False))
        new[key] = (theirs[h].T if t else theirs[h]) if h in theirs else torch.zeros_like(target)  # absent: a zero bias
    if arch == "gpt2":
        for i in range(c.n_layer):
            a = f"transformer.h.{i}.attn."
            for s in ("weight", "bias"):
                w = theirs[a + "c_attn." + s]
                for n, part in zip(("q_proj", "k_proj", "v_proj"), (w.T if s == "weight" else w).chunk(3)):
                    new[a + n + "." + s] = part
    model.load_state_dict(new, strict=True)
    spec, note = tokenizer_spec_from_hf(folder)
    if spec is not None and spec["kind"] != "sp":  # check the spec against the folder's own tokenizer
        probe = "Hello, world! It's 2024 -- ROMEO: 'tis   fine.\n\nnaïve café 日本語 🎭"
        hf_tok, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(spec)
        probe = "".join(ch for ch in probe if spec["kind"] != "char" or ch in spec["chars"])
        if hf_tok.encode(probe, add_special_tokens=False) != ours.encode(probe):
            spec, note = None, "its tokenizer encodes differently from tokenizer.py's rebuilding of it"
    return model.eval(), dict(model_type=arch, tokenizer=spec, note=note, chat_template=chat_markers(folder))


def chat_markers(folder):
    """The chat template that export wrote beside the weights, or None for a model that was not fine-tuned."""
    path = os.path.join(folder, CHAT_MARKERS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            template = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} does not load ({e}); delete it to import the model without its chat template") from e
    markers_fit = isinstance(template, dict) and all(
        isinstance(m, str) or (isinstance(m, list) and all(isinstance(i, int) for i in m)) for m in template.values())
    if not markers_fit:
        raise UserError(f"{path} is not a chat template (a dict of role: text or list of token ids); delete it "
                        "to import the model without one")
    return template


def import_hf(cfg):
    path = os.path.join(cfg.to_run, "ckpt.pt")
    if os.path.exists(cfg.to_run) and not os.path.isdir(cfg.to_run):
        raise UserError(f"--to_run={cfg.to_run} is a file; give a run directory")
    if os.path.exists(path) and not cfg.overwrite:
        raise UserError(f"{path} exists; pick another --to_run or pass --overwrite")
    model, info = load_hf(cfg.from_hf)
    if info["tokenizer"] is None:
        print(f"note: no tokenizer spec: {info['note']}; train.py and sft.py use the dataset's, sample.py needs one")
    try:
        os.makedirs(cfg.to_run, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --to_run={cfg.to_run}: {e.strerror}") from None
    # train.run's checkpoint layout, without optimizer state: a starting point, not a run to resume
    save_checkpoint(path, dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                               model_config=dataclasses.asdict(model.config), config=dataclasses.asdict(cfg),
                               tokenizer=info["tokenizer"], dataset=f"hf:{cfg.from_hf}",
                               **({"chat_template": info["chat_template"]} if info["chat_template"] else {}),
                               state=dict(step=0, tokens=0, flops=0.0, elapsed=0.0, best_val_loss=float("inf")),
                               rng=dict(torch=torch.get_rng_state(), cuda=[])))
    print(f"wrote {path} ({info['model_type']}, {model.param_counts()['total'] / 1e6:.2f}M parameters)")
    return model, info


def main(argv):
    cfg = configurator.build(ExportConfig, configurator.parse(argv, ExportConfig))
    if bool(cfg.to) == bool(cfg.from_hf) or bool(cfg.from_hf) != bool(cfg.to_run):
        raise UserError("give --to=<folder> to export out_dir's checkpoint, or --from_hf=<folder> --to_run=<run dir>")
    return export(cfg) if cfg.to else import_hf(cfg)


if __name__ == "__main__":
    configurator.run_script(main)
