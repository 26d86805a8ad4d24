"""What every script that runs a model shares: the device, the precision, the GPU's peak and MFU,
checkpoints written atomically and read back with one clear error, the training snapshot a resume restores,
and torchrun's processes and the stop signals. train.py, sft.py, sample.py,
export.py, bench.py and scaling.py import it; it imports only torch.
"""

import contextlib
import os
import signal

import torch

from configurator import UserError

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


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def precision(name, device):
    """The dtype, the autocast context the forward pass runs under, and the gradient scaler: bf16 autocast
    and TF32 on GPUs that have them, fp16 with loss scaling on older GPUs, plain fp32 on the CPU."""
    dtype = pick_dtype(name, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling, bf16 does not
    return dtype, autocast, scaler


def compile_wanted(setting, device):
    """--compile: true/on/1, false/off/0, or "auto", which compiles on CUDA only: on a CPU the faster steps
    win back the compilation only in runs far longer than most CPU runs."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "on", "1", "false", "off", "0"):
        raise UserError(f"compile must be auto, true or false, got {setting!r}")
    return setting in ("true", "on", "1") or (setting == "auto" and device.type == "cuda")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    """Load a training_snapshot back into the model, the optimizers, the loss scale and the generators."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    # full_state_dict: the checkpoint holds whole tensors, which FSDP shards again as it loads them
    set_state_dict(model, optimizers, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizers"],
                   options=StateDictOptions(full_state_dict=True))
    if scaler.is_enabled() and checkpoint.get("scaler"):  # empty when saved without fp16
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    sampler.set_state(checkpoint["rng"]["sampler"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


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
