"""Checkpoints and the run directory that holds them.

A checkpoint is a dict saved with torch.save: `version`, `model` (the state dict), `model_config`,
`tokenizer` (its spec, tokenizer.py), and for a run that can be resumed `optimizers`, `scaler`,
`rng`, `state`, `config`, `threads` and `run_id`; sft.py adds `chat_template`. Files are replaced
atomically, and every way a checkpoint can be unusable is one line that says what to do.
"""

import contextlib
import dataclasses
import json
import os
import shlex
import sys

import torch

from configurator import UserError
from files import replace_atomically, write_atomically
from model import GPT, GPTConfig

CHECKPOINT_VERSION = 1


def save_checkpoint(path, checkpoint):
    replace_atomically(path, lambda f: torch.save(checkpoint, f), "wb")


def load_checkpoint(path, needs=("model", "model_config")):
    """The checkpoint at `path`, once it is known to hold the fields `needs`."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first, or check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is corrupted or incomplete and cannot be loaded "
                        f"({type(e).__name__}); best.pt beside it may still be good") from e
    if not isinstance(checkpoint, dict) or "version" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this code's train.py or sft.py")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {checkpoint['version']}, this code reads "
                        f"version {CHECKPOINT_VERSION}")
    missing = [key for key in needs if not checkpoint.get(key)]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}: it was not written by train.py or "
                        "sft.py, or was edited; use another checkpoint")
    return checkpoint


def load_init(init_from):
    """The checkpoint to start from: init_from/ckpt.pt for a run directory, else the file itself."""
    path = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from
    if not os.path.isfile(path):
        raise UserError(f"init_from: no checkpoint at {path}; give a run directory or a .pt file")
    return load_checkpoint(path)


def build_model(checkpoint, path):
    """model.py's GPT holding the checkpoint's weights, refused in one line if they do not fit its
    model_config or are not finite (a diverged run's)."""
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path}: its weights do not fit its model_config ({type(e).__name__}: "
                        f"{detail}); it comes from other code or was edited") from e
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"{path} holds weights that are not finite (NaN or inf): the run diverged; "
                        "use best.pt or an earlier run")
    return model


