"""bench.py: each row runs in --quick mode on tiny models and prints its fields. Speeds are never
asserted: they depend on the machine and its load."""

import json
import re

import numpy as np
import pytest

import bench
from configurator import UserError


def make_dataset(root, name="tiny"):
    """data/<name> as prepare.py writes it: char ids in train.bin and val.bin, and meta.json."""
    text = "to be or not to be, that is the question.\n" * 200
    chars = "".join(sorted(set(text)))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    folder = root / "data" / name
    folder.mkdir(parents=True)
    cut = len(ids) * 9 // 10
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    meta = dict(vocab_size=len(chars) + 1, dtype="uint16", eot_id=len(chars),
                tokenizer=dict(kind="char", chars=chars), train_tokens=cut,
                train_bytes=cut, val_tokens=len(ids) - cut, val_bytes=len(ids) - cut)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_speedrun_runs_both_commands_alternately_and_prints_seconds_losses_and_ratio(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_dataset(tmp_path)
    common = 'dataset = "tiny"\ntokenizer = "char"\nsample_tokens = 0\neval_interval = 100\n'
    (tmp_path / "slow.py").write_text(common + 'optimizer = "adamw"\n')
    (tmp_path / "fast.py").write_text(common + 'optimizer = "muon"\n')
    results = bench.main(["--only=speedrun", "--quick=True", "--rounds=2", "--baseline=slow.py",
                          "--speedrun=fast.py"])["speedrun"]
    assert set(results["seconds"]) == set(results["val_loss"]) == {"baseline", "speedrun"}
    assert all(0 < loss < 10 for loss in results["val_loss"].values())
    out = capsys.readouterr().out
    row = r"round (\d) (baseline|speedrun) +(\S+) +([\d.]+) s  val loss ([\d.]+)"
    rounds = re.findall(row, out)
    assert [(r[0], r[1], r[2]) for r in rounds] == [
        ("1", "baseline", "slow.py"), ("1", "speedrun", "fast.py"),
        ("2", "baseline", "slow.py"), ("2", "speedrun", "fast.py")]
    ratio = float(re.search(r"speedrun / baseline seconds: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(results["ratio"], abs=1e-3)


def test_speedrun_says_in_one_line_which_command_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none.py").write_text('dataset = "absent"\n')
    with pytest.raises(UserError, match="python train.py none.py failed: .*absent"):
        bench.main(["--only=speedrun", "--quick=True", "--rounds=1", "--baseline=none.py",
                    "--speedrun=none.py"])


def test_generation_compares_our_generate_with_transformers_on_the_same_weights(capsys):
    pytest.importorskip("transformers")
    results = bench.main(["--only=generation", "--quick=True", "--rounds=2",
                          "--device=cpu"])["generation"]
    assert set(results["tokens_per_sec"]) == {"ours", "transformers"}
    assert results["new_tokens"] == 16
    out = capsys.readouterr().out
    assert "generation: 1 x 32, context 64, vocabulary 65, 16 tokens" in out
    rounds = re.findall(r"round (\d) (ours|transformers) +([\d.]+) tokens/s", out)
    assert [r[:2] for r in rounds] == [("1", "ours"), ("1", "transformers"),
                                       ("2", "ours"), ("2", "transformers")]
    assert re.search(r"ours / transformers tokens/s: [\d.]+", out)


@pytest.mark.parametrize("option, message", [
    ("--only=bogus", "unknown row bogus"), ("--rounds=0", "--rounds must be at least 1"),
    ("--new_tokens=0", "--new_tokens must be at least 1")])
def test_bad_settings_are_one_line_before_any_row_runs(monkeypatch, option, message):
    monkeypatch.setattr(bench, "BENCHMARKS", {name: lambda cfg: pytest.fail("a row ran")
                                              for name in bench.BENCHMARKS})
    with pytest.raises(UserError, match=message):
        bench.main([option])
