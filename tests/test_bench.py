"""bench.py: every benchmark runs end to end at a tiny size and writes the JSON that RESULTS.md's numbers come
from. Speeds are not asserted: they depend on the machine and its load."""

import base64
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import bench
from configurator import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--new_tokens=12",
        "--warmup_steps=1", "--timed_steps=2", "--repeats=1", "--prepare_mb=0.02"]


def write_ranks(path):
    """A small byte-level BPE in tiktoken's format: the 256 bytes, then a few merges of common letters."""
    tokens = [bytes([i]) for i in range(256)] + [b"th", b"he", b"the", b" the", b"an", b"in", b"er", b"ou"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_every_benchmark_runs_and_writes_its_keys(tmp_path, capsys):
    ranks = write_ranks(tmp_path / "small.tiktoken")
    out = tmp_path / "bench.json"
    results = bench.main(TINY + [f"--prepare_tokenizers=char,{ranks}", f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"training", "generation", "prepare"}

    training = results["training"]
    assert training["model"]["n_layer"] == 1 and training["block_size"] == 32 and training["batch_size"] == 2
    assert training["tok_per_sec"] > 0 and training["flops_per_token"] > 0
    assert training["mfu"] is None  # no peak known for a CPU and none given

    generation = results["generation"]
    for key in ("kv_cache", "kv_cache_plain", "recompute", "recompute_same", "transformers"):
        assert generation[f"{key}_tok_per_sec"] > 0 and generation[f"{key}_settings"]
    assert generation["speedup"] > 0 and generation["speedup_same_settings"] > 0
    assert generation["sample_command_seconds"] > 0 and generation["speedup_whole_command"] > 0
    assert generation["new_tokens"] == 12 and generation["model"]["n_embd"] == 32

    tokenizers = results["prepare"]["tokenizers"]
    assert set(tokenizers) == {"char", str(ranks)}
    for name in tokenizers:
        assert tokenizers[name]["prepare_mb_per_sec"] > 0 and tokenizers[name]["tokenizer_mb_per_sec"] > 0
    assert tokenizers[str(ranks)]["vocab_size"] == 265  # 264 ranks and the end-of-text token
    printed = capsys.readouterr().out
    assert "MFU" in printed and "n/a" in printed and "speed-up like for like" in printed


def test_peak_tflops_gives_an_mfu(capsys):
    results = bench.main(TINY + ["--only=training", "--peak_tflops=1.0"])
    assert set(results) == {"training"}
    assert 0 < results["training"]["mfu"] < 1
    assert results["training"]["profile"] is None  # only when asked for


def test_profile_lists_the_operations_that_took_the_step_s_time(capsys):
    profile = bench.main(TINY + ["--only=training", "--profile_steps=2"])["training"]["profile"]
    assert 0 < len(profile) <= 15
    times = [op["ms_per_step"] for op in profile]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert any(op["name"] in ("aten::mm", "aten::addmm") for op in profile)  # the matrix products are there
    assert "where a step's time went" in capsys.readouterr().out


def test_speedrun_times_whole_train_commands_and_reads_their_final_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question.\n" * 400)
    common = ('dataset = "tiny"\nsource = "corpus.txt"\ntokenizer = "char"\nn_layer = 1\nn_head = 2\nn_embd = 32\n'
              'block_size = 32\nbatch_size = 4\neval_iters = 2\nsample_tokens = 0\nwarmup_iters = 2\n')
    (tmp_path / "slow.py").write_text(common + 'out_dir = "out-slow"\nmax_iters = 20\neval_interval = 10\n')
    (tmp_path / "fast.py").write_text(common + 'out_dir = "out-fast"\nmax_iters = 10\neval_interval = 10\n')
    import prepare
    prepare.main(["slow.py"])
    results = bench.main(["--only=speedrun", "--speedrun=slow.py,fast.py,fast.py --max_iters=5 --out_dir=out-5",
                          "--speedrun_target=3.0"])
    slow, fast, faster = results["speedrun"]["runs"]
    assert [(run["command"], run["steps"]) for run in (slow, fast, faster)] == [
        ("slow.py", 20), ("fast.py", 10), ("fast.py --max_iters=5 --out_dir=out-5", 5)]
    assert (tmp_path / "out-fast" / "log.jsonl").exists() and (tmp_path / "out-5" / "log.jsonl").exists()
    assert slow["seconds"] > 0 and fast["seconds"] > 0 and slow["val_loss"] < 5
    evals = [json.loads(line) for line in open(tmp_path / "out-slow" / "log.jsonl") if "val_loss" in line]
    best = min(evals, key=lambda r: r["val_loss"])
    assert (slow["best_val_loss"], slow["best_step"], slow["best_elapsed"]) == (best["val_loss"], best["step"], best["elapsed"])
    first_below = next((r["elapsed"] for r in evals if r["val_loss"] <= 3.0), None)
    assert slow["target_elapsed"] == first_below and not slow["stopped_at_limit"]
    out = capsys.readouterr().out
    reached_at = next((r["step"] for r in evals if r["val_loss"] <= 3.0), None)
    assert "% of the baseline" in out
    baseline_verdict = [line for line in out.splitlines() if "reach" in line][0]  # one per run, the baseline first
    assert (f"reached 3 at step {reached_at:,}," if reached_at is not None else "did not reach 3") in baseline_verdict


def test_speedrun_limit_stops_a_command_and_reports_how_far_it_got(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question.\n" * 400)
    (tmp_path / "endless.py").write_text('dataset = "tiny"\nsource = "corpus.txt"\ntokenizer = "char"\nn_layer = 1\n'
                                         'n_head = 2\nn_embd = 32\nblock_size = 32\nbatch_size = 4\neval_iters = 2\n'
                                         'sample_tokens = 0\nmax_iters = 10_000_000\neval_interval = 5\n')
    import prepare
    prepare.main(["endless.py"])
    run, = bench.main(["--only=speedrun", "--speedrun=endless.py", "--speedrun_limit=8", "--busy=1"])["speedrun"]["runs"]
    assert run["stopped_at_limit"] and 8 <= run["seconds"] < 20
    assert 0 <= run["steps"] < 10_000_000 and run["best_val_loss"] <= run["val_loss"] + 1e-9
    out = capsys.readouterr().out
    assert "stopped at the limit" in out and "beside 1 busy process(es)" in out


def test_busy_processes_each_keep_a_core_busy_until_the_block_ends():
    with bench.busy_processes(2) as spinners:
        time.sleep(1.0)
        cpu_seconds = [sum(map(int, open(f"/proc/{s.pid}/stat").read().split()[13:15])) / os.sysconf("SC_CLK_TCK")
                       for s in spinners]
        assert all(s.poll() is None for s in spinners) and all(t > 0.2 for t in cpu_seconds), cpu_seconds
    assert all(s.poll() is not None for s in spinners)


@pytest.mark.parametrize("option, message", [("--new_tokens=0", "--new_tokens must be at least 1"),
                                             ("--timed_steps=0", "--timed_steps must be at least 1"),
                                             ("--repeats=0", "--repeats must be at least 1"),
                                             ("--prepare_mb=-1", "--prepare_mb must be more than 0"),
                                             ("--json=nodir/b.json", "folder nodir does not exist"),
                                             ("--prepare_tokenizers=char,bogus", "'bogus' is neither char, sp, gpt2")])
def test_bad_settings_are_refused_before_any_benchmark_runs(monkeypatch, option, message):
    monkeypatch.setattr(bench, "BENCHMARKS", {name: lambda *args: pytest.fail("a benchmark ran") for name in bench.BENCHMARKS})
    with pytest.raises(UserError, match=message):
        bench.main([option])


def test_ctrl_c_is_one_line_and_exit_130():
    # Ctrl-C inside main (during a benchmark, say): configurator.parse, which main calls first, stands in for the work
    code = ("import configurator, runpy\ndef interrupt(*args): raise KeyboardInterrupt\n"
            "configurator.parse = interrupt\nrunpy.run_path('bench.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 130 and done.stderr == "interrupted\n"


def test_serving_times_the_first_token_with_and_without_kept_caches(capsys):
    pytest.importorskip("fastapi")
    results = bench.main(["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--serve_turns=3",
                          "--dtype=float32", "--only=serving"])
    turns = results["serving"]["turns"]
    assert [turn["prefilled"] for turn in turns][1:] == [14, 14]  # later messages prefill their own tokens only
    assert turns[0]["prefilled"] == turns[0]["context_tokens"] < turns[-1]["context_tokens"] <= 64
    assert all(turn["kept_cache_seconds"] > 0 and turn["no_cache_seconds"] > 0 for turn in turns)
    assert results["serving"]["speedup_last_turn"] > 0 and "first token, kept cache" in capsys.readouterr().out


def test_gpu_suite_runs_every_part_at_tiny_size_and_writes_finite_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tinyshakespeare_char").mkdir(parents=True)
    (tmp_path / "data" / "tinyshakespeare_char" / "input.txt").write_text("to be or not to be, that is the question.\n" * 400)
    out = tmp_path / "suite.json"
    results = bench.main(["--suite=gpu", "--tiny=True", f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"machine", "gpt2_small", "moe", "moe_dense_twin", "host_syncs", "speedrun", "summary"}
    assert results["machine"]["device"] and results["machine"]["torch"] == torch.__version__
    gpt2, moe, dense = results["gpt2_small"], results["moe"], results["moe_dense_twin"]
    assert gpt2["model"]["n_layer"] == 2 and gpt2["model"]["vocab_size"] == 50304 and gpt2["model"]["pos_emb"] == "learned"
    assert moe["model"]["moe_experts"] == 16 and dense["model"]["moe_experts"] == 0 and dense["model"]["mlp_hidden"] == 1536
    assert results["host_syncs"]["counted"] is False and results["host_syncs"]["steps"] == [2, 4]
    run, = results["speedrun"]["runs"]
    assert run["steps"] == 4 and (tmp_path / "out-speedrun-gpu" / "log.jsonl").exists()
    summary = results["summary"]
    assert set(summary) == {"gpt2_small_mfu", "moe_mfu_vs_dense", "host_syncs_per_step", "speedrun_seconds",
                            "speedrun_best_val_loss", "speedrun_target_elapsed"}
    assert all(math.isfinite(value) for key, value in summary.items() if key != "speedrun_target_elapsed")
    assert 0 < summary["gpt2_small_mfu"] < 1 and summary["moe_mfu_vs_dense"] > 0
    assert "GPU suite on" in capsys.readouterr().out


def test_gpu_suite_says_in_one_line_that_the_speedrun_data_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "GPU_SUITE", [part for part in bench.GPU_SUITE if part[0] in ("host_syncs", "speedrun")])
    results = bench.main(["--suite=gpu", "--tiny=True"])
    assert results["speedrun"] == results["host_syncs"] == dict(skipped="data/tinyshakespeare_char/input.txt is missing")
    assert results["summary"] == {}
    assert "skipped, data/tinyshakespeare_char/input.txt is missing" in capsys.readouterr().out


def test_a_suite_part_is_stopped_at_its_budget(tmp_path):
    assert bench.run_part("slow", 1, ["--only=training"], str(tmp_path / "part.json")) == dict(stopped_at_budget=1)


def test_host_syncs_are_counted_at_the_line_of_this_repository_that_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)  # what a CUDA build does: warn per sync

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    sites = bench.count_syncs(step, torch.device("cuda"))
    line = step.__code__.co_firstlineno + 2
    assert sites == {f"tests/test_bench.py:{line} warnings.warn(\"called a synchronizing CUDA operation\")": 3}
