"""Benchmarks through lm-evaluation-harness, the field's standard (its numbers compare with papers
and leaderboards), on a checkpoint of train.py or sft.py, with no export.

    python eval.py                                     # out/ckpt.pt on the offline Shakespeare task
    python eval.py --out_dir=out-gpt-51m --tasks=hellaswag,arc_easy,piqa,lambada_openai
    python eval.py --out_dir=out-gpt-51m --tasks=hellaswag --limit=500 --num_fewshot=5
    python eval.py --include_path=my_tasks --tasks=my_task    # a folder of tasks in lm-eval's YAML

lm-eval turns each task's documents into requests; Harness answers them with model.py (scores in
batches, perplexity in windows of block_size, generations with the KV cache); lm-eval computes the
metrics and their standard errors, printed here and saved in out_dir/eval_<tasks>.json.

The default task, shakespeare_completion (eval_tasks/), is offline: given a line and a half of a
play that prepare.py's default split holds out, which of four endings completes it? Chance is 25%.
lm-eval's own command runs it on an export.py folder (pip install "lm-eval[hf]"), from anywhere
given the path to eval_tasks; with --apply_chat_template it renders a fine-tuned model's requests
in the chat template that export.py writes (render_chat's layout, as Jinja):

    python export.py --out_dir=out --to=hf/my-model
    lm_eval --model hf --model_args pretrained=hf/my-model,add_bos_token=True \\
        --include_path eval_tasks --tasks shakespeare_completion
"""

import dataclasses
import difflib
import glob
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch

from configurator import UserError
from data import offline_unless_hub_reachable
from engine import load_model, printable
from files import write_atomically
from runtime import use_threads

try:
    from lm_eval.api.model import LM
except ImportError as e:  # an extra: the Quick start does not install it
    sys.exit(f'error: eval.py needs lm-evaluation-harness: pip install "lm-eval" ({e.name})')

TASKS_DIR = os.path.join(configurator.ROOT, "eval_tasks")


@dataclass
class EvalConfig:
    out_dir: str = "out"          # a run of train.py or sft.py
    ckpt: str = "ckpt.pt"         # "best.pt" for the best by validation loss
    tasks: str = "shakespeare_completion"  # comma-separated lm-eval tasks or groups
    include_path: str = ""        # a folder of more tasks in lm-eval's YAML format
    limit: int = 0                # at most this many documents per task; 0 = all
    num_fewshot: int = -1         # examples before each question; -1 = each task's own default
    batch_size: int = 32          # requests per forward pass
    bos: bool = True              # end-of-text first, as in training; False as lm-eval does GPT-2
    seed: int = 1234              # lm-eval's default: few-shot examples, sampled generations
    device: str = "auto"          # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"           # the weights' dtype: bfloat16 on GPUs that have it, or float32
    threads: int = 0              # CPU threads; 0 = torch's default


