"""Supervised fine-tuning: a pretrained model becomes a chatbot that answers in a chat template.

    python sft.py                                   # the offline demo: out/ tuned into out-sft/
    python sample.py --out_dir=out-sft --chat       # then talk to it
    python sft.py --init_from=out-gpt-51m --out_dir=out-gpt-51m-sft \\
        --sources="hf:HuggingFaceH4/ultrachat_200k:train_sft@50000,hf:yahma/alpaca-cleaned*0.5"
    python sft.py --mask_prompt=False                   # the Korean article's first attempt

What the two chatbot articles learned the hard way is the default here:
- only the assistant's tokens carry loss: with the prompt unmasked, the Korean model "kept
  whining". Masking goes through the targets' ignore index (-1), never an attention mask, so
  flash attention stays on;
- conversations are packed into full block_size rows, so every batch carries about as many loss
  tokens; conversations longer than the context are split between exchanges;
- chat_data.py reads the sources (`demo`, .jsonl files, Hugging Face datasets), mixes in a few
  identity conversations, and drops samples in which the assistant claims to be another model.

The loop is train.py's (optimizers, schedule, checkpoints, logging, resume, torchrun): this file
turns conversations into packed rows and calls train.train on them from the pretrained weights.
The chat template is stored in the checkpoint, so `sample.py --chat` renders conversations
exactly as they were trained on.
"""

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np
import torch

from chat_data import OTHER_MODELS, load_conversations, parse_source
from checkpoint import load_checkpoint, load_init
from configurator import UserError
from model import GPTConfig
from tokenizer import chat_template, load_tokenizer, marker_ids, render_chat, sampleable_vocab_size
from train import TrainConfig, train


