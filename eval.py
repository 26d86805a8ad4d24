"""Benchmarks through lm-evaluation-harness, the field's standard (its numbers compare with papers and
leaderboards), on a checkpoint of train.py or sft.py, or on an export.py folder, with no export step.

    python eval.py                                                  # out/ckpt.pt on the offline Shakespeare task
    python eval.py --out_dir=out-gpt-51m --tasks=hellaswag,arc_easy,piqa,lambada_openai --batch_size=32
    python eval.py --out_dir=out-gpt-51m --tasks=hellaswag --limit=500 --num_fewshot=5
    python eval.py --out_dir=out-sft --chat --tasks=arc_easy         # each request in the checkpoint's chat template
    python eval.py --include_path=my_tasks --tasks=my_task           # a folder of tasks in lm-eval's YAML format

lm-eval turns each task's documents into requests, and Harness answers them with model.py: the log-likelihood
of continuations, scored in batches; of whole texts, in windows of block_size (perplexity tasks); and
generations with the KV cache up to the task's stop sequences. lm-eval computes the metrics and the table
printed here, and the results go to out_dir/eval_<tasks>.json.

The default task, shakespeare_completion (eval_tasks/), needs no network: given a line and a half of one of the
plays that prepare.py's default split holds out, which of four endings truly completes it? Chance is 25%.
lm-eval's own CLI runs it too, on an export.py folder (from this folder, where it finds eval.py), with
pip install "lm-eval[hf]" (plain lm-eval lacks the accelerate that its hf backend imports):

    python -m lm_eval run --model hf --model_args pretrained=hf/my-model,add_bos_token=True \
        --include_path eval_tasks --tasks shakespeare_completion
"""

import contextlib
import dataclasses
import difflib
import glob
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch
from lm_eval.api.model import TemplateLM

import prepare
from configurator import UserError
from runtime import pick_device, pick_dtype, write_atomically
from sample import decoding, load, printable
from tokenizer import EOT_TEXT, marker_ids, render_chat, sampleable_vocab_size

TASKS_DIR = os.path.join(configurator.ROOT, "eval_tasks")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that set none (its hf backend's too)


@dataclass
class EvalConfig:
    out_dir: str = "out"             # a run of train.py or sft.py, or an export.py (Hugging Face) folder
    ckpt: str = "ckpt.pt"            # "best.pt" for the best by validation loss
    tasks: str = "shakespeare_completion"  # comma-separated lm-eval tasks or groups; the default is offline
    include_path: str = ""           # a folder of more tasks in lm-eval's YAML format
    limit: int = 0                   # at most this many documents per task; 0 = all
    num_fewshot: int = -1            # examples before each question; -1 = each task's own default
    batch_size: int = 32             # requests per forward pass
    chat: bool = False               # render requests in the checkpoint's chat template (from sft.py)
    bos: bool = True                 # start each request with end-of-text, as training documents start; False
                                     # as lm-eval scores GPT-2, for numbers comparable with its published ones
    seed: int = 1234                 # lm-eval's default seed: few-shot examples and sampled generations
    device: str = "auto"             # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"              # "auto": bfloat16 on GPUs; on a CPU the faster of float32 and bfloat16, measured


# ----------------------------------------------------------------------------- the offline task

def shakespeare_completion(items=1000, fewshot_items=100, seed=1337, **metadata):
    """The documents of eval_tasks/shakespeare_completion.yaml: the test split from the plays that prepare.py holds
    out by default (so a model trained on its train split has never seen them), few-shot examples from the others."""
    import datasets
    plays = prepare.shakespeare_plays()
    held_out = [prepare.is_val(i, prepare.PrepareConfig.val_fraction) for i in range(len(plays))]
    rng = random.Random(seed)
    splits = dict(test=completion_items([p for p, v in zip(plays, held_out) if v], items, rng),
                  train=completion_items([p for p, v in zip(plays, held_out) if not v], fewshot_items, rng))
    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in splits.items()})


