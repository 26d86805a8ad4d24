"""What every script that runs a model shares: the device, the precision, the GPU's peak and MFU,
checkpoints written atomically and read back with one clear error, the training snapshot a resume restores,
the checks that let a run directory be resumed only by its own run, and torchrun's processes and the
stop signals. train.py, sft.py, sample.py,
export.py, bench.py and scaling.py import it; it imports only torch.
"""

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time

import torch

from configurator import UserError, locked_folder, temp_path

CHECKPOINT_VERSION = 1

# Peak dense bf16 tensor throughput in TFLOP/s from the vendors' data sheets (without sparsity).
# Matched in order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L40", 181),
               ("L4", 121), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125)]  # V100: fp16


def table_peak_tflops(gpu_name):
    """The table's peak for a GPU name (case-insensitive), or None when the table does not know it."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key.lower() in gpu_name.lower()), None)


def peak_flops(device, override_tflops):
    """Peak FLOP/s of one device, or None when unknown (MFU is then not printed, never guessed)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = table_peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Model FLOPs utilization (PaLM, appendix B): the model's FLOPs per second over the peak, a fraction;
    None when the peak is unknown, so that no guess is ever printed."""
    return flops_per_token * tokens_per_sec / peak_flops if peak_flops else None


# ----------------------------------------------------------------------------- device and precision

def pick_device(name):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
        available = dict(cuda=torch.cuda.is_available, mps=torch.backends.mps.is_available).get(device.type)
        if available and not available():
            raise UserError(f"device {name} is not available here (torch {torch.__version__}); use --device=auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device, use="train", step=None, shape=""):
    """The dtype for --dtype=name. "auto": bfloat16 on GPUs that have it, float16 on older GPUs, and on a CPU
    whichever of float32 and bfloat16 the probe below measured faster for this use (cpu_dtype)."""
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = cpu_dtype(use, step, shape) if device.type == "cpu" else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def precision(name, device, step=None, shape=""):
    """The dtype, the autocast context the forward pass runs under, and the gradient scaler: bf16 autocast
    and TF32 on GPUs that have them, fp16 with loss scaling on older GPUs, and on a CPU the faster of fp32
    and bf16 autocast as measured on step(dtype), a training step (pick_dtype)."""
    dtype = pick_dtype(name, device, "train", step, shape)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_to(dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling, bf16 does not
    return dtype, autocast, scaler


def compile_wanted(setting, device):
    """--compile: true/on/1, false/off/0, or "auto", which compiles on CUDA only: on a CPU the faster steps
    win back the compilation only in runs far longer than most CPU runs."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "on", "1", "false", "off", "0"):
        raise UserError(f"compile must be auto, true or false, got {setting!r}")
    return setting in ("true", "on", "1") or (setting == "auto" and device.type == "cuda")


