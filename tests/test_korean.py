"""The Korean route of the 150M article, offline, on the Constitution of the Republic of Korea
(tests/data, see its README): morpheme hooks whose pieces join back to the text, prepare.py over
MeCab's morphemes with the recipe's own settings, a tiny MoE that learns, SFT on questions about the
articles with the prompt masked, a chat reply in the template, and the recipe's Hub source read from
a local copy laid out like the Hub's."""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

import data
import engine
import prepare
import sft
import tokenizer
import train
from checkpoint import load_checkpoint
from configurator import UserError
from tokenizer import load_hook, load_tokenizer

pytest.importorskip("mecab_ko", reason="the Korean route needs mecab-ko: pip install mecab-ko")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTITUTION = os.path.join(ROOT, "tests", "data", "korean_constitution.txt")
RECIPE = os.path.join(ROOT, "config", "moe_150m_ko.py")
HOOKS = ("tokenizer:mecab_morphemes",)
# the recipe at a tiny size: every setting that makes it big, overridden
TINY_MOE = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--moe_experts=4",
            "--moe_expert_hidden=32", "--batch_size=8", "--batch_tokens=0", "--max_tokens=0", "--warmup_iters=10",
            "--eval_iters=4", "--early_stop_patience=0", "--sample_tokens=0", "--learning_rate=3e-3",
            "--log_interval=50"]


@pytest.fixture(scope="module")
def constitution():
    with open(CONSTITUTION, encoding="utf-8", newline="") as f:  # its lines end in CRLF: kept, to round-trip too
        return f.read()


