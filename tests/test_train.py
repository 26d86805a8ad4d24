"""The training loop on tiny models: loss falls, exact resume, atomic checkpoints, NaN handling,
budgets, the log format, bad configs, and one process against two under torchrun."""

import contextlib
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import data
import model as model_module
import prepare
import recipe
import train
from configurator import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread: two threads that wait on each other at every tiny operation are slow on a busy machine
TINY = ["--dataset=tiny", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--eval_iters=4", "--sample_tokens=0", "--warmup_iters=5", "--learning_rate=3e-3", "--threads=1"]


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """A small char-level corpus with structure to learn, prepared in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    words = "the king and queen of england speak to their lords in court at night".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(1500))
    (tmp_path / "corpus.txt").write_text(text)
    prepare.main(["--source=corpus.txt", "--dataset=tiny", "--tokenizer=char"])
    return tmp_path


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


def test_loss_falls_and_the_run_directory_follows_the_contract(tiny_data):
    train.main(TINY + ["--out_dir=run", "--max_iters=80", "--eval_interval=40", "--log_interval=10"])
    log = read_log("run")
    evals = [r for r in log if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 80
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8, evals
    for record in log:
        if "val_loss" in record:
            assert {"step", "val_loss", "val_bpb", "tokens", "flops", "elapsed"} <= record.keys()
        else:
            assert {"step", "train_loss", "lr", "tokens", "flops", "elapsed", "tok_per_sec", "mfu"} <= record.keys()
            assert record["mfu"] is None  # no known peak on a CPU: say nothing rather than a wrong number
    meta = data.load_meta("data/tiny")
    last = evals[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * meta["val_tokens"] / meta["val_bytes"] / math.log(2))
    assert last["tokens"] == 80 * 8 * 32
    for name in ("ckpt.pt", "best.pt", "config.json", "loss.png", "report.md"):
        assert os.path.isfile(os.path.join("run", name))
    with open("run/loss.png", "rb") as f:  # a PNG: its signature, then IHDR's width and height
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[16:24] == (800).to_bytes(4, "big") + (
        450).to_bytes(4, "big")
    page = open("run/report.md").read()
    best = min(evals, key=lambda r: r["val_loss"])
    assert f"| final validation | loss {last['val_loss']:.4f}, {last['val_bpb']:.4f} bits/byte" in page
    assert f"| best validation | loss {best['val_loss']:.4f}" in page
    assert f"| tokens seen | {last['tokens']:,} |" in page
    checkpoint = ckpt.load_checkpoint("run/ckpt.pt")
    assert checkpoint["state"]["step"] == 80 and checkpoint["config"]["max_iters"] == 80
    assert checkpoint["tokenizer"] == meta["tokenizer"]
    total = sum(v.numel() for k, v in checkpoint["model"].items() if k != "lm_head.weight")  # tied
    assert f"| parameters | {total:,} (" in page


@pytest.mark.parametrize("optimizer, dtype", [("adamw", "float32"), ("muon", "float32"), ("adamw", "float16")])
def test_resume_reproduces_the_uninterrupted_losses_bitwise(tiny_data, monkeypatch, optimizer, dtype):
    args = TINY + ["--max_iters=24", "--eval_interval=8", "--log_interval=1", "--dropout=0.1", f"--optimizer={optimizer}",
                   f"--dtype={dtype}"]
    real_precision = train.precision

    def restless_scaler(name, device):
        """fp16's loss scale, made to move all the time: it starts high enough that the first steps overflow
        and are skipped, and it doubles after every 2 good steps, so steps keep overflowing now and then."""
        dtype, autocast, scaler = real_precision(name, device)
        return dtype, autocast, torch.amp.GradScaler(device.type, init_scale=2.0 ** 20, growth_interval=2,
                                                     enabled=scaler.is_enabled())

    monkeypatch.setattr(train, "precision", restless_scaler)
    train.main(args + ["--out_dir=straight"])

    calls = {"n": 0}
    real_batch = data.TokenData.batch

    def interrupt_during_step_13(self, split, *a):  # a real SIGINT arriving in the middle of a step
        calls["n"] += split == "train"
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, split, *a)

    monkeypatch.setattr(data.TokenData, "batch", interrupt_during_step_13)
    assert train.main(args + ["--out_dir=interrupted"]) == signal.SIGINT  # the command line exits with 130
    assert max(train_losses("interrupted")) == 13  # the step in flight finished, then it stopped
    monkeypatch.setattr(data.TokenData, "batch", real_batch)
    train.main(args + ["--out_dir=interrupted", "--resume"])

    assert train_losses("interrupted") == train_losses("straight")  # exact float equality, every step
    assert len(train_losses("straight")) == 24
    if dtype == "float16":
        assert ckpt.load_checkpoint("straight/ckpt.pt")["scaler"]["_growth_tracker"] in (0, 1)


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    ckpt.save_checkpoint(path, {"version": ckpt.CHECKPOINT_VERSION, "weights": torch.ones(3)})

    def crash_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"version": ckpt.CHECKPOINT_VERSION, "weights": torch.zeros(3)})
    assert torch.equal(ckpt.load_checkpoint(path, needs=())["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_corrupted_or_missing_checkpoint_is_one_clear_line(tiny_data):
    with pytest.raises(UserError, match="no checkpoint at"):
        train.main(TINY + ["--out_dir=none", "--resume"])
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4"])
    with open("run/ckpt.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="corrupted or incomplete"):
        train.main(TINY + ["--out_dir=run", "--resume"])


def poison_forward(monkeypatch, bad_calls):
    """Make the model's loss NaN on the given forward calls, counted over training forwards only."""
    real_forward = model_module.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)