class Harness(LM):
    """model.py's GPT as an lm-eval model, which answers lists of a task's requests."""

    def __init__(self, model, tokenizer, cfg):
        super().__init__()
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.block, self.on = model.config.block_size, model.lm_head.weight.device
        self.generator = torch.Generator(self.on).manual_seed(cfg.seed)

    def tok_encode(self, text, add_special_tokens=True):
        """A request's text as ids, end-of-text first unless add_special_tokens or --bos is off."""
        try:
            ids = self.tokenizer.encode(text)
        except UserError as e:
            raise UserError(f"a request holds text that this checkpoint's tokenizer cannot encode: "
                            f"{e}") from e
        eot = self.tokenizer.eot_id
        return [eot] * (self.cfg.bos and add_special_tokens and ids[:1] != [eot]) + ids

    def loglikelihood(self, requests, disable_tqdm=False):
        """(log p(continuation | context), whether greedy decoding gives it) of each request, split
        into ids as lm-eval's hf backend does (trailing spaces go to the continuation)."""
        pairs = []
        for context, continuation in (r.args for r in requests):
            kept = context.rstrip()
            whole = self.tok_encode(context + continuation, add_special_tokens=bool(kept))
            start = len(self.tok_encode(kept)) if kept else 1
            if not kept and whole[:1] != [self.tokenizer.eot_id]:
                whole = [self.tokenizer.eot_id] + whole
            pairs.append((whole[:start], whole[start:]))
        return self.scored(pairs)

    @torch.no_grad()
    def scored(self, requests):
        """(log-probability, greedy) of each (context ids, continuation ids), longest first as in
        lm-eval's backends, each batch one forward pass over rows padded on the right (causal
        attention keeps padding out) that keep their last block_size + 1 ids, as lm-eval's hf."""
        from lm_eval.models.utils import Collator
        order = Collator(requests, sort_fn=lambda r: (-len(r[0]) - len(r[1]), tuple(r[0] + r[1])))
        answers = []
        for batch in order.get_batched(n=self.cfg.batch_size):
            longest = max(len(continuation) for _, continuation in batch)
            if longest > self.block:
                raise UserError(f"a continuation of {longest} tokens is longer than the model's "
                                f"context ({self.block}); this task needs a longer block_size")
            windows = [(context + continuation)[-(self.block + 1):] for context, continuation
                       in batch]
            inputs = torch.zeros(len(windows), max(map(len, windows)) - 1, dtype=torch.long)
            targets = torch.full_like(inputs, -1)
            for row, window in enumerate(windows):
                inputs[row, :len(window) - 1] = torch.tensor(window[:-1])
                targets[row, :len(window) - 1] = torch.tensor(window[1:])
            inputs, targets = inputs.to(self.on), targets.to(self.on)
            # with targets, forward returns the logits of every position (its loss goes unused);
            # probabilities over the ids the model can write, as generation and exports have them
            logits = self.model(inputs, targets)[0][..., :self.tokenizer.vocab_size]
            rows = []
            for row, (window, (_, continuation)) in enumerate(zip(windows, batch)):
                span = slice(len(window) - 1 - len(continuation), len(window) - 1)
                logprobs, target = logits[row, span].float().log_softmax(-1), targets[row, span]
                rows.append(torch.stack((logprobs.gather(-1, target[:, None]).sum(),
                                         (logprobs.argmax(-1) == target).all())))
            answers += [(logprob, bool(greedy)) for logprob, greedy in torch.stack(rows).tolist()]
        return order.get_original(answers)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, for perplexity, in lm-eval's windows of block_size
        that each predict new tokens only, with as much context as fits."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owners, eot = [], [], self.tokenizer.eot_id
        for index, (text,) in enumerate(r.args for r in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(ids, eot, self.block, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.scored(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Each continuation, greedy unless the task samples, up to its first stop sequence,
        end-of-text or max_gen_toks, one at a time (rows of different lengths need a padding mask
        that model.py does not take). A long context keeps its last tokens."""
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm
        answers = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="generating"):
            kwargs = normalize_gen_kwargs(gen_kwargs, 256)  # lm-eval's default max_gen_toks
            steps, until = kwargs["max_gen_toks"], [s for s in kwargs["until"] if s]
            ids = self.tok_encode(context)[-max(self.block - steps, self.block // 2):]
            new = []
            tokens = self.model.generate(torch.tensor([ids], device=self.on), steps,
                                         kwargs["temperature"], kwargs.get("top_k") or 0,
                                         kwargs.get("top_p") or 1.0, self.generator,
                                         vocab_size=self.tokenizer.vocab_size)
            for token in tokens:
                if token.item() == self.tokenizer.eot_id:
                    break
                new.append(token.item())
                if any(s in printable(self.tokenizer, new)[0] for s in until):
                    break
            text = printable(self.tokenizer, new)[0]
            answers.append(text[:min([text.index(s) for s in until if s in text],
                                     default=len(text))])
        return answers


def task_manager(tasks, include_path):
    """lm-eval's TaskManager over eval_tasks/ and --include_path, and over its own 14,000-odd tasks
    only when a task is not named there (indexing them takes a while); unknown tasks are refused."""
    paths = [TASKS_DIR] + ([include_path] if include_path else [])
    names = set()  # the task and group names that the YAML files declare
    for path in paths:
        for name in glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True):
            with open(name, encoding="utf-8") as f:
                names.update(re.findall(r"^(?:task|group):\s*([^\s#]+)", f.read(), flags=re.M))
    if not set(tasks) <= names:  # data from the Hub, perhaps: without a network, fail at once
        offline_unless_hub_reachable(",".join(tasks))
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=paths, include_defaults=not set(tasks) <= names)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = {t: ", ".join(difflib.get_close_matches(t, manager.all_tasks, n=3))
                 for t in unknown}
        hints = "; ".join(f"{t!r}: did you mean {close[t] or 'nothing close'}?" for t in unknown)
        raise UserError(f"unknown task {hints} (`lm-eval ls tasks` lists them all)")
    return manager


def main(argv, out=sys.stdout):
    cfg = configurator.build(EvalConfig, configurator.parse(argv, EvalConfig))
    configurator.check_at_least(cfg, limit=0, num_fewshot=-1, batch_size=1)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks=hellaswag,arc_easy")
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise UserError(f"--include_path={cfg.include_path} is not a folder; give a folder of "
                        "lm-eval YAML tasks")
    use_threads(cfg.threads)
    manager = task_manager(tasks, cfg.include_path)
    # the weights in one dtype (runtime.pick_dtype's), no autocast, as lm-eval's hf backend runs
    model, tokenizer, _ = load_model(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype)
    if not os.access(cfg.out_dir, os.W_OK):
        raise UserError(f"{cfg.out_dir} is not writable, so the results could not be saved there")
    harness = Harness(model, tokenizer, cfg)
    from lm_eval import simple_evaluate
    # a task built by a function (as ours is) makes lm-eval suggest its own CLI's --metadata
    logging.getLogger("lm_eval.api.task").addFilter(lambda r: "Custom kwargs" not in r.getMessage())
    start = time.perf_counter()
    try:
        results = simple_evaluate(model=harness, tasks=tasks, task_manager=manager,
                                  limit=cfg.limit or None,
                                  num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot,
                                  batch_size=cfg.batch_size, log_samples=False,
                                  random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                  torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    except ConnectionError as e:  # what datasets and huggingface_hub raise without the Hub
        raise UserError(f"a task's data set could not be fetched ({str(e).splitlines()[0]}): the "
                        "Hub's tasks need the network; --tasks=shakespeare_completion runs "
                        "offline") from e
    report(results, tasks, cfg, time.perf_counter() - start, out)
    return results


def report(results, tasks, cfg, seconds, out):
    """lm-eval's table (each metric with its standard error, from the spread over items: 30.6% ±
    1.5% says that 29.8% is no worse), the speed, and the results JSON in out_dir."""
    from lm_eval.utils import handle_non_serializable, make_table
    items = sum(n["effective"] for n in results["n-samples"].values())
    results["config"].update(model=os.path.join(cfg.out_dir, cfg.ckpt),
                             eval_config=dataclasses.asdict(cfg))
    path = os.path.join(cfg.out_dir, f"eval_{'+'.join(tasks)}.json")
    write_atomically(path, json.dumps(results, indent=2, default=handle_non_serializable))
    out.write(make_table(results) + "\n")
    if results.get("groups"):
        out.write(make_table(results, "groups") + "\n")
    out.write(f"{items} items in {seconds:.1f} s ({items / seconds:.1f} items/s); results in "
              f"{path}\n")


if __name__ == "__main__":
    configurator.run_script(main)
