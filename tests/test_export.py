"""export.py and hf.py on tiny models: transformers computes the same logits and greedy tokens as
model.py for GPT-2, Llama and Qwen3 exports, tokenizers encode to the same ids, export then import
gives back the same weights, and every bad input (an architecture no standard one expresses, a
broken checkpoint, a busy or full destination) is one line that writes nothing. CPU, no network."""

import base64
import dataclasses
import errno
import io
import json
import os
import re
import subprocess

import pytest
from conftest import random_gpt
import torch

pytest.importorskip("transformers", reason="export.py needs transformers (requirements-extra.txt)")
pytest.importorskip("safetensors", reason="export.py needs safetensors")

import transformers

import export
import sample
from checkpoint import CHECKPOINT_VERSION, save_checkpoint
from configurator import UserError
from engine import Chat
from files import locked_folder
from model import GPT, PRESETS
from tokenizer import chat_template, load_tokenizer, render_chat

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet is "
        "the sun.\nJULIET: O Romeo, Romeo! wherefore art thou Romeo? 1234 5678\n  Deny thy "
        "father and refuse thy name.\n") * 20
PROBE = "ROMEO: the sun, 42 times!\n  Juliet?? naïve café 日本 🎭 end\n\n"
CHAR_SPEC = {"kind": "char", "chars": "".join(sorted(set(TEXT)))}
TINY = dict(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=64)
ARCHS = {  # every field that maps is set away from its default somewhere
    "gpt2": dict(PRESETS["classic"]),
    "llama": dict(PRESETS["modern"], mlp="swiglu", qk_norm=False, bias=True, n_kv_head=2,
                  rope_theta=500.0),
    "qwen3": dict(PRESETS["modern"], mlp="swiglu", n_kv_head=1, tie_embeddings=True,
                  rope_theta=20000.0),
}


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_run(out_dir, spec=CHAR_SPEC, extra=None, **arch):
    """A run directory with a checkpoint whose every weight (norms and biases too) is random."""
    model = random_gpt(**{**TINY, **arch})
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), dict(
        version=CHECKPOINT_VERSION, model=model.state_dict(), tokenizer=spec,
        model_config=dataclasses.asdict(model.config), dataset="test", **(extra or {})))
    return model.eval()


def run_export(tmp_path, *args, run="run", to="hf"):
    return export.main([f"--out_dir={tmp_path / run}", f"--to={tmp_path / to}", *args])


def greedy(model, ids, n, vocab_size):
    return torch.stack(list(model.generate(ids, n, temperature=0, vocab_size=vocab_size)), dim=1)


