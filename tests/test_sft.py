"""sft.py on tiny models: masked positions get no gradient, the loss is the assistant tokens' mean, the
template round-trips, identity and cleaning, packing at turn boundaries, local and Hub-format data, and a
fine-tuned model that beats its base model on held-out conversations."""

import dataclasses
import io
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import chat_data
import checkpoint as ckpt_module
import data
import engine
import prepare
import sample
import sft
import train
from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import chat_template, load_tokenizer, marker_ids, render_chat


def parse_chat(tokenizer, template, ids):
    """The messages back from render_chat's ids: where each role marker starts a message and
    end_of_turn closes it, to check that the template round-trips."""
    if ids[:1] != [tokenizer.eot_id]:
        raise ValueError("a rendered conversation starts with the end-of-text token")
    markers = {role: marker_ids(tokenizer, m) for role, m in template.items()
               if role != "end_of_turn"}
    end = marker_ids(tokenizer, template["end_of_turn"])
    messages, i = [], 1
    while i < len(ids):
        role = next((r for r, m in markers.items() if ids[i:i + len(m)] == m), None)
        if role is None:
            raise ValueError(f"no role marker at token {i}")
        start = i + len(markers[role])
        ends = (j for j in range(start, len(ids) - len(end) + 1) if ids[j:j + len(end)] == end)
        stop = next(ends, None)
        if stop is None:
            raise ValueError(f"the {role} message at token {start} has no end_of_turn")
        messages.append(dict(role=role, content=tokenizer.decode(ids[start:stop])))
        i = stop + len(end)
    return messages


CHARS = "\n abcdefghijklmnopqrstuvwxyz0123456789?.,'"
TOKENIZER = load_tokenizer({"kind": "char", "chars": CHARS})
SPECIAL = chat_template(TOKENIZER, 64)
TEXT = {"user": "user, ", "assistant": "bot, ", "end_of_turn": "\n\n", "system": "sys, "}
PRETRAIN = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=48", "--block_size=64", "--batch_size=16",
            "--eval_iters=4", "--sample_tokens=0", "--warmup_iters=10", "--learning_rate=3e-3", "--out_dir=base"]


def sums(n, seed):
    rng = random.Random(seed)
    return [(a, b) for a, b in ((rng.randint(0, 49), rng.randint(0, 49)) for _ in range(n))]


@pytest.fixture
def base_run(tmp_path, monkeypatch):
    """A tiny char model pretrained on sums written as prose, and chat data asking for them."""
    monkeypatch.chdir(tmp_path)
    text = "\n".join(f"what is {a} plus {b}? so {a} plus {b} is {a + b}, they said." for a, b in sums(3000, 0))
    (tmp_path / "corpus.txt").write_text(text)
    prepare.main(["--source=corpus.txt", "--dataset=tiny", "--tokenizer=char"])
    train.main(PRETRAIN + ["--max_iters=150", "--eval_interval=150"])
    with open("chat.jsonl", "w") as f:
        for a, b in sums(1200, 1):
            f.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}) + "\n")
    return tmp_path


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_special_tokens_sit_in_the_padding_rows_and_text_markers_are_the_fallback():
    assert SPECIAL == {"user": [43], "assistant": [44], "end_of_turn": [45], "system": [46]}
    assert isinstance(chat_template(load_tokenizer({"kind": "char", "chars": CHARS + "<|>"}), 45)["user"], str)
    with pytest.raises(UserError, match="not in the char vocabulary"):
        chat_template(TOKENIZER, 43)  # no room for special tokens, and no "<|>" to write markers with


def test_the_chat_template_lives_below_the_stages():
    # tokenizer.py holds it, so sft.py needs no sample.py (a stage beside it) and the template no torch
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, tokenizer; light = 'torch' not in sys.modules; import sft; "
            "print(light, 'sample' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("template", [SPECIAL, TEXT], ids=["special", "text"])
