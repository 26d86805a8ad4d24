"""sample.py on tiny models: reproducible text, the KV cache against full recompute, chat turns that
prefill only their new tokens, whole-turn dropping when the context fills, streaming, and bad input."""

import base64
import dataclasses
import io
import os
import random
import subprocess
import sys

import pytest
import torch

import checkpoint as ckpt
import engine
import prepare
import sample
import train
from configurator import UserError
from model import GPT, GPTConfig, PRESETS
from tokenizer import load_tokenizer, marker_ids, render_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "\nabcdefghijklmnopqrstuvwxyz <>:"
SPEC = {"kind": "char", "chars": CHARS}
TEMPLATE = {"user": "<u>", "assistant": "<a>", "end_of_turn": "<e>", "system": "<s>"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(preset="classic", block_size=64):
    """Random weights, scaled up so that greedy choices are not near-ties decided by rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS[preset], vocab_size=64, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def write_run(out_dir, model=None, **extra):
    """A run directory holding a checkpoint with the keys train.py writes."""
    model = model or tiny_model()
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = dict(version=ckpt.CHECKPOINT_VERSION, model=model.state_dict(),
                      model_config=dataclasses.asdict(model.config), config={}, tokenizer=SPEC, state=dict(step=0))
    torch.save({**checkpoint, **extra}, os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


def run_sample(*args):
    out = io.StringIO()
    sample.main(list(args), out=out)
    return out.getvalue()


def recompute(model, ids, n):
    """nanoGPT's generation: the full forward over the (cropped) sequence for every token, greedy."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
            ids.append(logits[0, -1, :len(CHARS) + 1].argmax().item())
    return ids


# ----------------------------------------------------------------------------- generation

def test_same_seed_gives_the_same_text(tmp_path):
    run = write_run(tmp_path / "run")
    args = [f"--out_dir={run}", "--prompt=the king", "--max_new_tokens=40", "--temperature=1.0", "--num_samples=2"]
    first = run_sample(*args, "--seed=1")
    assert first == run_sample(*args, "--seed=1")
    assert first != run_sample(*args, "--seed=2")
    samples = first.split("-" * 40 + "\n")
    assert len(samples) == 3 and samples[0] != samples[1]  # the samples differ; the split leaves "" last
    assert all(s.startswith("the king") for s in samples[:2])


@pytest.mark.parametrize("preset", ["classic", "modern"])
def test_cached_generation_equals_full_recompute_at_temperature_0(tmp_path, preset):
    model = tiny_model(preset)
    tokenizer = load_tokenizer(SPEC)
    prompt = [tokenizer.eot_id] + tokenizer.encode("the queen")
    with torch.no_grad():
        cached = [t.item() for t in model.generate(torch.tensor([prompt]), 50, temperature=0, vocab_size=tokenizer.vocab_size)]
    assert cached == recompute(model, prompt, 50)[len(prompt):]
    # and through the script, which also decodes and streams the tokens
    text = run_sample(f"--out_dir={write_run(tmp_path / 'run', model)}", "--prompt=the queen", "--temperature=0",
                      "--max_new_tokens=50", "--dtype=float32")
    assert text == "the queen" + tokenizer.decode(cached) + "\n" + "-" * 40 + "\n"


def test_tokens_are_streamed_as_they_are_produced(tmp_path):
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    sample.main([f"--out_dir={write_run(tmp_path / 'run')}", "--max_new_tokens=30"], out=Recorder())
    assert sum(1 for w in writes if w) >= 25  # one write per printable token, not one at the end


def test_a_character_split_over_byte_tokens_is_printed_whole():
    ranks = "\n".join(f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256))
    tokenizer = load_tokenizer({"kind": "tiktoken", "ranks": ranks})
    ids = tokenizer.encode("né")
    assert len(ids) == 3  # "é" is two byte tokens
    assert engine.printable(tokenizer, ids[:2]) == ("n", False)  # half a character waits
    assert engine.printable(tokenizer, ids) == ("né", False)


