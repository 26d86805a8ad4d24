"""Generation and chat from a checkpoint written by train.py or sft.py, streamed as it is produced.

    python sample.py --out_dir=out                                   # unconditional: starts from end-of-text
    python sample.py --out_dir=out --prompt="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out --prompt=FILE:prompt.txt          # or --prompt=- to read stdin; nanoGPT's --start too
    python sample.py --out_dir=out-sft --chat                        # multi-turn chat with a fine-tuned model

With --chat, a conversation is rendered in the checkpoint's chat template (tokenizer.py: the one
definition of that layout, which sft.py trains on), and each reply ends at the template's end_of_turn.
"""

import contextlib
import dataclasses
import functools
import os
import sys
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import load_tokenizer, marker_ids, render_chat, sampleable_vocab_size
from runtime import ThreadTuner, load_checkpoint, pick_device, pick_dtype, time_each


@dataclass
class SampleConfig:
    out_dir: str = "out"
    ckpt: str = "ckpt.pt"            # "best.pt" for the best by validation loss
    prompt: str = ""                 # text, FILE:path, or - for stdin; empty = unconditional
    num_samples: int = 1
    max_new_tokens: int = 500        # per sample, or per reply in chat
    temperature: float = 0.8         # 0 = greedy
    top_k: int = 200                 # 0 = off
    top_p: float = 1.0               # nucleus sampling; 1.0 = off
    chat: bool = False               # multi-turn chat; needs a checkpoint from sft.py
    system: str = ""                 # chat: a system message, if the template has a system marker
    seed: int = 1337
    device: str = "auto"             # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"              # "auto": bfloat16 on GPUs; on a CPU the faster of float32 and bfloat16, measured
    threads: int = 0                 # CPU threads while decoding; 0 = the fastest, measured as it goes (decoding)


# ----------------------------------------------------------------------------- chat

def printable(tokenizer, ids, stop_text=None):
    """The text of `ids` that is safe to print so far, and whether it reached `stop_text` (cut before it).
    A trailing U+FFFD is a character whose bytes are not all generated yet: it waits for the next token."""
    text = tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]).rstrip("\ufffd")
    return cut_at(text, [stop_text]) if stop_text else (text, False)


def cut_at(text, stops):
    """`text` up to the first of `stops` in it, and whether one was there; with none there, less a tail that could
    be the start of one, which waits for more text (serve.py cuts replies at a request's stop strings with it)."""
    found = [text.index(stop) for stop in stops if stop in text]
    if found:
        return text[:min(found)], True
    held = max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-n:])),
               default=0)
    return text[:len(text) - held], False