def test_a_nan_loss_is_skipped_and_never_saved(tiny_data, monkeypatch):
    poison_forward(monkeypatch, bad_calls={6, 7})
    train.main(TINY + ["--out_dir=run", "--max_iters=12", "--eval_interval=6", "--log_interval=1"])
    skipped = [r["step"] for r in read_log("run") if r.get("skipped")]
    assert skipped == [6, 7]
    weights = ckpt.load_checkpoint("run/ckpt.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert ckpt.load_checkpoint("run/ckpt.pt")["state"]["tokens"] == 10 * 8 * 32  # skipped steps trained nothing


def test_nan_losses_with_no_rollback_left_stop_with_a_message(tiny_data, monkeypatch):
    poison_forward(monkeypatch, bad_calls=set(range(1, 100)))
    with pytest.raises(UserError, match="training diverged"):
        train.main(TINY + ["--out_dir=run", "--max_iters=10", "--nan_patience=2"])


def tensors_of(tree):
    """{path: tensor} for every tensor in nested dicts and lists (a checkpoint's model and optimizer state)."""
    if isinstance(tree, torch.Tensor):
        return {"": tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {f"{key}/{path}": t for key, value in items for path, t in tensors_of(value).items()}


MOE = ["--moe_experts=4", "--moe_top_k=2", "--moe_expert_hidden=16", "--moe_first_dense=1"]


@pytest.mark.parametrize("optimizer, model_args", [("adamw", []), ("muon", []), ("adamw", MOE)])
def test_a_skipped_step_leaves_weights_and_optimizer_state_bit_identical(tiny_data, monkeypatch, optimizer, model_args):
    # warmup longer than the run: the learning rate of steps 1-5 does not depend on the budget
    args = TINY + model_args + ["--warmup_iters=100", "--eval_interval=100", f"--optimizer={optimizer}"]
    train.main(args + ["--out_dir=five", "--max_iters=5"])
    poison_forward(monkeypatch, bad_calls={6})
    train.main(args + ["--out_dir=six", "--max_iters=6"])
    assert [r["step"] for r in read_log("six") if r.get("skipped")] == [6]
    five, six = (ckpt.load_checkpoint(f"{run}/ckpt.pt") for run in ("five", "six"))
    assert six["state"]["step"] == 6 and six["state"]["tokens"] == five["state"]["tokens"]
    before = tensors_of(dict(model=five["model"], optimizers=five["optimizers"]["state"]))
    after = tensors_of(dict(model=six["model"], optimizers=six["optimizers"]["state"]))
    assert before.keys() == after.keys() and any("exp_avg_sq" in path for path in before)
    assert [path for path in before if not torch.equal(before[path], after[path])] == []


def test_an_ordinary_step_reads_one_device_value(tiny_data, monkeypatch):
    """train.py's own reads of tensor values into Python per step (each makes the host wait for a GPU), as the
    difference of runs 4 steps apart, which log, evaluate and checkpoint only at their end: the non-finite flag."""
    counts = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            counts[-1] += sys._getframe(1).f_code.co_filename == train.__file__
            return real(self, *args)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for steps in (4, 8):
        counts.append(0)
        train.main(TINY + [f"--out_dir=run{steps}", f"--max_iters={steps}", f"--log_interval={steps}",
                           f"--eval_interval={steps}"])
    assert (counts[1] - counts[0]) / 4 == 1


def test_wandb_without_its_package_is_one_clear_line_before_anything_is_written(tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(UserError, match="pip install wandb"):
        train.main(TINY + ["--out_dir=run", "--max_iters=2", "--wandb_project=demo"])
    assert not os.path.exists("run")


def test_a_budget_smaller_than_one_step_says_so(tiny_data):
    with pytest.raises(UserError, match=r"max_flops=1 is less than one step \(256 tokens, .* FLOPs per step\)"):
        train.main(TINY + ["--out_dir=run", "--max_iters=0", "--max_flops=1"])
    assert not os.path.exists("run")


def test_flop_budget_stops_within_one_step(tiny_data):
    net = model_module.GPT(model_module.GPTConfig(**{**model_module.PRESETS["classic"], "n_layer": 2, "n_head": 2,
                                                     "n_embd": 32, "block_size": 32, "vocab_size": 64}))
    flops_per_step = net.flops_per_token() * 8 * 32
    budget = 17.5 * flops_per_step
    train.main(TINY + ["--out_dir=run", "--max_iters=0", f"--max_flops={budget}", "--eval_interval=100"])
    spent = read_log("run")[-1]["flops"]
    assert budget - flops_per_step < spent <= budget


def test_target_loss_stops_at_the_first_evaluation_that_reaches_it(tiny_data, capsys):
    train.main(TINY + ["--out_dir=full", "--max_iters=60", "--eval_interval=10"])
    evals = [r for r in read_log("full") if "val_loss" in r]
    target = evals[3]["val_loss"] + 1e-6  # just above step 30's loss, below every earlier one
    assert all(r["val_loss"] > target for r in evals[:3])
    train.main(TINY + ["--out_dir=speedrun", "--max_iters=60", "--eval_interval=10", f"--target_loss={target}"])
    assert [r["val_loss"] for r in read_log("speedrun") if "val_loss" in r] == [r["val_loss"] for r in evals[:4]]
    assert ckpt.load_checkpoint("speedrun/ckpt.pt")["state"]["step"] == 30
    assert f"validation loss reached the target {target:g} at step 30" in capsys.readouterr().out


def test_learning_rate_schedules():
    def scale(cfg, step, total_steps=110):
        run = types.SimpleNamespace(cfg=cfg, state=train.TrainState(step=step), total_steps=total_steps,
                                    started=time.time())
        return train.learning_rate_scale(run)
    cfg = train.TrainConfig(warmup_iters=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert scale(cfg, 0) == pytest.approx(0.1)
    assert scale(cfg, 10) == pytest.approx(1.0)
    assert scale(cfg, 60) == pytest.approx(0.55)
    assert scale(cfg, 110) == pytest.approx(0.1)
    wsd = train.TrainConfig(warmup_iters=10, min_lr_ratio=0.0, lr_schedule="wsd", decay_fraction=0.2)
    assert scale(wsd, 89) == 1.0
    assert scale(wsd, 100) == pytest.approx(0.5)


def run_script(*args, **kwargs):
    # a time limit: under torchrun, a rank that died leaves the other waiting in a collective for ever
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, **{"timeout": 300, **kwargs})


@pytest.mark.parametrize("arg, message", [
    ("--n_layr=2", "error: unknown config key 'n_layr': did you mean n_layer"),
    ("--max_iters=lots", "error: max_iters must be int"),
    ("--preset=fancy", "error: preset must be one of classic, modern"),
])
def test_bad_config_is_one_line_on_stderr(tiny_data, arg, message):
    result = run_script(os.path.join(ROOT, "train.py"), "--dataset=tiny", arg)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_under_torchrun_match_one_process(tiny_data, sharding):
    args = [os.path.join(ROOT, "train.py")] + TINY + ["--max_iters=6", "--eval_interval=6", "--batch_tokens=512"]
    one = run_script(*args, "--out_dir=one")
    two = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, "--out_dir=two",
                     f"--fsdp={sharding == 'fsdp'}")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes x 1)" in two.stdout and "1 processes x 2)" in one.stdout
    a, b = ckpt.load_checkpoint("one/ckpt.pt")["model"], ckpt.load_checkpoint("two/ckpt.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    la, lb = train_losses("one"), train_losses("two")
    assert la.keys() == lb.keys() and all(la[s] == pytest.approx(lb[s], rel=1e-5) for s in la)

    # stopped at step 3 and resumed under torchrun, the two processes continue exactly (for FSDP the full
    # checkpoint is sharded again on load)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, "--out_dir=resumed",
                f"--fsdp={sharding == 'fsdp'}"]
    first = run_script(*torchrun, "--max_iters=3")
    second = run_script(*torchrun, "--resume")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert train_losses("resumed")[6] == lb[6]
    resumed = ckpt.load_checkpoint("resumed/ckpt.pt")["model"]
    assert all(torch.equal(resumed[name], b[name]) for name in b)


