"""The documents of shakespeare_completion.yaml, built offline from the plays that prepare.py's
default split holds out (so a model trained on its train split has never seen them), few-shot
examples from the others. lm-eval loads this file from beside the YAML; it finds the repository's
data.py one folder up, so `lm_eval --include_path eval_tasks` works from any folder.
"""

import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import VAL_FRACTION, is_val, markdown_play_to_text, shakespeare_plays  # noqa: E402


def documents(items=1000, fewshot_items=100, seed=1337, **metadata):
    """The test split, `items` items from the held-out plays, and a train split for few-shot."""
    import datasets
    plays = shakespeare_plays()
    held_out = [is_val(i, VAL_FRACTION) for i in range(len(plays))]
    rng = random.Random(seed)
    splits = dict(test=completion_items([p for p, v in zip(plays, held_out) if v], items, rng),
                  train=completion_items([p for p, v in zip(plays, held_out) if not v],
                                         fewshot_items, rng))
    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs)
                                 for name, docs in splits.items()})


def completion_items(plays, count, rng):
    """`count` items from these plays' speeches: the line before, then a line cut at its middle
    word boundary; the choices are the rest of that line and the rests of three other lines cut
    the same way. Only lines of 20 to 70 characters are cut, so that an item is about as long as a
    small model's context or shorter."""
    items, endings = [], []
    for path in plays:
        with open(path, encoding="utf-8") as f:
            text = markdown_play_to_text(f.read())
        for speech in text.split("\n\n"):
            speaker, *lines = speech.split("\n")
            if not re.fullmatch(r"[A-Z][A-Z .,'-]*:", speaker):  # headings and stage directions
                continue
            for before, line in zip(lines, lines[1:]):
                spaces = [i for i, ch in enumerate(line) if ch == " " and i > 0]
                if 20 <= len(line) <= 70 and not line.startswith("[") and spaces:
                    cut = min(spaces, key=lambda i: abs(i - len(line) / 2))
                    items.append((before + "\n" + line[:cut], line[cut:] + "\n"))
                    endings.append(line[cut:] + "\n")
    endings, docs = sorted(set(endings)), []
    for context, ending in rng.sample(items, min(count, len(items))):
        choices = [ending] + [e for e in rng.sample(endings, 4) if e != ending][:3]
        rng.shuffle(choices)
        docs.append(dict(context=context, choices=choices, answer=choices.index(ending)))
    return docs
