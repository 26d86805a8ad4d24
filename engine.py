"""Generation around model.generate, shared by sample.py, serve.py, eval.py and sft.py: loading a
model to run, text streamed as it is generated, and chats whose KV cache outlives each turn, so
that a new message costs only its own tokens (nanochat's engine, in the same spirit).
"""

import contextlib
import os
import sys

import torch

from checkpoint import build_model, load_checkpoint
from configurator import UserError
from runtime import pick_device, pick_dtype
from tokenizer import load_tokenizer, marker_ids, render_chat, sampleable_vocab_size


def load_model(out_dir, ckpt="ckpt.pt", device="auto", dtype="auto"):
    """(model, tokenizer, checkpoint) from a run's checkpoint, on the device, its weights stored in
    the dtype (bf16 on GPUs: half the bytes per token)."""
    path = os.path.join(out_dir, ckpt)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, "log.jsonl")):
        found = ", ".join(sorted(name for name in os.listdir(out_dir) if name.endswith(".pt")))
        raise UserError(f"no checkpoint at {path} (the run has {found or 'none'}): check --ckpt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with train.py, or point --out_dir "
                        "(and --ckpt) at a run")
    checkpoint = load_checkpoint(path, needs=("model", "model_config", "tokenizer"))
    model = build_model(checkpoint, path)
    device = pick_device(device)
    model.to(device=device, dtype=pick_dtype(dtype, device)).eval()
    return model, load_tokenizer(checkpoint["tokenizer"]), checkpoint


def sample_text(model, tokenizer, prompt, max_new_tokens, seed, stop_tokens=(), vocab_size=None):
    """The text a model continues the ids `prompt` with, at temperature 0.8 and top_k 200 (train.py
    prints one at each evaluation, from the same seed every time)."""
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = model.generate(torch.tensor([prompt], device=device), max_new_tokens, temperature=0.8,
                            top_k=200, generator=generator, stop_tokens=stop_tokens,
                            vocab_size=vocab_size)
    ids = [t.item() for t in tokens]
    before, after = (tokenizer.decode([i for i in part if i < tokenizer.vocab_size])
                     for part in (prompt, ids))
    return (before + "\n" if before else "") + after


def printable(tokenizer, ids, stop_text=None):
    """The text of `ids` that is safe to print so far, and whether it reached `stop_text` (cut
    before it). A trailing U+FFFD is a character whose bytes are not all generated: it waits."""
    text = tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]).rstrip("\ufffd")
    return cut_at(text, [stop_text]) if stop_text else (text, False)


def cut_at(text, stops):
    """`text` up to the first of `stops` in it, and whether one was there; with none there, less a
    tail that could be the start of one, which waits for more text (serve.py's stop strings)."""
    found = [text.index(stop) for stop in stops if stop in text]
    if found:
        return text[:min(found)], True
    held = max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-n:])), default=0)
    return text[:len(text) - held], False