def test_init_from_starts_from_another_runs_weights_with_a_fresh_optimizer(tiny_data):
    train.main(TINY + ["--out_dir=first", "--max_iters=20", "--eval_interval=20"])
    train.main(TINY + ["--out_dir=second", "--init_from=first", "--max_iters=4", "--eval_interval=4"])
    first, second = read_log("first"), read_log("second")
    # step 0 of the second run evaluates exactly the weights the first one ended with
    assert second[0]["step"] == 0 and second[0]["val_loss"] == first[-1]["val_loss"]
    assert ckpt.load_checkpoint("second/ckpt.pt")["state"]["step"] == 4
    with pytest.raises(UserError, match="init_from: no checkpoint at nowhere"):
        train.main(TINY + ["--out_dir=third", "--init_from=nowhere"])
    with open("digits.txt", "w") as f:  # a char vocabulary of its own: the same ids would mean other characters
        f.write("0123456789 +-=\n" * 2000)
    prepare.main(["--source=digits.txt", "--dataset=digits", "--tokenizer=char"])
    with pytest.raises(UserError, match="init_from's tokenizer is not this data's .data/digits."):
        train.main(TINY + ["--out_dir=fourth", "--init_from=first", "--dataset=digits", "--max_iters=2"])
    assert not os.path.exists("fourth")


