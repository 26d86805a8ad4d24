"""Supervised fine-tuning: turn a pretrained model into a chatbot that answers in a chat template.

    python sft.py                                              # the offline demo: fine-tunes out/ into out-sft/
    python sample.py --out_dir=out-sft --chat                  # then talk to it
    python sft.py --init_from=out-gpt-51m --out_dir=out-gpt-51m-sft \\
        --sources="hf:HuggingFaceH4/ultrachat_200k:train_sft@50000,hf:yahma/alpaca-cleaned*0.5"
    python sft.py --mask_prompt=False                          # the Korean article's first attempt, to compare

What the two chatbot articles learned the hard way is the default here:
- only the assistant's tokens carry loss (an unmasked prompt made the Korean model "keep whining");
  masking goes through the targets' ignore index (-1), never an attention mask, so flash attention stays on;
- conversations are packed into full block_size rows, so every batch carries about as many loss tokens;
- a few built-in identity conversations teach the model its own name, and samples in which the
  assistant claims to be another model (the 350M model called itself ChatGPT) are dropped and counted.

Sources, comma-separated, each `spec[*weight][@cap]`: `demo` (built here from the Shakespeare plays and
sums, offline), a local `.jsonl` file, or `hf:<dataset or local folder>[:split]` read through `datasets`.
A row is {"messages": [{"role", "content"}, ...]} (UltraChat; ShareGPT's {"from", "value"} too),
{"instruction", "input", "output"} (Alpaca), or {"prompt", "response"}. `cap` keeps the first conversations
of a source; `weight` scales how many of its training conversations enter the mix (2 = each twice,
0.5 = a random half). Every 1/val_fraction-th conversation of each source is held out for validation.

The loop is train.py's (optimizers, schedule, checkpoints, logging, resume, torchrun): this file only
turns conversations into packed rows and starts train.launch from the pretrained weights. The chat template
is stored in the checkpoint, so `sample.py --chat` renders conversations exactly as they were trained.
"""

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import torch

from configurator import UserError
from model import GPTConfig
from prepare import is_val, markdown_play_to_text, offline_unless_hub_reachable, play_title, shakespeare_plays
from tokenizer import chat_template, load_tokenizer, marker_ids, render_chat, sampleable_vocab_size
from runtime import load_checkpoint, load_init
from train import TrainConfig, launch

OTHER_MODELS = "ChatGPT,GPT-3,GPT-3.5,GPT-4,GPT-4o,OpenAI,Gemini,Bard,Claude,Anthropic,LLaMA,Meta AI,Mistral,Qwen,DeepSeek"


@dataclass
class SFTConfig:
    sources: str = "demo"              # comma-separated spec[*weight][@cap]; see the top of this file
    demo_conversations: int = 4000     # size of the offline demo set
    val_fraction: float = 0.05         # held out from each source
    mask_prompt: bool = True           # False trains on every token, the prompt included
    overlong: str = "split"            # a conversation longer than the context: "split" at turn boundaries, or "truncate"
    identity_rate: float = 0.05        # share of the conversations that are identity conversations; 0 = none
    identity_name: str = "Ariel"
    identity_maker: str = "a small-lm user"
    drop_claims: str = OTHER_MODELS    # drop samples whose assistant claims to be one of these; empty = keep all
    lr_fraction: float = 0.1           # learning rates = this x the pretraining peaks (the 350M article used 10%)
    epochs: float = 0.0                # > 0: sets max_iters to this many passes over the packed training rows


# The fine-tuning run's own defaults, under whatever the config file and command line set. On the offline
# demo from the Quick-start model the validation loss flattens between 750 and 1,000 steps (RESULTS.md).
SFT_DEFAULTS = dict(init_from="out", out_dir="out-sft", max_iters=1000, warmup_iters=50, eval_interval=250,
                    eval_iters=10, sample_tokens=80, log_interval=50)


# ----------------------------------------------------------------------------- conversations