@pytest.fixture
def workdir(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def decoded_splits(data_dir):
    meta = data.load_meta(data_dir)
    tok = load_tokenizer(meta["tokenizer"])
    ids = {s: np.fromfile(os.path.join(data_dir, f"{s}.bin"), dtype=meta["dtype"]).tolist() for s in data.SPLITS}
    return meta, tok, ids


def articles(text):
    """{number: first sentence} of the constitution's articles (제N조), the main text only: the
    supplement (부칙) numbers its own from 1 again."""
    found = {}
    for number, sentence in re.findall(r"^\s*제(\d+)조 (?:① ?)?(.+?다\.)", text, flags=re.MULTILINE):
        found.setdefault(int(number), sentence)
    return found


@pytest.mark.parametrize("hook", HOOKS)
def test_mecab_cuts_inside_words_and_decoding_gives_the_text_back(workdir, constitution, hook):
    text = constitution[:4000]
    pieces = load_hook(hook)(text)
    assert "".join(pieces) == text and len(pieces) > 1000
    assert "|".join(load_hook(hook)("대통령은 이번 행사를 통해")) == "대통령|은 이번 행사|를 통해"  # the article's
    (workdir / "part.txt").write_text(text, encoding="utf-8", newline="")
    prepare.main(["--source=part.txt", "--dataset=ko", "--tokenizer=sp", "--sp_vocab_size=600",
                  f"--pretokenize={hook}"])
    meta, tok, ids = decoded_splits("data/ko")
    assert meta["tokenizer"]["pretokenize"] == hook
    assert tok.decode(ids["train"]) + tok.decode(ids["val"]) == text
    for probe in (constitution[-700:], "대통령은 이번 행사를 통해 우리 지역의 소중한 생명을 보호하기 위해 모든 것을 다하겠다고 약속했다.\n"):
        assert tok.decode(tok.encode(probe)) == probe  # unseen text too, through byte fallback


def test_sentencepiece_learns_no_piece_across_a_morpheme_boundary(workdir):
    vocab = {}
    for name, hook in (("plain", ""), ("mecab", HOOKS[0])):
        prepare.main([f"--source={CONSTITUTION}", f"--dataset={name}", "--tokenizer=sp", "--sp_vocab_size=1000",
                      f"--pretokenize={hook}"])
        sp = load_tokenizer(data.load_meta(f"data/{name}")["tokenizer"]).sp
        vocab[name] = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    # "the president" + a topic particle, 28 times in the text: one piece without the hook, stem and
    # particle with it
    assert "▁대통령은" in vocab["plain"] and "▁대통령" in vocab["mecab"] and "▁대통령은" not in vocab["mecab"]


def test_the_recipe_end_to_end_at_a_tiny_size_pretrains_fine_tunes_and_chats(workdir, constitution):
    prepare.main([RECIPE, f"--source={CONSTITUTION}", "--dataset=ko", "--sp_vocab_size=800"])
    meta, tok, ids = decoded_splits("data/ko")
    assert meta["tokenizer"]["pretokenize"] == "tokenizer:mecab_morphemes"
    assert tok.decode(ids["train"]) + tok.decode(ids["val"]) == constitution
    train.main([RECIPE, "--dataset=ko", "--out_dir=base", "--max_iters=100", "--eval_interval=50"] + TINY_MOE)
    evals = [json.loads(line) for line in open("base/log.jsonl") if "val_loss" in line]
    assert load_checkpoint("base/ckpt.pt")["model_config"]["moe_experts"] == 4
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals

    # three ways to ask about each article: the held-out conversations ask about articles trained in
    # other words
    asked = ["헌법 제{}조는 무엇을 정하나요?", "제{}조의 내용을 알려 주세요.", "대한민국 헌법 제{}조에 따르면?"]
    with open("qa.jsonl", "w", encoding="utf-8") as f:
        for n, answer in articles(constitution).items():
            f.writelines(json.dumps({"prompt": q.format(n), "response": answer}, ensure_ascii=False) + "\n"
                         for q in asked)
    sft.main([RECIPE, "--init_from=base", "--out_dir=chat", "--sources=qa.jsonl", "--identity_rate=0",
              "--max_iters=250", "--eval_interval=125", "--lr_fraction=1"] + TINY_MOE)
    evals = [json.loads(line) for line in open("chat/log.jsonl") if "val_loss" in line]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals  # step 0 evaluates the pretrained weights

    checkpoint = load_checkpoint("chat/ckpt.pt")
    template = checkpoint["chat_template"]
    chats = sft.PackedChats(sft.SFTConfig(sources="qa.jsonl", identity_rate=0), 0, tok, template, 128, {})
    targets = chats.batch("train", torch.arange(len(chats.rows["train"])), 128)[1]
    trained = tok.decode([int(t) for row in targets for t in row if 0 <= t < tok.vocab_size])
    assert "대한민국은 민주공화국이다." in trained and "무엇을 정하나요" not in trained  # the prompt is masked

    # a chat as sample.py --chat holds it: a reply generated after the assistant marker, ended by
    # end_of_turn
    model, chat_tok, _ = engine.load_model("chat", device="cpu", dtype="float32")
    for n in (1, 3, 66):
        conversation, question = engine.Chat(model, chat_tok, template), asked[0].format(n)
        reply = "".join(conversation.respond(question, max_new_tokens=60, temperature=0))
        print(f"{question} -> {reply}", file=sys.stderr)
        generated = len(conversation.turns[-1]) - len(conversation.user_turn(question))
        assert generated <= 60 and re.search("[가-힣]", reply), reply  # over 60: cut short, end_of_turn appended


def test_the_hub_source_streams_the_korean_subset_of_a_local_copy(workdir, constitution, monkeypatch):
    """hf:wikimedia/wikipedia's layout: a folder per subset, parquet shards with columns id, url,
    title, text, and the README's configs naming them; here with the articles of the constitution as
    pages."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    pages = {"20231101.ko": [f"제{n}조\n\n{a}\n" for n, a in articles(constitution).items()],
             "20231101.en": ["The Constitution of the Republic of Korea.\n"] * 5}
    readme = ["---", "configs:"]
    for subset, texts in pages.items():
        (workdir / "wikipedia" / subset).mkdir(parents=True)
        pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))],
                                 "url": [f"https://ko.wikipedia.org/wiki?curid={i}" for i in range(len(texts))],
                                 "title": [t.split("\n")[0] for t in texts], "text": texts}),
                       workdir / "wikipedia" / subset / "train-00000-of-00001.parquet")
        readme += [f"- config_name: {subset}", "  data_files:", "  - split: train", f"    path: {subset}/train-*"]
    (workdir / "wikipedia" / "README.md").write_text("\n".join(readme + ["---", ""]))
    calls, load_dataset = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or load_dataset(*a, **k))

    prepare.main([RECIPE, "--source=hf:wikipedia", "--dataset=kowiki", "--sp_vocab_size=700"])
    assert calls == [(("wikipedia", "20231101.ko"), dict(split="train", streaming=True))]
    meta, tok, ids = decoded_splits("data/kowiki")
    assert meta["val_documents"] == 13 and meta["train_documents"] == 117  # every 10th page validates
    for split, wanted in (("val", True), ("train", False)):
        pages_of_split = [t for i, t in enumerate(pages["20231101.ko"]) if data.is_val(i, 0.1) == wanted]
        assert tok.decode(ids[split]) == "".join(pages_of_split)  # the end-of-text tokens decode to nothing


def test_a_missing_analyser_or_a_hook_that_loses_text_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "mecab_ko", None)  # as if not installed
    tokenizer.mecab.cache_clear()
    with pytest.raises(UserError, match=r"^the pretokenize hook tokenizer:mecab_morphemes needs mecab-ko: "
                                        r"pip install mecab-ko$"):
        load_tokenizer({"kind": "char", "chars": "가나", "pretokenize": HOOKS[0]}).encode("가나")
    tokenizer.mecab.cache_clear()
    monkeypatch.setattr(tokenizer, "lossy", lambda text: text.split(), raising=False)
    with pytest.raises(UserError, match="returned pieces that do not join back to the text"):
        load_hook("tokenizer:lossy")("대한민국 헌법")
