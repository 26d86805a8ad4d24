"""Speed measurements behind the numbers in RESULTS.md, one function per benchmark.

    python bench.py                                       # every benchmark, default model and settings
    python bench.py config/gpt_51m.py --only=training     # a recipe's model, batch, optimizer and dtype
    python bench.py --only=generation --json=bench.json   # also write the results as JSON
    python bench.py --only=speedrun                       # the CPU speedrun against its baseline, whole commands
    python bench.py --only=speedrun --busy=1              # the same beside a process that keeps one core busy
    python bench.py --only=serving                        # serve.py's first token with and without kept caches
    python bench.py --suite=gpu --json=gpu.json           # every GPU target of issue #17 in one call of 7.5 minutes

Config files and --key=value set any key of train.py (model shape, batch_size, optimizer, dtype, compile,
peak_tflops), of sample.py (dtype, threads, temperature, top_k) and the BenchConfig keys below.

training: tokens/s and MFU of forward + backward + optimizer step as train.py runs them (autocast dtype,
gradient clipping, torch.compile when train.py would use it) on one micro-batch of batch_size x block_size
random tokens per step, after warm-up steps, the median of timed steps, the device synchronised around
each. The vocabulary is the config's prepared dataset's, or GPT-2's when data/<dataset> is not prepared.
MFU = model.flops_per_token() x tokens/s / the device's peak (runtime.mfu and runtime.peak_flops); a CPU
has no peak in the table, so MFU is n/a unless --peak_tflops is given. Accumulation (batch_tokens) is left out: it repeats
the same micro-step. --profile_steps=N then runs N more steps under torch.profiler and lists the operations
with the most time of their own per step (GPU time on a GPU); a compiled step shows its generated kernels.

generation: tokens/s generating new_tokens tokens at batch 1, by default from a randomly initialised model
of issue #5's shape (6 layers, 384 wide, 6 heads, context 1024, vocabulary 65 as shakespeare_char; model
keys replace it with the config's model). Weights are random: speed does not depend on what they learned.
  KV cache            exactly sample.py's path: sample.sample with sample.py's dtype and decoding settings
  KV cache (plain)    the same with float32 weights and torch's default threads and attention kernel
  recompute, nanoGPT  nanoGPT's way: crop to block_size, full forward, sample from the last logits, every
                      token; float32, torch's default threads and attention kernel
  recompute, same     the same recompute under sample.py's dtype and decoding settings (like for like)
  transformers        Hugging Face transformers' own generate, with its cache, on the same model exported by
                      export.to_hf (GPT-2's architecture only); float32, torch's default threads
  python sample.py    the whole command on the same model saved as a run: start-up, loading, new_tokens tokens;
                      its speed-up is against the recompute's generation alone, nanoGPT's start-up not counted
The KV-cache and transformers rows are the median of `repeats` runs; each recompute row is one run (it takes minutes).

prepare: MB/s (UTF-8 bytes of text per second) of `prepare.main` end to end (reading, tokenizer vocabulary
or training pass, encoding with one process per CPU, writing .bin files) on the built-in Shakespeare plays
repeated or cut to prepare_mb megabytes, in a temporary directory; and of the tokenizer alone, its encode
over the same text in 1 MB pieces in one process. prepare_tokenizers takes prepare.py's --tokenizer
values: char, sp, gpt2 (tiktoken's download; n/a offline) or a local .tiktoken ranks file.

speedrun (only with --only=speedrun): `python train.py <command>` for each of `speedrun`'s comma-separated
commands (a config file, then any --key=value overrides), the baseline first, one after the other: the wall
clock of the whole command, the final and the best validation loss, and with speedrun_target, when each run
first reached it (train.py's own clock, which starts after start-up and data loading but includes
compilation). speedrun_limit stops a command after that many seconds and reports how far it got. Issue #8's
CPU speedrun is the default pair; the GPU one is --speedrun=config/shakespeare_char.py,config/speedrun_gpu.py
--speedrun_target=1.47. --busy=N runs the commands beside N processes that each keep a core busy, as on a
shared machine: with --threads=0 (measured) and --threads=N (pinned) it shows what the thread count is worth.

host_syncs (only with --only=host_syncs): how often train.py's own loop makes the host wait for the GPU per step
(a loss read back, a check of a device value), and from which line: train.main on the config's prepared
dataset, counted under torch.cuda.set_sync_debug_mode; n/a on a CPU.

--suite=gpu (GPU_SUITE): the GPT-2 small shape's training MFU (classic preset, bf16, compiled), the MoE of
config/moe_150m_ko.py against its dense twin (the same active width; the ratio of their MFU), host_syncs on
the GPU speedrun's config and the speedrun's whole command, each a bench.py child stopped at its time budget,
then the figures against issue #17's targets. The speedrun's data is prepared from
data/tinyshakespeare_char/input.txt (the device machine is offline; else those two parts are skipped).
--tiny=True runs it all at a tiny size, on a CPU in seconds.

serving (only with --only=serving): time to first token of each message of a conversation that fills most of
the context (serve_turns messages, each twice as long as its reply), streamed from `python serve.py` on the
generation benchmark's model saved as a chat run, against the same server with --cache_mb=0, which keeps no
cache, so that every message prefills the whole conversation; one request to each in turn, greedy, over HTTP
on localhost. The time runs from sending the request to the first chunk of the reply.
"""