def to_messages(row):
    """One dataset row as a list of {role, content} messages, whatever the dataset's layout."""
    if not isinstance(row, dict):
        raise UserError(f"a row {json.dumps(row)[:40]} is not a conversation object: expected one with messages, "
                        "conversations, instruction/output or prompt/response")
    turns = row.get("messages") or row.get("conversations")
    if turns:
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return []  # no list of messages: valid() rejects it, so it is dropped and counted as malformed
        def role(turn):  # ShareGPT's names too; a role that is not a string is left for valid() to reject
            name = turn.get("role", turn.get("from"))
            return {"human": "user", "gpt": "assistant"}.get(name, name) if isinstance(name, str) else name
        return [dict(role=role(t), content=t.get("content", t.get("value"))) for t in turns]
    if "instruction" in row and "output" in row:  # Alpaca: the optional input follows the instruction
        prompt = row["instruction"]
        if isinstance(prompt, str) and row.get("input"):
            prompt += f"\n\n{row['input']}"
        return [dict(role="user", content=prompt), dict(role="assistant", content=row["output"])]
    for question, answer in (("prompt", "response"), ("prompt", "completion"), ("question", "answer")):
        if question in row and answer in row:
            return [dict(role="user", content=row[question]), dict(role="assistant", content=row[answer])]
    raise UserError(f"a row with columns {sorted(row)} is not a conversation: expected messages, "
                    "conversations, instruction/output or prompt/response")


def valid(messages):
    return (all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in messages)
            and any(m["role"] == "assistant" for m in messages))


def claims_to_be_another_model(messages, names):
    """True when an assistant message says it is, or was made by, one of `names` (a compiled pattern)."""
    return names is not None and any(names.search(m["content"]) for m in messages if m["role"] == "assistant")


