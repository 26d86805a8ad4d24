import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import scaling
from configurator import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Epoch AI's extraction of the Chinchilla paper's Figure 4 points (Besiroglu et al. 2024, arXiv:2404.10102),
# shipped with the tests
CHINCHILLA_CSV = os.path.join(ROOT, "tests", "data", "chinchilla_svg_extracted_data.csv")


def run_json(argv, capsys):
    scaling.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)


def write_csv(path, columns):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
    return str(path)


def test_fit_recovers_epoch_replication_from_chinchilla_csv(capsys):
    result = run_json(["fit", CHINCHILLA_CSV, "--drop_highest=5"], capsys)  # with the default 100 bootstraps
    law = result["law"]
    assert result["points"] == 240
    assert abs(law["E"] / 1.817 - 1) < 0.01
    assert abs(law["alpha"] - 0.347) < 0.005 and abs(law["beta"] - 0.367) < 0.005
    low, high = result["ci95"]["alpha"]
    assert low < law["alpha"] < high


def test_fit_recovers_a_known_law_from_noisy_points(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truth = dict(E=1.6, A=300.0, B=900.0, alpha=0.32, beta=0.38)
    n, d = np.geomspace(1e7, 1e10, 12).repeat(10), np.tile(np.geomspace(1e8, 1e12, 10), 12)
    loss = scaling.predicted_loss(truth, n, d) * np.exp(rng.normal(0, 0.003, n.size))
    result = run_json(["fit", write_csv(tmp_path / "runs.csv", {"params": n, "tokens": d, "loss": loss}),
                       "--bootstrap=0", f"--law_out={tmp_path / 'law.json'}"], capsys)
    for key in ("alpha", "beta"):
        assert abs(result["law"][key] - truth[key]) < 0.03
    assert abs(result["law"]["E"] / truth["E"] - 1) < 0.03
    table = run_json(["table", f"--law={tmp_path / 'law.json'}", "--sizes=[1e9]"], capsys)
    assert table["rows"][0]["loss"] > result["law"]["E"]


def test_approach1_table_matches_the_paper_within_3_percent(capsys):
    rows = run_json(["table"], capsys)["rows"]
    assert len(rows) == len(scaling.APPROACH1_TABLE)
    for row, (n, c, d) in zip(rows, scaling.APPROACH1_TABLE):
        assert abs(row["C"] / c - 1) < 0.03, n
        # the 67B row prints 1.5T tokens where its own FLOPs give C / 6N = 1.43T: the table departs from C = 6ND there
        assert abs(row["D"] / (d if n != 67e9 else c / (6 * n)) - 1) < 0.03, n


def test_table_from_a_law_is_compute_optimal(capsys):
    law = scaling.LAWS["epoch"]
    for row in run_json(["table", "--law=epoch", "--sizes=[1e8,1e10]"], capsys)["rows"]:
        c = row["C"]
        assert math.isclose(c, 6 * row["N"] * row["D"], rel_tol=1e-9)
        for factor in (0.9, 1.1):  # any other split of the same FLOPs loses
            n = row["N"] * factor
            assert scaling.predicted_loss(law, n, c / (6 * n)) > row["loss"]


def test_mfu_reproduces_the_primer_worked_example(capsys):
    model = ["--n_layer=26", "--n_embd=2304", "--block_size=2048", "--gpu=A100", "--mfu=0.35"]
    for n, primer_days in ((1e9, [787, 1574, 3935]), (2e9, None)):
        result = run_json(["mfu", f"--params={n:g}", *model], capsys)
        per_token = 6 * n + 12 * 26 * 2304 * 2048  # 6N + 12*L*H*Q*T, with H*Q = 2,304
        days = [result["gpu_days"][k] for k in ("1e+12", "2e+12", "5e+12", "1e+13")]
        assert days == pytest.approx([t * per_token / (312e12 * 0.35) / 86400 for t in (1e12, 2e12, 5e12, 1e13)])
        if primer_days:  # the primer's 1B row, 1T to 5T tokens, is within 1% of its formula (792, 1,584, 3,960)
            assert days[:3] == pytest.approx(primer_days, rel=0.01)
    assert days[0] == pytest.approx(1428, abs=1)  # the primer prints 1,574 for 2B: twice its 1B row, not its formula


def test_mfu_of_the_350m_article(capsys):
    result = run_json(["mfu", os.path.join(ROOT, "config", "gpt_350m.py"), "--tok_per_sec=50000", "--gpu=A100"], capsys)
    n = 24 * 12 * 1024 ** 2 + (2 * 24 + 1) * 1024 + 50304 * 1024  # blocks, bias-free norms, the tied output head
    assert result["N"] == n
    assert result["mfu"] == pytest.approx((6 * n + 12 * 24 * 1024 * 2048) * 50000 / 312e12)  # 43.7%


def test_isoflop_recovers_the_exponent_of_a_known_law(tmp_path, capsys):
    law = dict(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.30)
    n, d, budget = [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        center = scaling.optimal_split(law)[0] * (c / 6) ** scaling.optimal_split(law)[1]
        sizes = center * np.geomspace(0.25, 4, 7)
        n += list(sizes)
        d += list(c / (6 * sizes))
        budget += [c] * len(sizes)
    n, d = np.array(n), np.array(d)
    path = write_csv(tmp_path / "iso.csv", {"N": n, "D": d, "loss": scaling.predicted_loss(law, n, d), "budget": budget})
    result = run_json(["isoflop", path, f"--plot={tmp_path / 'iso.png'}"], capsys)
    assert result["budgets_used"] == 4
    assert result["power_laws"]["N"]["exponent"] == pytest.approx(law["beta"] / (law["alpha"] + law["beta"]), abs=0.01)
    assert result["power_laws"]["D"]["exponent"] == pytest.approx(law["alpha"] / (law["alpha"] + law["beta"]), abs=0.01)
    assert os.path.getsize(tmp_path / "iso.png") > 10_000


def test_sweep_micro_grid_end_to_end(tmp_path):
    # 2 budgets x 3 sizes of tiny models on the Shakespeare default, prepared in tmp_path; then Approach 2
    command = [sys.executable, os.path.join(ROOT, "scaling.py"), "sweep", "--budgets=[5e9,1.5e10]",
               "--shapes=[(1,8),(1,16),(2,32)]", "--eval_iters=4", "--batch_size=8", "--json"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert [b["runs"] for b in result["budgets"]] == [3, 3]
    assert os.path.getsize(tmp_path / "out-sweep" / "isoflop.png") > 10_000
    runs = sorted(os.listdir(tmp_path / "out-sweep"))
    assert len([r for r in runs if r.startswith("C")]) == 6
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # resumes: trains nothing
    assert again.returncode == 0 and "6 already done" in again.stderr


def test_plan_writes_a_config_that_train_py_runs(tmp_path, monkeypatch, capsys):
    import prepare
    import runtime
    import train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 400)
    prepare.main(["--source=corpus.txt", "--dataset=tiny"])
    capsys.readouterr()
    plan = run_json(["plan", "--gpu=H100", "--hours=2e-6", "--law=epoch", "--dataset=tiny", "--plan_block_size=32",
                     "--plan_out=plan.py"], capsys)
    law = scaling.LAWS["epoch"]
    assert plan["flops"] == pytest.approx(989e12 * 0.4 * 2e-6 * 3600)
    G, a = scaling.optimal_split(law)
    assert plan["N_opt"] == pytest.approx(G * (plan["flops"] / 6) ** a)
    assert plan["expected_loss"] == pytest.approx(scaling.predicted_loss(law, plan["N"], plan["tokens"]))
    train.main(["plan.py", "--dataset=tiny", "--out_dir=run", "--max_iters=3", "--eval_iters=2", "--sample_tokens=0"])
    checkpoint = runtime.load_checkpoint("run/ckpt.pt")
    assert checkpoint["model_config"]["n_embd"] == plan["shape"]["n_embd"]
    assert checkpoint["config"]["batch_tokens"] == plan["batch_tokens"] and checkpoint["state"]["step"] == 3
    assert (plan["vocab_size"], plan["vocab_source"]) == (prepare.load_meta("data/tiny")["vocab_size"], "data/tiny")
    # --vocab_size at its word, whatever data/<dataset> holds: GPT-2's shapes the 24-hour plan as RESULTS.md has it
    capsys.readouterr()
    plan = run_json(["plan", "--gpu=H100", "--hours=24", "--law=epoch", "--dataset=tiny", "--vocab_size=50257",
                     "--plan_out=plan.py"], capsys)
    assert (plan["vocab_size"], plan["vocab_source"], plan["shape"]["n_layer"]) == (50257, "--vocab_size", 21)
    assert "# vocabulary 50,257 from --vocab_size" in open("plan.py").read()


def test_plan_under_mup_keeps_the_proxy_s_learning_rate_and_trains_at_the_planned_width(tmp_path, monkeypatch, capsys):
    import prepare
    import runtime
    import train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 400)
    prepare.main(["--source=corpus.txt", "--dataset=tiny"])
    capsys.readouterr()
    argv = ["plan", "--gpu=H100", "--hours=2e-6", "--law=epoch", "--dataset=tiny", "--plan_block_size=32", "--plan_out=plan.py"]
    standard = run_json(argv, capsys)
    plan = run_json(argv + ["--mup=True", "--mup_base_width=32", "--learning_rate=0.004"], capsys)
    assert plan["learning_rate"] == 0.004 != standard["learning_rate"] and plan["shape"] == standard["shape"]
    assert plan["mup"] == dict(mup=True, mup_base_width=32, mup_base_head_dim=8)  # the proxy's 4 heads (train.py's default)
    train.main(["plan.py", "--dataset=tiny", "--out_dir=run", "--max_iters=2", "--eval_iters=2", "--sample_tokens=0"])
    checkpoint = runtime.load_checkpoint("run/ckpt.pt")  # the parametrization travels with the weights
    assert checkpoint["model_config"]["mup"] and checkpoint["model_config"]["n_embd"] == plan["shape"]["n_embd"]
    assert checkpoint["config"]["learning_rate"] == 0.004
    with pytest.raises(scaling.UserError, match="give --mup_base_width"):
        scaling.main(argv + ["--mup=True", "--mup_base_width=32"])


def test_bad_input_is_one_line(tmp_path):
    bad_csv = write_csv(tmp_path / "bad.csv", {"params": [1e6], "accuracy": [0.5]})
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    cases = [([str(tmp_path / "missing.csv")], "not found"), ([bad_csv], "needs columns"),
             ([str(empty_run)], "no log.jsonl")]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            scaling.main(["fit", *args])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scaling.py"), "fit", str(tmp_path / "missing.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    with pytest.raises(UserError, match="subcommand"):
        scaling.main(["fitt"])
    with pytest.raises(UserError, match="unknown GPU"):
        scaling.main(["mfu", "--params=1e9", "--gpu=TPU", "--mfu=0.4"])


def test_a_law_file_that_is_not_a_law_is_one_line(tmp_path):
    (tmp_path / "law.txt").write_text("E = 1.8\n")
    with pytest.raises(UserError, match="is not JSON"):
        scaling.main(["table", f"--law={tmp_path / 'law.txt'}"])
    (tmp_path / "law.json").write_text(json.dumps(dict(scaling.LAWS["epoch"], alpha="0.35")))
    with pytest.raises(UserError, match="positive numbers"):
        scaling.main(["table", f"--law={tmp_path / 'law.json'}"])


@pytest.mark.parametrize("option, message", [("--hours=-5", "--hours must be"), ("--gpus=0", "--gpus must be at least 1"),
                                             ("--dollars=-100", "--dollars must be"), ("--mfu=1.5", "--mfu is a fraction"),
                                             ("--price_per_gpu_hour=-2", "--price_per_gpu_hour must be")])
def test_plan_refuses_a_bad_budget(option, message):
    with pytest.raises(UserError, match=message):
        scaling.main(["plan", "--gpu=H100", "--hours=1", "--dollars=100", "--price_per_gpu_hour=2", "--law=epoch", option])


def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "fit_law", lambda *args: pytest.fail("the fit ran"))
    with pytest.raises(UserError, match="folder .*nodir does not exist"):
        scaling.main(["fit", CHINCHILLA_CSV, f"--law_out={tmp_path / 'nodir' / 'law.json'}"])
    with pytest.raises(UserError, match="is a folder"):
        scaling.main(["plan", "--gpu=H100", "--hours=1", "--law=epoch", f"--plan_out={tmp_path}"])


