"""The conversations sft.py fine-tunes on: read from every source, cleaned, split and mixed.

A source is `spec[*weight][@cap]`: `demo` (questions about the Shakespeare plays and sums, built
here, offline), a local `.jsonl` file, or `hf:<dataset or local folder>[:split]` read through
`datasets`. A row is {"messages": [{"role", "content"}, ...]} (UltraChat; ShareGPT's {"from",
"value"} too), {"instruction", "input", "output"} (Alpaca), or {"prompt", "response"}. `cap` keeps
a source's first conversations; `weight` scales how many of its training conversations enter the
mix (2 = each twice, 0.5 = a random half). Every 1/val_fraction-th conversation of each source is
held out for validation. A few identity conversations teach the model its own name, and samples
in which the assistant claims to be another model (the 350M article's called itself ChatGPT) are
dropped and counted.
"""

import itertools
import json
import os
import random
import re

from configurator import UserError
from data import (is_val, markdown_play_to_text, offline_unless_hub_reachable, play_title,
                  shakespeare_plays)

OTHER_MODELS = ("ChatGPT,GPT-3,GPT-3.5,GPT-4,GPT-4o,OpenAI,Gemini,Bard,Claude,Anthropic,LLaMA,Meta "
                "AI,Mistral,Qwen,DeepSeek")


def to_messages(row):
    """One dataset row as a list of {role, content} messages, whatever the dataset's layout."""
    if not isinstance(row, dict):
        raise UserError(f"a row {json.dumps(row)[:40]} is not a conversation object: expected one "
                        "with messages, conversations, instruction/output or prompt/response")
    turns = row.get("messages") or row.get("conversations")
    if turns:
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return []  # no list of messages: valid() rejects it, so it is dropped and counted
        sharegpt = {"human": "user", "gpt": "assistant"}  # a role that is no string: valid() drops
        roles = [t.get("role", t.get("from")) for t in turns]
        return [dict(role=sharegpt.get(r, r) if isinstance(r, str) else r,
                     content=t.get("content", t.get("value"))) for r, t in zip(roles, turns)]
    if "instruction" in row and "output" in row:  # Alpaca: the optional input follows
        prompt = row["instruction"]
        if isinstance(prompt, str) and row.get("input"):
            prompt += f"\n\n{row['input']}"
        return [dict(role="user", content=prompt), dict(role="assistant", content=row["output"])]
    for ask, answer in (("prompt", "response"), ("prompt", "completion"), ("question", "answer")):
        if ask in row and answer in row:
            return [dict(role="user", content=row[ask]),
                    dict(role="assistant", content=row[answer])]
    raise UserError(f"a row with columns {sorted(row)} is not a conversation: expected messages, "
                    "conversations, instruction/output or prompt/response")


def valid(messages):
    return (all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                for m in messages) and any(m["role"] == "assistant" for m in messages))


def claim_pattern(names):
    """A first-person claim or a maker, then one of `names` within the same clause ("I am ChatGPT",
    "As an AI language model developed by OpenAI"); a bare mention ("GPT-4 or Gemini?") is kept."""
    if not names.strip():
        return None
    alternatives = "|".join(re.escape(n.strip()) for n in names.split(",") if n.strip())
    claim = (r"\b(?:I am|I'm|I was|my name is|as an?"
             r"|created by|developed by|trained by|built by|made by)")
    return re.compile(claim + rf"\b[^.!?\n]{{0,40}}?(?<![\w-])(?:{alternatives})(?![\w-])",
                      re.IGNORECASE)


def claims_another_model(messages, pattern):
    return pattern is not None and any(pattern.search(m["content"]) for m in messages
                                       if m["role"] == "assistant")