class TextStream:
    """The text of a growing list of ids, decoded incrementally, so that printing costs the same per token however
    long the output grows. A suffix decoded alone could lose a leading space (SentencePiece) or split a character
    over byte tokens, so new text is decode(context + new ids) minus decode(context), with the context the ids
    printed last; a trailing U+FFFD (a character whose bytes are not all generated) waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.context_start, self.printed = tokenizer, [], 0, 0

    def push(self, token):
        if token < self.tokenizer.vocab_size:  # the padding rows and template specials have no text
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


def shared_length(cache, ids):
    """How many of `ids`, from the first, the cache holds already."""
    cached = cache.tokens[0, :cache.pos].tolist()
    return next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))


def resume(cache, context):
    """Cut the cache back to the part of it that `context` starts with, keeping at least one new token, whose
    logits start the reply, and return the ids still to prefill, (1, T). Positions are absolute, so a stale
    tail cannot be kept."""
    cache.pos = min(shared_length(cache, context), len(context) - 1)
    return torch.tensor([context[cache.pos:]], device=cache.k.device)


class Chat:
    """A conversation whose KV cache outlives each turn, so a new message costs only its own tokens."""

    def __init__(self, model, tokenizer, template, system="", cache=None):
        missing = {"user", "assistant", "end_of_turn"} - template.keys()
        if missing:
            raise UserError(f"the checkpoint's chat template lacks {', '.join(sorted(missing))}; redo sft.py")
        if system and "system" not in template:
            raise UserError("this checkpoint's chat template has no system marker; drop the system message (--system)")
        self.model, self.tokenizer = model, tokenizer
        self.template, self.end = template, marker_ids(tokenizer, template["end_of_turn"])
        self.end_text = template["end_of_turn"] if isinstance(template["end_of_turn"], str) else None
        self.prefix = render_chat(tokenizer, template, [dict(role="system", content=system)] if system else [])[0]
        # an empty message must fit after the system message, or every message would be blamed for its length
        if len(self.prefix) + len(self.user_turn("")) >= model.config.block_size:
            raise UserError(f"the system message takes {len(self.prefix) - 1} tokens and the context holds "
                            f"{model.config.block_size}, leaving no room for a message: shorten it (--system)")
        self.turns = []  # ids of each finished exchange: user message, assistant marker, reply, end_of_turn
        self.cache = cache  # made at the first reply, unless given (serve.py keeps caches between requests)
        self.vocab_size = sampleable_vocab_size(tokenizer, template)

    def user_turn(self, message):
        """The ids a message adds to the conversation: it, then the assistant marker that the reply follows."""
        turn = render_chat(self.tokenizer, self.template, [dict(role="user", content=message)])[0][1:]
        return turn + marker_ids(self.tokenizer, self.template["assistant"])

    def fit(self, message, max_new_tokens):
        """The ids of `message`'s turn, once the oldest whole exchanges are dropped until it and its reply fit the
        context (a half-exchange would confuse the model). Once fitted, fitting again drops nothing."""
        block = self.model.config.block_size
        turn = self.user_turn(message)
        if len(self.prefix) + len(turn) >= block:
            system = f", {len(self.prefix) - 1} of them taken by the system message" if len(self.prefix) > 1 else ""
            raise UserError(f"that message takes {len(turn)} tokens and the context holds {block}{system}: shorten it")
        room = min(max_new_tokens, block // 2)
        dropped = 0
        while self.turns and len(self.context(turn)) + room > block:
            self.turns.pop(0)
            dropped += 1
        if dropped:
            print(f"[context full: dropped the oldest {dropped} exchange(s) and rebuilt the cache]", file=sys.stderr)
        return turn

    def context(self, turn):
        return self.prefix + [i for t in self.turns for i in t] + turn

    def respond(self, message, max_new_tokens, temperature=0.8, top_k=0, top_p=1.0, generator=None):
        """Yield the reply's text as it is generated, one piece per token; the exchange joins the conversation once
        it ends. `reused` is then how many of the context's tokens the cache held, and `ended` whether the reply
        reached end_of_turn."""
        turn = self.fit(message, max_new_tokens)
        context = self.context(turn)
        # the cache is reused as far as it matches the context: everything but the new tokens normally, the
        # system prefix after a drop
        self.cache = self.cache or self.model.new_kv_cache(1)
        new = resume(self.cache, context)
        self.reused = self.cache.pos
        reply, shown, ended, found = [], "", False, False
        steps = self.model.generate(new, min(max_new_tokens, self.model.config.block_size - len(context)), temperature,
                                    top_k, top_p, generator, kv_cache=self.cache, vocab_size=self.vocab_size)
        with contextlib.closing(steps):  # stopping early leaves the last token unfed: next turn prefills it
            for token in steps:
                reply.append(token.item())
                ended = reply[-len(self.end):] == self.end
                text, found = printable(self.tokenizer, reply[:-len(self.end)] if ended else reply, self.end_text)
                yield text[len(shown):]
                shown = text
                if ended or found:
                    break
        self.ended = ended or found
        self.turns.append(turn + reply + ([] if self.ended else self.end))


# ----------------------------------------------------------------------------- loading and the two modes
# Decoding at batch 1 on a CPU is a stream of small matrix-vector products that read every weight once per
# token, so it is bound by memory, not arithmetic. The settings below (bf16 weights where measured faster, the thread
# count measured fastest, each product split across the threads, the attention kernel that suits the dtype) make it
# faster at the same validation loss, though greedy text can part ways at near-ties; RESULTS.md has the figures
# (bench.py --only=generation).


def decoding_dtype(name, device):
    """runtime.pick_dtype's choice for decoding: on a CPU where bf16 products are measured faster, the weights
    are stored in bf16, half the bytes to read per token (a small model may then fit the last-level cache)."""
    return pick_dtype(name, device, use="decode")


@contextlib.contextmanager
def decoding(model, threads=0):
    """The settings that `model` generates tokens under, on a CPU: `threads` threads, or by default the count that
    decodes fastest now, timed on its forwards (one per token) by runtime.ThreadTuner; and, for bf16 weights,
    attention by the plain math kernel, as the flash kernel is slow in bf16 for a single query over many cached keys
    (in fp32 it is the faster); and each token's products split across the threads (split_products). All are
    undone on exit. A long prompt's prefill runs under them too."""
    weight = model.lm_head.weight
    math_attention = weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    say = functools.partial(print, file=sys.stderr)
    with ThreadTuner(weight.device, threads, unit="token", say=say) as tuner, split_products(model, say), \
            sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        # each forward is one unit of work, timed from its start: the wait between tokens is not the model's
        hooks = (model.register_forward_pre_hook(lambda *_: tuner.begin()),
                 model.register_forward_hook(lambda *_: tuner.tick()))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