@dataclass
class SFTConfig:
    sources: str = "demo"           # comma-separated spec[*weight][@cap] (chat_data.py)
    demo_conversations: int = 4000  # size of the offline demo set
    val_fraction: float = 0.05      # held out from each source
    mask_prompt: bool = True        # False trains on every token, the prompt too
    identity_rate: float = 0.05     # share of identity conversations; 0 = none
    identity_name: str = "Ariel"
    identity_maker: str = "a small-lm user"
    drop_claims: str = OTHER_MODELS  # drop samples claiming to be one of these; empty = keep all
    lr_fraction: float = 0.1        # learning rates = this x pretraining's (the 350M article: 10%)
    epochs: float = 0.0             # > 0: max_iters = this many passes over the packed rows

    def __post_init__(self):
        problems = [why for wrong, why in [
            (not 0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (not 0 <= self.identity_rate < 1, "identity_rate must be in [0, 1)"),
            (not self.lr_fraction > 0, "lr_fraction multiplies pretraining's rates: above 0"),
            (self.epochs < 0, "epochs must not be negative (0 runs max_iters steps)")] if wrong]
        if problems:
            raise ValueError(problems[0])


# The fine-tuning run's own defaults, under the config file and command line. On the offline demo
# from the Quick-start model the validation loss flattens between 750 and 1,000 steps (RESULTS.md).
SFT_DEFAULTS = dict(init_from="out", out_dir="out-sft", max_iters=1000, warmup_iters=50,
                    eval_interval=250, eval_iters=10, sample_tokens=80, log_interval=50)


def main(argv):
    overrides = configurator.parse(argv, TrainConfig, SFTConfig)
    sft = configurator.build(SFTConfig, overrides)
    init_from = overrides.get("init_from", SFT_DEFAULTS["init_from"])
    out_dir = overrides.get("out_dir", SFT_DEFAULTS["out_dir"])
    if os.path.abspath(out_dir) == os.path.abspath(init_from):
        raise UserError(f"out_dir and init_from are both {out_dir}: fine-tuning would overwrite "
                        "the pretrained checkpoint; give sft.py its own out_dir")
    resume = overrides.get("resume", False)
    # a resumed run takes its architecture, tokenizer and learning rates from its own checkpoint
    start = load_checkpoint(os.path.join(out_dir, "ckpt.pt")) if resume else load_init(init_from)
    if resume and "sft" not in start:
        raise UserError(f"--resume: {out_dir}/ckpt.pt is a pretraining run: resume it with "
                        f"train.py, or fine-tune it with --init_from={out_dir} and another out_dir")
    if resume and start.get("dataset") != sft.sources:  # its data position counts these rows
        raise UserError(f"--resume: {out_dir} was fine-tuned on --sources={start.get('dataset')}, "
                        f"not {sft.sources}; resume with the same sources, or start again "
                        "elsewhere")
    if "tokenizer" not in start:
        raise UserError(f"{init_from} has no tokenizer: sft.py needs the model's own to encode "
                        "chats")
    if not resume and "chat_template" in start:
        say(f"note: {init_from} is already fine-tuned; fine-tuning it again")
    pretrained, scale = start.get("config", {}), 1.0 if resume else sft.lr_fraction
    kept = ("optimizer", "batch_size", "batch_tokens", "weight_decay", "beta1", "beta2", "dtype",
            "compile", "vocab_multiple")
    base = dict(SFT_DEFAULTS, **{k: pretrained[k] for k in kept if k in pretrained},
                learning_rate=scale * pretrained.get("learning_rate", TrainConfig.learning_rate),
                muon_lr=scale * pretrained.get("muon_lr", TrainConfig.muon_lr))
    cfg = configurator.build(TrainConfig, overrides, **base)

    tokenizer = load_tokenizer(start["tokenizer"])
    model_cfg = GPTConfig(**start["model_config"])
    template = start.get("chat_template") or chat_template(tokenizer, model_cfg.vocab_size)
    fields = dict(tokenizer=start["tokenizer"], dataset=sft.sources, chat_template=template,
                  sft=dataclasses.asdict(sft), pretrained=init_from)
    data = PackedChats(sft, cfg.seed, tokenizer, template, model_cfg.block_size, fields)
    if sft.epochs > 0:
        processes = int(os.environ.get("WORLD_SIZE", 1))
        rows_per_step = cfg.batch_tokens // model_cfg.block_size or cfg.batch_size * processes
        steps = math.ceil(sft.epochs * len(data.rows["train"]) / rows_per_step)
        cfg = dataclasses.replace(cfg, max_iters=steps)
        say(f"{sft.epochs:g} epochs = {steps} steps of {rows_per_step} rows")
    muon = f" (Muon {cfg.muon_lr:.2e})" if cfg.optimizer == "muon" else ""
    trained = "assistant tokens only" if sft.mask_prompt else "every token (mask_prompt=False)"
    say(f"template: {template}; learning rate {cfg.learning_rate:.2e}{muon}; {trained} carry loss")
    stopped_by = train(cfg, overrides, data=data, init=None if resume else start)
    demo = "demo" in [parse_source(spec)[0] for spec in sft.sources.split(",")]
    if not stopped_by and demo and int(os.environ.get("RANK", 0)) == 0:
        print(demo_exam(os.path.join(cfg.out_dir, "best.pt"), data.val_conversations))
    return stopped_by


# ----------------------------------------------------------------------------- tokens, masks, rows

def encode(tokenizer, template, messages, mask_prompt):
    """Token ids, which of them carry loss (the assistant's, unless mask_prompt is off), and where
    each exchange starts: a user message, with the system message before it and the reply after
    it, is one unit that packing never splits."""
    ids, trained, starts = [tokenizer.eot_id], [False], []
    for i, message in enumerate(messages):
        message_ids, message_trained = render_chat(tokenizer, template, [message])
        after_the_system = any(m["role"] != "system" for m in messages[:i])
        if not starts or (message["role"] == "user" and after_the_system):
            starts.append(len(ids))
        ids += message_ids[1:]
        trained += message_trained[1:]
    return ids, trained if mask_prompt else [True] * len(ids), starts


def fit_to_context(ids, trained, starts, length):
    """Pieces of at most `length` tokens: the whole conversation, or a long one split between
    exchanges, each opening with end-of-text as a conversation does. An exchange longer than
    `length` alone is truncated. Returns (pieces, how many were truncated)."""
    if len(ids) <= length:
        return [(ids, trained)], 0
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
    """First-fit packing into rows of row_len tokens: each piece goes to the first of the last
    `open_rows` rows it fits in, else to a new row. The rest of a row is padding that carries no
    loss. Returns the token rows (n, row_len) and their loss mask."""
    rows, masks, room = [], [], []
    for ids, trained in pieces:
        open_now = range(max(0, len(rows) - open_rows), len(rows))
        r = next((r for r in open_now if room[r] >= len(ids)), None)
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
    """Conversations packed into rows of block_size + 1 tokens, which the training loop draws
    whole; the targets of positions that carry no loss (prompts, padding) are -1, the loss's
    ignore index. It offers the loop what data.TokenData does."""

    def __init__(self, cfg, seed, tokenizer, template, block_size, checkpoint_fields):
        conversations = load_conversations(cfg, seed, say)
        self.rows, self.masks, unencodable = {}, {}, 0
        for split, chats in zip(("train", "val"), conversations):
            pieces, cut = [], 0
            for messages in chats:
                try:
                    encoded = encode(tokenizer, template, messages, cfg.mask_prompt)
                except UserError:  # a character the char vocabulary lacks
                    unencodable += 1
                    continue
                new_pieces, new_cut = fit_to_context(*encoded, block_size + 1)
                pieces += [p for p in new_pieces if any(p[1][1:])]  # no loss, nothing taught
                cut += new_cut
            if not pieces:
                raise UserError(f"no {split} conversation could be encoded with this tokenizer")
            self.rows[split], self.masks[split] = pack(pieces, block_size + 1, tokenizer.eot_id)
            say(f"{split}: {len(chats):,} conversations -> {len(pieces):,} pieces ({cut:,} "
                f"truncated to the context of {block_size}) packed into "
                f"{len(self.rows[split]):,} rows; {100 * self.masks[split][:, 1:].mean():.1f}% of "
                "the target tokens carry loss")
        if unencodable:
            say(f"{unencodable:,} conversations skipped: characters the tokenizer does not have")
        loss_ids = self.rows["val"][:, 1:][self.masks["val"][:, 1:]]  # bits per byte of the replies
        text = tokenizer.decode([int(i) for i in loss_ids if i < tokenizer.vocab_size])
        self.bytes_per_val_token = max(len(text.encode("utf-8")), 1) / len(loss_ids)
        self.tokenizer, self.vocab_size = tokenizer, tokenizer.vocab_size
        self.checkpoint_fields = checkpoint_fields
        self.val_conversations = conversations[1]
        # the sample printed at each evaluation answers the first held-out question that encodes
        self.sample_prompt = [tokenizer.eot_id]
        for message in (m for c in conversations[1] for m in c if m["role"] == "user"):
            with contextlib.suppress(UserError):  # characters the tokenizer lacks: the next one
                self.sample_prompt = (render_chat(tokenizer, template, [message])[0]
                                      + marker_ids(tokenizer, template["assistant"]))
                break
        end = marker_ids(tokenizer, template["end_of_turn"])
        self.sample_stop_tokens = tuple(end) if len(end) == 1 else ()
        self.sample_vocab_size = sampleable_vocab_size(tokenizer, template)

    def reading(self):  # the rows are in memory: no dataset folder to hold
        return contextlib.nullcontext()

    def positions(self, split, block_size):
        return len(self.rows[split])

    def batch(self, split, rows, block_size):
        tokens = torch.from_numpy(self.rows[split][rows.numpy()]).long()
        trained = torch.from_numpy(self.masks[split][rows.numpy()])[:, 1:]
        targets = tokens[:, 1:].masked_fill(~trained, -1)
        return tokens[:, :-1], targets


def demo_exam(checkpoint_path, conversations, questions=100):
    """How many held-out demo questions the fine-tuned model answers exactly, greedily, per kind of
    question (its first word). The base model cannot answer in the template at all: it scores 0."""
    from engine import Chat, load_model
    model, tokenizer, checkpoint = load_model(*os.path.split(checkpoint_path))
    right, skipped = {}, 0
    # "Give me a line of X" has many right answers: it teaches style, and is not examined
    examined = [c for c in conversations if len(c) == 2 and not c[0]["content"].startswith("Give")]
    for messages in examined[:questions]:
        question, answer = messages[0]["content"], messages[1]["content"]
        chat = Chat(model, tokenizer, checkpoint["chat_template"])
        try:
            reply = "".join(chat.respond(question, 80, temperature=0))
        except UserError:  # longer than a small model's context, or characters its tokenizer lacks
            skipped += 1
            continue
        right.setdefault(question.split()[0], []).append(reply.strip() == answer)
    scores = ", ".join(f'"{kind} ..." {sum(m)}/{len(m)}' for kind, m in sorted(right.items()))
    skips = (f"; {skipped} skipped: too long for the context of {model.config.block_size} tokens, "
             "or with characters the tokenizer lacks" if skipped else "")
    return f"held-out demo questions answered exactly (greedy): {scores or 'none'}{skips}"


def say(*args):
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every process builds the data
        print(*args)


if __name__ == "__main__":
    configurator.run_script(main)