def claim_pattern(names):
    if not names.strip():
        return None
    alternatives = "|".join(re.escape(n.strip()) for n in names.split(",") if n.strip())
    # a first-person claim or a maker, then the name within the same clause: "I am ChatGPT", "As an AI
    # language model developed by OpenAI"; a bare mention ("compare GPT-4 and Gemini") is kept
    return re.compile(r"\b(?:I am|I'm|I was|my name is|as an?|created by|developed by|trained by|built by|made by)"
                      rf"\b[^.!?\n]{{0,40}}?(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def demo_conversations(n, seed):
    """Questions about the Shakespeare corpus, answered from it, and sums: small enough for the Quick-start
    model's 128-character context, with answers that can be checked against the corpus."""
    rng = random.Random(seed)
    speeches, plays_of = [], {}  # (play title, speaker, first line of a speech)
    for path in shakespeare_plays():
        with open(path, encoding="utf-8") as f:
            markdown = f.read()
        text, title = markdown_play_to_text(markdown), play_title(path, markdown)
        for speaker, body in re.findall(r"^([A-Z][A-Z' ]+):\n((?:.+\n)+)", text, flags=re.MULTILINE):
            line = body.splitlines()[0]
            plays_of.setdefault(speaker, set()).add(title)
            # a spoken line short enough for the context, not a stage direction such as "[Aside]"
            if len(line) <= 45 and not line.startswith("["):
                speeches.append((title, speaker, line))
    conversations = []
    for _ in range(n):
        title, speaker, line = rng.choice(speeches)
        a, b = rng.randint(0, 9), rng.randint(0, 9)  # one digit: a table this small a model can learn
        play = (f"{speaker} speaks in {title}." if len(plays_of[speaker]) == 1 else
                f"{speaker} speaks in {len(plays_of[speaker])} plays, {title} among them.")
        conversations.append(rng.choice([
            # each kind of question opens with its own word: a model this small tells them apart by the start
            [("user", f"Which play has {speaker} in it?"), ("assistant", play)],
            [("user", f"Give me a line of {speaker}."), ("assistant", line)],
            [("user", f"Add {a} and {b}."), ("assistant", f"{a} plus {b} is {a + b}.")],
        ]))
    return [[dict(role=r, content=c) for r, c in conversation] for conversation in conversations]


def identity_conversations(n, name, maker, rng):
    answers = [("Who are you?", f"I am {name}, a small language model made by {maker}."),
               ("What is your name?", f"My name is {name}."),
               ("Who made you?", f"I was made by {maker}."),
               ("Are you ChatGPT?", f"No, I am {name}, a small language model made by {maker}."),
               ("Hello!", f"Hello! I am {name}. How can I help?")]
    return [[dict(role="user", content=q), dict(role="assistant", content=a)]
            for q, a in (rng.choice(answers) for _ in range(n))]


def parse_source(spec):
    """`path[*weight][@cap]` -> (path, weight, cap)."""
    match = re.fullmatch(r"(.+?)(?:\*([0-9.]+))?(?:@([0-9]+))?", spec.strip())
    if not match or not match.group(1):
        raise UserError(f"source {spec!r} is not spec[*weight][@cap], e.g. data/chat.jsonl*2@5000")
    return match.group(1), float(match.group(2) or 1.0), int(match.group(3) or 0)


def read_source(path, cap, cfg, seed):
    """Conversations of one source, at most `cap` (0 = all)."""
    if path == "demo":
        rows = demo_conversations(cap or cfg.demo_conversations, seed)
    elif path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        offline_unless_hub_reachable(name)
        import datasets
        try:  # streamed: a cap of 50,000 reads 50,000 rows, not the whole dataset
            table = datasets.load_dataset(name, split=split or "train", streaming=True)
        except Exception as e:
            raise UserError(f"could not load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        rows = (to_messages(row) for row in table)
    elif path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise UserError(f"chat data {path} not found")
        rows = []
        with open(path, "rb") as f:  # bytes, decoded line by line, so that an error names the file's line
            for number, line in enumerate(f, 1):
                try:
                    if line.strip():
                        rows.append(to_messages(json.loads(line.decode("utf-8"))))
                except UnicodeDecodeError as e:
                    raise UserError(f"{path} line {number} is not UTF-8 ({e.reason}): save the file as UTF-8") from e
                except json.JSONDecodeError as e:  # its own line number counts within the line
                    raise UserError(f"{path} line {number} is not JSON ({e.msg} at column {e.colno})") from e
                except UserError as e:
                    raise UserError(f"{path} line {number}: {e}") from e
    else:
        raise UserError(f"source {path!r}: give demo, a .jsonl file, or hf:<dataset>[:split]")
    conversations = []
    for messages in rows:
        if cap and len(conversations) >= cap:
            break
        conversations.append(messages)
    return conversations


def load_conversations(cfg, seed, rng, say):
    """The training and validation conversations: every source read, cleaned, split and weighted, and the
    identity conversations mixed in."""
    names = claim_pattern(cfg.drop_claims)
    train, val = [], []
    for spec in cfg.sources.split(","):
        path, weight, cap = parse_source(spec)
        conversations = read_source(path, cap, cfg, seed)
        kept = [c for c in conversations if valid(c) and not claims_to_be_another_model(c, names)]
        claims = sum(claims_to_be_another_model(c, names) for c in conversations if valid(c))
        held = [c for i, c in enumerate(kept) if is_val(i, cfg.val_fraction)]
        own = [c for i, c in enumerate(kept) if not is_val(i, cfg.val_fraction)]
        mixed = own * int(weight) + rng.sample(own, round(len(own) * (weight % 1)))
        say(f"{path}: {len(conversations):,} conversations, {len(conversations) - len(kept) - claims:,} malformed "
            f"and {claims:,} claiming to be another model dropped; {len(mixed):,} in the training mix, {len(held):,} held out")
        train += mixed
        val += held
    if not train or not val:
        raise UserError(f"the sources {cfg.sources!r} leave {len(train)} training and {len(val)} validation "
                        "conversations; both need at least one")
    if cfg.identity_rate:
        if not 0 <= cfg.identity_rate < 1:
            raise UserError(f"identity_rate must be in [0, 1), got {cfg.identity_rate}")
        # n / (len + n) = rate
        for split in (train, val):
            n = round(cfg.identity_rate * len(split) / (1 - cfg.identity_rate))
            split += identity_conversations(n, cfg.identity_name, cfg.identity_maker, rng)
    rng.shuffle(train)
    return train, val


# ----------------------------------------------------------------------------- tokens and packing

def encode(tokenizer, template, messages, mask_prompt):
    """Token ids, which of them carry loss, and where each exchange starts (a user message, with the system
    message before it and the assistant's reply after it, is one unit that packing never splits)."""
    ids, trained, starts = [tokenizer.eot_id], [False], []
    for i, message in enumerate(messages):
        message_ids, message_trained = render_chat(tokenizer, template, [message])
        if not starts or (message["role"] == "user" and any(m["role"] != "system" for m in messages[:i])):
            starts.append(len(ids))
        ids += message_ids[1:]
        trained += message_trained[1:]
    if not mask_prompt:
        trained = [True] * len(ids)
    return ids, trained, starts


def fit_to_context(ids, trained, starts, length, overlong):
    """Pieces of at most `length` tokens: whole conversations, or long ones split between exchanges (each
    piece opening with end-of-text as a conversation does), or truncated. An exchange longer than `length`
    on its own is truncated in either mode."""
    if len(ids) <= length:
        return [(ids, trained)], 0
    if overlong == "truncate":
        return [(ids[:length], trained[:length])], 1
    pieces, piece, piece_trained, cut = [], [], [], 0
    for start, end in zip(starts, starts[1:] + [len(ids)]):
        if piece and len(piece) + end - start > length:
            pieces.append((piece, piece_trained))
            piece, piece_trained = [], []
        if not piece:
            piece, piece_trained = [ids[0]], [trained[0]]
        piece, piece_trained = piece + ids[start:end], piece_trained + trained[start:end]
        if len(piece) > length:
            piece, piece_trained, cut = piece[:length], piece_trained[:length], cut + 1
    pieces.append((piece, piece_trained))
    return pieces, cut


def pack(pieces, row_len, pad_id, open_rows=64):
    """First-fit packing into rows of row_len tokens: each piece goes to the first of the last `open_rows`
    rows it fits, else a new row. The rest of a row is padding that carries no loss. Returns token rows
    (n, row_len) and their loss mask."""
    rows, masks, room = [], [], []
    for ids, trained in pieces:
        candidates = range(max(0, len(rows) - open_rows), len(rows))
        r = next((r for r in candidates if room[r] >= len(ids)), None)
        if r is None:
            rows.append([]), masks.append([]), room.append(row_len)
            r = len(rows) - 1
        rows[r] += ids
        masks[r] += trained
        room[r] -= len(ids)
    tokens = np.full((len(rows), row_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), row_len), dtype=bool)
    for r, (ids, trained) in enumerate(zip(rows, masks)):
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, trained
    return tokens, mask


class PackedChats:
    """Conversations packed into rows of block_size + 1 tokens; the training loop draws whole rows. The targets of
    positions that carry no loss (prompts, padding) are -1, the loss's ignore index."""

    def __init__(self, cfg, seed, tokenizer, template, block_size, checkpoint_fields, say):
        if cfg.overlong not in ("split", "truncate"):
            raise UserError(f"overlong must be split or truncate, got {cfg.overlong!r}")
        if not 0 < cfg.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
        rng = random.Random(seed)
        conversations = load_conversations(cfg, seed, rng, say)
        self.rows, self.masks = {}, {}
        unencodable = 0
        for split, chats in zip(("train", "val"), conversations):
            pieces, cut = [], 0
            for messages in chats:
                try:
                    encoded = encode(tokenizer, template, messages, cfg.mask_prompt)
                except UserError:  # a character the char vocabulary lacks
                    unencodable += 1
                    continue
                new_pieces, new_cut = fit_to_context(*encoded, block_size + 1, cfg.overlong)
                pieces += [p for p in new_pieces if any(p[1][1:])]  # a piece with no loss token teaches nothing
                cut += new_cut
            if not pieces:
                raise UserError(f"no {split} conversation could be encoded with this tokenizer")
            self.rows[split], self.masks[split] = pack(pieces, block_size + 1, tokenizer.eot_id)
            loss_share = self.masks[split][:, 1:].mean()
            say(f"{split}: {len(chats):,} conversations -> {len(pieces):,} pieces ({cut:,} {cfg.overlong} for the "
                f"context of {block_size}) packed into {len(self.rows[split]):,} rows; {100 * loss_share:.1f}% "
                f"of the target tokens carry loss")
            if split == "val":
                loss_ids = self.rows[split][:, 1:][self.masks[split][:, 1:]]
                text = tokenizer.decode([int(i) for i in loss_ids if i < tokenizer.vocab_size])
                self.bytes_per_val_token = max(len(text.encode("utf-8")), 1) / len(loss_ids)
        if unencodable:
            say(f"{unencodable:,} conversations skipped: characters the tokenizer does not have")
        self.vocab_size = tokenizer.vocab_size
        # the sample printed at each evaluation answers the first held-out question the tokenizer can encode
        self.sample_prompt = [tokenizer.eot_id]
        for message in (m for c in conversations[1] for m in c if m["role"] == "user"):
            try:
                self.sample_prompt = (render_chat(tokenizer, template, [message])[0]
                                      + marker_ids(tokenizer, template["assistant"]))
                break
            except UserError:
                continue
        end = marker_ids(tokenizer, template["end_of_turn"])
        self.sample_stop_tokens = tuple(end) if len(end) == 1 else ()
        self.sample_vocab_size = sampleable_vocab_size(tokenizer, template)
        self.checkpoint_fields = checkpoint_fields
        self.val_conversations = conversations[1]

    def positions(self, split, block_size):
        return len(self.rows[split])

    def batch(self, split, rows, block_size):
        tokens = torch.from_numpy(self.rows[split][rows.numpy()]).long()
        targets = tokens[:, 1:].masked_fill(~torch.from_numpy(self.masks[split][rows.numpy()])[:, 1:], -1)
        return tokens[:, :-1], targets


# ----------------------------------------------------------------------------- the run

def main(argv):
    overrides = configurator.parse(argv, TrainConfig, SFTConfig)
    sft = configurator.build(SFTConfig, overrides)
    if not 0 <= sft.epochs < math.inf:
        raise UserError(f"epochs must be a positive number of passes, or 0 to run max_iters steps; got {sft.epochs:g}")
    if not sft.lr_fraction > 0:
        raise UserError(f"lr_fraction multiplies the pretraining learning rates and must be more than 0, got {sft.lr_fraction}")
    # init_from (train.py's key): the pretrained run directory or checkpoint file; out_dir is where sft writes
    init_from = overrides.get("init_from", SFT_DEFAULTS["init_from"])
    out_dir = overrides.get("out_dir", SFT_DEFAULTS["out_dir"])
    if os.path.abspath(out_dir) == os.path.abspath(init_from):
        raise UserError(f"out_dir and init_from are both {out_dir}: fine-tuning would overwrite the pretrained "
                        "checkpoint; give sft.py its own out_dir")
    resume = overrides.get("resume", False)
    # a resumed run takes its architecture, tokenizer and learning rates from its own checkpoint
    start = load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if resume else load_init(init_from)
    if resume and "sft" not in start:
        raise UserError(f"--resume: {out_dir}/ckpt.pt is a pretraining run of train.py: resume it with train.py, or "
                        f"fine-tune it with --init_from={out_dir} and another out_dir")
    if resume and start.get("dataset") != sft.sources:  # its data position counts rows packed from those sources
        raise UserError(f"--resume: {out_dir} was fine-tuned on --sources={start.get('dataset')}, not {sft.sources}; "
                        "resume with the same sources, or start a new run in another out_dir")
    if not resume and "chat_template" in start:
        say(f"note: {init_from} is already fine-tuned; fine-tuning it again")
    pretrained = start["config"]
    base = dict(SFT_DEFAULTS, **{k: pretrained[k] for k in ("optimizer", "batch_size", "batch_tokens", "weight_decay",
                                                            "beta1", "beta2", "dtype", "compile", "vocab_multiple")
                                 if k in pretrained})
    scale = 1.0 if resume else sft.lr_fraction
    base.update(learning_rate=scale * pretrained.get("learning_rate", TrainConfig.learning_rate),
                muon_lr=scale * pretrained.get("muon_lr", TrainConfig.muon_lr))
    cfg = configurator.build(TrainConfig, overrides, **base)

    tokenizer = load_tokenizer(start["tokenizer"])
    model_cfg = GPTConfig(**start["model_config"])
    template = start.get("chat_template") or chat_template(tokenizer, model_cfg.vocab_size)
    fields = dict(tokenizer=start["tokenizer"], dataset=sft.sources, chat_template=template,
                  sft=dataclasses.asdict(sft), pretrained=init_from)
    data = PackedChats(sft, cfg.seed, tokenizer, template, model_cfg.block_size, fields, say)
    if sft.epochs > 0:
        rows_per_step = cfg.batch_tokens // model_cfg.block_size or cfg.batch_size * int(os.environ.get("WORLD_SIZE", 1))
        cfg = dataclasses.replace(cfg, max_iters=math.ceil(sft.epochs * len(data.rows["train"]) / rows_per_step))
        say(f"{sft.epochs:g} epochs = {cfg.max_iters} steps of {rows_per_step} rows")
    say(f"template: {template}; learning rate {cfg.learning_rate:.2e}"
        f"{f' (Muon {cfg.muon_lr:.2e})' if cfg.optimizer == 'muon' else ''}, "
        f"{'assistant tokens only' if sft.mask_prompt else 'every token (mask_prompt=False)'} carry loss")
    stopped_by = launch(cfg, overrides, data=data, init=None if resume else start)
    if not stopped_by and "demo" in [parse_source(spec)[0] for spec in sft.sources.split(",")] and \
            int(os.environ.get("RANK", 0)) == 0:
        print(demo_exam(os.path.join(cfg.out_dir, "best.pt"), data.val_conversations))
    return stopped_by


def demo_exam(checkpoint_path, conversations, questions=100):
    """How many held-out demo questions the fine-tuned model answers exactly, greedily, per kind of
    question (its first word). The base model cannot answer in the template at all: it scores zero."""
    from sample import Chat, SampleConfig, decoding, load
    out_dir, ckpt = os.path.split(checkpoint_path)
    model, tokenizer, checkpoint = load(SampleConfig(out_dir=out_dir, ckpt=ckpt))
    right, skipped = {}, 0
    with decoding(model):
        # "Give me a line of X" has many right answers: it teaches style, and is not examined
        for messages in [c for c in conversations if len(c) == 2 and not c[0]["content"].startswith("Give")][:questions]:
            question, answer = messages[0]["content"], messages[1]["content"]
            chat = Chat(model, tokenizer, checkpoint["chat_template"])
            try:
                reply = "".join(chat.respond(question, 80, temperature=0))
            except UserError:  # longer than a small model's context, or characters its tokenizer lacks
                skipped += 1
                continue
            right.setdefault(question.split()[0], []).append(reply.strip() == answer)
    scores = ", ".join(f'"{kind} ..." {sum(marks)}/{len(marks)}' for kind, marks in sorted(right.items()))
    skips = (f"; {skipped} skipped: too long for the context of {model.config.block_size} tokens, or with characters "
             "the tokenizer lacks" if skipped else "")
    return f"held-out demo questions answered exactly (greedy): {scores or 'none'}{skips}"


def say(*args):
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, every process builds the data; one reports
        print(*args)


if __name__ == "__main__":
    configurator.run_script(main)