def test_a_run_directory_that_holds_a_run_is_never_overwritten_by_mistake(tiny_data):
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4"])
    files = lambda: [name for name in os.listdir("run") if name != ".lock"]  # noqa: E731
    before = {name: os.path.getmtime(os.path.join("run", name)) for name in files()}
    with pytest.raises(UserError, match=r"run already holds a run \(ckpt.pt\): --resume continues it, --overwrite=True"):
        train.main(TINY + ["--out_dir=run", "--max_iters=2", "--eval_interval=2"])
    assert {name: os.path.getmtime(os.path.join("run", name)) for name in files()} == before
    train.main(TINY + ["--out_dir=run", "--max_iters=2", "--eval_interval=2", "--overwrite=True"])
    assert ckpt.load_checkpoint("run/ckpt.pt")["state"]["step"] == 2 and max(train_losses("run")) == 2


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=0", "batch_size must be at least 1"),
    ("--eval_interval=0", "eval_interval must be at least 1"),
    ("--eval_iters=0", "eval_iters must be at least 1"),
    ("--log_interval=0", "log_interval must be at least 1"),
    ("--vocab_multiple=0", "vocab_multiple must be at least 1"),
    ("--lr_schedule=linear", "lr_schedule must be cosine or wsd"),
    ("--decay_fraction=0.0", r"decay_fraction must be in \(0, 1\]"),
    ("--compile=yes", "compile must be auto, true or false"),
    ("--device=gpu", "device must be auto, cpu, cuda"),
    ("--learning_rate=-1e-3", "learning_rate must not be negative, got -0.001"),
    ("--muon_lr=0", "learning rates must be above 0"),
    ("--learning_rate=nan", "learning_rate must be a finite number, got nan"),
    ("--max_flops=nan", "max_flops must be a finite number, got nan"),
    ("--beta1=1.5", "beta1 and beta2 must be below 1"),
    ("--weight_decay=-0.1", "weight_decay must not be negative"),
    ("--fsdp=True --optimizer=muon", "Muon needs whole matrices"),
])
def test_settings_that_would_fail_midway_are_refused_before_anything_is_written(tiny_data, arg, message):
    with pytest.raises(UserError, match=message):
        train.main(TINY + ["--out_dir=run", "--max_iters=4", *arg.split()])
    assert not os.path.exists("run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there_is_one_line(tiny_data):
    with pytest.raises(UserError, match="device cuda is not available here"):
        train.main(TINY + ["--out_dir=run", "--device=cuda"])


def test_out_dir_that_cannot_be_created_is_one_line(tiny_data):
    open("taken", "w").close()
    with pytest.raises(UserError, match="cannot create taken: File exists"):
        train.main(TINY + ["--out_dir=taken", "--max_iters=2"])


def test_resume_on_other_data_is_refused_and_a_half_written_log_line_is_dropped(tiny_data):
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4", "--log_interval=1"])
    with open("corpus2.txt", "w") as f:
        f.write("0123456789 abcdefghijklmnopqrstuvwxyz\n" * 400)
    prepare.main(["--source=corpus2.txt", "--dataset=other", "--tokenizer=char"])
    config_before = open("run/config.json").read()
    with pytest.raises(UserError, match="was trained on other data .dataset 'tiny'.*--resume needs the same data"):
        train.main(TINY + ["--out_dir=run", "--resume", "--dataset=other", "--max_iters=8"])
    assert open("run/config.json").read() == config_before

    with open("run/log.jsonl", "a") as f:
        f.write('{"step": 5, "train_lo')  # a crash while appending
    train.main(TINY + ["--out_dir=run", "--resume", "--max_iters=8", "--eval_interval=4", "--log_interval=1"])
    assert sorted(train_losses("run")) == list(range(1, 9))


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_our_muon_is_torchs_algorithm_and_in_float32_orthogonalises_as_well(shape):
    """recipe.Muon with the iteration in bf16 takes torch.optim.Muon's steps bit for bit; in float32 (what a CPU
    without bf16 instructions runs) its updates are as near to orthogonal."""
    torch.manual_seed(0)
    theirs, ours, ours32 = (torch.nn.Parameter(torch.randn(*shape)) for _ in range(3))
    with torch.no_grad():
        ours.copy_(theirs), ours32.copy_(theirs)
    optimizers = [torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1),
                  recipe.Muon([ours], lr=0.02, weight_decay=0.1, orthogonalise_in=torch.bfloat16),
                  recipe.Muon([ours32], lr=0.02, weight_decay=0.1, orthogonalise_in=torch.float32)]
    for _ in range(3):
        grad = torch.randn(*shape)
        for p, opt in zip((theirs, ours, ours32), optimizers):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(theirs, ours)
    torch.testing.assert_close(ours32, theirs, atol=2e-3, rtol=0)
    singular_values = torch.linalg.svdvals(recipe.orthogonalise(torch.randn(*shape), torch.float32))
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # near-orthogonal, as Muon wants