def test_the_template_renders_and_parses_back(template):
    messages = [dict(role="system", content="be brief."), dict(role="user", content="what is 2 plus 2?"),
                dict(role="assistant", content="2 plus 2 is 4."), dict(role="user", content="and 3 plus 3?"),
                dict(role="assistant", content="6.")]
    ids, trained = render_chat(TOKENIZER, template, messages)
    assert parse_chat(TOKENIZER, template, ids) == messages
    # what carries loss is exactly the assistant's words and their end_of_turn
    end = marker_ids(TOKENIZER, template["end_of_turn"])
    assert [i for i, t in zip(ids, trained) if t] == TOKENIZER.encode("2 plus 2 is 4.") + end + TOKENIZER.encode("6.") + end


def packed_batch(tmp_path, mask_prompt=True):
    rows = [{"prompt": f"what is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a, b in sums(40, 2)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    cfg = sft.SFTConfig(sources=str(path), identity_rate=0.0, val_fraction=0.25, mask_prompt=mask_prompt)
    data = sft.PackedChats(cfg, 0, TOKENIZER, SPECIAL, 128, {})
    return data, data.batch("train", torch.arange(len(data.rows["train"])), 128)


def test_masked_positions_contribute_exactly_zero_gradient_and_the_loss_is_the_assistant_mean(tmp_path):
    data, (x, y) = packed_batch(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=2, n_embd=32))
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    masked = y == -1
    assert masked.any() and (~masked).any()
    assert torch.all(logits.grad[masked] == 0)
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    # the mean over exactly the assistant's tokens: its words and its end_of_turn, nothing of the prompt
    per_token = torch.nn.functional.cross_entropy(logits.detach()[~masked], y[~masked])
    assert torch.allclose(loss, per_token)
    answers = "".join(TOKENIZER.decode([int(t) for t in row if 0 <= t < TOKENIZER.vocab_size]) for row in y)
    assert "what is" not in answers and "plus" in answers
    assert int((y == SPECIAL["end_of_turn"][0]).sum()) == answers.count(".")  # one end_of_turn per answer


def test_without_prompt_masking_every_real_token_carries_loss(tmp_path):
    masked, _ = packed_batch(tmp_path, mask_prompt=True)
    unmasked, _ = packed_batch(tmp_path, mask_prompt=False)
    share = lambda d: d.masks["train"][:, 1:].mean()
    assert share(unmasked) > 2 * share(masked)
    assert (unmasked.masks["train"] == (unmasked.rows["train"] != TOKENIZER.eot_id)).mean() > 0.9


def test_identity_conversations_appear_at_the_configured_rate(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"r{i}"}) for i in range(1000)))
    cfg = sft.SFTConfig(sources=str(path), identity_rate=0.2, identity_name="Puck", identity_maker="Oberon")
    train_set, val_set = chat_data.load_conversations(cfg, 0, lambda *a: None)
    identity = [c for c in train_set if "Puck" in c[1]["content"] or "Oberon" in c[1]["content"]]
    assert len(identity) / len(train_set) == pytest.approx(0.2, abs=0.005)
    assert any("Puck" in c[1]["content"] for c in val_set)


def test_a_sample_claiming_to_be_another_model_is_dropped_and_counted(tmp_path):
    rows = [("who are you?", "I am ChatGPT, a large language model."),
            ("help", "As an AI language model developed by OpenAI, I cannot do that."),
            ("name?", "I'm Claude."),
            ("compare", "GPT-4 and Gemini are both large models."),   # a mention, not a claim: kept
            ("animal", "The llama is a South American camelid."),
            ("hi", "Hello there.")]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": q, "input": "", "output": a}) for q, a in rows))
    said = []
    cfg = sft.SFTConfig(sources=str(path), identity_rate=0.0, val_fraction=0.2)
    train_set, val_set = chat_data.load_conversations(cfg, 0, said.append)
    kept = {c[1]["content"] for c in train_set + val_set}
    assert kept == {rows[3][1], rows[4][1], rows[5][1]}
    assert "3 claiming to be another model dropped" in said[0]