def training_snapshot(run):
    """What a resumed run needs to go on exactly: train.py's `run` with its full weights and
    optimizer state (gathered on every rank under FSDP, so call it on all of them), fp16's loss
    scale, every generator, its state, settings and data."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(run.raw_model, run.optimizers, options=options)
    rng = dict(torch=torch.get_rng_state(), sampler=run.sampler.get_state(),
               cuda=torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [])
    return dict(version=CHECKPOINT_VERSION, model=model_state, optimizers=optim_state,
                scaler=run.scaler.state_dict(), rng=rng,
                model_config=dataclasses.asdict(run.model_cfg), config=dataclasses.asdict(run.cfg),
                state=dataclasses.asdict(run.state), run_id=run.run_id, threads=run.threads,
                run=run.resolved, **run.data.checkpoint_fields)


def restore_training(run, checkpoint):
    """Load a training_snapshot back into `run`. The optimizers keep the settings they were built
    with (a resumed run applies its command's rates); moments and step counts come from the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    groups = lambda: [group for opt in run.optimizers for group in opt.param_groups]  # noqa: E731
    settings = [{k: v for k, v in group.items() if k != "params"} for group in groups()]
    set_state_dict(run.raw_model, run.optimizers, model_state_dict=checkpoint["model"],
                   optim_state_dict=checkpoint["optimizers"],
                   options=StateDictOptions(full_state_dict=True))
    for group, setting in zip(groups(), settings):  # loading made new group dicts
        group.update(setting)
    if run.scaler.is_enabled() and checkpoint.get("scaler"):  # empty when saved without fp16
        run.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    run.sampler.set_state(checkpoint["rng"]["sampler"])
    if run.device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


def load_resumed(cfg, data_fields, say):
    """out_dir/ckpt.pt, once it is known to be this run's, of this data, and resumable by this
    command."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    resumed = load_checkpoint(path)  # with its model and model_config
    if not all(key in resumed for key in ("optimizers", "state", "rng", "config")):
        raise UserError(f"{path} holds weights to start from, not a run to resume: use --init_from")
    if "sft" in resumed and "sft" not in data_fields:
        raise UserError(f"{path} is a fine-tuning run: resume it with python sft.py --resume")
    if not same_data(resumed, data_fields):
        raise UserError(f"{path} was trained on other data (dataset {resumed.get('dataset')!r}, "
                        f"prepared from other input or settings than data/{cfg.dataset} now): "
                        "--resume needs the same data; to train on new data use --init_from")
    owner = recorded_run_id(cfg.out_dir)
    if owner and resumed.get("run_id") and owner != resumed["run_id"]:
        raise UserError(f"{path} belongs to another run ({resumed['run_id']}; config.json is run "
                        f"{owner}): resume it in its own out_dir, or start from it with "
                        "--init_from")
    if resumed["config"].get("optimizer", cfg.optimizer) != cfg.optimizer:
        raise UserError(f"{path} trained with optimizer={resumed['config']['optimizer']}; --resume "
                        "keeps its optimizer state: drop --optimizer, or use --init_from")
    old = resumed["config"]
    changed = [f"{key} {old[key]!r} -> {value!r}" for key, value in dataclasses.asdict(cfg).items()
               if key not in ("resume", "overwrite", "init_from") and old.get(key, value) != value]
    if changed:
        say(f"note: resuming with settings other than the checkpoint's: {', '.join(changed)}")
    return resumed


def same_data(checkpoint, fields):
    """Whether a checkpoint was trained on the data behind `fields`: prepare.py's fingerprint of its
    input and settings when both have one, else the dataset's name and tokenizer."""
    if checkpoint.get("data_fingerprint") and fields.get("data_fingerprint"):
        return checkpoint["data_fingerprint"] == fields["data_fingerprint"]
    return (checkpoint.get("dataset") == fields.get("dataset")
            and checkpoint.get("tokenizer") == fields["tokenizer"])


def recorded_run_id(out_dir):
    """The run id in out_dir/config.json, or None for a folder without one."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def catch_up_best(out_dir, resumed, say):
    """ckpt.pt is written before best.pt: after a crash between the two, best.pt is one evaluation
    behind, and is written again from ckpt.pt."""
    state, best_path = resumed["state"], os.path.join(out_dir, "best.pt")
    if state.get("best_step") != state["step"]:
        return
    with contextlib.suppress(Exception):  # missing or unreadable: as behind as can be
        best = torch.load(best_path, map_location="cpu", mmap=True, weights_only=True)
        if best["state"]["step"] == state["step"]:
            return
    save_checkpoint(best_path, resumed)
    say(f"best.pt missed the best evaluation, step {state['step']} (a crash between two writes): "
        "written again")


class RunLog:
    """out_dir's config.json and log.jsonl, written by the first process, and Weights & Biases when
    wandb_project is set (imported here, so that a missing package is one line before any write)."""

    def __init__(self, cfg, enabled):
        self.cfg, self.enabled, self.wandb = cfg, enabled, None
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        earlier = os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))
        if earlier and not (cfg.resume or cfg.overwrite):
            raise UserError(f"{cfg.out_dir} already holds a run (ckpt.pt): --resume continues it, "
                            "--overwrite=True starts it over, or choose another --out_dir")
        if enabled and cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_project needs the wandb package: pip install "
                                "wandb") from None
            self.wandb = wandb

    def open(self, run, resumed):
        """Record what the run is (its command, settings and machine) in config.json, and start the
        log: a resumed run keeps its lines up to its checkpoint's step (what came after is trained
        again); a new one leaves no checkpoint of an earlier run (--overwrite) beside it."""
        cuda = run.device.type == "cuda"
        device = torch.cuda.get_device_name(run.device) if cuda else run.device.type
        resolved = dict(run_id=run.run_id, command=shlex.join(["python", *sys.argv]),
                        torch=str(torch.__version__), device=device, threads=run.threads,
                        dtype=str(run.dtype).removeprefix("torch."),
                        parameters=run.raw_model.param_counts(),
                        train=dataclasses.asdict(run.cfg), model=dataclasses.asdict(run.model_cfg))
        if not self.enabled:
            return resolved
        out_dir, kept = self.cfg.out_dir, []
        write_atomically(os.path.join(out_dir, "config.json"), json.dumps(resolved, indent=2))
        if resumed:
            catch_up_best(out_dir, resumed, run.say)
            step = resumed["state"]["step"]
            with contextlib.suppress(FileNotFoundError), open(self.path) as f:
                kept = [line for line in f
                        if line.endswith("\n") and json.loads(line)["step"] <= step]
        else:
            for name in ("ckpt.pt", "best.pt"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, name))
        write_atomically(self.path, "".join(kept))
        if self.wandb:
            self.wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name or None,
                            config=resolved, resume="allow")
        return resolved

    def write(self, record):
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: ckpt.pt still holds the last checkpoint
            raise UserError(f"could not write {self.path}: {e.strerror}; ckpt.pt holds the last "
                            "checkpoint: make room and --resume") from None
        if self.wandb:
            self.wandb.log(record, step=record["step"])