def files(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_computes_and_tokenizes_what_model_py_does(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = write_run(tmp_path / "run", **ARCHS[arch])
    run_export(tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json"} <= set(os.listdir(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM"}[arch]
    c, h, rows = model.config, hf.config, load_tokenizer(CHAR_SPEC).vocab_size
    # the padding rows past the tokenizer's stay home: no consumer would know not to sample them
    assert c.vocab_size == 128 and h.vocab_size == rows and h.tie_word_embeddings == c.tie_embeddings
    if arch == "gpt2":
        assert h.layer_norm_epsilon == 1e-5 and h.n_positions == c.block_size
    else:
        assert h.rms_norm_eps == 1e-6 and h.max_position_embeddings == c.block_size
        assert h.num_key_value_heads == c.n_kv_head
        assert h.rope_parameters["rope_theta"] == c.rope_theta
        assert h.attention_bias == c.bias and getattr(h, "mlp_bias", False) == c.bias
    x = torch.randint(0, rows, (2, 40))
    with torch.no_grad():
        assert (model(x, x)[0][..., :rows] - hf(x).logits).abs().max() < 1e-4

    tok = load_tokenizer(CHAR_SPEC)
    prompt = torch.tensor([[tok.eot_id] + tok.encode("ROMEO:")])
    ours = greedy(model, prompt, 20, tok.vocab_size)[0].tolist()
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.size(1):].tolist()
    if tok.eot_id in ours:  # transformers stops at end-of-text (generation_config's eos)
        ours = ours[:ours.index(tok.eot_id) + 1]
    assert theirs == ours
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode(TEXT[:200], add_special_tokens=False) == tok.encode(TEXT[:200])



@pytest.mark.parametrize("arch", ARCHS)
def test_a_mup_model_exports_with_its_multipliers_folded_into_the_weights(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    model = write_run(tmp_path / "run", **ARCHS[arch], mup=True, mup_base_width=32)  # m = 2
    run_export(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert not hf.config.tie_word_embeddings  # the head carries the logits' 1/m
    rows = hf.config.vocab_size  # the tokenizer's: the padding rows are not exported
    x = torch.randint(0, rows, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x, x)[0][..., :rows], hf(x).logits
        plain = GPT(dataclasses.replace(model.config, mup=False, mup_base_width=0))
        plain.load_state_dict(model.state_dict())
        unfolded = plain(x, x)[0][..., :rows]
    assert (ours - theirs).abs().max() < 1e-4
    assert (unfolded - theirs).abs().max() > 1e-2  # without the multipliers: other logits


def test_gpt2_without_biases_and_with_grouped_kv_heads_is_still_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM
    model = write_run(tmp_path / "run", **dict(PRESETS["classic"], bias=False, n_kv_head=2,
                                               tie_embeddings=False))
    run_export(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    rows = hf.config.vocab_size
    x = torch.randint(0, rows, (1, 30))
    with torch.no_grad():  # biases of zero, every kv head its own
        assert (model(x, x)[0][..., :rows] - hf(x).logits).abs().max() < 1e-4


def sp_spec():
    import sentencepiece as spm
    proto = io.BytesIO()  # prepare.py's settings
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines(True)), model_writer=proto, vocab_size=320,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], unk_id=0, bos_id=-1,
        eos_id=1, pad_id=-1, character_coverage=0.9999, minloglevel=2)
    return {"kind": "sp", "model": base64.b64encode(proto.getvalue()).decode()}


def tiktoken_spec():
    ranks = [bytes([i]) for i in range(256)] + [
        b"th", b"he", b"the", b" the", b"Ro", b"me", b"Rome", b"RO", b"ME", b"ROME", b"ROMEO",
        b"ou", b" thou", b" J", b"ul", b" Jul", b"ie"]
    return {"kind": "tiktoken",
            "ranks": "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))}


@pytest.mark.parametrize("make_spec", [sp_spec, tiktoken_spec])
def test_exported_tokenizers_encode_to_the_same_ids(tmp_path, make_spec):
    from transformers import AutoTokenizer
    spec = make_spec()
    tok = load_tokenizer(spec)
    vocab = -(-tok.vocab_size // 64) * 64
    write_run(tmp_path / "run", spec, **dict(PRESETS["classic"], vocab_size=vocab))
    run_export(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, PROBE):
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text) and hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tok.eot_id


def test_the_pipeline_on_the_folder_continues_as_sample_py_on_the_run(tmp_path):
    from transformers import AutoTokenizer, pipeline
    write_run(tmp_path / "run", **ARCHS["gpt2"])  # its greedy text does not reach end-of-text
    run_export(tmp_path)
    tok = load_tokenizer(CHAR_SPEC)  # end-of-text first, as every training document starts
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("ROMEO:").input_ids
    assert ids == [tok.eot_id] + tok.encode("ROMEO:")
    generate = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu",
                        dtype=torch.float32)
    theirs = generate("ROMEO:", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    out = io.StringIO()
    sample.main([f"--out_dir={tmp_path / 'run'}", "--prompt=ROMEO:", "--temperature=0",
                 "--max_new_tokens=30", "--dtype=float32"], out=out)
    assert theirs == out.getvalue().split("\n" + "-" * 40)[0] and len(theirs) > len("ROMEO:") + 20


def test_chat_template_renders_as_sample_py_does(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    tok = load_tokenizer(CHAR_SPEC)
    template = {"user": [70], "assistant": [72], "end_of_turn": [71], "system": "ROMEO:"}
    write_run(tmp_path / "run", **dict(ARCHS["llama"], extra=dict(chat_template=template)))
    run_export(tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [dict(role="system", content="be brief"), dict(role="user", content="hi Romeo"),
                dict(role="assistant", content="O Juliet"), dict(role="user", content="light?")]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert ids == render_chat(tok, template, messages)[0] + [72]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == ids
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == [tok.eot_id, 71]
    assert AutoConfig.from_pretrained(tmp_path / "hf").vocab_size == 73  # up to the last marker
    assert generation.suppress_tokens == list(range(tok.vocab_size, 70))  # the rows between
    # with sft.py's markers, right after the tokenizer's ids, transformers' greedy reply in the
    # template is sample.py --chat's
    template = chat_template(tok, TINY["vocab_size"])
    model = write_run(tmp_path / "run", **dict(ARCHS["llama"], extra=dict(chat_template=template)))
    run_export(tmp_path, "--overwrite")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    prompt = torch.tensor([hf_tok.apply_chat_template(messages[:2], add_generation_prompt=True)
                           ["input_ids"]])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.size(1):].tolist()
    ends = (tok.eot_id, *template["end_of_turn"])
    theirs = theirs[:next((i for i, t in enumerate(theirs) if t in ends), 12)]
    ours = "".join(Chat(model, tok, template, "be brief").respond("hi Romeo", 12, temperature=0))
    assert tok.decode(theirs) == ours


def refused(tmp_path, *args, match, to="hf"):
    """export.py refuses in one line, and writes nothing at --to."""
    with pytest.raises(UserError, match=match) as e:
        run_export(tmp_path, *args, to=to)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("arch, what", [
    (dict(PRESETS["modern"]), "relu2"), (dict(PRESETS["classic"], norm="rmsnorm"), "rmsnorm"),
    (dict(PRESETS["modern"], mlp="swiglu", moe_experts=4), "MoE")])
def test_what_no_standard_architecture_expresses_is_refused_in_one_line(tmp_path, arch, what):
    write_run(tmp_path / "run", **arch)
    assert "exportable: classic" in refused(tmp_path, match=what)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_tokenizer_with_a_morpheme_hook_is_refused_in_one_line(tmp_path):
    spec = {**CHAR_SPEC, "pretokenize": "tokenizer:mecab_morphemes"}
    write_run(tmp_path / "run", spec=spec, **ARCHS["llama"])
    refused(tmp_path, match="pretokenize hook tokenizer:mecab_morphemes")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_broken_checkpoint_is_refused_in_one_line_before_anything_is_written(tmp_path):
    model = write_run(tmp_path / "run", **ARCHS["llama"])
    path = tmp_path / "run" / "ckpt.pt"
    good = torch.load(path, weights_only=True)
    nan = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    wider = dict(good["model_config"], n_embd=128)
    for change, match in [(dict(model=nan), "not finite"), (dict(model={}), "has no model"),
                          (dict(tokenizer=None), "has no tokenizer"),
                          (dict(model_config=wider), "do not fit its model_config")]:
        save_checkpoint(str(path), {**good, **change})
        refused(tmp_path, match=match)
        assert sorted(os.listdir(tmp_path)) == ["run"]


def test_bad_arguments_say_what_to_give(tmp_path):
    with pytest.raises(UserError, match="give --to"):
        export.main([f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match="gguf_type must be"):
        export.main([f"--out_dir={tmp_path}", "--to_gguf=m.gguf", "--gguf_type=q4"])
    refused(tmp_path, match="no checkpoint")


def test_export_never_deletes_the_run_or_files_that_are_not_an_export(tmp_path):
    run = tmp_path / "run"
    write_run(run, **ARCHS["gpt2"])
    for to in ("run", "run/hf", "."):  # the run itself, inside it, around it
        refused(tmp_path, "--overwrite", to=to, match="overlaps the run")
    assert os.listdir(run) == ["ckpt.pt"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    refused(tmp_path, "--overwrite", to="notes", match="not an earlier export")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("keep me")
    refused(tmp_path, to="file", match="is a file")
    run_export(tmp_path)
    refused(tmp_path, match="exists and is not empty")
    for _ in range(2):  # an earlier export is replaced
        run_export(tmp_path, "--overwrite")
    assert sorted(os.listdir(tmp_path)) == [".lock", "file", "hf", "notes", "run"]


def test_a_second_export_there_is_refused_and_a_killed_one_s_staging_is_removed(tmp_path,
                                                                                 dead_pid):
    write_run(tmp_path / "run", **ARCHS["gpt2"])
    with locked_folder(str(tmp_path), "export.py"):  # another export.py, writing beside it
        with pytest.raises(UserError, match=r"is in use by export.py \(pid"):
            run_export(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".lock", "run"]
    for stale in (f"hf.{dead_pid}.tmp", f"hf.old.{dead_pid}.tmp"):  # a killed export's folders
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_text("half")
    (tmp_path / f"other.{dead_pid}.tmp").mkdir()  # a folder not of this export: kept
    live = f"hf.{os.getppid()}.tmp"  # a live process's, whatever it is: kept
    (tmp_path / live).mkdir()
    run_export(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".lock", "hf", live, f"other.{dead_pid}.tmp", "run"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("unexpected pos 128 vs 64")])
def test_a_full_disk_is_one_line_and_the_earlier_export_is_kept(tmp_path, monkeypatch, error):
    from safetensors import SafetensorError
    write_run(tmp_path / "run", **ARCHS["gpt2"])
    run_export(tmp_path)
    before = files(tmp_path / "hf")

    def fail(*args, **kwargs):
        raise error

    for failing in (error, SafetensorError("Error while serializing: I/O error: No space left")):
        error = failing
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail)
        refused(tmp_path, "--overwrite", match=f"cannot write {tmp_path / 'hf'}: .*intact")
        assert files(tmp_path / "hf") == before
        assert sorted(os.listdir(tmp_path)) == [".lock", "hf", "run"]


def test_a_gguf_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    write_run(tmp_path / "run", **ARCHS["llama"])
    gguf = f"--to_gguf={tmp_path / 'm.gguf'}"
    refused(tmp_path, gguf, match="convert_hf_to_gguf.py.*pip download")
    write_run(tmp_path / "run", **ARCHS["qwen3"])  # llama.cpp's Qwen3 reads chars otherwise
    refused(tmp_path, gguf, match="no GGUF from this model.*converts")
    write_run(tmp_path / "run", tiktoken_spec(), **dict(ARCHS["llama"], vocab_size=320))
    refused(tmp_path, gguf, match="knows this BPE vocabulary by no published model")
    assert sorted(os.listdir(tmp_path)) == ["run"]


LLAMA_CPP = os.environ.get("LLAMA_CPP_DIR", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py")),
                    reason="set LLAMA_CPP_DIR to a llama.cpp source tree (README: Run it in "
                    "llama.cpp)")
@pytest.mark.parametrize("make_spec", [lambda: CHAR_SPEC, sp_spec])
def test_llama_cpp_s_converter_makes_a_gguf_with_our_vocabulary(tmp_path, monkeypatch, make_spec):
    monkeypatch.syspath_prepend(os.path.join(LLAMA_CPP, "gguf-py"))
    monkeypatch.setenv("PYTHONPATH", os.path.join(LLAMA_CPP, "gguf-py"))
    from gguf import GGUFReader
    spec = make_spec()
    tok = load_tokenizer(spec)
    write_run(tmp_path / "run", spec, **dict(ARCHS["llama"], vocab_size=384))
    run_export(tmp_path, f"--to_gguf={tmp_path / 'm.gguf'}")
    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("llama.block_count") == 2
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and value("tokenizer.ggml.bos_token_id") == tok.eot_id
    assert value("tokenizer.ggml.model") == "llama"  # SentencePiece's way, no space put first
    assert value("tokenizer.ggml.add_bos_token") and not value("tokenizer.ggml.add_space_prefix")
    if spec["kind"] == "char":  # each character its own token, spaces as Llama spells them
        assert tokens[:tok.vocab_size - 1] == [ch.replace(" ", "\u2581") for ch in tok.chars]


LLAMA_BIN = os.path.join(LLAMA_CPP, "build", "bin")


def gpt2_spec():
    """GPT-2's own BPE; tiktoken downloads its ranks at first use (offline: .ci/gpt2_ranks.sh)."""
    try:
        load_tokenizer({"kind": "tiktoken", "name": "gpt2"})
    except UserError as e:
        pytest.skip(f"{e} (or set TIKTOKEN_CACHE_DIR to what .ci/gpt2_ranks.sh prints)")
    return {"kind": "tiktoken", "name": "gpt2"}


@pytest.mark.skipif(not os.path.isfile(os.path.join(LLAMA_BIN, "llama-completion")),
                    reason="set LLAMA_CPP_DIR to a llama.cpp source tree with llama-completion and "
                    "llama-tokenize built in build/bin (README: Run it in llama.cpp)")
@pytest.mark.parametrize("make_spec, arch", [(lambda: CHAR_SPEC, "llama"), (sp_spec, "llama"),
                                             (gpt2_spec, "gpt2"), (gpt2_spec, "llama"),
                                             (gpt2_spec, "qwen3")])
def test_llama_cpp_tokenizes_and_greedy_decodes_as_model_py(tmp_path, monkeypatch, make_spec,
                                                            arch):
    monkeypatch.setenv("PYTHONPATH", os.path.join(LLAMA_CPP, "gguf-py"))
    spec = make_spec()
    tok = load_tokenizer(spec)
    vocab = -(-tok.vocab_size // 64) * 64
    model = write_run(tmp_path / "run", spec, **dict(ARCHS[arch], vocab_size=vocab, n_embd=32,
                                                     block_size=128))  # holds all 100 tokens
    run_export(tmp_path, f"--to_gguf={tmp_path / 'm.gguf'}")
    llama = lambda tool, *args, **kw: subprocess.run(  # noqa: E731
        [os.path.join(LLAMA_BIN, tool), "-m", str(tmp_path / "m.gguf"), *args],
        capture_output=True, check=True, **kw).stdout  # bytes: a piece may be half a character
    probes = ["ROMEO: the sun", " the sun,\n  and Juliet", "Juliet 1234", "\n\nROMEO"]
    if spec["kind"] != "char":  # byte fallback or byte-level BPE: any text
        probes += ["naïve café", "대한민국 헌법", "  two spaces", "it's   don't\t\ttabs 12345678"]
    for text in probes:
        ids = json.loads(llama("llama-tokenize", "--stdin", "--ids", "--log-disable",
                               input=text.encode()).strip().splitlines()[-1])
        assert ids == [tok.eot_id] + tok.encode(text), text
    prompt = "ROMEO:"
    ids = torch.tensor([[tok.eot_id] + tok.encode(prompt)])
    ours = []
    for token in model.generate(ids, 100, temperature=0.0, vocab_size=tok.vocab_size):
        if token.item() == tok.eot_id:  # llama.cpp stops at end-of-text
            break
        ours.append(token.item())
    theirs = llama_completion(tmp_path / "m.gguf", prompt, 100)
    assert theirs == b"".join(token_bytes(tok, i) for i in ours)


def llama_completion(gguf, prompt, n):
    """llama-completion's greedy text. Its log thread prints the text, and the process can exit
    before that thread is done on a busy machine (llama.cpp#22142): the run counts only when its
    last log line, the timings, was printed too."""
    for _ in range(5):
        run = subprocess.run([os.path.join(LLAMA_BIN, "llama-completion"), "-m", str(gguf), "-p",
                              prompt, "-n", str(n), "--temp", "0", "-t", "1", "-no-cnv",
                              "--no-display-prompt", "--no-warmup", "--simple-io"],
                             capture_output=True, check=True)
        if b"graphs reused" in run.stderr:
            return run.stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n")
    pytest.fail("llama-completion's output was cut short in five runs out of five")


def token_bytes(tok, i):
    """What llama.cpp prints for token i: a SentencePiece byte piece is its byte alone."""
    if tok.spec["kind"] == "sp":
        piece = tok.sp.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode()
    if tok.spec["kind"] == "tiktoken":  # a byte-level piece may be part of a character
        return tok.enc.decode_single_token_bytes(i)
    return tok.decode([i]).encode()