def test_long_conversations_split_between_exchanges_never_inside_one():
    messages = [dict(role="system", content="sum.")]
    for a, b in sums(6, 3):
        messages += [dict(role="user", content=f"what is {a} plus {b}?"), dict(role="assistant", content=f"{a + b}.")]
    ids, trained, starts = sft.encode(TOKENIZER, SPECIAL, messages, mask_prompt=True)
    pieces, cut = sft.fit_to_context(ids, trained, starts, 60)
    assert len(pieces) > 1 and cut == 0
    parsed = [parse_chat(TOKENIZER, SPECIAL, piece) for piece, _ in pieces]
    assert all(len(piece) <= 60 for piece, _ in pieces)
    assert parsed[0][0]["role"] == "system"
    assert [m for p in parsed for m in p] == messages  # every exchange whole, in order, in exactly one piece
    assert all([m["role"] for m in p if m["role"] != "system"] == ["user", "assistant"] * (len(p) // 2) for p in parsed)


def test_rows_are_full_and_hold_whole_conversations(tmp_path):
    data, _ = packed_batch(tmp_path)
    rows, masks = data.rows["train"], data.masks["train"]
    assert rows.shape[1] == 129
    assert (rows[:, 0] == TOKENIZER.eot_id).all()  # every row starts a conversation
    for row, mask in zip(rows.tolist(), masks):
        end = max(i for i, m in enumerate(mask) if m) + 1  # after the last loss token, padding only
        assert set(row[end:]) <= {TOKENIZER.eot_id}
        starts = [i for i, t in enumerate(row[:end]) if t == TOKENIZER.eot_id] + [end]
        for a, b in zip(starts, starts[1:]):
            assert [m["role"] for m in parse_chat(TOKENIZER, SPECIAL, row[a:b])] == ["user", "assistant"]
    assert ((rows == TOKENIZER.eot_id) & ~masks).mean() < 0.25  # first-fit packing leaves little room unused


def test_hub_format_data_loads_through_datasets(tmp_path):
    pytest.importorskip("pyarrow")
    import datasets
    ultrachat = [{"prompt": "hi", "prompt_id": str(i), "messages": [dict(role="user", content=f"hello {i}"),
                                                                    dict(role="assistant", content=f"hi {i}.")]}
                 for i in range(20)]
    folder = tmp_path / "ultrachat"
    folder.mkdir()
    datasets.Dataset.from_list(ultrachat).to_parquet(str(folder / "train_sft-00000.parquet"))
    cfg = sft.SFTConfig(sources=f"hf:{folder}:train@10", identity_rate=0.0, val_fraction=0.1)
    train_set, val_set = chat_data.load_conversations(cfg, 0, lambda *a: None)
    assert len(train_set) + len(val_set) == 10
    assert sorted(c[0]["content"] for c in train_set + val_set) == sorted(f"hello {i}" for i in range(10))


def test_fine_tuning_beats_the_base_model_and_chats_in_the_template(base_run, capsys):
    sft.main(["--init_from=base", "--sources=chat.jsonl", "--identity_rate=0", "--max_iters=120", "--eval_interval=60",
              "--warmup_iters=10", "--lr_fraction=0.3"])
    evals = [r for r in read_log("out-sft") if "val_loss" in r]
    base, tuned = evals[0]["val_loss"], evals[-1]["val_loss"]  # step 0 evaluates the pretrained weights
    assert tuned < base - 1.0, (base, tuned)
    checkpoint = ckpt_module.load_checkpoint("out-sft/ckpt.pt")
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    assert checkpoint["chat_template"] == chat_template(tokenizer, 64)
    # sample.py --chat renders with the stored template and the reply ends at end_of_turn
    replies = iter(["what is 12 plus 30?"])

    def read(prompt):
        try:
            return next(replies)
        except StopIteration:
            raise EOFError

    cfg = sample.SampleConfig(out_dir="out-sft", temperature=0, max_new_tokens=40)
    model, tokenizer, ckpt = engine.load_model("out-sft")
    out = io.StringIO()
    sample.chat(model, tokenizer, ckpt, cfg, torch.Generator().manual_seed(0), out, read=read)
    answer = out.getvalue().strip()
    assert "plus" in answer and len(answer) < 40, answer


def test_bad_input_is_one_clear_line(base_run):
    with pytest.raises(UserError, match="no checkpoint at nowhere"):
        sft.main(["--init_from=nowhere", "--sources=chat.jsonl"])
    with pytest.raises(UserError, match="would overwrite the pretrained"):
        sft.main(["--init_from=base", "--out_dir=base", "--sources=chat.jsonl"])
    with pytest.raises(UserError, match="not found"):
        sft.main(["--init_from=base", "--sources=missing.jsonl"])
    with open("odd.jsonl", "w") as f:
        f.write(json.dumps({"text": "no roles here"}) + "\n")
    with pytest.raises(UserError, match="is not a conversation"):
        sft.main(["--init_from=base", "--sources=odd.jsonl"])


def test_rows_that_are_not_utf8_json_or_conversation_objects_name_their_line(tmp_path):
    good = json.dumps({"prompt": "hi", "response": "yo."})
    cfg = sft.SFTConfig()
    for name, second, error in [("latin1.jsonl", '{"prompt": "café"}', "line 2 is not UTF-8"),
                                ("bad.jsonl", '{"prompt": "hi", response: 1}', r"line 2 is not JSON \(Expecting property name"),
                                ("list.jsonl", "[1, 2]", r"line 2: a row \[1, 2\] is not a conversation object"),
                                ("text.jsonl", '"text"', 'line 2: a row "text" is not a conversation object')]:
        (tmp_path / name).write_bytes(f"{good}\n{second}\n".encode("latin-1"))  # "é" in latin-1 is not UTF-8
        with pytest.raises(UserError, match=f"{name} {error}"):
            list(chat_data.read_source(str(tmp_path / name), 0, cfg.demo_conversations, 0))


@pytest.mark.parametrize("spec", ["demo*1.2.3", "demo@x", "demo*two", "chat.jsonl*@5"])
def test_a_source_whose_weight_or_cap_is_not_a_number_is_one_line(spec):
    with pytest.raises(UserError, match=r"is not spec\[\*weight\]\[@cap\]: a weight is a number"):
        chat_data.parse_source(spec)
    assert chat_data.parse_source("demo*0.5@20") == ("demo", 0.5, 20)


def test_a_malformed_json_line_names_the_file_and_its_line_number(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "yo."}) + "\n\n" + '{"prompt": "hi", "response": }\n')
    with pytest.raises(UserError, match=r"chat.jsonl line 3 is not JSON \(Expecting value at column 30\)"):
        chat_data.read_source(str(path), 0, 4000, 0)