import collections
import contextlib
import copy
import dataclasses
import http.client
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

import configurator  # first: Ctrl-C during the imports is one line
import torch

import prepare
import sample
import train
from configurator import UserError
from model import GPT, GPTConfig, PRESETS, sample_token
from sample import SampleConfig
from tokenizer import CharTokenizer, chat_template, load_tokenizer
from runtime import CHECKPOINT_VERSION, compile_wanted, cpu_name, mfu, peak_flops, pick_device, precision
from train import MODEL_KEYS, TrainConfig, build_model_config, make_optimizers, precision_probe

TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class BenchConfig:
    only: str = ""                  # comma-separated benchmark names; empty = all
    json: str = ""                  # also write the results to this file
    repeats: int = 3                # generation (KV cache) and prepare: the median of this many runs
    new_tokens: int = 1000          # generation: tokens generated by each method
    warmup_steps: int = 3           # training: untimed steps first (allocator, kernels, compilation)
    timed_steps: int = 10           # training: the median step time of these
    profile_steps: int = 0          # training: then profile this many steps and list where their time went
    prepare_mb: float = 5.0         # prepare: megabytes of text
    prepare_tokenizers: str = "char,gpt2"  # prepare: prepare.py --tokenizer values, comma-separated
    speedrun: str = "config/baseline_cpu.py,config/speedrun_cpu.py"  # speedrun: the baseline, then the contender(s), each
                                                                     # a config file and optional --key=value overrides
    speedrun_target: float = 0.0    # speedrun: also report when each run's validation loss first reached this
    speedrun_limit: float = 0.0     # speedrun: stop a command after this many seconds; 0 = no limit
    busy: int = 0                   # speedrun: this many busy single-thread processes run beside the commands (a shared CPU)
    serve_turns: int = 10           # serving: messages in the conversation
    sync_steps: int = 10            # host_syncs: the longer of its two train.py runs takes this many more steps
    suite: str = ""                 # "gpu": the GPU suite (GPU_SUITE below) instead of --only's benchmarks
    tiny: bool = False              # the suite at a tiny size, to check it on a CPU in seconds


