"""export.py on tiny models: transformers computes the same logits and greedy tokens as model.py for GPT-2,
Llama and Qwen3 exports, tokenizers encode to the same ids, export then import gives back the same weights,
and what no standard architecture expresses is refused in one line. CPU only, no network."""

import base64
import dataclasses
import errno
import io
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers

import export
import runtime
import sample
from configurator import UserError
from model import GPT, GPTConfig, PRESETS
from sample import render_chat
from tokenizer import load_tokenizer

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET: O Romeo, Romeo! wherefore art thou Romeo? 1234 5678\n  Deny thy father and refuse thy name.\n") * 20
PROBE = "ROMEO: the sun, 42 times!\n  Juliet?? naïve café 日本 🎭 end\n\n"
CHAR_SPEC = {"kind": "char", "chars": "".join(sorted(set(TEXT)))}
TINY = dict(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=64)
ARCHS = {  # every field that maps is set away from its default somewhere
    "gpt2": dict(PRESETS["classic"]),
    "llama": dict(PRESETS["modern"], mlp="swiglu", qk_norm=False, bias=True, n_kv_head=2, rope_theta=500.0),
    "qwen3": dict(PRESETS["modern"], mlp="swiglu", n_kv_head=1, tie_embeddings=True, rope_theta=20000.0),
}


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_run(out_dir, spec=CHAR_SPEC, extra=None, **arch):
    """A run directory with a checkpoint whose every weight (norms and biases too) is random."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **arch}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(out_dir, exist_ok=True)
    runtime.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), dict(
        version=runtime.CHECKPOINT_VERSION, model=model.state_dict(), model_config=dataclasses.asdict(model.config),
        config={}, tokenizer=spec, dataset="test", state=dict(step=0), rng={}, **(extra or {})))
    return model.eval()


def greedy(model, ids, n, vocab_size):
    return torch.stack(list(model.generate(ids, n, temperature=0, vocab_size=vocab_size)), dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_computes_what_model_py_computes_and_the_weights_come_back(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = write_run(tmp_path / "run", **ARCHS[arch])
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert type(hf).__name__ == expected
    c, h = model.config, hf.config
    assert h.vocab_size == c.vocab_size == 128 and h.tie_word_embeddings == c.tie_embeddings
    if arch == "gpt2":
        assert h.layer_norm_epsilon == model.transformer.ln_f.eps == 1e-5 and h.n_positions == c.block_size
    else:
        assert h.rms_norm_eps == model.transformer.ln_f.eps == 1e-6 and h.max_position_embeddings == c.block_size
        assert h.num_key_value_heads == c.n_kv_head and h.rope_parameters["rope_theta"] == c.rope_theta
        assert h.attention_bias == c.bias and getattr(h, "mlp_bias", False) == c.bias

    x = torch.randint(0, 66, (2, 40))
    with torch.no_grad():
        ours, _ = model(x, x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max() < 1e-4

    tok = load_tokenizer(CHAR_SPEC)
    prompt = torch.tensor([[tok.eot_id] + tok.encode("ROMEO:")])
    ours = greedy(model, prompt, 20, tok.vocab_size)[0].tolist()
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.size(1):].tolist()
    if tok.eot_id in ours:  # transformers stops at end-of-text (generation_config's eos), model.py goes on
        ours = ours[:ours.index(tok.eot_id) + 1]
    assert theirs == ours
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(TEXT[:200], add_special_tokens=False) == tok.encode(TEXT[:200])

    export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'back'}"])
    back, tokenizer, checkpoint = sample.load(sample.SampleConfig(out_dir=str(tmp_path / "back"), device="cpu", dtype="float32"))
    assert checkpoint["tokenizer"] == CHAR_SPEC and back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(UserError, match="exists"):
        export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'back'}"])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_mup_model_exports_with_its_multipliers_folded_into_the_weights(tmp_path, arch):
    from transformers import AutoModelForCausalLM
    model = write_run(tmp_path / "run", **ARCHS[arch], mup=True, mup_base_width=32)  # m = 2, base heads 8 wide
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert not hf.config.tie_word_embeddings  # the head carries the logits' 1/m, the embeddings do not
    x = torch.randint(0, 66, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x, x)[0], hf(x).logits
        plain = GPT(dataclasses.replace(model.config, mup=False, mup_base_width=0))
        plain.load_state_dict(model.state_dict())
        unfolded, _ = plain(x, x)
    assert (ours - theirs).abs().max() < 1e-4
    assert (unfolded - theirs).abs().max() > 1e-2  # the same weights without the multipliers: other logits


def test_gpt2_without_biases_and_with_grouped_kv_heads_is_still_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM
    model = write_run(tmp_path / "run", **dict(PRESETS["classic"], bias=False, n_kv_head=2, tie_embeddings=False))
    hf, _ = export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert (model(x, x)[0] - hf(x).logits).abs().max() < 1e-4
    back, _ = export.load_hf(str(tmp_path / "hf"))  # back as a GPT-2: biases of zero, every kv head its own
    assert back.config.bias and back.config.n_kv_head == 0
    with torch.no_grad():
        assert (model(x, x)[0] - back(x, x)[0]).abs().max() < 1e-5


def sp_spec():
    import sentencepiece as spm
    proto = io.BytesIO()  # prepare.py's settings
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines(True)), model_writer=proto, vocab_size=320, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], unk_id=0, bos_id=-1,
        eos_id=1, pad_id=-1, character_coverage=0.9999, minloglevel=2)
    return {"kind": "sp", "model": base64.b64encode(proto.getvalue()).decode()}


def tiktoken_spec():
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"he", b"the", b" the", b"Ro", b"me", b"Rome", b"RO", b"ME",
                                                b"ROME", b"ROMEO", b"ou", b" thou", b" J", b"ul", b" Jul", b"ie"]
    return {"kind": "tiktoken", "ranks": "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks))}


@pytest.mark.parametrize("make_spec", [sp_spec, tiktoken_spec])
def test_exported_tokenizers_encode_to_the_same_ids_and_come_back(tmp_path, make_spec):
    from transformers import AutoTokenizer
    spec = make_spec()
    tok = load_tokenizer(spec)
    write_run(tmp_path / "run", spec, **dict(PRESETS["classic"], vocab_size=-(-tok.vocab_size // 64) * 64))
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (TEXT, PROBE):
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text) and hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tok.eot_id
    _, info = export.load_hf(str(tmp_path / "hf"))
    assert load_tokenizer(info["tokenizer"]).encode(PROBE) == tok.encode(PROBE)


def test_the_pipeline_on_a_raw_prompt_continues_as_sample_py_does(tmp_path):
    from transformers import AutoTokenizer, pipeline
    write_run(tmp_path / "run", **ARCHS["gpt2"])  # whose greedy text does not reach end-of-text, where pipeline stops
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    tok = load_tokenizer(CHAR_SPEC)  # end-of-text first, as every training document starts
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ROMEO:").input_ids == [tok.eot_id] + tok.encode("ROMEO:")
    generate = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu", dtype=torch.float32)
    theirs = generate("ROMEO:", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    out = io.StringIO()
    sample.main([f"--out_dir={tmp_path / 'run'}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=30",
                 "--dtype=float32"], out=out)
    ours = out.getvalue().split("\n" + "-" * 40)[0]
    assert theirs == ours and len(ours) > len("ROMEO:") + 20


@pytest.mark.parametrize("make_spec, arch, converts", [(lambda: CHAR_SPEC, "llama", False), (sp_spec, "qwen3", False),
                                                       (sp_spec, "gpt2", False), (sp_spec, "llama", True)])
def test_what_llama_cpp_s_converter_would_get_wrong_is_said(tmp_path, capsys, make_spec, arch, converts):
    # as convert_hf_to_gguf.py of llama-cpp-python 0.3.36's sdist did by hand (it is not installable from PyPI)
    write_run(tmp_path / "run", make_spec(), **dict(ARCHS[arch], vocab_size=384))
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    said = "for a GGUF, prepare the data with --tokenizer=sp and export a Llama" in capsys.readouterr().out
    assert said != converts


def test_chat_template_renders_as_sample_py_does(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig
    tok = load_tokenizer(CHAR_SPEC)
    template = {"user": [70], "assistant": [72], "end_of_turn": [71], "system": "ROMEO:"}  # ids in the padding rows
    write_run(tmp_path / "run", **dict(PRESETS["classic"], extra=dict(chat_template=template)))
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [dict(role="system", content="be brief"), dict(role="user", content="hi Romeo"),
                dict(role="assistant", content="O Juliet"), dict(role="user", content="what light?")]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf_tok.encode(text, add_special_tokens=False) == render_chat(tok, template, messages)[0] + [72]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == hf_tok.encode(text, add_special_tokens=False)
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == [tok.eot_id, 71]
    assert 70 not in generation.suppress_tokens and 66 in generation.suppress_tokens and 127 in generation.suppress_tokens


def test_a_fine_tuned_model_keeps_its_chat_template_through_export_and_import(tmp_path, monkeypatch):
    template = {"user": [70], "assistant": [72], "end_of_turn": [71], "system": "ROMEO:"}
    write_run(tmp_path / "run", **dict(ARCHS["llama"], extra=dict(chat_template=template)))
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'back'}"])
    assert runtime.load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))["chat_template"] == template
    replies = []
    for folder in ("run", "hf", "back"):  # the folder itself too, as sample.py reads it
        monkeypatch.setattr("sys.stdin", io.StringIO("hi Romeo\nwhat light?\n"))
        out = io.StringIO()
        sample.main([f"--out_dir={tmp_path / folder}", "--chat", "--system=be brief", "--temperature=0",
                     "--max_new_tokens=12", "--dtype=float32"], out=out)
        replies.append(out.getvalue())
    assert replies[0] == replies[1] == replies[2] and replies[0].count("\n") == 5  # 2 messages, 2 replies, Ctrl-D
    (tmp_path / "hf" / export.CHAT_MARKERS).write_text('{"user": 3.5}')
    with pytest.raises(UserError, match="is not a chat template"):
        export.load_hf(str(tmp_path / "hf"))


@pytest.mark.parametrize("arch, what", [(dict(PRESETS["modern"]), "relu2"),
                                        (dict(PRESETS["modern"], mlp="swiglu", moe_experts=4), "MoE"),
                                        (dict(PRESETS["classic"], norm="rmsnorm"), "rmsnorm")])
def test_what_no_standard_architecture_expresses_is_refused_in_one_line(tmp_path, arch, what):
    write_run(tmp_path / "run", **arch)
    with pytest.raises(UserError) as e:
        export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    message = str(e.value)
    assert what in message and "exportable: classic" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "hf")


def test_a_tokenizer_with_a_morpheme_hook_is_refused_in_one_line(tmp_path):
    write_run(tmp_path / "run", spec={**CHAR_SPEC, "pretokenize": "tokenizer:mecab_morphemes"}, **ARCHS["llama"])
    with pytest.raises(UserError) as e:
        export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    assert "pretokenize hook tokenizer:mecab_morphemes" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "hf")


def test_bad_arguments_say_what_to_give(tmp_path):
    with pytest.raises(UserError, match="give --to"):
        export.main([f"--out_dir={tmp_path}"])
    with pytest.raises(UserError, match="no checkpoint"):
        export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    with pytest.raises(UserError, match="no config.json"):
        export.main([f"--from_hf={tmp_path}", f"--to_run={tmp_path / 'run'}"])


def test_sample_py_reads_an_exported_folder_directly(tmp_path):
    write_run(tmp_path / "run", **ARCHS["gpt2"])
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    args = ["--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=30", "--dtype=float32"]
    texts = []
    for folder in ("run", "hf"):
        out = io.StringIO()
        sample.main([f"--out_dir={tmp_path / folder}"] + args, out=out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and len(texts[0]) > len("ROMEO:")


def test_export_never_deletes_the_run_or_files_that_are_not_an_export(tmp_path):
    run = tmp_path / "run"
    write_run(run, **ARCHS["gpt2"])
    for to in (run, run / "hf", tmp_path):  # the run itself, inside it, around it
        with pytest.raises(UserError, match="overlaps the run"):
            export.main([f"--out_dir={run}", f"--to={to}", "--overwrite"])
    assert os.listdir(run) == ["ckpt.pt"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier export"):
        export.main([f"--out_dir={run}", f"--to={tmp_path / 'notes'}", "--overwrite"])
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        export.main([f"--out_dir={run}", f"--to={tmp_path / 'file'}"])
    for _ in range(2):  # an earlier export is replaced
        export.main([f"--out_dir={run}", f"--to={tmp_path / 'hf'}", "--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["file", "hf", "notes", "run"]  # nothing staged is left beside it


def test_a_target_that_cannot_be_written_is_one_line_and_the_earlier_export_is_kept(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_run(run, **ARCHS["gpt2"])
    export.main([f"--out_dir={run}", f"--to={tmp_path / 'hf'}"])
    before = {name: (tmp_path / "hf" / name).read_bytes() for name in os.listdir(tmp_path / "hf")}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'hf'}: No space left on device"):
        export.main([f"--out_dir={run}", f"--to={tmp_path / 'hf'}", "--overwrite"])
    assert {name: (tmp_path / "hf" / name).read_bytes() for name in os.listdir(tmp_path / "hf")} == before
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'new'}: Permission denied"):  # a read-only parent
        export.main([f"--out_dir={run}", f"--to={tmp_path / 'new'}"])


def test_a_model_on_the_hub_is_downloaded_then_imported(tmp_path, monkeypatch):
    import huggingface_hub
    with pytest.raises(UserError, match="--from_hf=gpt2 is no local folder, and the Hub did not give it"):
        export.main(["--from_hf=gpt2", f"--to_run={tmp_path / 'gpt2'}"])  # offline
    model = write_run(tmp_path / "run", **ARCHS["gpt2"])
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hub' / 'gpt2'}"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kwargs: str(tmp_path / "hub" / name))
    back, _ = export.main(["--from_hf=gpt2", f"--to_run={tmp_path / 'out-gpt2'}"])
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_broken_hugging_face_folder_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="config.json does not load"):
        export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'run'}"])
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')  # and no weights
    with pytest.raises(UserError, match="no file named model.safetensors"):
        export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'run'}"])
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        export.main([f"--from_hf={tmp_path / 'hf'}", f"--to_run={tmp_path / 'file'}"])
    assert not os.path.exists(tmp_path / "run")