def test_messages_that_are_not_a_list_of_objects_are_counted_as_malformed(tmp_path):
    rows = [{"messages": "hi"}, {"messages": ["hi"]}, {"messages": [{"role": ["user"], "content": "hi"}]},
            {"instruction": 7, "output": "seven."}] + [{"prompt": f"q{i}", "response": f"r{i}."} for i in range(8)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    said = []
    cfg = sft.SFTConfig(sources=str(path), identity_rate=0.0, val_fraction=0.25)
    train_set, val_set = chat_data.load_conversations(cfg, 0, said.append)
    assert len(train_set) + len(val_set) == 8 and "12 conversations, 4 malformed" in said[0]


def test_the_demo_exam_skips_questions_longer_than_the_context(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.save(dict(version=ckpt_module.CHECKPOINT_VERSION, model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                    config={}, tokenizer={"kind": "char", "chars": CHARS}, chat_template=SPECIAL), tmp_path / "best.pt")
    questions = [[dict(role="user", content=q), dict(role="assistant", content="4.")]
                 for q in ["add 2 and 2.", "which play has " + "x" * 40 + " in it?"]]
    result = sft.demo_exam(str(tmp_path / "best.pt"), questions)
    assert result.startswith('held-out demo questions answered exactly (greedy): "add ..." ')
    assert result.endswith("; 1 skipped: too long for the context of 32 tokens, or with characters the tokenizer lacks")


def test_negative_epochs_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"epochs must not be negative \(0 runs max_iters steps\)"):
        sft.main(["--epochs=-1"])
    with pytest.raises(UserError, match="lr_fraction multiplies pretraining's rates: above 0"):
        sft.main(["--lr_fraction=-0.1"])


def test_the_offline_demo_fits_the_quick_start_model():
    """Every demo conversation uses only characters of the plays (the Quick-start char vocabulary) and
    fits its 128-token context, so none is skipped or split."""
    chars = set()
    for path in data.shakespeare_plays():
        with open(path, encoding="utf-8") as f:
            chars |= set(data.markdown_play_to_text(f.read()))
    tokenizer = load_tokenizer({"kind": "char", "chars": "".join(sorted(chars))})
    template = chat_template(tokenizer, 128)
    conversations = chat_data.demo_conversations(500, 0)
    kinds = {c[0]["content"].split()[0] for c in conversations}
    assert kinds == {"Which", "Give", "Add"}
    answers = [c[1]["content"] for c in chat_data.demo_conversations(4000, 0)]  # as many as sft.py's demo makes
    assert not any(" in ACT " in a or " in PROLOGUE" in a for a in answers)  # the play's title, not its first heading
    assert any("speaks in Measure for Measure" in a for a in answers)
    for messages in conversations:
        ids, _, _ = sft.encode(tokenizer, template, messages, mask_prompt=True)
        assert len(ids) <= 129


def test_the_offline_demo_beats_the_base_model_by_a_margin(tmp_path, monkeypatch, capsys):
    """The demo end to end on a tiny model pretrained on the plays: validation loss on the held-out demo
    conversations falls by more than 1 nat from the base model's (step 0), and the exam runs."""
    monkeypatch.chdir(tmp_path)
    prepare.main(["--dataset=plays"])
    train.main(["--dataset=plays", "--n_layer=2", "--n_head=2", "--n_embd=48", "--block_size=128", "--eval_iters=2",
                "--sample_tokens=0", "--max_iters=100", "--eval_interval=100", "--out_dir=base"])
    sft.main(["--init_from=base", "--sources=demo@1000", "--lr_fraction=1", "--max_iters=150",
              "--eval_interval=150", "--sample_tokens=0"])
    evals = [r for r in read_log("out-sft") if "val_loss" in r]
    assert evals[0]["val_loss"] - evals[-1]["val_loss"] > 1.0, evals  # it falls by well over 1 nat: a margin
    assert "held-out demo questions answered exactly (greedy)" in capsys.readouterr().out


def test_resume_continues_with_the_fine_tuning_learning_rate(base_run):
    args = ["--init_from=base", "--sources=chat.jsonl", "--identity_rate=0", "--warmup_iters=2", "--log_interval=1",
            "--sample_tokens=0", "--eval_interval=5"]
    sft.main(args + ["--max_iters=10", "--out_dir=straight"])
    sft.main(args + ["--max_iters=5", "--out_dir=resumed"])
    sft.main(args + ["--max_iters=10", "--out_dir=resumed", "--resume"])
    straight, resumed = ({r["step"]: r["lr"] for r in read_log(d) if "lr" in r} for d in ("straight", "resumed"))
    # 10% of the pretraining peak once, not again on resume, on the same schedule
    assert max(straight.values()) == pytest.approx(0.1 * 3e-3)
    assert resumed[10] == pytest.approx(straight[10]) and resumed[7] == pytest.approx(straight[7])
    with pytest.raises(UserError, match="--resume: resumed was fine-tuned on --sources=chat.jsonl, not demo"):
        sft.main([a for a in args if not a.startswith("--sources")] + ["--max_iters=12", "--out_dir=resumed", "--resume"])
    # each script resumes its own runs only: train.py would train the chat model on pretraining data
    with pytest.raises(UserError, match="resumed/ckpt.pt is a fine-tuning run: resume it with python sft.py"):
        train.main(["--dataset=tiny", "--out_dir=resumed", "--resume", "--max_iters=12"])
    with pytest.raises(UserError, match="--resume: base/ckpt.pt is a pretraining run: resume it with train.py"):
        sft.main(["--out_dir=base", "--sources=chat.jsonl", "--resume"])


def test_epochs_set_the_step_budget_from_the_packed_rows(base_run, capsys):
    sft.main(["--init_from=base", "--sources=chat.jsonl", "--identity_rate=0", "--epochs=0.5", "--sample_tokens=0",
              "--eval_interval=1000"])
    rows = int(capsys.readouterr().out.split(" conversations -> ")[1].split("packed into ")[1].split(" rows")[0].replace(",", ""))
    assert ckpt_module.load_checkpoint("out-sft/ckpt.pt")["state"]["step"] == math.ceil(0.5 * rows / 16)  # 16 rows a step