def byte_and_sentencepiece_tokenizers():
    import sentencepiece as spm
    text = "ROMEO: né à Köln, 대통령은 이번 행사를 통해\n  two  spaces and digits 12345\n" * 20
    proto = io.BytesIO()  # byte fallback and kept whitespace, as prepare.py trains it
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines(True)), model_writer=proto, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
                                   minloglevel=2)
    ranks = "\n".join(f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256))
    return [load_tokenizer({"kind": "tiktoken", "ranks": ranks}),
            load_tokenizer({"kind": "sp", "model": base64.b64encode(proto.getvalue()).decode()})]


@pytest.mark.parametrize("tokenizer", byte_and_sentencepiece_tokenizers(), ids=["bytes", "sentencepiece"])
def test_streamed_text_equals_the_whole_decode_and_decodes_only_the_last_ids(tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(600)] + tokenizer.encode(" né 대통령은  x")
    decoded_lengths = []
    real_decode = tokenizer.decode
    tokenizer.decode = lambda part: decoded_lengths.append(len(part)) or real_decode(part)
    stream = engine.TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == real_decode(ids)  # random ids too: invalid byte sequences, split characters, leading spaces
    assert max(decoded_lengths) <= 32  # a short window (a run of invalid bytes waits longer), never all 600


def test_checkpoints_written_by_train_py_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    words = "the king and queen speak to their lords".split()
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    prepare.main(["--source=corpus.txt", "--dataset=tiny", "--tokenizer=char"])
    train.main(["--dataset=tiny", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
                "--eval_iters=1", "--sample_tokens=0", "--max_iters=2", "--eval_interval=2", "--out_dir=run"])
    for name in ("ckpt.pt", "best.pt"):
        text = run_sample("--out_dir=run", f"--ckpt={name}", "--prompt=the king", "--max_new_tokens=20")
        assert text.startswith("the king") and text.endswith("\n" + "-" * 40 + "\n")