def autocast_to(dtype, device):
    """The context that runs a forward pass in dtype: autocast, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the CPU probe
# Whether bf16 pays on a CPU cannot be read from its flags: with AVX512-BF16 one 2-core EPYC trained 2.5x faster in
# bf16, while a Xeon with AMX ran bf16 products 4x faster than fp32 yet trained a small model slower (the casts
# cost more than the products save); without native bf16 it is emulated, hundreds of times slower. So "auto" times
# the work itself, once per machine, torch version, thread count and shape (RESULTS.md).

# the dtypes a CPU chooses between, and the share of float32's time bf16 must beat to be chosen: a clear win
DTYPES = ("float32", "bfloat16")
BF16_MARGIN = 0.9
# (rows, inner, columns, threads) of the timed products when no training step is given: one token through a wide
# layer on one thread, as sample.py decodes; a hidden layer's worth on every core, as Muon orthogonalises
PROBE_SHAPES = dict(decode=(1, 1024, 2048, 1), product=(512, 128, 512, 0))
_reported = set()


def probe_cache_path():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "small-lm", "cpu_probe.json")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def time_each(work, options, repeats, warmups=2):
    """The best seconds of work(option) for each option, alternated, so that other work on the machine slows all
    alike. Each first runs `warmups` times untimed: oneDNN builds its kernels for a shape over the first calls
    (20 ms, then 1 ms, on the Xeon, for a product that then takes 0.06 ms). An option over 3x slower than the
    first after one timed call is given up on (an emulated bf16)."""
    best = dict.fromkeys(options, math.inf)
    for option in best:
        for _ in range(warmups):
            work(option)
    for _ in range(repeats):
        for option in best:
            if 3 * best[options[0]] < best[option] < math.inf:
                continue
            start = time.perf_counter()
            work(option)
            best[option] = min(best[option], time.perf_counter() - start)
    return best


def in_each_dtype(work):
    """work(dtype) as time_each's work over DTYPES, the dtypes' names."""
    return lambda name: work(getattr(torch, name))


def measure_product(use):
    """time_each of one PROBE_SHAPES product in each dtype: well under a second, even where bf16 is emulated."""
    m, k, n, threads = PROBE_SHAPES[use]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        return time_each(in_each_dtype(lambda dtype: torch.matmul(a.to(dtype), b.to(dtype))), DTYPES, repeats=20)
    finally:
        torch.set_num_threads(saved)


def cpu_dtype(use, step=None, shape=""):
    """"float32" or "bfloat16", whichever this CPU runs faster, from the cache (measured on first use), printed once
    per process. use "train" times step(dtype), one forward and backward of the model to train at its micro-batch
    (`shape` names it), unless bf16 products are not even faster alone; "decode" and "product" (and "train"
    without a step) time PROBE_SHAPES."""
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    entry = f"{use} {shape}".strip()
    path = probe_cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    times = cache.get(key, {}).get(entry)
    if times is None:
        with torch.random.fork_rng(devices=[]):  # a probed run and a cached one draw the same random numbers
            times = measure_product("product" if use == "train" else use)
            if use == "train" and step and times["bfloat16"] < times["float32"]:
                times = time_each(in_each_dtype(step), DTYPES, repeats=2, warmups=1)
        cache.setdefault(key, {})[entry] = times
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, json.dumps(cache, indent=1))
        except OSError:  # a read-only home: measure again next time
            pass
    choice = "bfloat16" if times["bfloat16"] < BF16_MARGIN * times["float32"] else "float32"
    if entry not in _reported:
        _reported.add(entry)
        print(f"cpu probe ({key}): {entry}: {1e3 * times['float32']:.2f} ms in float32, "
              f"{1e3 * times['bfloat16']:.2f} ms in bfloat16 -> {choice} (cached in {path})", file=sys.stderr)
    return choice


# ----------------------------------------------------------------------------- the CPU's threads
# How many threads run a small model fastest depends on what else the machine does, and that changes while a run goes
# on. On an idle 2-core EPYC two threads trained nanoGPT's CPU recipe 1.5x faster than one; beside one busy process,
# 2.4x slower, as each of the step's many small operations waited for the thread the other process held up. Waiting
# passively instead kept them even but cost the idle machine its 1.5x (RESULTS.md). So the count is measured, again
# and again, on the work itself, and OpenMP keeps its default wait policy.

class ThreadTuner:
    """torch's thread count on a CPU, chosen by timing the work: tick() once per unit of it (a training step, a decoded
    token). Once `units` units are timed at the current count, it times as many at the next rung of the ladder (all
    threads, half of them, ..., 1) and keeps the trial's count if that was clearly faster. A trial that loses waits 20
    times its length for the next, and each further loss doubles the wait up to 160, so that trials cost a few percent;
    a unit over twice the current count's time ends its trial at once. pinned > 0 fixes the count; off the CPU it does
    nothing. Sums split over another number of threads round differently (by about 1e-6), so runs repeat bit for bit
    only with a pinned count. A context manager: the count it found is undone on exit."""

    MARGIN = 0.9       # a trial must take under 90% of the current count's time to win
    FIRST_WAIT = 20    # after a lost trial, the next waits this many times its length, doubled at each further loss
    LAST_WAIT = 160    # up to this many, so that a change of load is still found within minutes
    GIVE_UP = 2.0      # a trial unit this many times slower than the current count's median ends the trial

    def __init__(self, device, pinned=0, unit="step", say=print, units=4, clock=time.perf_counter):
        if pinned < 0:
            raise UserError(f"threads must be at least 1, or 0 to measure the fastest count, got {pinned}")
        self.saved = torch.get_num_threads()
        if device.type == "cpu" and pinned:
            torch.set_num_threads(pinned)
        self.on = device.type == "cpu" and not pinned and self.saved > 1
        self.ladder = sorted({self.saved >> i for i in range(self.saved.bit_length())}, reverse=True)  # 8, 4, 2, 1
        self.unit, self.say, self.units, self.clock = unit, say, units, clock
        self.rung, self.trial, self.direction = 0, None, 1
        self.current, self.tried = [], []  # the latest timings at the current count, and at the trial's
        self.last = self.trial_start = None
        self.next_trial, self.wait, self.skip, self.reported = 0.0, self.FIRST_WAIT, 0, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)

    def begin(self):
        """Mark where a unit starts, where the time since the last tick is not the work's (a decoder's idle wait)."""
        self.last = self.clock()

    def tick(self):
        """Mark where a unit ends (and, without begin(), the next starts)."""
        now = self.clock()
        took, self.last = (now - self.last if self.last is not None else None), now
        if not self.on or took is None:
            return
        if self.skip:  # the first unit at a new count warms it up
            self.skip -= 1
        elif self.trial is None:
            self.current = (self.current + [took])[-self.units:]
            if len(self.current) == self.units and now >= self.next_trial:
                self.start_trial(now)
        else:
            self.tried.append(took)
            if len(self.tried) == self.units or took > self.GIVE_UP * median(self.current):
                self.end_trial(now)

    def start_trial(self, now):
        if not 0 <= self.rung + self.direction < len(self.ladder):
            self.direction = -self.direction
        self.trial, self.tried, self.trial_start = self.rung + self.direction, [], now
        self.set(self.trial)

    def end_trial(self, now):
        before, after = median(self.current), median(self.tried)
        counts, won = (self.ladder[self.rung], self.ladder[self.trial]), after < self.MARGIN * before
        if won or not self.reported:  # every change, and the first measurement
            self.say(f"threads: {counts[0]} -> {counts[1] if won else counts[0]} ({1e3 * before:.2f} ms a {self.unit} on "
                     f"{counts[0]}, {1e3 * after:.2f} on {counts[1]}; measured again as the run goes)")
            self.reported = True
        if won:  # keep it, and go on in the same direction at once if the ladder does
            self.rung, self.current, self.wait = self.trial, self.tried, self.FIRST_WAIT
            further = 0 <= self.rung + self.direction < len(self.ladder)
        else:  # back, and the next trial goes the other way where it can
            self.set(self.rung)
            self.direction, further = -self.direction, False
        self.next_trial = now if further else now + self.wait * (now - self.trial_start)
        self.wait = self.wait if won else min(2 * self.wait, self.LAST_WAIT)
        self.trial = None

    def set(self, rung):
        torch.set_num_threads(self.ladder[rung])
        self.skip = 1


def median(times):
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    replace_atomically(path, lambda f: torch.save(checkpoint, f), "wb")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...), or check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is corrupted or incomplete and cannot be loaded ({type(e).__name__}); "
                        f"best.pt beside it may still be good") from e
    if not isinstance(checkpoint, dict) or "version" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this code's train.py (a dict with version, model and "
                        "model_config); a Hugging Face model comes in through export.py --from_hf")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint.get('version')}, this code reads version {CHECKPOINT_VERSION}")
    return checkpoint


def load_init(init_from):
    """The checkpoint to start from: init_from/ckpt.pt for a run directory, else the file itself."""
    path = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from
    if not os.path.isfile(path):
        raise UserError(f"init_from: no checkpoint at {path}; give a run directory or a .pt file")
    return load_checkpoint(path)


def write_atomically(path, text):
    """Replace a text file whole: readers see the old file or the new one, never half of it."""
    replace_atomically(path, lambda f: f.write(text), "w")


def replace_atomically(path, write, mode):
    """write(file) into a temporary file of this process's own, flushed to the disk, then renamed over `path`.
    A failure (a full disk, a read-only folder) is one line, and leaves the previous file as it was."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous {os.path.basename(path)}, if any, "
                        "is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def training_snapshot(model, optimizers, scaler, sampler, device, **fields):
    """What a resumed run needs to continue exactly: full weights and optimizer state (gathered on every
    rank under FSDP, so call it on all of them), fp16's loss scale and every random generator's state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # half a second to import
    model_state, optim_state = get_state_dict(model, optimizers,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = dict(torch=torch.get_rng_state(), sampler=sampler.get_state(),
               cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
    return dict(version=CHECKPOINT_VERSION, model=model_state, optimizers=optim_state, scaler=scaler.state_dict(),
                rng=rng, **fields)


def restore_training(checkpoint, model, optimizers, scaler, sampler, device):
    """Load a training_snapshot back into the model, the optimizers, the loss scale and the generators. The
    optimizers' settings (learning rates, betas, weight decay) stay those they were built with: a resumed run
    applies its command's, and only the moments and step counts come from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    settings = [{key: value for key, value in group.items() if key != "params"}
                for opt in optimizers for group in opt.param_groups]
    # full_state_dict: the checkpoint holds whole tensors, which FSDP shards again as it loads them
    set_state_dict(model, optimizers, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizers"],
                   options=StateDictOptions(full_state_dict=True))
    for group, setting in zip([group for opt in optimizers for group in opt.param_groups], settings):
        group.update(setting)
    if scaler.is_enabled() and checkpoint.get("scaler"):  # empty when saved without fp16
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    sampler.set_state(checkpoint["rng"]["sampler"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


# ----------------------------------------------------------------------------- run directories: one run each, resumed only by itself

def holding_out_dir(out_dir, rank):
    """The first process holds out_dir (made if missing) for the whole run; a second run there stops at once."""
    return locked_folder(out_dir, os.path.basename(sys.argv[0]) or "train.py") if rank == 0 else contextlib.nullcontext()


def load_resumed(cfg, data, say):
    """out_dir/ckpt.pt, once it is known to be this run's, of this data, and resumable by this command."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    resumed = load_checkpoint(path)
    missing = sorted({"optimizers", "state", "rng", "config", "model_config"} - resumed.keys())
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}: it holds weights to start from, not a run to resume; "
                        "use --init_from instead")
    if "sft" in resumed and "sft" not in data.checkpoint_fields:
        raise UserError(f"{path} is a fine-tuning run of sft.py: resume it with python sft.py --resume (its chat data "
                        "and template are sft.py's)")
    if not same_data(resumed, data.checkpoint_fields):
        raise UserError(f"{path} was trained on other data (dataset {resumed.get('dataset')!r}, prepared with other "
                        f"input, settings or tokens than data/{cfg.dataset} now): --resume needs the same data; to "
                        "train on new data start from it with --init_from instead")
    owner = recorded_run_id(cfg.out_dir)
    if owner and resumed.get("run_id") and owner != resumed["run_id"]:
        raise UserError(f"{path} belongs to another run ({resumed['run_id']}; {cfg.out_dir}/config.json is run {owner}): "
                        "resume it in its own out_dir, or start from it with --init_from")
    if resumed["config"].get("optimizer", cfg.optimizer) != cfg.optimizer:
        raise UserError(f"{path} trained with optimizer={resumed['config']['optimizer']}; --resume keeps the optimizer "
                        "(its state is in the checkpoint): drop --optimizer, or start from it with --init_from")
    changed = [f"{key} {resumed['config'][key]!r} -> {value!r}" for key, value in dataclasses.asdict(cfg).items()
               if key in resumed["config"] and key not in ("resume", "overwrite", "init_from") and resumed["config"][key] != value]
    if changed:
        say(f"note: resuming with settings other than the checkpoint's: {', '.join(changed)}")
    return resumed


def same_data(checkpoint, fields):
    """Whether a checkpoint was trained on the data behind `fields`: prepare.py's fingerprint of its input and
    settings when both have one, else the dataset's name and tokenizer."""
    if checkpoint.get("data_fingerprint") and fields.get("data_fingerprint"):
        return checkpoint["data_fingerprint"] == fields["data_fingerprint"]
    return checkpoint.get("dataset") == fields.get("dataset") and checkpoint.get("tokenizer") == fields["tokenizer"]


def recorded_run_id(out_dir):
    """The run id in out_dir/config.json, or None for a folder without one (an older run, a copied checkpoint)."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def open_run_dir(out_dir, resolved, log, resumed, say):
    """Record the resolved config and start the log: a resumed run keeps its lines up to the checkpoint's step
    (what the interrupted run logged after it is trained again); a new one starts with no checkpoint of an
    earlier run (--overwrite) left beside it."""
    write_atomically(os.path.join(out_dir, "config.json"), json.dumps(resolved, indent=2))
    if resumed:
        catch_up_best(out_dir, resumed, say)
    else:
        for name in ("ckpt.pt", "best.pt"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
    log.start(resumed["state"]["step"] if resumed else None)


def catch_up_best(out_dir, resumed, say):
    """ckpt.pt is written before best.pt: after a crash between the two, ckpt.pt is the best checkpoint and best.pt
    one evaluation behind. Then ckpt.pt is written as best.pt too, so that best.pt is never left behind."""
    state, best_path = resumed["state"], os.path.join(out_dir, "best.pt")
    if state.get("best_step") != state["step"]:
        return
    try:
        best_step = torch.load(best_path, map_location="cpu", mmap=True, weights_only=True)["state"]["step"]
    except Exception:  # missing or unreadable: as behind as can be
        best_step = None
    if best_step != state["step"]:
        save_checkpoint(best_path, resumed)
        say(f"best.pt missed the best evaluation, step {state['step']} (a crash between the two writes): written "
            "again from ckpt.pt")


# ----------------------------------------------------------------------------- processes and signals

def start_process(device_name):
    """(device, rank, world): this process alone, or one of torchrun's, which sets RANK and LOCAL_RANK."""
    if "RANK" not in os.environ:
        return pick_device(device_name), 0, 1
    import torch.distributed as dist
    on_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    dist.init_process_group("nccl" if on_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if on_cuda else "cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def end_process(world):
    """Tear down together, and only after a clean finish: a process that left while rank 0 still wrote its
    checkpoint died in gloo's teardown, and destroying the group mid-collective deadlocks (torchtitan #1342)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


class StopSignals:
    """Ctrl-C and SIGTERM only set `signum`, so that a loop can finish the step in flight, checkpoint and return."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
