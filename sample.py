"""Generation and chat from a checkpoint of train.py or sft.py, printed as it is generated.

    python sample.py --out_dir=out                            # unconditional: starts at end-of-text
    python sample.py --out_dir=out --prompt="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out --prompt=FILE:prompt.txt   # --prompt=- reads stdin; or --start
    python sample.py --out_dir=out-sft --chat                 # talk to a fine-tuned model

A prompt is prefilled once into the model's KV cache, then each new token costs one position
(model.generate). With --chat, the conversation is laid out in the checkpoint's chat template
(tokenizer.render_chat, which sft.py trains on) and each reply ends at the template's end_of_turn;
the cache is kept from one message to the next.
"""

import os
import sys
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch

from configurator import UserError
from engine import Chat, TextStream, load_model
from runtime import use_threads


@dataclass
class SampleConfig:
    out_dir: str = "out"
    ckpt: str = "ckpt.pt"           # "best.pt" for the best by validation loss
    prompt: str = ""                # text, FILE:path, or - for stdin; empty = unconditional
    num_samples: int = 1
    max_new_tokens: int = 500       # per sample, or per reply in a chat
    temperature: float = 0.8        # 0 = greedy
    top_k: int = 200                # 0 = off
    top_p: float = 1.0              # nucleus sampling; 1.0 = off
    chat: bool = False              # a multi-turn chat; needs a checkpoint from sft.py
    system: str = ""                # chat: a system message, if the template has a system marker
    seed: int = 1337
    device: str = "auto"            # auto picks cuda, then mps, then cpu
    dtype: str = "auto"             # the weights' dtype: bfloat16 on GPUs that have it, or float32
    threads: int = 0                # CPU threads; 0 = torch's default

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.chat and self.prompt:
            raise ValueError("--prompt is for generation; with --chat type the messages, or pipe "
                             "them in")
        if self.system and not self.chat:
            raise ValueError("--system is a chat's system message: add --chat, or put it in "
                             "--prompt")


def main(argv, out=sys.stdout):
    # nanoGPT's sample.py calls the prompt `start`: --start=X is --prompt=X here
    argv = ["--prompt=" + a[len("--start="):] if a.startswith("--start=") else a for a in argv]
    cfg = configurator.build(SampleConfig, configurator.parse(argv, SampleConfig))
    configurator.check_at_least(cfg, num_samples=1, max_new_tokens=1, temperature=0, top_k=0)
    use_threads(cfg.threads)
    model, tokenizer, checkpoint = load_model(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)
    if cfg.chat:
        chat(model, tokenizer, checkpoint, cfg, generator, out)
    else:
        sample(model, tokenizer, cfg, generator, out)


def sample(model, tokenizer, cfg, generator, out):
    """num_samples continuations of the prompt, each printed token by token."""
    text = read_prompt(cfg.prompt)
    ids = [tokenizer.eot_id] + tokenizer.encode(text)  # every training document starts this way
    block = model.config.block_size
    if len(ids) > block:  # leave room for new tokens, so the cache need not be rebuilt at once
        keep = max(block - cfg.max_new_tokens, block // 2)
        print(f"warning: the prompt is {len(ids)} tokens, longer than the context of {block}; "
              f"keeping its last {keep}", file=sys.stderr)
        ids = ids[-keep:]
    prompt = torch.tensor([ids], device=model.lm_head.weight.device)
    for _ in range(cfg.num_samples):
        out.write(text)
        stream = TextStream(tokenizer)
        for token in model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                    cfg.top_p, generator, vocab_size=tokenizer.vocab_size):
            out.write(stream.push(token.item()))
            out.flush()
        out.write(stream.flush() + "\n" + "-" * 40 + "\n")
        out.flush()


def read_prompt(spec):
    if spec == "-":
        return sys.stdin.read()
    if not spec.startswith("FILE:"):
        return spec
    path = spec[len("FILE:"):]
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text ({e.reason}): save it as "
                        "UTF-8") from e


def chat(model, tokenizer, checkpoint, cfg, generator, out, read=input):
    """Read a message, stream the reply, and again, until Ctrl-D. Ctrl-C stops a reply."""
    if not checkpoint.get("chat_template"):
        raise UserError(f"{cfg.out_dir}/{cfg.ckpt} has no chat template: fine-tune it with sft.py "
                        "first")
    conversation = Chat(model, tokenizer, checkpoint["chat_template"], cfg.system)
    print(f"chatting with {cfg.out_dir}/{cfg.ckpt}; Ctrl-C stops a reply, Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            message = read("> ")
        except EOFError:  # Ctrl-D: end the line the prompt is on
            out.write("\n")
            return
        if read is input and not sys.stdin.isatty():  # piped messages are shown: a dialogue
            out.write(message + "\n")
        try:
            for piece in conversation.respond(message, cfg.max_new_tokens, cfg.temperature,
                                              cfg.top_k, cfg.top_p, generator):
                out.write(piece)
                out.flush()
        except UserError as e:  # a message too long, or with characters the tokenizer lacks
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # the next message reuses the cache as far as it matches
            print(" [stopped]", file=sys.stderr)
        out.write("\n")


if __name__ == "__main__":
    configurator.run_script(main)
