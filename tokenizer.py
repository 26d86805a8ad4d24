"""Tokenizers rebuilt from a small JSON spec, so a checkpoint can carry its tokenizer.

    {"kind": "char", "chars": "..."}                         ids are positions in `chars`; EOT = len(chars)
    {"kind": "sp", "model": "<base64 ModelProto>"}           SentencePiece with byte fallback; EOT = its eos
    {"kind": "tiktoken", "name": "gpt2"}                     tiktoken's registry (downloads at first use)
    {"kind": "tiktoken", "ranks": "<.tiktoken text>"}        BPE ranks embedded, with GPT-2's split pattern
    {"kind": "tiktoken", "ranks_file": "path.tiktoken"}      the same, read from a file

Any spec may add "pretokenize": "module:function", a text transform applied before encoding (for example
a morpheme splitter for Korean). sentencepiece and tiktoken are imported only by the tokenizers that need them.
"""

import base64
import importlib

import numpy as np

from configurator import UserError

# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_pat_str), for BPE ranks loaded from a file
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"


def load_hook(name):
    """The function named "module:function", or the identity for an empty name."""
    if not name:
        return lambda text: text
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"pretokenize hook {name!r} not found ({e}); give it as module:function") from e


class CharTokenizer:
    def __init__(self, spec):
        self.spec, self.chars = spec, spec["chars"]
        self.vocab_size, self.eot_id = len(self.chars) + 1, len(self.chars)
        self.pretokenize = load_hook(spec.get("pretokenize"))
        # encoding is a vectorised binary search over the sorted code points: ~100x a Python dict loop
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.order = np.argsort(codepoints)
        self.sorted = codepoints[self.order]

    def encode(self, text):
        codepoints = np.frombuffer(self.pretokenize(text).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self.sorted, codepoints).clip(max=max(len(self.sorted) - 1, 0))
        unknown = self.sorted[pos] != codepoints if len(self.sorted) else codepoints == codepoints
        if unknown.any():
            missing = sorted({chr(c) for c in codepoints[unknown]})
            raise UserError(f"{len(missing)} characters not in the char vocabulary: {''.join(missing[:40])!r}; "
                            "prepare the data with a vocabulary that covers them (or use --tokenizer=sp)")
        return self.order[pos].tolist()

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i != self.eot_id)


class SentencePieceTokenizer:
    def __init__(self, spec):
        import sentencepiece as spm
        self.spec = spec
        self.sp = spm.SentencePieceProcessor(model_proto=base64.b64decode(spec["model"]))
        self.vocab_size, self.eot_id = self.sp.get_piece_size(), self.sp.eos_id()
        if self.eot_id < 0:
            raise UserError("this SentencePiece model has no eos piece to separate documents; retrain it with prepare.py")
        self.pretokenize = load_hook(spec.get("pretokenize"))

    def encode(self, text):
        return self.sp.encode(self.pretokenize(text))

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


def read_ranks(text, name):
    """Parse the .tiktoken format: one "<base64 token> <rank>" per line."""
    ranks = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:  # binascii.Error, for bad base64, is a ValueError too
                raise UserError(f"{name} is not a tiktoken ranks file: line {number} is {line[:40]!r}, not "
                                '"<base64 token> <rank>"') from e
    return ranks


class TiktokenTokenizer:
    def __init__(self, spec):
        import tiktoken
        import tiktoken.load
        self.spec = spec
        if "name" in spec:
            try:
                self.enc = tiktoken.get_encoding(spec["name"])
            except ValueError as e:
                raise UserError(f"unknown tiktoken encoding {spec['name']!r}: {e}") from e
            except Exception as e:  # the first use downloads the ranks
                raise UserError(f"could not load the {spec['name']} tokenizer ({type(e).__name__}: {e}); tiktoken "
                                "downloads it at first use, so connect once or pass a local ranks file "
                                "(--tokenizer=path/to/file.tiktoken)") from e
        else:
            name = spec.get("ranks_file", "the BPE ranks")
            if "ranks" in spec:
                ranks = read_ranks(spec["ranks"], name)
            else:
                try:
                    ranks = tiktoken.load.load_tiktoken_bpe(spec["ranks_file"])
                except (OSError, ValueError) as e:
                    raise UserError(f"could not read the BPE ranks file {spec['ranks_file']}: {e}") from e
            # tiktoken panics, in Rust, on text with a byte that has no rank of its own
            missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
            if missing:
                raise UserError(f"{name} is not a byte-level BPE: its ranks must include all 256 single bytes, "
                                f"but {len(missing)} have no rank, {missing[0]!r} among them")
            if sorted(ranks.values()) != list(range(len(ranks))):  # the end-of-text token takes id len(ranks)
                raise UserError(f"{name}: the ranks must be numbered 0 to {len(ranks) - 1}, each once")
            self.enc = tiktoken.Encoding(name=spec.get("ranks_file", "ranks"), pat_str=GPT2_PATTERN,
                                         mergeable_ranks=ranks, special_tokens={EOT_TEXT: len(ranks)})
        self.vocab_size, self.eot_id = self.enc.n_vocab, self.enc.eot_token
        self.pretokenize = load_hook(spec.get("pretokenize"))

    def encode(self, text):
        # "<|endoftext|>" written in the text is ordinary text, never the separator
        return self.enc.encode_ordinary(self.pretokenize(text))

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


KINDS = {"char": CharTokenizer, "sp": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}


def load_tokenizer(spec):
    if spec.get("kind") not in KINDS:
        raise UserError(f"unknown tokenizer kind {spec.get('kind')!r} (expected one of {', '.join(KINDS)})")
    return KINDS[spec["kind"]](spec)