def completion_items(plays, count, rng):
    """`count` items from these plays' speeches: the line before, then a line cut at its middle word boundary;
    the choices are the rest of that line and the rests of three other lines cut the same way. Only lines of
    20 to 70 characters are cut, so that an item is about as long as a small model's context or shorter."""
    items, endings = [], []
    for path in plays:
        with open(path, encoding="utf-8") as f:
            text = prepare.markdown_play_to_text(f.read())
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


# ----------------------------------------------------------------------------- model.py as an lm-eval model

class TextPieces:
    """A stand-in tokenizer whose ids are pieces of text, for render_chat (tokenizer.py, the chat template's one
    home) to lay a conversation out as the text that lm-eval passes around, each marker as its sentinel text."""
    eot_id = EOT_TEXT

    def encode(self, text):
        return [text]


class Harness(TemplateLM):
    """model.py's GPT as an lm-eval model. lm-eval turns a task's documents into requests, calls the methods
    below on lists of them, and computes the metrics from their answers. TemplateLM, lm-eval's base for models
    with a tokenizer, splits each (context, continuation) pair into ids as its hf backend does."""

    def __init__(self, model, tokenizer, cfg, template=None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.bos, self.name = cfg.batch_size, cfg.bos, os.path.join(cfg.out_dir, cfg.ckpt)
        self.block, self._device = model.config.block_size, model.lm_head.weight.device
        self.generator = torch.Generator(self._device).manual_seed(cfg.seed)
        self.ends = [[tokenizer.eot_id]]
        self.vocab_size = tokenizer.vocab_size
        self.sentinels = {}  # chat: the text that stands for each marker in a rendered request, and its ids
        if template:
            self.ends.append(marker_ids(tokenizer, template["end_of_turn"]))
            self.vocab_size = sampleable_vocab_size(tokenizer, template)
            self.text_template = {role: [m if isinstance(m, str) else f"<|{role}|>"] for role, m in template.items()}
            self.sentinels = {EOT_TEXT: [tokenizer.eot_id]} | {
                self.text_template[role][0]: marker_ids(tokenizer, m) for role, m in template.items()}
            longest_first = sorted(self.sentinels, key=len, reverse=True)
            self.sentinel_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @property
    def eot_token_id(self):  # also lm-eval's prefix for an empty context and for perplexity windows
        return self.tokenizer.eot_id

    @property
    def tokenizer_name(self):  # names the rendering in lm-eval's request cache
        return f"{self.name} chat template"

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """The ids of a request's text, after end-of-text unless add_special_tokens=False or --bos=False."""
        ids = self.encode(string)
        start = self.bos and add_special_tokens is not False and ids[:1] != [self.eot_token_id]
        return [self.eot_token_id] * start + ids

    def encode(self, text):
        """tokenizer.py's ids of `text`; with a chat template, each sentinel becomes its marker's ids, the
        other pieces are encoded apart, as render_chat does."""
        pieces = self.sentinel_pattern.split(text) if self.sentinels else [text]
        try:
            return [i for p in pieces for i in (self.sentinels[p] if p in self.sentinels else self.tokenizer.encode(p))]
        except UserError as e:
            raise UserError(f"a request holds text that this checkpoint's tokenizer cannot encode: {e}") from e

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """A conversation as render_chat lays it out, then the assistant marker that a reply follows; without it,
        lm-eval continues the last (assistant) message, which is then left open."""
        text = "".join(render_chat(TextPieces(), self.text_template, chat_history)[0])
        if add_generation_prompt:
            return text + self.text_template["assistant"][0]
        return text.removesuffix(self.text_template["end_of_turn"][0])

    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        """(log-probability of the continuation given its context, whether greedy decoding yields it) for each
        request, ((context, continuation), context ids, continuation ids), batch_size per forward pass."""
        from lm_eval.models.utils import Collator
        # longest first, as lm-eval's backends order them: similar lengths share a batch, and memory runs out first
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        answers = []
        for batch in order.get_batched(n=self.batch_size):
            for request, (logprob, greedy) in zip(batch, self.score(batch)):
                answers.append((logprob, bool(greedy)))
                if request[0] is not None:  # perplexity windows are cached per document, in loglikelihood_rolling
                    self.cache_hook.add_partial("loglikelihood", request[0], answers[-1])
        return order.get_original(answers)

    @torch.no_grad()
    def score(self, batch):
        """[log-probability, 1 if greedy] of each request's continuation, from one forward pass over the rows padded on
        the right (causal attention: padding never reaches earlier positions), the log-softmax in fp32. A row keeps
        the last block_size + 1 ids, so a long context loses its oldest tokens, as in lm-eval's hf backend."""
        longest = max(len(continuation) for _, _, continuation in batch)
        if longest > self.block:
            raise UserError(f"a continuation of {longest} tokens is longer than the model's context ({self.block}); "
                            "this task needs a model with a longer block_size")
        windows = [(context + continuation)[-(self.block + 1):] for _, context, continuation in batch]
        inputs = torch.zeros(len(windows), max(map(len, windows)) - 1, dtype=torch.long)
        targets = torch.full_like(inputs, -1)
        for row, window in enumerate(windows):
            inputs[row, :len(window) - 1] = torch.tensor(window[:-1])
            targets[row, :len(window) - 1] = torch.tensor(window[1:])
        inputs, targets = inputs.to(self._device), targets.to(self._device)
        # targets make forward return the logits of every position; the loss that comes with them is not needed
        logits, _ = self.model(inputs, targets)
        answers = []
        for row, (window, (_, _, continuation)) in enumerate(zip(windows, batch)):
            span = slice(len(window) - 1 - len(continuation), len(window) - 1)
            logprobs, target = logits[row, span].float().log_softmax(-1), targets[row, span]
            greedy = (logprobs.argmax(-1) == target).all()
            answers.append(torch.stack((logprobs.gather(-1, target[:, None]).sum(), greedy)))
        return torch.stack(answers).tolist()  # one copy from the device per batch

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, for perplexity: its ids after end-of-text, cut into windows of
        block_size that each predict new tokens only, with as much context as fits (lm-eval's own windowing)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owners = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(ids, self.eot_token_id, self.block, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Each request's continuation, greedy unless the task samples, up to its first stop sequence, end-of-text
        (or end_of_turn in chat) or max_gen_toks: one request at a time, since rows of different lengths would
        need a padding mask that model.py's attention does not take."""
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm
        answers = []
        with decoding(self.model):
            for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generating"):
                answers.append(self.generate(context, normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[-1])
        return answers

    def generate(self, context, kwargs):
        """The text model.generate (the KV cache) continues `context` with, cut before the first stop sequence.
        A long context keeps its last tokens, leaving room for the new ones but at least half the block, as
        sample.py does; a longer generation slides the cache."""
        steps, until = kwargs["max_gen_toks"], [s for s in kwargs["until"] if s]
        ids = self.tok_encode(context)[-max(self.block - steps, self.block // 2):]
        new = []
        tokens = self.model.generate(torch.tensor([ids], device=self._device), steps, kwargs["temperature"],
                                     kwargs.get("top_k") or 0, kwargs.get("top_p") or 1.0, self.generator,
                                     vocab_size=self.vocab_size)
        with contextlib.closing(tokens):
            for token in tokens:
                new.append(token.item())
                end = next((end for end in self.ends if new[-len(end):] == end), None)
                if end:
                    del new[-len(end):]
                    break
                if any(s in printable(self.tokenizer, new)[0] for s in until):
                    break
        text = printable(self.tokenizer, new)[0]
        return text[:min([text.index(s) for s in until if s in text], default=len(text))]


# ----------------------------------------------------------------------------- tasks and the run

def task_manager(tasks, include_path):
    """lm-eval's TaskManager over eval_tasks/ and --include_path, and over lm-eval's own 14,000-odd tasks only when a
    task is not named there (indexing them takes seconds); an unknown task is one line naming the closest ones."""
    paths = [TASKS_DIR] + ([include_path] if include_path else [])
    if not set(tasks) <= local_tasks([TASKS_DIR]):  # data from the Hub, perhaps: without a network, fail at once
        prepare.offline_unless_hub_reachable(",".join(tasks))  # rather than after retries; before datasets loads
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=paths, include_defaults=not set(tasks) <= local_tasks(paths))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean "
                          f"{', '.join(difflib.get_close_matches(t, manager.all_tasks, n=3)) or 'nothing close'}?"
                          for t in unknown)
        raise UserError(f"unknown task {hints} (`lm-eval ls tasks` lists them all)")
    return manager


def local_tasks(paths):
    """The task and group names that the YAML files under `paths` declare."""
    names = set()
    for path in paths:
        for name in glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True):
            with open(name, encoding="utf-8") as f:
                names.update(re.findall(r"^(?:task|group):\s*([^\s#]+)", f.read(), flags=re.MULTILINE))
    return names


def evaluate(harness, manager, tasks, cfg):
    """lm-eval's simple_evaluate on `harness`; data that the Hub cannot send is one line, not a trace."""
    from lm_eval import simple_evaluate
    # a task built by a function (as ours is) makes lm-eval suggest its own CLI's --metadata, which eval.py has not
    logging.getLogger("lm_eval.api.task").addFilter(lambda record: "Custom kwargs" not in record.getMessage())
    try:
        return simple_evaluate(model=harness, tasks=tasks, task_manager=manager, limit=cfg.limit or None,
                               num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                               batch_size=cfg.batch_size, apply_chat_template=cfg.chat, log_samples=False,
                               random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                               fewshot_random_seed=cfg.seed)
    except ConnectionError as e:  # datasets' and huggingface_hub's errors for an unreachable Hub are ConnectionErrors
        raise UserError(f"a task's data set could not be fetched ({str(e).splitlines()[0]}): the Hub's tasks need "
                        "the network; --tasks=shakespeare_completion runs offline") from e


def chat_template_of(checkpoint, cfg):
    template = checkpoint.get("chat_template")
    if not template:
        raise UserError(f"{cfg.ckpt} in {cfg.out_dir} has no chat template: fine-tune it with sft.py, or drop --chat")
    return template


def main(argv, out=sys.stdout):
    cfg = configurator.build(EvalConfig, configurator.parse(argv, EvalConfig))
    configurator.check_at_least(cfg, limit=0, num_fewshot=-1, batch_size=1)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks=shakespeare_completion,hellaswag")
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise UserError(f"--include_path={cfg.include_path} is not a folder; give a folder of lm-eval YAML tasks")
    manager = task_manager(tasks, cfg.include_path)
    # scoring is batched matrix products with the weights stored in one dtype (no autocast, as lm-eval's hf backend
    # does with its dtype): on a CPU, the faster for such products as measured
    dtype = pick_dtype(cfg.dtype, pick_device(cfg.device), use="product")
    model, tokenizer, checkpoint = load(dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch.")))
    if not os.access(cfg.out_dir, os.W_OK):
        raise UserError(f"{cfg.out_dir} is not writable, so the results could not be saved there")
    harness = Harness(model, tokenizer, cfg, chat_template_of(checkpoint, cfg) if cfg.chat else None)
    start = time.perf_counter()
    results = evaluate(harness, manager, tasks, cfg)
    seconds = time.perf_counter() - start
    report(results, tasks, cfg, seconds, out)
    return results


def report(results, tasks, cfg, seconds, out):
    """lm-eval's table, the speed, and the results JSON in out_dir, replaced whole."""
    from lm_eval.utils import handle_non_serializable, make_table
    items = sum(n["effective"] for n in results["n-samples"].values())
    results["config"].update(model=os.path.join(cfg.out_dir, cfg.ckpt), eval_config=dataclasses.asdict(cfg))
    path = os.path.join(cfg.out_dir, f"eval_{'+'.join(tasks)}{'_chat' if cfg.chat else ''}.json")
    write_atomically(path, json.dumps(results, indent=2, default=handle_non_serializable))
    out.write(make_table(results) + "\n")
    if results.get("groups"):
        out.write(make_table(results, "groups") + "\n")
    out.write(f"{items} items in {seconds:.1f} s ({items / seconds:.1f} items/s); results in {path}\n")


if __name__ == "__main__":
    configurator.run_script(main)