def test_a_csv_with_columns_but_no_rows_says_so(tmp_path):
    with pytest.raises(UserError, match="no data rows"):
        scaling.main(["fit", write_csv(tmp_path / "header.csv", {"params": [], "tokens": [], "loss": []})])


def test_ctrl_c_is_one_line_and_exit_130():
    # Ctrl-C inside main (during a fit, say): configurator.parse, which main calls first, stands in for the work
    code = ("import configurator, runpy\ndef interrupt(*args): raise KeyboardInterrupt\n"
            "configurator.parse = interrupt\nrunpy.run_path('scaling.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, "fit"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 130 and done.stderr == "interrupted\n"


def test_points_that_are_not_finite_and_negative_counts_are_one_line(tmp_path, capsys):
    good = dict(params=[1e6, 2e6, 4e6, 8e6, 16e6, 32e6], tokens=[1e9] * 6, loss=[4.0, 3.8, 3.6, 3.5, 3.4, 3.3])
    for loss, count in [([4.0, 3.8, float("inf"), 3.5, 3.4, 3.3], 1), ([float("nan")] * 2 + [3.6, 3.5, 3.4, 3.3], 2)]:
        path = write_csv(tmp_path / "points.csv", dict(good, loss=loss))  # an inf fitted E = 0; a NaN was dropped as highest
        with pytest.raises(UserError, match=f"{count} of 6 points have an N, D or loss that is not a positive finite number"):
            scaling.main(["fit", path, "--drop_highest=2", "--bootstrap=0"])
    with pytest.raises(UserError, match="--drop_highest must be 0 or more, got -1"):
        scaling.main(["fit", write_csv(tmp_path / "good.csv", good), "--drop_highest=-1"])
    with pytest.raises(UserError, match="--tok_per_sec and --params must not be negative"):  # printed an MFU of -43.7%
        scaling.main(["mfu", "--params=1e9", "--tok_per_sec=-50000", "--gpu=A100"])
