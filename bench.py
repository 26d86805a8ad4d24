"""Speed comparisons behind RESULTS.md, each side by side with what it replaces.

    python bench.py                     # every row
    python bench.py --only=generation   # one row: speedrun or generation
    python bench.py --quick=True        # every row at a tiny size, in seconds (the tests)

speedrun: `python train.py config/speedrun_cpu.py` against nanoGPT's CPU recipe
(config/baseline_cpu.py) as whole commands, start-up and evaluation included: wall seconds, the
final validation loss of each (its log.jsonl) and the ratio of their seconds.
generation: tokens/s at batch 1 of model.generate (our KV cache) against transformers' generate on
the same weights, exported by hf.save_hf: a random 6 x 384 GPT-2-shaped model, context 1024,
vocabulary 65 (shakespeare_char's); speed does not depend on what the weights learned.
On a GPU, train.py's own log gives a run's tokens/s and MFU at every step.

The machine may be shared: each comparison alternates its two sides `rounds` times in one process
and prints every round, then the medians. Nothing here changes what a run computes.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch

from configurator import UserError
from files import read_log
from model import PRESETS, GPT, GPTConfig
from runtime import pick_device
from tokenizer import CharTokenizer


@dataclass
class BenchConfig:
    only: str = ""               # comma-separated rows; empty = all
    quick: bool = False          # tiny models and runs: checks that every row works, in seconds
    rounds: int = 3              # each comparison alternates its two sides this many times
    baseline: str = "config/baseline_cpu.py"   # speedrun: nanoGPT's recipe...
    speedrun: str = "config/speedrun_cpu.py"   # ...against ours, each a train.py config
    train_args: str = ""         # speedrun: --key=value overrides for both commands
    new_tokens: int = 1000       # generation: tokens per round and side
    device: str = "auto"         # generation: where it runs


GENERATION_MODEL = dict(PRESETS["classic"], bias=False, n_layer=6, n_head=6, n_embd=384,
                        block_size=1024, vocab_size=65)
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)
QUICK_TRAIN = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
               "--max_iters=4", "--eval_iters=1", "--warmup_iters=1", "--compile=False"]


def medians(times):
    return {side: statistics.median(values) for side, values in times.items()}


def speedrun_row(cfg):
    """Whole `python train.py <config>` commands, baseline first, alternated for cfg.rounds."""
    sides = {"baseline": cfg.baseline, "speedrun": cfg.speedrun}
    extra = cfg.train_args.split() + QUICK_TRAIN * cfg.quick
    seconds, losses = {side: [] for side in sides}, {}
    print(f"speedrun: python train.py CONFIG {' '.join(extra)}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, cfg.rounds + 1):
            for side, config in sides.items():
                out_dir = os.path.join(tmp, side)
                command = [sys.executable, os.path.join(configurator.ROOT, "train.py"), config,
                           *extra, f"--out_dir={out_dir}", "--overwrite=True"]
                start = time.perf_counter()
                done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
                seconds[side].append(time.perf_counter() - start)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    raise UserError(f"python train.py {config} failed: {last}")
                evals = [r for r in read_log(out_dir) if r.get("val_loss") is not None]
                losses[side] = evals[-1]["val_loss"]
                print(f"  round {round_} {side:<9} {config:<28} {seconds[side][-1]:8.1f} s  "
                      f"val loss {losses[side]:.4f}", flush=True)
    mid = medians(seconds)
    ratio = mid["speedrun"] / mid["baseline"]
    for side in sides:
        print(f"  median {side:<9} {mid[side]:8.1f} s  val loss {losses[side]:.4f}")
    print(f"  speedrun / baseline seconds: {ratio:.3f}")
    return dict(seconds=mid, val_loss=losses, ratio=ratio)


def generation_row(cfg):
    """model.generate against transformers' generate, the same weights, alternated."""
    try:
        from hf import save_hf
        import transformers  # noqa: F401  (an extra, not in the Quick start)
    except ImportError as e:
        raise UserError(f"the generation row needs transformers ({e.name} is missing): "
                        "pip install transformers") from e
    device = pick_device(cfg.device)
    config = GPTConfig(**dict(GENERATION_MODEL, **(TINY if cfg.quick else {})))
    new_tokens = min(cfg.new_tokens, 16) if cfg.quick else cfg.new_tokens
    torch.manual_seed(0)
    model = GPT(config).eval()
    # 64 characters and the end-of-text token: the 65 rows of the model's vocabulary
    tok = CharTokenizer(dict(kind="char", chars="".join(chr(33 + i) for i in range(64))))
    with tempfile.TemporaryDirectory() as folder:
        theirs = save_hf(model, tok, {}, folder)[0].to(device).eval()
    model.to(device)
    prompt = torch.full((1, 1), tok.eot_id, dtype=torch.long, device=device)

    def ours(n):
        generator = torch.Generator(device=device).manual_seed(0)
        return sum(1 for _ in model.generate(prompt, n, temperature=0.8, top_k=200,
                                             generator=generator, vocab_size=tok.vocab_size))

    def transformers_generate(n):
        torch.manual_seed(0)
        with torch.no_grad():
            out = theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                                  top_k=200, temperature=0.8, pad_token_id=tok.eot_id)
        return out.size(1) - prompt.size(1)

    sides = {"ours": ours, "transformers": transformers_generate}
    for generate in sides.values():  # warm-up: first calls allocate and pick kernels
        generate(8)
    rates = {side: [] for side in sides}
    print(f"generation: {config.n_layer} x {config.n_embd}, context {config.block_size}, "
          f"vocabulary {config.vocab_size}, {new_tokens} tokens, batch 1, {device.type}, "
          f"{torch.get_num_threads()} threads")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for round_ in range(1, cfg.rounds + 1):
        for side, generate in sides.items():
            synchronize()
            start = time.perf_counter()
            n = generate(new_tokens)
            synchronize()
            rates[side].append(n / (time.perf_counter() - start))
            print(f"  round {round_} {side:<13} {rates[side][-1]:10.1f} tokens/s", flush=True)
    mid = medians(rates)
    for side in sides:
        print(f"  median {side:<13} {mid[side]:10.1f} tokens/s")
    ratio = mid["ours"] / mid["transformers"]
    print(f"  ours / transformers tokens/s: {ratio:.2f}")
    return dict(tokens_per_sec=mid, ratio=ratio, new_tokens=new_tokens)


BENCHMARKS = {"speedrun": speedrun_row, "generation": generation_row}


def main(argv):
    cfg = configurator.build(BenchConfig, configurator.parse(argv, BenchConfig))
    configurator.check_at_least(cfg, rounds=1, new_tokens=1)
    names = [name for name in cfg.only.split(",") if name]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown row {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = names or list(BENCHMARKS)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    return {name: BENCHMARKS[name](cfg) for name in names}


if __name__ == "__main__":
    configurator.run_script(main)
