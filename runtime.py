"""Where a model runs: the device, the precision, the CPU's threads, torchrun's processes, the stop
signals, and the GPU's peak that MFU is measured against. Every choice here is made once, before
the first step, from the settings and the device's type, never from a timing: the same command
computes the same numbers on a quiet or a busy machine.
"""

import contextlib
import os
import signal

import torch

from configurator import UserError

# Peak dense bf16 tensor throughput in TFLOP/s from the vendors' data sheets (without sparsity).
# Matched in order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
               ("L40", 181), ("L4", 121), ("RTX 4090", 165), ("RTX 3090", 71),
               ("V100", 125)]  # V100: fp16, it has no bf16


def peak_flops(gpu_name, override_tflops=0.0):
    """Peak FLOP/s of one GPU, its name matched (case-insensitive) in the table, or None when it is
    not there and no override is given: MFU is then not printed, never guessed."""
    tflops = override_tflops or next((tflops for key, tflops in PEAK_TFLOPS
                                      if key.lower() in gpu_name.lower()), None)
    return tflops * 1e12 if tflops else None


def mfu(flops_per_token, tokens_per_sec, peak):
    """Model FLOPs utilization (PaLM, Chowdhery et al. 2022, appendix B): the model's FLOPs per
    second over the peak, a fraction; None when the peak is unknown."""
    return flops_per_token * tokens_per_sec / peak if peak else None


def pick_device(name):
    """--device: auto picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    available = dict(cuda=torch.cuda.is_available, mps=torch.backends.mps.is_available)
    if device.type in available and not available[device.type]():
        raise UserError(f"device {name} is not available here (torch {torch.__version__}); use "
                        "--device=auto or cpu")
    return device


def pick_dtype(name, device):
    """--dtype: auto is bfloat16 on GPUs that have it, float16 on older GPUs (a V100), and float32
    elsewhere: CPUs without bf16 instructions emulate it, hundreds of times slower."""
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def precision(name, device):
    """(dtype, the autocast context forward passes run under, the gradient scaler). fp16 needs loss
    scaling, bf16 does not; TF32 speeds up whatever fp32 matmuls stay outside autocast."""
    dtype = pick_dtype(name, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return dtype, autocast_to(dtype, device), scaler


def autocast_to(dtype, device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_wanted(setting, device):
    """--compile: true or false, or auto, which compiles on CUDA only: on a CPU, at the sizes people
    train there, compiling takes longer than the faster steps save (RESULTS.md)."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise UserError(f"compile must be auto, true or false, got {setting!r}")
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def use_threads(threads):
    """Fix torch's CPU thread count for the whole run: N, or torch's default (one per core) for 0.
    Sums split over another count round differently, so a run that is to repeat keeps its count."""
    if threads < 0:
        raise UserError(f"threads must be at least 1, or 0 for torch's default, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def distribute(model, fsdp, compile, device, world, dtype):
    """The model a training loop calls: sharded over the processes by FSDP2 (in place: build the
    optimizers after this), compiled where that is on, and wrapped in DDP when not sharded."""
    if world > 1 and fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    if compile_wanted(compile, device):
        model = torch.compile(model)
    if world > 1 and not fsdp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def gradient_sync(model, world, fsdp, last):
    """DDP averages gradients on a step's last micro-step only; the others accumulate locally."""
    return model.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()


def mean_over_processes(value, world):
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def start_process(device_name):
    """(device, rank, world): this process alone, or one of torchrun's, which sets RANK."""
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
    """Tear down together, after a clean finish: destroying the group while another process is in a
    collective deadlocks (torchtitan #1342)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


class StopSignals:
    """Ctrl-C and SIGTERM only set `signum`, so that a loop can finish its step, checkpoint and
    return."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self, signum, frame):
        self.signum = signum

    def agreed(self, device, world):
        """The signal, once every process has heard of it: a signal to one stops them all."""
        if world > 1:
            import torch.distributed as dist
            flag = torch.tensor(float(self.signum or 0), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