def demo_conversations(n, seed):
    """Questions about the Shakespeare corpus answered from it, and sums: short enough for the
    Quick-start model's context, with answers that can be checked against the corpus."""
    rng = random.Random(seed)
    speeches, plays_of = [], {}  # (play title, speaker, the first line of a speech)
    for path in shakespeare_plays():
        with open(path, encoding="utf-8") as f:
            markdown = f.read()
        text, title = markdown_play_to_text(markdown), play_title(path, markdown)
        for speaker, body in re.findall(r"^([A-Z][A-Z' ]+):\n((?:.+\n)+)", text, re.MULTILINE):
            line = body.splitlines()[0]
            plays_of.setdefault(speaker, set()).add(title)
            if len(line) <= 45 and not line.startswith("["):  # a spoken line, not "[Aside]"
                speeches.append((title, speaker, line))
    conversations = []
    for _ in range(n):
        title, speaker, line = rng.choice(speeches)
        a, b = rng.randint(0, 9), rng.randint(0, 9)  # one digit: a table a small model can learn
        play = (f"{speaker} speaks in {title}." if len(plays_of[speaker]) == 1 else
                f"{speaker} speaks in {len(plays_of[speaker])} plays, {title} among them.")
        conversations.append(rng.choice([
            # each kind of question opens with its own word: a model this small tells them apart so
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
    match = re.fullmatch(r"(.+?)(?:\*(\d+(?:\.\d*)?|\.\d+))?(?:@(\d+))?", spec.strip())
    if not match or set("*@") & set(match.group(1)):  # a weight or cap that is not a number
        raise UserError(f"source {spec!r} is not spec[*weight][@cap]: a weight is a number, a cap "
                        "a count, e.g. data/chat.jsonl*2@5000")
    return match.group(1), float(match.group(2) or 1.0), int(match.group(3) or 0)


def read_source(path, cap, demo_size, seed):
    """Conversations of one source, at most `cap` (0 = all)."""
    if path == "demo":
        rows = demo_conversations(cap or demo_size, seed)
    elif path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        offline_unless_hub_reachable(name)
        import datasets
        try:  # streamed: a cap of 50,000 reads 50,000 rows, not the whole dataset
            table = datasets.load_dataset(name, split=split or "train", streaming=True)
        except Exception as e:
            raise UserError(f"could not load {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from e
        rows = (to_messages(row) for row in table)
    elif path.endswith(".jsonl"):
        rows = read_jsonl(path)
    else:
        raise UserError(f"source {path!r}: give demo, a .jsonl file, or hf:<dataset>[:split]")
    return list(itertools.islice(rows, cap or None))


def read_jsonl(path):
    if not os.path.isfile(path):
        raise UserError(f"chat data {path} not found")
    with open(path, "rb") as f:  # bytes, decoded line by line, so that an error names its line
        for number, line in enumerate(f, 1):
            try:
                if line.strip():
                    yield to_messages(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number} is not UTF-8 ({e.reason}): save it "
                                "as UTF-8") from e
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not JSON ({e.msg} at column "
                                f"{e.colno})") from e
            except UserError as e:
                raise UserError(f"{path} line {number}: {e}") from e


def load_conversations(cfg, seed, say):
    """(training, validation) conversations: every source of cfg.sources read, cleaned, split and
    weighted, with the identity conversations mixed in. `cfg` is sft.py's SFTConfig."""
    rng, pattern, train, val = random.Random(seed), claim_pattern(cfg.drop_claims), [], []
    for spec in cfg.sources.split(","):
        path, weight, cap = parse_source(spec)
        conversations = read_source(path, cap, cfg.demo_conversations, seed)
        claims = sum(valid(c) and claims_another_model(c, pattern) for c in conversations)
        kept = [c for c in conversations if valid(c) and not claims_another_model(c, pattern)]
        held = [c for i, c in enumerate(kept) if is_val(i, cfg.val_fraction)]
        own = [c for i, c in enumerate(kept) if not is_val(i, cfg.val_fraction)]
        mixed = own * int(weight) + rng.sample(own, round(len(own) * (weight % 1)))
        say(f"{path}: {len(conversations):,} conversations, "
            f"{len(conversations) - len(kept) - claims:,} malformed and {claims:,} claiming to be "
            f"another model dropped; {len(mixed):,} in the training mix, {len(held):,} held out")
        train, val = train + mixed, val + held
    if not train or not val:
        raise UserError(f"the sources {cfg.sources!r} leave {len(train)} training and {len(val)} "
                        "validation conversations; both need at least one")
    for split in (train, val):  # n / (len + n) = identity_rate
        n = round(cfg.identity_rate * len(split) / (1 - cfg.identity_rate))
        split += identity_conversations(n, cfg.identity_name, cfg.identity_maker, rng)
    rng.shuffle(train)
    return train, val
