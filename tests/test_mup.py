"""muP on tiny models: at the base width it is the standard parametrization, each parameter gets the
table's learning rate and initialisation (AdamW and Muon, dense and MoE), the coordinate check is
flat under muP and drifts without it, the sweep runs end to end and resumes, and bad settings are
one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

import mup
from model import GPT, GPTConfig, PRESETS
from recipe import make_optimizers
from test_scaling import write_dataset
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture
def shakespeare(tmp_path, monkeypatch, one_thread):
    """A small character dataset as data/shakespeare in tmp_path, the working directory."""
    monkeypatch.chdir(tmp_path)
    from data import markdown_play_to_text, shakespeare_plays
    plays = [markdown_play_to_text(open(path, encoding="utf-8").read())
             for path in shakespeare_plays()[:4]]
    write_dataset("shakespeare", text="".join(plays))
    return tmp_path


def losses_after_steps(model_cfg, train_cfg, steps=3):
    torch.manual_seed(0)
    model = GPT(model_cfg)
    optimizers = make_optimizers(model, train_cfg, torch.device("cpu"), torch.float32)
    x = torch.randint(model_cfg.vocab_size, (4, model_cfg.block_size + 1),
                      generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return model, optimizers, losses


@pytest.mark.parametrize("preset,optimizer",
                         [("classic", "adamw"), ("modern", "muon"), ("modern", "adamw")])
def test_at_the_base_width_mup_is_the_standard_parametrization(preset, optimizer, one_thread):
    cfg = TrainConfig(optimizer=optimizer, learning_rate=1e-2)
    standard = GPTConfig(**PRESETS[preset], **TINY)
    sp_model, sp_optimizers, sp = losses_after_steps(standard, cfg)
    mup_model, _, mu = losses_after_steps(GPTConfig(**PRESETS[preset], **TINY, mup=True,
                                                    mup_base_width=64), cfg)
    assert sp == pytest.approx(mu, rel=1e-5, abs=1e-6)
    # off, the optimizer keeps today's two AdamW groups: checkpoints written before muP existed
    # still resume
    groups = [len(opt.param_groups) for opt in sp_optimizers]
    assert groups == ([2, 1] if optimizer == "muon" else [2])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_gets_the_table_s_learning_rate_and_initialisation(optimizer):
    m = 4
    config = GPTConfig(**PRESETS["modern"], **{**TINY, "n_embd": 256}, moe_experts=4, moe_top_k=2,
                       mup=True,
                       mup_base_width=256 // m)
    torch.manual_seed(0)
    model = GPT(config)
    cfg = TrainConfig(optimizer=optimizer, learning_rate=1e-2, muon_lr=0.02, weight_decay=0.1)
    optimizers = make_optimizers(model, cfg, torch.device("cpu"), torch.float32)
    group_of = {id(p): (type(opt).__name__, g)
                for opt in optimizers for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        kind, group = group_of[id(p)]
        hidden = name.startswith("transformer.h.") and p.ndim >= 2 and not name.endswith("bias")
        if kind == "Muon":  # torch's Muon scales by fan_out / fan_in itself: muP needs nothing more
            assert hidden and group["lr"] == 0.02 and ".router." not in name and p.ndim == 2
        elif hidden:  # attention, MLP, router and the stacked experts under AdamW
            assert (group["lr"], group["weight_decay"]) == pytest.approx((1e-2 / m, 0.1 * m)), name
        else:
            decay = 0.1 if p.ndim >= 2 else 0.0
            assert group["lr"] == 1e-2 and group["weight_decay"] == decay, name
        if name.endswith("c_fc.weight") or name.endswith("q_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / m ** 0.5, rel=0.1), name
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # 1/head_dim, SP's at the base
    assert config.attention_scale == pytest.approx((64 // 4) ** 0.5 / (256 // 4))


def test_the_coordinate_check_is_flat_under_mup_and_drifts_without_it(shakespeare, capsys):
    plot = shakespeare / "coord.png"
    mup.main(["coord", "--coord_widths=[32,64,128,256]", "--base_width=32", "--batch_size=8",
                       "--block_size=32", "--coord_steps=3", f"--coord_plot={plot}", "--json"])
    result = json.loads(capsys.readouterr().out)
    layers = {"embeddings", "attention 0", "mlp 0", "attention 1", "mlp 1", "logits"}
    assert set(result["mup"]) == layers and len(result["mup"]["logits"]) == 4
    # measured: muP's spreads 1.02 to 1.33, the standard parametrization's hidden layers 16 to 51,
    # its logits 4.5
    assert max(result["mup_spread"].values()) < 2
    assert min(result["standard_spread"][k] for k in layers - {"embeddings"}) > 3
    assert os.path.getsize(plot) > 10_000


def test_the_sweep_runs_every_width_and_rate_then_resumes(shakespeare):
    command = [sys.executable, os.path.join(ROOT, "mup.py"), "sweep", "--widths=[32,64]",
               "--learning_rates=[1e-3,1e-2]",
               "--base_width=32", "--max_iters=6", "--warmup_iters=2", "--eval_iters=2",
               "--batch_size=4",
               "--block_size=16", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for name in ("standard", "mup"):
        assert set(result[name]["best"]) == {"32", "64"}
        assert result[name]["best"]["64"]["lr"] in (1e-3, 1e-2)
        assert all(len(curve) == 2 for curve in result[name]["curves"].values())
    config = json.load(open(shakespeare / "out-mup" / "mup_E64_lr0.01" / "config.json"))
    assert config["model"]["mup"] and config["model"]["mup_base_width"] == 32
    assert config["train"]["learning_rate"] == 0.01
    assert os.path.getsize(shakespeare / "out-mup" / "mup_sweep.png") > 10_000
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "8 already done" in again.stderr


def test_the_sweep_never_touches_a_live_run(shakespeare):
    from files import locked_folder
    run = shakespeare / "out-mup" / "standard_E32_lr0.001"
    run.mkdir(parents=True)
    (run / "train.log").write_text("a live run's log\n")
    with locked_folder(str(run), "train.py"), pytest.raises(mup.UserError, match="in use by"):
        mup.main(["sweep", "--widths=[32]", "--learning_rates=[1e-3]", "--base_width=32"])
    assert (run / "train.log").read_text() == "a live run's log\n"


def test_a_diverged_run_counts_as_infinite_loss(tmp_path):
    (tmp_path / "train.log").write_text("error: training diverged: 3 non-finite losses in a row at "
                                        "step 7; ...\n")
    assert mup.final_loss(tmp_path) == float("inf")


def test_mup_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="mup needs mup_base_width"):
        GPTConfig(**TINY, mup=True)
    with pytest.raises(ValueError, match="no multiple of n_head"):
        GPTConfig(**TINY, mup=True, mup_base_width=66)
    assert GPTConfig(**TINY, mup=True, mup_base_width=66,
                     mup_base_head_dim=11).attention_scale == 11 ** 0.5 / 16


def test_train_py_says_what_mup_needs_in_one_line(shakespeare):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--mup=True"],
                          capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: invalid model config: mup needs mup_base_width")


@pytest.mark.parametrize("argv,message", [
    (["nothing"], "first argument must be a subcommand"),
    (["sweep", "--widths=[]"], "must be non-empty lists"),
    (["coord", "--coord_plot=/nonexistent/x.png"], "does not exist"),
    (["coord", "--coord_lrr=1"], "did you mean coord_lr"),
])
def test_bad_mup_py_arguments_are_one_line(tmp_path, argv, message):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "mup.py"), *argv],
                          capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