def test_muon_takes_the_hidden_matrices_only_and_no_bias_is_decayed():
    config = model_module.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True,
                                    moe_experts=4, moe_top_k=2, moe_expert_hidden=16, moe_first_dense=1)
    gpt = model_module.GPT(config)
    adamw, muon = recipe.make_optimizers(gpt, train.TrainConfig(optimizer="muon"), torch.device("cpu"),
                                         torch.float32)
    name = {id(p): n for n, p in gpt.named_parameters()}
    in_muon = {name[id(p)] for group in muon.param_groups for p in group["params"]}
    decayed = {name[id(p)] for p in adamw.param_groups[0]["params"]}
    assert in_muon and all(n.startswith("transformer.h.") and n.endswith(".weight") and ".router." not in n
                           and ".experts." not in n for n in in_muon)
    assert "transformer.h.1.mlp.experts.c_fc.bias" in name.values()  # a 2-D stack of the experts' biases
    assert not any(n.endswith(".bias") for n in decayed)
    assert "transformer.h.1.mlp.experts.c_fc.weight" in decayed  # the 3-D stack: AdamW, with decay


# ----------------------------------------------------------------------------- reliability (issue 18)

def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(out_dir):
    """The steps log.jsonl holds now, read as another process appends to it (a torn last line is skipped)."""
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def test_a_second_run_in_the_same_out_dir_stops_at_once_naming_the_first(tiny_data):
    """Before its first checkpoint, a run was unprotected: a second one in its out_dir shared its files."""
    args = [os.path.join(ROOT, "train.py")] + TINY + ["--out_dir=run", "--eval_interval=100000", "--log_interval=1"]
    first = subprocess.Popen([sys.executable, *args, "--max_iters=1000000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(logged_steps("run")) >= 3)  # training, and no ckpt.pt yet
        assert not os.path.exists("run/ckpt.pt")
        second = run_script(*args, "--max_iters=4")
        assert second.returncode == 1
        assert second.stderr == (f"error: run is in use by train.py (pid {first.pid}): wait for it "
                                 "to end, or stop it\n")
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()
    open(f"run/ckpt.pt.{first.pid}.tmp", "wb").close()  # what a run killed mid-write leaves
    third = run_script(*args, "--max_iters=2")  # kill -9 leaves no stale lock
    assert third.returncode == 0, third.stderr[-2000:]
    assert sorted(os.listdir("run")) == [".lock", "best.pt", "ckpt.pt", "config.json", "log.jsonl", "loss.png",
                                         "report.md"]


def test_kill_9_at_random_moments_then_resume_logs_every_loss_of_an_uninterrupted_run(tiny_data):
    args = [os.path.join(ROOT, "train.py")] + TINY + ["--max_iters=60", "--eval_interval=10", "--log_interval=1"]
    train.main(args[1:] + ["--out_dir=straight"])
    rng = random.Random()
    kills = sorted(rng.sample(range(2, 58), 3))  # the steps after which each kill comes, within a random 0.3 s
    for target in kills:
        resume = ["--resume"] if os.path.exists("killed/ckpt.pt") else []
        run = subprocess.Popen([sys.executable, *args, "--out_dir=killed", *resume], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_for(lambda: max(logged_steps("killed"), default=0) >= target or run.poll() is not None)
        time.sleep(rng.uniform(0, 0.3))  # anywhere in a step, an evaluation or a checkpoint write
        run.kill()
        assert run.wait() in (-signal.SIGKILL, 0)
    resume = ["--resume"] if os.path.exists("killed/ckpt.pt") else []
    last = run_script(*args, "--out_dir=killed", *resume)
    assert last.returncode == 0, (kills, last.stderr[-2000:])
    assert train_losses("killed") == train_losses("straight"), kills  # exact float equality, every step
    assert len(train_losses("straight")) == 60


def test_resume_applies_the_commands_optimizer_settings_and_config_json_says_so(tiny_data):
    args = TINY + ["--eval_interval=4", "--log_interval=1"]
    changed = ["--learning_rate=1e-4", "--weight_decay=0.0", "--beta1=0.8", "--beta2=0.95"]
    train.main(args + ["--out_dir=run", "--max_iters=8"])
    train.main(args + ["--out_dir=run", "--max_iters=12", "--resume", *changed])
    train.main(args + ["--out_dir=fresh", "--max_iters=12", *changed])  # the same schedule from the start
    lr = {d: {r["step"]: r["lr"] for r in read_log(d) if "lr" in r} for d in ("run", "fresh")}
    assert [lr["run"][s] for s in range(9, 13)] == [lr["fresh"][s] for s in range(9, 13)]
    for group in ckpt.load_checkpoint("run/ckpt.pt")["optimizers"]["param_groups"]:
        assert (group["peak_lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-4, (0.8, 0.95), 0.0)
    with open("run/config.json") as f:
        config = json.load(f)["train"]
    assert (config["learning_rate"], config["weight_decay"], config["beta1"], config["beta2"]) == (1e-4, 0.0, 0.8, 0.95)


def test_resume_on_other_data_of_the_same_characters_is_refused_and_nothing_changes(tiny_data):
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4"])
    lines = open("corpus.txt").read().splitlines()
    random.Random(1).shuffle(lines)
    with open("shuffled.txt", "w") as f:
        f.write("\n".join(lines))
    prepare.main(["--source=shuffled.txt", "--dataset=shuffled", "--tokenizer=char"])
    assert data.load_meta("data/shuffled")["tokenizer"] == data.load_meta("data/tiny")["tokenizer"]
    before = {name: open(f"run/{name}", "rb").read() for name in os.listdir("run")}
    with pytest.raises(UserError, match="run/ckpt.pt was trained on other data .dataset 'tiny'.*--init_from"):
        train.main(TINY + ["--out_dir=run", "--resume", "--dataset=shuffled", "--max_iters=8"])
    assert {name: open(f"run/{name}", "rb").read() for name in os.listdir("run")} == before


def test_another_runs_checkpoint_is_refused_and_the_log_is_kept(tiny_data):
    train.main(TINY + ["--out_dir=mine", "--max_iters=8", "--eval_interval=4", "--log_interval=1"])
    train.main(TINY + ["--out_dir=other", "--max_iters=4", "--eval_interval=4"])
    shutil.copy("other/ckpt.pt", "mine/ckpt.pt")  # dropped in by mistake
    log = open("mine/log.jsonl").read()
    with pytest.raises(UserError, match=r"mine/ckpt.pt belongs to another run \(\w+; config.json is run \w+\)"):
        train.main(TINY + ["--out_dir=mine", "--resume", "--max_iters=8"])
    assert open("mine/log.jsonl").read() == log


def test_a_sigint_before_the_first_step_does_not_advise_a_resume_that_would_fail(tiny_data, monkeypatch, capsys):
    real_batch = data.TokenData.batch

    def interrupt_the_first_evaluation(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_batch(*args)

    monkeypatch.setattr(data.TokenData, "batch", interrupt_the_first_evaluation)
    assert train.main(TINY + ["--out_dir=run", "--max_iters=4"]) == signal.SIGINT
    lines = capsys.readouterr().out.strip().splitlines()
    assert "stopped by SIGINT at step 0; no step was taken: run it again" in lines
    assert lines[-1].startswith("report: run/report.md")  # what exists: the untrained model's evaluation
    assert not os.path.exists("run/ckpt.pt")


@pytest.mark.parametrize("script", ["train.py", "prepare.py", "sft.py", "scaling.py"])
def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(tmp_path, script):
    (tmp_path / "numpy.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")  # Ctrl-C mid-import
    result = subprocess.run([sys.executable, os.path.join(ROOT, script)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 130 and result.stderr == "interrupted\n"


def test_a_crash_between_ckpt_pt_and_best_pt_is_caught_up_on_resume(tiny_data, monkeypatch, capsys):
    real_save = train.save_checkpoint

    def crash_before_the_second_best(path, snapshot):
        if path.endswith("best.pt") and snapshot["state"]["step"] == 8:
            raise KeyboardInterrupt  # the process dies between the two writes
        real_save(path, snapshot)

    monkeypatch.setattr(train, "save_checkpoint", crash_before_the_second_best)
    args = TINY + ["--out_dir=run", "--max_iters=8", "--eval_interval=4"]
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    assert ckpt.load_checkpoint("run/best.pt")["state"]["step"] == 4
    assert ckpt.load_checkpoint("run/ckpt.pt")["state"]["best_step"] == 8
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.main(args + ["--resume"])
    assert "best.pt missed the best evaluation, step 8" in capsys.readouterr().out
    best, latest = ckpt.load_checkpoint("run/best.pt"), ckpt.load_checkpoint("run/ckpt.pt")
    assert best["state"]["step"] == 8 and all(torch.equal(best["model"][k], latest["model"][k]) for k in latest["model"])


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_loses_nothing(tiny_data, monkeypatch):
    args = TINY + ["--out_dir=run", "--eval_interval=4", "--log_interval=1"]
    train.main(args + ["--max_iters=4"])
    log = open("run/log.jsonl").read()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: no_space() if dst.endswith("log.jsonl") else real_replace(src, dst))
    with pytest.raises(UserError, match="could not write run/log.jsonl: No space left on device; the previous log.jsonl"):
        train.main(args + ["--max_iters=8", "--resume"])  # the resumed log's rewrite
    assert open("run/log.jsonl").read() == log
    monkeypatch.setattr(os, "replace", real_replace)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"half a checkpoint"), no_space()))
    with pytest.raises(UserError, match="could not write run/ckpt.pt: No space left on device; the previous ckpt.pt"):
        train.main(args + ["--max_iters=8", "--resume"])
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint("run/ckpt.pt")["state"]["step"] == 4
    assert max(train_losses("run")) == 8  # logged before the failed checkpoint, trained again on resume

    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: no_space() if mode == "a" else real_open(path, mode, *a, **k),
                        raising=False)
    with pytest.raises(UserError, match="could not write run/log.jsonl: No space left on device; ckpt.pt holds"):
        train.main(args + ["--max_iters=8", "--resume"])
    assert sorted(os.listdir("run")) == [".lock", "best.pt", "ckpt.pt", "config.json", "log.jsonl", "loss.png",
                                         "report.md"]


def test_a_read_only_out_dir_or_a_dangling_link_is_one_line(tiny_data, monkeypatch):
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4"])
    before = {name: open(f"run/{name}", "rb").read() for name in os.listdir("run")}
    real_open = os.open

    def read_only(path, *args):  # as root, a chmod would not stop the writes
        if str(path).startswith("run"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match="cannot write in run: Read-only file system"):
        train.main(TINY + ["--out_dir=run", "--resume", "--max_iters=8"])
    monkeypatch.setattr(os, "open", real_open)
    assert {name: open(f"run/{name}", "rb").read() for name in os.listdir("run")} == before
    os.symlink("nowhere", "linked")
    with pytest.raises(UserError, match="linked is a symbolic link to nowhere, which does not exist"):
        train.main(TINY + ["--out_dir=linked", "--max_iters=4"])


def test_a_checkpoint_without_optimizer_state_is_not_resumed(tiny_data):
    train.main(TINY + ["--out_dir=run", "--max_iters=4", "--eval_interval=4"])
    checkpoint = ckpt.load_checkpoint("run/ckpt.pt")
    del checkpoint["optimizers"]  # weights only, as a checkpoint shared without its optimizer
    ckpt.save_checkpoint("run/ckpt.pt", checkpoint)
    with pytest.raises(UserError, match="run/ckpt.pt holds weights to start from, not a run to resume: use "
                                        "--init_from"):
        train.main(TINY + ["--out_dir=run", "--resume", "--max_iters=8"])


def test_token_ids_beyond_the_vocabulary_are_one_line(tiny_data):
    meta = data.load_meta("data/tiny")
    np.full(meta["val_tokens"], 60000, dtype=np.uint16).tofile("data/tiny/val.bin")  # same size, other ids
    with pytest.raises(UserError, match="val.bin holds token id 60000, beyond the vocabulary of 21"):
        train.main(TINY + ["--out_dir=run", "--max_iters=4"])


def test_values_that_are_not_finite_in_a_config_file_are_one_line(tiny_data):
    for line, message in [("max_flops = float('inf')", "max_flops must be a finite number, got inf"),
                          ("grad_clip = float('nan')", "grad_clip must be a finite number, got nan")]:
        with open("recipe.py", "w") as f:
            f.write(line + "\n")
        with pytest.raises(UserError, match=message):
            train.main(["recipe.py"] + TINY + ["--out_dir=run"])
        assert not os.path.exists("run")


@contextlib.contextmanager
def both_cores_busy():
    """Two processes that keep both cores busy, as other jobs on a shared machine do."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for process in spin:
            process.kill()
            process.wait()


def test_the_same_command_gives_the_same_losses_on_a_loaded_machine_and_the_thread_count_is_kept(tiny_data):
    """The thread count is chosen once, before the first step (torch's default here), saved in the checkpoint and
    used again on resume: nothing a timing measures changes what a run computes."""
    args = [os.path.join(ROOT, "train.py")] + [a for a in TINY if a != "--threads=1"] + [
        "--max_iters=200", "--eval_interval=8", "--log_interval=1"]
    quiet = run_script(*args, "--out_dir=quiet")
    with both_cores_busy():
        busy = run_script(*args, "--out_dir=busy")
    assert quiet.returncode == 0 and busy.returncode == 0, busy.stderr[-2000:]
    assert train_losses("busy") == train_losses("quiet")  # exact float equality, every step
    threads = json.load(open("quiet/config.json"))["threads"]  # torch's default in a new process
    assert ckpt.load_checkpoint("busy/ckpt.pt")["threads"] == threads
    assert json.load(open("busy/config.json"))["threads"] == threads
    # a resumed run takes the recorded count, whatever torch's default is in its process
    first = subprocess.Popen([sys.executable, *args, "--out_dir=resumed"], stdout=subprocess.DEVNULL)
    wait_for(lambda: max(logged_steps("resumed"), default=0) >= 10 or first.poll() is not None)
    first.kill()
    first.wait()
    one = {**os.environ, "OMP_NUM_THREADS": "1"}
    second = run_script(*args, "--out_dir=resumed", "--resume", env=one)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{threads} threads" in second.stdout and train_losses("resumed") == train_losses("quiet")


def test_kill_9_and_resume_on_a_loaded_machine_equal_the_uninterrupted_run(tiny_data):
    args = [os.path.join(ROOT, "train.py")] + TINY + ["--max_iters=200", "--eval_interval=10", "--log_interval=1"]
    train.main(args[1:] + ["--out_dir=straight"])
    with both_cores_busy():
        run = subprocess.Popen([sys.executable, *args, "--out_dir=killed"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_for(lambda: max(logged_steps("killed"), default=0) >= 15 or run.poll() is not None)
        run.kill()
        assert run.wait() == -signal.SIGKILL
        resumed = run_script(*args, "--out_dir=killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_losses("killed") == train_losses("straight")