GENERATION_MODEL = dict(PRESETS["classic"], bias=False, n_layer=6, n_head=6, n_embd=384, block_size=1024, vocab_size=65)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_training(cfg, tcfg, scfg, overrides, device):
    vocab, vocab_source = prepare.dataset_vocab(tcfg.dataset, gpt2_fallback=True)
    model_cfg = build_model_config(tcfg, overrides, vocab)
    torch.manual_seed(tcfg.seed)
    model = GPT(model_cfg).to(device)
    optimizers = make_optimizers(model, tcfg, device)
    dtype, autocast, scaler = precision(tcfg.dtype, device, *precision_probe(model, tcfg.batch_size, device))
    compile_on = compile_wanted(tcfg.compile, device)
    forward = torch.compile(model) if compile_on else model
    B, T = tcfg.batch_size, model_cfg.block_size
    data = torch.randint(vocab, (B, T + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]

    def step():  # train.py's micro-step and optimizer step, without its bookkeeping
        with autocast:
            _, loss = forward(x, y)
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf"))
        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        model.update_moe_bias()

    for _ in range(cfg.warmup_steps):
        step()
    seconds = statistics.median(timed(step, device) for _ in range(cfg.timed_steps))
    profile = profile_step(step, device, cfg.profile_steps) if cfg.profile_steps else None
    tok_per_sec = B * T / seconds
    utilization = mfu(model.flops_per_token(), tok_per_sec, peak_flops(device, tcfg.peak_tflops))
    params = model.param_counts()["total"]
    print(f"training: {params / 1e6:.2f}M parameters ({model_cfg.n_layer} x {model_cfg.n_embd}, vocabulary "
          f"{model_cfg.vocab_size} from {vocab_source}), {tcfg.optimizer}, batch {B} x {T}, {device.type}, "
          f"{str(dtype)[6:]}, compile {compile_on}, {torch.get_num_threads()} threads")
    print(f"  {'tokens/s':<22}{tok_per_sec:>12,.0f}   (median of {cfg.timed_steps} steps, {seconds:.3f} s/step)")
    print(f"  {'model TFLOP/s':<22}{model.flops_per_token() * tok_per_sec / 1e12:>12.3f}   (flops_per_token x tokens/s)")
    print(f"  {'MFU':<22}{f'{100 * utilization:.1f}%' if utilization is not None else 'n/a (no known peak; set --peak_tflops)':>12}")
    if profile:
        print(f"  where a step's time went ({'GPU' if device.type == 'cuda' else 'CPU'} time, the median step "
              f"{1e3 * seconds:.1f} ms; {cfg.profile_steps} profiled steps):")
        for op in profile:
            print(f"    {op['ms_per_step']:8.2f} ms  {op['calls_per_step']:6.0f} calls  {op['name'][:80]}")
    return dict(profile=profile, model=dataclasses.asdict(model_cfg), params=params, batch_size=B, block_size=T, device=device.type,
                dtype=str(dtype)[6:], compile=compile_on, threads=torch.get_num_threads(), seconds_per_step=seconds,
                tok_per_sec=tok_per_sec, flops_per_token=model.flops_per_token(), mfu=utilization)


def profile_step(step, device, steps, rows=15):
    """torch.profiler over `steps` calls of step: the operations with the most time of their own (GPU time on
    a GPU, CPU time elsewhere), per step. Compiled steps show the generated kernels by name."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as profiler:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    own_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)  # noqa: E731
    events = sorted(profiler.key_averages(), key=own_time, reverse=True)[:rows]
    return [dict(name=e.key, ms_per_step=own_time(e) / 1e3 / steps, calls_per_step=e.count / steps) for e in events]


@torch.no_grad()
def bench_generation(cfg, tcfg, scfg, overrides, device):
    if overrides.keys() & MODEL_KEYS:
        model_cfg = build_model_config(tcfg, overrides, prepare.dataset_vocab(tcfg.dataset, gpt2_fallback=True)[0])
    else:
        model_cfg = GPTConfig(**GENERATION_MODEL)
    torch.manual_seed(tcfg.seed)
    plain = GPT(model_cfg).to(device).eval()
    dtype = sample.decoding_dtype(scfg.dtype, device)
    tuned = copy.deepcopy(plain).to(dtype)
    # a char tokenizer over the whole vocabulary, so that every id decodes as sample.py decodes its text
    tokenizer = CharTokenizer({"kind": "char", "chars": "".join(chr(32 + i) for i in range(model_cfg.vocab_size - 1))})
    block, n, default_threads = model_cfg.block_size, cfg.new_tokens, torch.get_num_threads()
    settings = lambda: sample.decoding(tuned, scfg.threads)  # noqa: E731
    with settings():
        threads = torch.get_num_threads()

    def kv_cache(model, steps, context):
        with context():
            sample.sample(model, tokenizer, dataclasses.replace(scfg, prompt="", num_samples=1, max_new_tokens=steps),
                          io.StringIO())

    def recompute(model, steps, context):
        generator = torch.Generator(device).manual_seed(scfg.seed)
        idx = torch.full((1, 1), tokenizer.eot_id, device=device)
        with context(), torch.no_grad():  # as nanoGPT's generate
            for _ in range(steps):
                logits, _ = model(idx[:, -block:])
                token = sample_token(logits[:, -1], scfg.temperature, scfg.top_k, scfg.top_p, generator)
                idx = torch.cat((idx, token[:, None]), dim=1)

    def transformers_generate(model, steps, context):
        torch.manual_seed(scfg.seed)  # transformers samples from torch's global generator
        idx = torch.full((1, 1), tokenizer.eot_id, device=device)
        model.generate(idx, max_new_tokens=steps, min_new_tokens=steps, do_sample=scfg.temperature > 0,
                       temperature=scfg.temperature or None, top_k=scfg.top_k or None, pad_token_id=tokenizer.eot_id)

    name = lambda d, t: f"{str(d)[6:]}, {t} thread{'s' * (t > 1)}"  # noqa: E731
    plain_threads = name(torch.float32, default_threads)
    rows = [("kv_cache", "KV cache (sample.py)", name(dtype, threads), kv_cache, tuned, settings, cfg.repeats),
            ("kv_cache_plain", "KV cache (plain)", plain_threads, kv_cache, plain, contextlib.nullcontext, cfg.repeats),
            ("recompute", "recompute (nanoGPT)", plain_threads, recompute, plain, contextlib.nullcontext, 1),
            ("recompute_same", "recompute (same)", name(dtype, threads), recompute, tuned, settings, 1)]
    if model_cfg.pos_emb == "learned" and model_cfg.mlp == "gelu" and not model_cfg.moe_experts:  # GPT-2's shape
        from export import to_hf
        rows.append(("transformers", "transformers generate", plain_threads, transformers_generate,
                     to_hf(plain, "gpt2"), contextlib.nullcontext, cfg.repeats))
    result = dict(new_tokens=n, model=dataclasses.asdict(model_cfg), device=device.type)
    print(f"generation: {n} new tokens, batch 1, {model_cfg.n_layer} layers x {model_cfg.n_embd}, context {block}, "
          f"vocabulary {model_cfg.vocab_size}, {device.type}")
    for key, label, how, method, model, context, repeats in rows:
        method(model, 8, context)  # warm up the allocator and kernels
        result[f"{key}_tok_per_sec"] = n / statistics.median(timed(lambda: method(model, n, context), device)
                                                             for _ in range(repeats))
        result[f"{key}_settings"] = how
        print(f"  {label:<22}{result[f'{key}_tok_per_sec']:>12.1f} tok/s   {how}")
    result.update(sample_command(plain, tokenizer, n, scfg))
    print(f"  {'python sample.py':<22}{result['sample_command_seconds']:>12.1f} s       the whole command, start-up included")
    result["speedup"] = result["kv_cache_tok_per_sec"] / result["recompute_tok_per_sec"]
    result["speedup_same_settings"] = result["kv_cache_tok_per_sec"] / result["recompute_same_tok_per_sec"]
    result["speedup_whole_command"] = n / result["recompute_tok_per_sec"] / result["sample_command_seconds"]
    print(f"  {'speed-up vs nanoGPT':<22}{result['speedup']:>12.1f}x")
    print(f"  {'speed-up like for like':<22}{result['speedup_same_settings']:>12.1f}x")
    print(f"  {'whole sample.py':<22}{result['speedup_whole_command']:>12.1f}x   against the recompute's generation alone")
    return result


def sample_command(model, tokenizer, new_tokens, scfg):
    """Seconds of `python sample.py` generating new_tokens from `model` saved as a run, start-up included."""
    with tempfile.TemporaryDirectory() as run_dir:
        torch.save(dict(version=CHECKPOINT_VERSION, model=model.state_dict(), model_config=dataclasses.asdict(model.config),
                        config={}, tokenizer=tokenizer.spec, state=dict(step=0)), os.path.join(run_dir, "ckpt.pt"))
        command = [sys.executable, os.path.join(configurator.ROOT, "sample.py"), f"--out_dir={run_dir}",
                   f"--max_new_tokens={new_tokens}", f"--seed={scfg.seed}", f"--dtype={scfg.dtype}",
                   f"--threads={scfg.threads}", f"--temperature={scfg.temperature}", f"--top_k={scfg.top_k}"]
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise UserError(f"python sample.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return dict(sample_command_seconds=seconds)


def corpus(megabytes):
    """The built-in Shakespeare plays, repeated or cut (after a newline) to about `megabytes` of UTF-8."""
    plays = "".join(prepare.markdown_play_to_text(open(p, encoding="utf-8").read()) for p in prepare.shakespeare_plays())
    size = max(int(megabytes * 1e6), 1)
    text = plays * -(-size // len(plays.encode("utf-8")))
    text = text.encode("utf-8")[:size].decode("utf-8", "ignore")
    return text[:text.rfind("\n") + 1] or text


def bench_prepare(cfg, tcfg, scfg, overrides, device):
    text, results = corpus(cfg.prepare_mb), {}
    nbytes = len(text.encode("utf-8"))
    print(f"prepare: {nbytes / 1e6:.2f} MB of text, {os.cpu_count()} CPUs")
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        for name in filter(None, cfg.prepare_tokenizers.split(",")):
            argv = ["--source=corpus.txt", "--dataset=bench", "--force",
                    f"--tokenizer={os.path.abspath(name) if os.path.isfile(name) else name}"]
            os.chdir(tmp)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    prepare.main(argv)  # once untimed: fails fast when the tokenizer cannot load (gpt2 offline)
                    seconds = statistics.median(timed(lambda: prepare.main(argv), device) for _ in range(cfg.repeats))
                    meta = prepare.load_meta("data/bench")
                    tokenizer = load_tokenizer(meta["tokenizer"])
                    pieces = list(prepare.read_text("corpus.txt", "replace", [0]))
                    alone = statistics.median(timed(lambda: [tokenizer.encode(p) for p in pieces], device)
                                              for _ in range(cfg.repeats))
            except UserError as e:
                print(f"  {name:<22}{'n/a':>12}   {str(e)[:100]}")
                results[name] = dict(skipped=str(e))
                continue
            finally:
                os.chdir(here)
            results[name] = dict(prepare_mb_per_sec=nbytes / seconds / 1e6, tokenizer_mb_per_sec=nbytes / alone / 1e6,
                                 tokens=meta["train_tokens"] + meta["val_tokens"], vocab_size=meta["vocab_size"])
            print(f"  {os.path.basename(name):<22}{results[name]['prepare_mb_per_sec']:>9.1f} MB/s prepare.py, "
                  f"{results[name]['tokenizer_mb_per_sec']:.1f} MB/s tokenizer alone "
                  f"({results[name]['tokens']:,} tokens, vocabulary {meta['vocab_size']:,})")
    return dict(megabytes=nbytes / 1e6, cpus=os.cpu_count(), tokenizers=results)


def bench_speedrun(cfg, tcfg, scfg, overrides, device):
    """Whole `python train.py <command>` runs, one after the other, as a user runs them: wall clock with
    start-up, compilation and evaluation, and the validation losses in the run's log.jsonl. The data must be
    prepared first (python prepare.py <config>)."""
    runs = []
    print("speedrun: whole train.py commands, one after the other" + f", beside {cfg.busy} busy process(es)" * (cfg.busy > 0))
    with busy_processes(cfg.busy):
        for command in cfg.speedrun.split(","):
            runs.append(speedrun_command(command, cfg, runs[0]["seconds"] if runs else None))
    return dict(runs=runs, busy=cfg.busy)


@contextlib.contextmanager
def busy_processes(count):
    """`count` processes that each keep one core busy, as other work on a shared machine does, until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def speedrun_command(command, cfg, baseline_seconds):
    """One whole `python train.py <command>`: its wall clock and the validation losses of its log."""
    args = command.split()
    out_dir = configurator.build(TrainConfig, configurator.parse(args, TrainConfig, GPTConfig)).out_dir
    start, started_at, stopped = time.perf_counter(), time.time(), False
    try:
        command_line = [sys.executable, os.path.join(configurator.ROOT, "train.py"), *args,
                        "--overwrite=True"]  # a speedrun run again starts each run over in its out_dir
        done = subprocess.run(command_line,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=cfg.speedrun_limit or None)
        if done.returncode:
            raise UserError(f"python train.py {command} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    except subprocess.TimeoutExpired:
        stopped = True
    seconds = time.perf_counter() - start
    log_path, evals = os.path.join(out_dir, "log.jsonl"), []
    if os.path.exists(log_path) and os.path.getmtime(log_path) >= started_at:  # not an earlier run's log
        with open(log_path) as f:  # a command stopped at the limit may have left its last line half-written
            evals = [r for r in (json.loads(line) for line in f if line.endswith("\n")) if "val_loss" in r]
    if not evals:
        print(f"  {command}\n    {seconds:7.1f} s: stopped at the limit before its first evaluation")
        return dict(command=command, seconds=seconds, stopped_at_limit=stopped)
    best = min(evals, key=lambda record: record["val_loss"])
    reached = next((r for r in evals if cfg.speedrun_target and r["val_loss"] <= cfg.speedrun_target), None)
    share = f"{100 * seconds / baseline_seconds:.0f}% of the baseline" if baseline_seconds else "baseline"
    print(f"  {command}\n    {seconds:7.1f} s{' (stopped at the limit)' if stopped else ''} ({share}): val loss "
          f"{evals[-1]['val_loss']:.4f} at step {evals[-1]['step']:,}, best {best['val_loss']:.4f} at step "
          f"{best['step']:,} ({best['elapsed']:.1f} s into training)")
    if cfg.speedrun_target:
        print(f"    reached {cfg.speedrun_target:g} at step {reached['step']:,}, {reached['elapsed']:.1f} s into training"
              if reached else f"    did not reach {cfg.speedrun_target:g}")
    return dict(command=command, seconds=seconds, stopped_at_limit=stopped, val_loss=evals[-1]["val_loss"],
                steps=evals[-1]["step"], best_val_loss=best["val_loss"], best_step=best["step"],
                best_elapsed=best["elapsed"], target_elapsed=reached["elapsed"] if reached else None)


def bench_host_syncs(cfg, tcfg, scfg, overrides, device):
    """Host synchronisations per step of train.py's own loop (a loss read back, a check of a device value): two
    short runs of train.main on the config's prepared dataset, sync_steps apart in length, each counted under
    torch.cuda.set_sync_debug_mode("warn"); their difference over sync_steps leaves out what both pay once
    (setup, compilation, the first and last evaluation, the last log line). CUDA only: on a CPU nothing waits."""
    train_args = [f"--{key}={value!r}" for key, value in overrides.items() if key in TRAIN_KEYS | MODEL_KEYS]
    runs = []
    with tempfile.TemporaryDirectory() as out_dir:
        for steps in (cfg.sync_steps, 2 * cfg.sync_steps):
            argv = train_args + [f"--out_dir={out_dir}", "--overwrite=True", f"--max_iters={steps}",
                                 f"--eval_interval={steps}", f"--log_interval={steps}", "--eval_iters=1",
                                 "--sample_tokens=0", "--target_loss=0", "--early_stop_patience=0", "--max_seconds=0",
                                 "--max_tokens=0", "--max_flops=0"]
            with contextlib.redirect_stdout(io.StringIO()):
                start = time.perf_counter()
                sites = count_syncs(lambda: train.main(argv), device)
            runs.append((time.perf_counter() - start, sites))
    (short_seconds, short), (long_seconds, long) = runs
    per_step = {site: (long[site] - short[site]) / cfg.sync_steps for site in long if long[site] > short[site]}
    result = dict(counted=device.type == "cuda", device=device.type, steps=[cfg.sync_steps, 2 * cfg.sync_steps],
                  syncs_per_step=sum(per_step.values()), sites_per_step=per_step,
                  seconds_per_step=(long_seconds - short_seconds) / cfg.sync_steps)
    print(f"host_syncs: train.py's loop, runs of {cfg.sync_steps} and {2 * cfg.sync_steps} steps, {device.type}")
    if not result["counted"]:
        print("  n/a: the CPU runs the work itself; only a GPU makes the host wait")
    print(f"  {'syncs per step':<22}{result['syncs_per_step']:>12.1f}   "
          f"({1e3 * result['seconds_per_step']:.1f} ms per step, the runs' difference)")
    for site, count in sorted(per_step.items(), key=lambda item: -item[1]):
        print(f"    {count:6.1f}  {site[:110]}")
    return result


def count_syncs(work, device):
    """{site: host synchronisations} while work() runs, each at the innermost line of this repository's code on
    the stack (with torch's own line under it when the call is inside torch). Empty off CUDA."""
    sites = collections.Counter()

    def record(message, *args, **kwargs):  # warnings.showwarning's signature; runs where the warning is raised
        if "synchronizing" in str(message):
            stack = [frame for frame in traceback.extract_stack() if frame.filename != warnings.__file__]
            sites[sync_site(stack[:-1])] += 1  # without this function and the warnings module's own frames

    if device.type != "cuda":
        work()
        return sites
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def sync_site(stack):
    """'train.py:147 <its code>' for the innermost frame in this repository, and ' < torch/...:line' below it."""
    ours = [frame for frame in stack if frame.filename.startswith(configurator.ROOT + os.sep)]
    if not ours:
        return f"{stack[-1].filename}:{stack[-1].lineno}"
    site = f"{os.path.relpath(ours[-1].filename, configurator.ROOT)}:{ours[-1].lineno} {(ours[-1].line or '').strip()}"
    inner = stack[-1]
    return site if inner is ours[-1] else f"{site} < {inner.filename.split('site-packages' + os.sep)[-1]}:{inner.lineno}"


def bench_serving(cfg, tcfg, scfg, overrides, device):
    if overrides.keys() & MODEL_KEYS:
        model_cfg = build_model_config(tcfg, overrides, prepare.dataset_vocab(tcfg.dataset, gpt2_fallback=True)[0])
    else:
        model_cfg = GPTConfig(**dict(GENERATION_MODEL, vocab_size=GENERATION_MODEL["vocab_size"] + 4))
    torch.manual_seed(tcfg.seed)
    model = GPT(model_cfg)
    # a char tokenizer that leaves four rows of the embedding to the chat template's special tokens
    tokenizer = CharTokenizer({"kind": "char", "chars": "".join(chr(32 + i) for i in range(model_cfg.vocab_size - 5))})
    reply_tokens = max(int(0.8 * model_cfg.block_size / cfg.serve_turns) // 3, 1)  # an exchange: 3x its reply, + markers
    rng = random.Random(tcfg.seed)
    messages = ["".join(rng.choices(tokenizer.chars, k=2 * reply_tokens)) for _ in range(cfg.serve_turns)]
    print(f"serving: {cfg.serve_turns} messages of {2 * reply_tokens} tokens, replies of up to {reply_tokens}, "
          f"{model_cfg.n_layer} layers x {model_cfg.n_embd}, context {model_cfg.block_size}, {device.type}")
    print(f"  {'context':>8}{'prefilled':>11}{'first token, kept cache':>26}{'no cache':>11}{'speed-up':>10}")
    rows, histories = [], ([], [])
    with tempfile.TemporaryDirectory() as run_dir:
        torch.save(dict(version=CHECKPOINT_VERSION, model=model.state_dict(), model_config=dataclasses.asdict(model_cfg),
                        config={}, tokenizer=tokenizer.spec, state=dict(step=0),
                        chat_template=chat_template(tokenizer, model_cfg.vocab_size)), os.path.join(run_dir, "ckpt.pt"))
        servers = [start_serve(run_dir, cache_mb, scfg) for cache_mb in (1024, 0)]  # both start at once
        try:
            ports = [port_of(process) for process in servers]
            for message in messages:
                answers = [first_token(port, history + [dict(role="user", content=message)], reply_tokens)
                           for port, history in zip(ports, histories)]
                for history, (_, text, _) in zip(histories, answers):
                    history += [dict(role="user", content=message), dict(role="assistant", content=text)]
                (kept, _, usage), (none, _, _) = answers
                rows.append(dict(context_tokens=usage["prompt_tokens"], kept_cache_seconds=kept, no_cache_seconds=none,
                                 prefilled=usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]))
                print(f"  {rows[-1]['context_tokens']:>8}{rows[-1]['prefilled']:>11}{1e3 * kept:>23.1f} ms"
                      f"{1e3 * none:>8.1f} ms{none / kept:>9.1f}x")
        finally:
            for process in servers:
                process.terminate()
                process.wait()
    return dict(model=dataclasses.asdict(model_cfg), device=device.type, turns=rows,
                speedup_last_turn=rows[-1]["no_cache_seconds"] / rows[-1]["kept_cache_seconds"])


def start_serve(run_dir, cache_mb, scfg):
    command = [sys.executable, os.path.join(configurator.ROOT, "serve.py"), f"--out_dir={run_dir}", "--port=0",
               f"--cache_mb={cache_mb}", f"--dtype={scfg.dtype}", f"--threads={scfg.threads}"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def port_of(process):
    """The port that a `python serve.py --port=0` listens on, once it says so."""
    lines = []
    for line in process.stderr:  # "serving <name> at http://127.0.0.1:<port>/ ..."
        if line.startswith("serving "):
            return int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
        lines.append(line)
    raise UserError(f"python serve.py failed: {(lines or ['?'])[-1].strip()}")


def first_token(port, messages, max_tokens):
    """Seconds from sending a streamed chat request to its first chunk, the reply's text, and its usage."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = dict(messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options=dict(include_usage=True))
    start, first, text, usage = time.perf_counter(), None, "", None
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    for line in connection.getresponse():
        if line.startswith(b"data: {"):
            first = first or time.perf_counter() - start
            chunk = json.loads(line[6:])
            text += "".join(choice["delta"].get("content") or "" for choice in chunk.get("choices", []))
            usage = chunk.get("usage") or usage
    connection.close()
    if usage is None:
        raise UserError(f"serve.py did not answer the chat request on port {port}")
    return first, text, usage


# The GPU suite (issue #17): every GPU target in one device call of at most 8 minutes (a 15-minute lease). Each
# part is a bench.py command of its own with a budget in seconds, run as a child process and stopped at it, so
# one slow compilation cannot take the other parts' time; the budgets add up to 7.5 minutes.
GPT2_SMALL = ["--preset=classic", "--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--vocab_size=50304",
              "--batch_size=32", "--dtype=bfloat16", "--compile=True", "--timed_steps=20"]
MOE = [os.path.join(configurator.ROOT, "config", "moe_150m_ko.py"), "--dtype=bfloat16", "--compile=True", "--timed_steps=20"]
DENSE_TWIN = ["--moe_experts=0", "--mlp_hidden=1536"]  # the MoE's active width: a shared and 2 routed experts of 512
SPEEDRUN_GPU = os.path.join(configurator.ROOT, "config", "speedrun_gpu.py")
GPU_SUITE = [("gpt2_small", 100, ["--only=training", *GPT2_SMALL]),
             ("moe", 100, ["--only=training", *MOE]),
             ("moe_dense_twin", 70, ["--only=training", *MOE, *DENSE_TWIN]),
             ("host_syncs", 50, ["--only=host_syncs", SPEEDRUN_GPU]),
             ("speedrun", 130, ["--only=speedrun", f"--speedrun={SPEEDRUN_GPU}", "--speedrun_target=1.47",
                                "--speedrun_limit=120"])]
# --tiny=True: every model 2 layers x 32 wide, few steps, float32 without compilation, and a peak for an MFU
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--moe_expert_hidden=16", "--dtype=float32", "--compile=False"]
TINY_SUITE = TINY_MODEL + ["--warmup_steps=1", "--timed_steps=2", "--sync_steps=2", "--peak_tflops=1.0",
                           f"--speedrun={SPEEDRUN_GPU} {' '.join(TINY_MODEL)} --max_iters=4 --eval_interval=2 --eval_iters=1"]


def run_gpu_suite(cfg):
    """The GPU suite's parts one after the other, then its headline figures; returns every result by part."""
    on_gpu = torch.cuda.is_available()
    results = dict(machine=dict(device=torch.cuda.get_device_name() if on_gpu else cpu_name(),
                                torch=torch.__version__, cuda=torch.version.cuda))
    print(f"GPU suite on {results['machine']['device']}, torch {torch.__version__}")
    data_ready = prepare_speedrun_data(SPEEDRUN_GPU)
    with tempfile.TemporaryDirectory() as tmp:
        for name, budget, argv in GPU_SUITE:
            if name in ("host_syncs", "speedrun") and not data_ready:
                results[name] = dict(skipped="data/tinyshakespeare_char/input.txt is missing")
                continue
            results[name] = run_part(name, budget, argv + TINY_SUITE * cfg.tiny, os.path.join(tmp, f"{name}.json"))
    results["summary"] = summarize(results)
    return results


def prepare_speedrun_data(config):
    """The speedrun's data, prepared from data/tinyshakespeare_char/input.txt (prepare.py downloads it only when
    asked to: a device machine is offline). False, said in one line, when input.txt is not there."""
    if not os.path.isfile(os.path.join("data", "tinyshakespeare_char", "input.txt")):
        print("speedrun and host_syncs: skipped, data/tinyshakespeare_char/input.txt is missing (copy tinyshakespeare there)")
        return False
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.main([config])
    return True


def run_part(name, budget, argv, json_path):
    """`python bench.py <argv>` stopped after `budget` seconds: its JSON's only benchmark, or why there is none."""
    print(f"\n[{name}] {budget} s at most: python bench.py {' '.join(argv)}", flush=True)
    command = [sys.executable, os.path.join(configurator.ROOT, "bench.py"), *argv, f"--json={json_path}"]
    start = time.perf_counter()
    part = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, errors = part.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(part.pid, 9)  # its group: compilation workers and the speedrun's train.py go with it
        part.wait()
        print(f"[{name}] stopped at its budget of {budget} s")
        return dict(stopped_at_budget=budget)
    if part.returncode:
        print(f"[{name}] failed: {(errors.strip().splitlines() or ['?'])[-1]}")
        return dict(failed=(errors.strip().splitlines() or ["?"])[-1])
    with open(json_path) as f:
        return dict(next(iter(json.load(f).values())), command_seconds=time.perf_counter() - start)


def summarize(results):
    """The suite's figures against issue #17's targets, printed and returned."""
    summary = {}
    gpt2, moe, dense, syncs, speedrun = (results.get(name, {}) for name in ("gpt2_small", "moe", "moe_dense_twin",
                                                                              "host_syncs", "speedrun"))
    if "mfu" in gpt2:
        summary["gpt2_small_mfu"] = gpt2["mfu"]
    if "tok_per_sec" in moe and "tok_per_sec" in dense:  # one device, one peak: the MFU ratio is the FLOP/s ratio
        summary["moe_mfu_vs_dense"] = (moe["flops_per_token"] * moe["tok_per_sec"]) / (dense["flops_per_token"] * dense["tok_per_sec"])
    if "syncs_per_step" in syncs:
        summary["host_syncs_per_step"] = syncs["syncs_per_step"]
    run = (speedrun.get("runs") or [{}])[0]
    if "seconds" in run:
        summary.update(speedrun_seconds=run["seconds"], speedrun_best_val_loss=run.get("best_val_loss"),
                       speedrun_target_elapsed=run.get("target_elapsed"))
    print("\nsummary (issue #17's targets):")
    for key, value in summary.items():
        print(f"  {key:<26}{value if value is None else f'{value:.4g}'}")
    print(f"  targets: gpt2_small_mfu >= 0.55, moe_mfu_vs_dense >= 0.60, speedrun <= 62 s to val <= 1.47")
    return summary


BENCHMARKS = {"training": bench_training, "generation": bench_generation, "prepare": bench_prepare,
              "speedrun": bench_speedrun, "serving": bench_serving,
              "host_syncs": bench_host_syncs}
# the speedrun and host_syncs need their data prepared (--only=speedrun); serving starts servers (--only=serving)
DEFAULT_BENCHMARKS = ["training", "generation", "prepare"]


def main(argv):
    overrides = configurator.parse(argv, BenchConfig, TrainConfig, SampleConfig, GPTConfig)
    cfg, tcfg, scfg = (configurator.build(c, overrides) for c in (BenchConfig, TrainConfig, SampleConfig))
    names = [name for name in cfg.only.split(",") if name] or DEFAULT_BENCHMARKS
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    configurator.check_at_least(cfg, repeats=1, new_tokens=1, timed_steps=1, warmup_steps=0, profile_steps=0,
                                speedrun_target=0, speedrun_limit=0, serve_turns=1, sync_steps=1, busy=0)
    if not cfg.prepare_mb > 0:
        raise UserError(f"--prepare_mb must be more than 0, got {cfg.prepare_mb}")
    for name in filter(None, cfg.prepare_tokenizers.split(",") if "prepare" in names else []):
        if name not in ("char", "sp", "gpt2") and not os.path.isfile(name):  # gpt2 offline is an n/a row, not this
            raise UserError(f"--prepare_tokenizers: {name!r} is neither char, sp, gpt2 nor a ranks file")
    if cfg.json:
        configurator.check_writable(cfg.json, "json")
    if cfg.suite not in ("", "gpu"):
        raise UserError(f"--suite must be gpu, got {cfg.suite!r}")
    results = run_gpu_suite(cfg) if cfg.suite else run_benchmarks(names, cfg, tcfg, scfg, overrides)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def run_benchmarks(names, cfg, tcfg, scfg, overrides):
    device = pick_device(tcfg.device)
    print(f"machine: {torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}, "
          f"torch {torch.__version__}")
    return {name: BENCHMARKS[name](cfg, tcfg, scfg, overrides, device) for name in names}


if __name__ == "__main__":
    configurator.run_script(main)