@contextlib.contextmanager
def split_products(model, say):
    """Each nn.Linear's product for a single row (a token being decoded) run as one batched product over as many
    slices of the weight's rows as there are threads, where that is timed faster: MKL runs a one-row product on one
    thread however many it has, while a batched product shares its batch out, so every core reads weights (the
    products 1.4x faster on the 2-core EPYC, RESULTS.md). Each output is the same dot product: the same numbers."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    if split_pays(linears, say):
        for linear in linears:
            linear.forward = OneRowSplit(linear)
    try:
        yield
    finally:
        for linear in linears:
            vars(linear).pop("forward", None)  # back to nn.Linear's own


def split_pays(linears, say):
    """Whether a token's products (a row through each of `linears`) run clearly faster split across the threads than
    whole (under ThreadTuner's margin), timed now on the model's own weights: 70 to 80 ms for 6 x 384 on 2 cores."""
    weight = linears[0].weight
    if weight.device.type != "cpu" or torch.get_num_threads() == 1:
        return False
    rows = {k: torch.randn(1, 1, k, dtype=weight.dtype) for k in {linear.in_features for linear in linears}}
    splits = [OneRowSplit(linear) for linear in linears]

    def products(split):
        for linear, forward in zip(linears, splits):
            row = rows[linear.in_features]
            forward(row) if split else F.linear(row, linear.weight, linear.bias)
    with torch.no_grad():
        times = time_each(products, (False, True), repeats=8)
    pays = times[True] < ThreadTuner.MARGIN * times[False]
    say(f"decoding: a token's products {'split' if pays else 'whole'} on {torch.get_num_threads()} threads "
        f"({1e3 * times[True]:.2f} ms split, {1e3 * times[False]:.2f} ms whole)")
    return pays


class OneRowSplit:
    """A forward for `linear`: a single row's product as one batched product over slices of the weight's rows, one
    slice per thread; any other input as nn.Linear computes it."""
    def __init__(self, linear):
        self.weight, self.bias = linear.weight, linear.bias
        self.slices = {}  # thread count -> the views that split, made once: a few microseconds a call saved

    def __call__(self, x):
        threads = torch.get_num_threads()
        if threads not in self.slices:
            self.slices[threads] = self.split(threads)
        split = self.slices[threads]
        if split is None or x.dim() != 3 or x.numel() != self.weight.size(1):  # many rows: MKL shares those out itself
            return F.linear(x, self.weight, self.bias)
        weight, bias = split
        y = torch.matmul(x, weight) if bias is None else torch.baddbmm(bias, x.expand(threads, 1, -1), weight)
        return y.view(1, 1, -1)  # (parts, 1, out / parts) is already in the order of the outputs

    def split(self, parts):
        """The weight (out, in) as (parts, in, out / parts) and the bias as (parts, 1, out / parts), both views; None
        on one thread or where the rows do not divide evenly."""
        out, into = self.weight.shape
        if parts == 1 or out % parts:
            return None
        bias = None if self.bias is None else self.bias.view(parts, 1, out // parts)
        return self.weight.view(parts, out // parts, into).transpose(1, 2), bias


def load(cfg):
    path = os.path.join(cfg.out_dir, cfg.ckpt)
    # either file marks a Hugging Face folder, so that one with the other missing or broken says so; a train.py
    # run has a config.json too, but also its log
    hf_folder = any(os.path.isfile(os.path.join(cfg.out_dir, name)) for name in ("config.json", "model.safetensors"))
    run_folder = os.path.isfile(os.path.join(cfg.out_dir, "log.jsonl"))
    if not os.path.isfile(path) and hf_folder and not run_folder:
        checkpoint = hf_checkpoint(cfg.out_dir)
    elif not os.path.isfile(path):
        found = sorted(name for name in os.listdir(cfg.out_dir) if name.endswith(".pt")) if run_folder else []
        raise UserError(f"no checkpoint at {path}" + (f" (the run has {', '.join(found)}): check --ckpt" if found else
                        ": train one with train.py, or point --out_dir (and --ckpt) at a run or an exported Hugging Face folder"))
    else:
        checkpoint = load_checkpoint(path)
    device = pick_device(cfg.device)
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not fit this model.py ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "it comes from an incompatible version of the code") from e
    # weights stored in bf16, not autocast: decoding is bound by reading the weights, so halve them once
    model.to(device=device, dtype=decoding_dtype(cfg.dtype, device)).eval()
    return model, load_tokenizer(checkpoint["tokenizer"]), checkpoint


def hf_checkpoint(folder):
    """A Hugging Face folder (GPT-2, Llama or Qwen3, such as export.py writes) as a checkpoint's model,
    configuration and tokenizer. transformers is imported for this path only."""
    from export import load_hf
    model, info = load_hf(folder)
    if info["tokenizer"] is None:
        raise UserError(f"{folder}: {info['note']}; sample.py needs a tokenizer it can rebuild")
    return dict(model=model.state_dict(), model_config=dataclasses.asdict(model.config), tokenizer=info["tokenizer"],
                chat_template=info["chat_template"])


def read_prompt(spec):
    if spec == "-":
        return sys.stdin.read()
    if spec.startswith("FILE:"):
        if not os.path.isfile(spec[5:]):
            raise UserError(f"prompt file {spec[5:]} not found")
        try:
            with open(spec[5:], encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {spec[5:]} is not UTF-8 text ({e.reason}): save it as UTF-8") from e
    return spec


def sample(model, tokenizer, cfg, out):
    text = read_prompt(cfg.prompt)
    # every training document starts with end-of-text, so a prompt starts there too
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    block = model.config.block_size
    if len(ids) > block:
        # leave room for the new tokens, so that generation need not rebuild its cache at once, but
        # keep at least half the context
        keep = max(block - cfg.max_new_tokens, block // 2)
        print(f"warning: the prompt is {len(ids)} tokens, longer than the context of {block}; "
              f"keeping its last {keep}", file=sys.stderr)
        ids = ids[-keep:]
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    for _ in range(cfg.num_samples):
        out.write(text)
        stream = TextStream(tokenizer)
        for token in model.generate(torch.tensor([ids], device=device), cfg.max_new_tokens, cfg.temperature,
                                    cfg.top_k, cfg.top_p, generator, vocab_size=tokenizer.vocab_size):
            out.write(stream.push(token.item()))
            out.flush()
        out.write(stream.flush() + "\n" + "-" * 40 + "\n")
        out.flush()


def chat(model, tokenizer, checkpoint, cfg, out, read=input):
    template = checkpoint.get("chat_template")
    if not template:
        raise UserError(f"{cfg.ckpt} in {cfg.out_dir} has no chat template: fine-tune it with sft.py first")
    conversation = Chat(model, tokenizer, template, cfg.system)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)
    print(f"chatting with {cfg.out_dir}/{cfg.ckpt}; Ctrl-C stops a reply, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            message = read("> ")
        except EOFError:  # Ctrl-D: end the line the prompt is on
            out.write("\n")
            return
        if read is input and not sys.stdin.isatty():  # piped messages: show them, so the output reads as a dialogue
            out.write(message + "\n")
        try:
            for piece in conversation.respond(message, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                              generator):
                out.write(piece)
                out.flush()
        except UserError as e:  # a message the tokenizer cannot encode, or too long: say so and go on
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # the exchange is dropped; the next one reuses the cache as far as it matches
            print(" [stopped]", file=sys.stderr)
        out.write("\n")


def nanogpt_names(argv):
    """nanoGPT's sample.py calls the prompt `start` (text or FILE:path, as --prompt here): --start=X is --prompt=X."""
    return ["--prompt=" + arg[len("--start="):] if arg.startswith("--start=") else arg for arg in argv]


def main(argv, out=sys.stdout):
    cfg = configurator.build(SampleConfig, configurator.parse(nanogpt_names(argv), SampleConfig))
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("num_samples and max_new_tokens must be at least 1")
    if not cfg.temperature >= 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:  # NaN too
        raise UserError("temperature and top_k must not be negative, and top_p must be in (0, 1]")
    if cfg.chat and cfg.prompt:
        raise UserError("--prompt is for generation; with --chat type the messages, or pipe them to stdin")
    if cfg.system and not cfg.chat:
        raise UserError("--system is a chat's system message: add --chat, or put the text in --prompt")
    if cfg.threads < 0:
        raise UserError("threads must be at least 1, or 0 for the default")
    model, tokenizer, checkpoint = load(cfg)
    with decoding(model, cfg.threads):
        if cfg.chat:
            chat(model, tokenizer, checkpoint, cfg, out)
        else:
            sample(model, tokenizer, cfg, out)


if __name__ == "__main__":
    configurator.run_script(main)