class TextStream:
    """The text of a growing list of ids, decoded incrementally so that printing costs the same per
    token however long the output grows. A suffix decoded alone could lose a leading space
    (SentencePiece) or split a character over byte tokens, so new text is decode(context + new)
    minus decode(context), the context being the ids printed last."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.context_start, self.printed = tokenizer, [], 0, 0

    def push(self, token):  # one of the tokenizer's ids: generate is given its vocab_size
        self.ids.append(token)
        return self.flush(final=False)

    def flush(self, final=True):
        decode = self.tokenizer.decode
        context = decode(self.ids[self.context_start:self.printed])
        text = decode(self.ids[self.context_start:])
        if len(text) <= len(context) or (text.endswith("\ufffd") and not final):
            return ""
        self.context_start, self.printed = self.printed, len(self.ids)
        return text[len(context):]


def cached_length(cache, ids):
    """How many of `ids`, from the first, the cache holds already."""
    cached = cache.tokens[0, :cache.pos].tolist()
    differ = (i for i, (a, b) in enumerate(zip(cached, ids)) if a != b)
    return next(differ, min(len(cached), len(ids)))


def continue_cache(cache, context):
    """Cut the cache back to the part of it that `context` starts with, keeping at least one new
    token (whose logits start the reply); the ids still to prefill, (1, T). Positions are absolute,
    so a stale tail cannot be kept."""
    cache.pos = min(cached_length(cache, context), len(context) - 1)
    return torch.tensor([context[cache.pos:]], device=cache.k.device)


class Chat:
    """A conversation in a checkpoint's chat template (tokenizer.py), whose KV cache outlives each
    turn. `turns` holds the ids of each finished exchange: message, assistant marker, reply, end."""

    def __init__(self, model, tokenizer, template, system=""):
        missing = {"user", "assistant", "end_of_turn"} - template.keys()
        if missing:
            raise UserError(f"the chat template lacks {', '.join(sorted(missing))}; fine-tune "
                            "again")
        if system and "system" not in template:
            raise UserError("this model's chat template has no system marker: it takes no system "
                            "message")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        end = template["end_of_turn"]
        self.end, self.end_text = marker_ids(tokenizer, end), end if isinstance(end, str) else None
        system_message = [dict(role="system", content=system)] if system else []
        self.prefix = render_chat(tokenizer, template, system_message)[0]
        # an empty message must fit after the system message, or every message would be blamed
        if len(self.prefix) + len(self.user_turn("")) >= model.config.block_size:
            raise UserError(f"the system message takes {len(self.prefix) - 1} tokens and the "
                            f"context holds {model.config.block_size}, leaving no room for a "
                            "message: shorten it")
        self.turns, self.cache = [], None  # made at the first reply, unless serve.py sets one
        self.vocab_size = sampleable_vocab_size(tokenizer, template)

    def user_turn(self, message):
        """The ids a message adds: it, then the assistant marker that the reply follows."""
        message = [dict(role="user", content=message)]
        turn = render_chat(self.tokenizer, self.template, message)[0][1:]
        return turn + marker_ids(self.tokenizer, self.template["assistant"])

    def fit(self, message, max_new_tokens):
        """The ids of `message`'s turn, once the oldest whole exchanges are dropped until it and its
        reply fit the context (half an exchange would confuse the model)."""
        block, turn = self.model.config.block_size, self.user_turn(message)
        if len(self.prefix) + len(turn) >= block:
            taken = len(self.prefix) - 1
            system = f", {taken} of them taken by the system message" if taken else ""
            raise UserError(f"that message takes {len(turn)} tokens and the context holds "
                            f"{block}{system}: shorten it")
        dropped = 0
        while self.turns and len(self.context(turn)) + min(max_new_tokens, block // 2) > block:
            self.turns.pop(0)
            dropped += 1
        if dropped:
            print(f"[context full: dropped the oldest {dropped} exchange(s)]", file=sys.stderr)
        return turn

    def context(self, turn):
        return self.prefix + [i for t in self.turns for i in t] + turn

    def respond(self, message, max_new_tokens, temperature=0.8, top_k=0, top_p=1.0, generator=None):
        """Yield the reply's text as it is generated, a piece per token; the exchange joins the
        conversation once it ends. Then `reused` is how many context tokens the cache held, and
        `ended` whether the reply reached end_of_turn."""
        turn = self.fit(message, max_new_tokens)
        context = self.context(turn)
        # the cache is reused as far as it matches: all but the new tokens normally, the system
        # prefix after a drop
        self.cache = self.cache or self.model.new_kv_cache(1)
        new = continue_cache(self.cache, context)
        self.reused, reply, shown, ended, found = self.cache.pos, [], "", False, False
        room = min(max_new_tokens, self.model.config.block_size - len(context))
        steps = self.model.generate(new, room, temperature, top_k, top_p, generator,
                                    kv_cache=self.cache, vocab_size=self.vocab_size)
        with contextlib.closing(steps):  # stopping early leaves the last token for the next turn
            for token in steps:
                if token.item() == self.tokenizer.eot_id:  # ends a reply too, as eval.py and
                    reply, ended = reply + self.end, True   # the exports stop there
                    break
                reply.append(token.item())
                ended = reply[-len(self.end):] == self.end
                shown_ids = reply[:-len(self.end)] if ended else reply
                text, found = printable(self.tokenizer, shown_ids, self.end_text)
                yield text[len(shown):]
                shown = text
                if ended or found:
                    break
        self.ended = ended or found
        if not self.ended:  # out of room: a tail held back as a possible marker is text after all
            yield printable(self.tokenizer, reply)[0][len(shown):]
        self.turns.append(turn + reply + ([] if self.ended else self.end))