def test_prompt_from_a_file_and_from_stdin(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    (tmp_path / "prompt.txt").write_text("a lord\n")
    from_file = run_sample(f"--out_dir={run}", f"--prompt=FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens=5")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a lord\n"))
    assert from_file.startswith("a lord\n") and run_sample(f"--out_dir={run}", "--prompt=-", "--max_new_tokens=5") == from_file
    # nanoGPT's name for the prompt, with its FILE: prefix
    assert run_sample(f"--out_dir={run}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens=5") == from_file


def test_importing_sample_loads_no_heavy_library():
    heavy = ("datasets", "torch.distributed.checkpoint", "sentencepiece", "tiktoken", "matplotlib", "wandb")
    code = f"import sys, sample; print([m for m in sys.modules if m.startswith({heavy!r})])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- chat

def test_render_chat_marks_what_the_assistant_writes():
    tokenizer = load_tokenizer(SPEC)
    messages = [dict(role="system", content="be brief"), dict(role="user", content="hi"), dict(role="assistant", content="yo")]
    ids, trained = render_chat(tokenizer, TEMPLATE, messages)
    assert ids[0] == tokenizer.eot_id and tokenizer.decode(ids) == "<s>be brief<e><u>hi<e><a>yo<e>"
    assert tokenizer.decode([i for i, t in zip(ids, trained) if t]) == "yo<e>"
    with pytest.raises(UserError, match="no marker for role 'tool'"):
        render_chat(tokenizer, TEMPLATE, [dict(role="tool", content="x")])


def count_forward_tokens(monkeypatch, model):
    """Record, for every forward call, how many tokens it was given and its logits."""
    calls = []
    real_forward = model.forward

    def forward(idx, *args, **kwargs):
        logits, loss = real_forward(idx, *args, **kwargs)
        calls.append((idx.size(1), logits))
        return logits, loss

    monkeypatch.setattr(model, "forward", forward)
    return calls


@pytest.mark.parametrize("preset", ["classic", "modern"])
def test_the_second_turn_prefills_only_new_tokens_and_matches_full_recompute(monkeypatch, preset):
    model, tokenizer = tiny_model(preset, block_size=128), load_tokenizer(SPEC)
    chat = engine.Chat(model, tokenizer, TEMPLATE, system="be brief")
    "".join(chat.respond("hello there", max_new_tokens=12, temperature=0))
    after_first = chat.prefix + chat.turns[0]
    unfed = len(after_first) - chat.cache.pos  # the last sampled token (and an appended end marker)
    assert 1 <= unfed <= 1 + len(tokenizer.encode("<e>"))

    calls = count_forward_tokens(monkeypatch, model)
    reply = "".join(chat.respond("and you", max_new_tokens=12, temperature=0))
    second = tokenizer.encode("<u>and you<e><a>")
    assert calls[0][0] == unfed + len(second)  # the prefill: the new message, not the conversation
    assert all(n == 1 for n, _ in calls[1:])
    context = after_first + second
    with torch.no_grad():
        full, _ = model.__class__.forward(model, torch.tensor([context]))
    torch.testing.assert_close(calls[0][1][0, -1], full[0, -1], rtol=1e-4, atol=1e-4)
    assert chat.cache.tokens[0, :len(context)].tolist() == context
    assert tokenizer.decode(chat.turns[1]).startswith("<u>and you<e><a>" + reply)


def test_context_overflow_drops_whole_turns_and_rebuilds_the_cache(capsys):
    model, tokenizer = tiny_model(block_size=64), load_tokenizer(SPEC)
    chat = engine.Chat(model, tokenizer, TEMPLATE, system="hi")
    finished = []
    for message in ["one", "two", "three", "four", "five", "six"]:
        "".join(chat.respond(message, max_new_tokens=8, temperature=0))
        finished.append(chat.turns[-1])
        assert chat.turns == finished[-len(chat.turns):]  # the most recent whole exchanges, in order
        kept = chat.prefix + [i for turn in chat.turns for i in turn]
        assert len(kept) <= 64
        # what the cache holds is exactly the prefix and whole kept exchanges (up to the unfed last tokens)
        assert chat.cache.tokens[0, :chat.cache.pos].tolist() == kept[:chat.cache.pos]
        assert tokenizer.decode(chat.turns[0]).startswith("<u>")
    assert len(chat.turns) < len(finished)
    assert "dropped the oldest" in capsys.readouterr().err


@pytest.mark.parametrize("marker", ["<e>", "special"])
def test_a_reply_stops_at_the_end_of_turn_marker(monkeypatch, marker):
    model, tokenizer = tiny_model(), load_tokenizer(SPEC)
    special = tokenizer.vocab_size + 3  # a padding row of the embedding used as a special token
    template = dict(TEMPLATE, end_of_turn=[special] if marker == "special" else marker)
    end = marker_ids(tokenizer, template["end_of_turn"])
    script = tokenizer.encode("so <long") + end + tokenizer.encode("after")  # "<" alone is not the marker

    def scripted_generate(idx, max_new_tokens, *args, vocab_size=None, **kwargs):
        assert vocab_size > max(script)  # the special id can be sampled
        yield from (torch.tensor([t]) for t in script[:max_new_tokens])

    monkeypatch.setattr(model, "generate", scripted_generate)
    chat = engine.Chat(model, tokenizer, template)
    pieces = list(chat.respond("hi", max_new_tokens=30))
    assert "".join(pieces) == "so <long"
    assert chat.turns[0][-len(end):] == end and chat.turns[0][:-len(end)][-4:] == tokenizer.encode("long")
    if marker == "<e>":  # "<" waited until the next token showed it was not the marker
        assert pieces[3:5] == ["", "<l"]


def test_chat_loop_reports_bad_messages_and_goes_on(tmp_path, capsys):
    run = write_run(tmp_path / "run", chat_template=TEMPLATE)
    cfg = sample.SampleConfig(out_dir=run, chat=True, max_new_tokens=5)
    model, tokenizer, checkpoint = engine.load_model(run)
    messages = iter(["HELLO", "x" * 70, "hello"])

    def read(prompt):
        message = next(messages, None)
        if message is None:
            raise EOFError  # Ctrl-D
        return message

    out = io.StringIO()
    sample.chat(model, tokenizer, checkpoint, cfg, torch.Generator().manual_seed(0), out, read=read)
    err = capsys.readouterr().err
    assert "not in the char vocabulary" in err and "shorten it" in err
    lines = out.getvalue().split("\n")
    assert lines[:2] == ["", ""] and lines[2] and lines[3:] == ["", ""]  # no answer to the two bad messages


# ----------------------------------------------------------------------------- bad input

def test_each_bad_input_is_one_clear_line(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    with pytest.raises(UserError, match="no checkpoint at .*empty/ckpt.pt"):
        run_sample(f"--out_dir={tmp_path / 'empty'}")
    for name in ("config.json", "log.jsonl"):  # what train.py writes beside ckpt.pt; not a Hugging Face folder
        (tmp_path / "run" / name).write_text("{}\n")
    with pytest.raises(UserError, match=r"no checkpoint at .*run/best.pt \(the run has ckpt.pt\): check --ckpt"):
        run_sample(f"--out_dir={run}", "--ckpt=best.pt")
    write_run(tmp_path / "old", version=0)
    with pytest.raises(UserError, match="checkpoint version 0, this code reads version 1"):
        run_sample(f"--out_dir={tmp_path / 'old'}")
    (tmp_path / "weights").mkdir()
    torch.save(tiny_model().state_dict(), tmp_path / "weights" / "ckpt.pt")  # bare weights, not a train.py checkpoint
    with pytest.raises(UserError, match="is not a checkpoint of this code's train.py"):
        run_sample(f"--out_dir={tmp_path / 'weights'}")
    write_run(tmp_path / "other", model=tiny_model(), model_config=dict(dataclasses.asdict(tiny_model().config), n_embd=48))
    with pytest.raises(UserError, match="its weights do not fit its model_config"):
        run_sample(f"--out_dir={tmp_path / 'other'}")
    with pytest.raises(UserError, match="2 characters not in the char vocabulary: 'GK'"):
        run_sample(f"--out_dir={run}", "--prompt=the KinG")
    with pytest.raises(UserError, match="fine-tune it with sft.py first"):
        run_sample(f"--out_dir={run}", "--chat")
    capsys.readouterr()
    text = run_sample(f"--out_dir={run}", "--prompt=" + "a" * 100, "--max_new_tokens=10")
    assert capsys.readouterr().err == "warning: the prompt is 101 tokens, longer than the context of 64; keeping its last 54\n"
    assert text.startswith("a" * 100)


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("the café".encode("latin-1"))
    with pytest.raises(UserError, match=r"prompt file .*latin1.txt is not UTF-8 text .*save it as UTF-8"):
        run_sample(f"--out_dir={write_run(tmp_path / 'run')}", f"--prompt=FILE:{tmp_path / 'latin1.txt'}")


def test_a_system_message_too_long_for_the_context_is_blamed_not_the_message(tmp_path):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=32), chat_template=TEMPLATE)
    with pytest.raises(UserError, match="the system message takes 506 tokens and the context holds 32, leaving no room"):
        run_sample(f"--out_dir={run}", "--chat", "--system=" + "a" * 500)
    # a system message that fits but leaves little room: the error says how much it takes
    chat = engine.Chat(tiny_model(block_size=32), load_tokenizer(SPEC), TEMPLATE, system="a" * 10)
    with pytest.raises(UserError, match="takes 20 tokens and the context holds 32, 16 of them taken by the system message"):
        "".join(chat.respond("hello there", max_new_tokens=5))


def test_the_script_prints_one_line_and_exits_1(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"error: no checkpoint at {tmp_path}/ckpt.pt: train one with train.py, or point --out_dir (and --ckpt) at a run\n"


def test_a_system_message_without_chat_and_a_temperature_that_is_not_a_number_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--system is a chat's system message: add --chat"):
        sample.main(["--system=You are terse."])  # was ignored in silence
    with pytest.raises(UserError, match="--top_k must be at least 0, got -1"):
        sample.main(["--top_k=-1"])
    with pytest.raises(UserError, match=r"top_p must be in \(0, 1\], got 0.0"):
        sample.main(["--top_p=0"])
    (tmp_path / "recipe.py").write_text("temperature = float('nan')\n")  # was torch.multinomial's traceback
    with pytest.raises(UserError, match="temperature must be a finite number, got nan"):
        sample.main([str(tmp_path / "recipe.py")])
