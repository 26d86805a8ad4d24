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
# Epoch AI's extraction of the Chinchilla paper's Figure 4 points (Besiroglu et al. 2024,
# arXiv:2404.10102), shipped with the tests
CHINCHILLA_CSV = os.path.join(ROOT, "tests", "data", "chinchilla_svg_extracted_data.csv")


TEXT = "to be or not to be, that is the question\n"
TINY_VOCAB = len(set(TEXT)) + 1  # the characters and the end-of-text id


def write_dataset(name, repeats=400, text=None):
    """data/<name> in the format data.py reads, with a character tokenizer: no prepare.py needed."""
    text = text or TEXT * repeats
    chars = "".join(sorted(set(text)))
    os.makedirs(f"data/{name}")
    ids = np.searchsorted(np.array([ord(c) for c in chars]),
                          [ord(c) for c in text]).astype(np.uint16)
    cut = len(ids) * 9 // 10
    ids[:cut].tofile(f"data/{name}/train.bin")
    ids[cut:].tofile(f"data/{name}/val.bin")
    meta = dict(vocab_size=len(chars) + 1, eot_id=len(chars), dtype="uint16", train_tokens=cut,
                val_tokens=len(ids) - cut, train_bytes=cut, val_bytes=len(ids) - cut,
                tokenizer=dict(kind="char", chars=chars))
    with open(f"data/{name}/meta.json", "w") as f:
        json.dump(meta, f)


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
    # with the default 100 bootstraps
    result = run_json(["fit", CHINCHILLA_CSV, "--drop_highest=5"], capsys)
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
    result = run_json(["fit", write_csv(tmp_path / "runs.csv", {"N": n, "D": d, "loss": loss}),
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
        # the 67B row prints 1.5T tokens where its own FLOPs give C / 6N = 1.43T: the table departs
        # from C = 6ND there
        assert abs(row["D"] / (d if n != 67e9 else c / (6 * n)) - 1) < 0.03, n


def test_table_from_a_law_is_compute_optimal(capsys):
    law = scaling.LAWS["epoch"]
    for row in run_json(["table", "--law=epoch", "--sizes=[1e8,1e10]"], capsys)["rows"]:
        c = row["C"]
        assert math.isclose(c, 6 * row["N"] * row["D"], rel_tol=1e-9)
        for factor in (0.9, 1.1):  # any other split of the same FLOPs loses
            n = row["N"] * factor
            assert scaling.predicted_loss(law, n, c / (6 * n)) > row["loss"]


def test_fit_s_isoflop_profiles_recover_the_exponent_of_a_known_law(tmp_path, capsys):
    law = dict(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.30)
    n, d, budget = [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        center = scaling.optimal_split(law)[0] * (c / 6) ** scaling.optimal_split(law)[1]
        sizes = center * np.geomspace(0.25, 4, 7)
        n += list(sizes)
        d += list(c / (6 * sizes))
        budget += [c] * len(sizes)
    n, d = np.array(n), np.array(d)
    path = write_csv(tmp_path / "iso.csv",
                     {"N": n, "D": d, "loss": scaling.predicted_loss(law, n, d), "budget": budget})
    result = run_json(["fit", path, "--bootstrap=0"], capsys)["isoflop"]
    assert result["budgets_used"] == 4
    a_opt = law["beta"] / (law["alpha"] + law["beta"])
    assert result["power_laws"]["N"]["exponent"] == pytest.approx(a_opt, abs=0.01)
    scaling.main(["fit", path, "--bootstrap=0"])
    assert f"N_opt = {result['power_laws']['N']['coefficient']:.3g} * C^" in capsys.readouterr().out


def test_sweep_micro_grid_end_to_end(tmp_path):
    # 2 budgets x 3 sizes of tiny models on the Shakespeare default, prepared in tmp_path; then
    # Approach 2
    command = [sys.executable, os.path.join(ROOT, "scaling.py"), "sweep", "--budgets=[5e9,1.5e10]",
               "--shapes=[(1,8),(1,16),(2,32)]", "--eval_iters=4", "--batch_size=8", "--json"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert [b["runs"] for b in result["isoflop"]["budgets"]] == [3, 3]
    assert os.path.getsize(tmp_path / "out-sweep" / "isoflop.png") > 10_000
    report = (tmp_path / "out-sweep" / "report.md").read_text()
    assert "![isoFLOP profiles](isoflop.png)" in report and report.count("| C") >= 6
    runs = sorted(os.listdir(tmp_path / "out-sweep"))
    assert len([r for r in runs if r.startswith("C")]) == 6
    # resumes: trains nothing
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "6 already done" in again.stderr


def test_plan_writes_a_config_that_train_py_runs(tmp_path, monkeypatch, capsys):
    import train
    from checkpoint import load_checkpoint
    monkeypatch.chdir(tmp_path)
    write_dataset("tiny")
    plan = run_json(["plan", "--gpu=H100", "--hours=2e-6", "--law=epoch", "--dataset=tiny",
                     "--plan_block_size=32",
                     "--plan_out=plan.py"], capsys)
    law = scaling.LAWS["epoch"]
    assert plan["flops"] == pytest.approx(989e12 * 0.4 * 2e-6 * 3600)
    G, a = scaling.optimal_split(law)
    assert plan["N_opt"] == pytest.approx(G * (plan["flops"] / 6) ** a)
    expected = scaling.predicted_loss(law, plan["N"], plan["tokens"])
    assert plan["expected_loss"] == pytest.approx(expected)
    train.main(["plan.py", "--dataset=tiny", "--out_dir=run", "--max_iters=3", "--eval_iters=2",
                "--sample_tokens=0"])
    checkpoint = load_checkpoint("run/ckpt.pt")
    assert checkpoint["model_config"]["n_embd"] == plan["shape"]["n_embd"]
    assert checkpoint["config"]["batch_tokens"] == plan["batch_tokens"]
    assert checkpoint["state"]["step"] == 3
    assert (plan["vocab_size"], plan["vocab_source"]) == (TINY_VOCAB, "data/tiny")
    # --vocab_size at its word, whatever data/<dataset> holds: GPT-2's shapes the 24-hour plan as
    # RESULTS.md has it
    capsys.readouterr()
    plan = run_json(["plan", "--gpu=H100", "--hours=24", "--law=epoch", "--dataset=tiny",
                     "--vocab_size=50257",
                     "--plan_out=plan.py"], capsys)
    assert (plan["vocab_size"], plan["vocab_source"]) == (50257, "--vocab_size")
    assert plan["shape"]["n_layer"] == 21
    assert "vocabulary 50,257 from --vocab_size" in open("plan.py").read()


def test_bad_input_is_one_line(tmp_path):
    bad_csv = write_csv(tmp_path / "bad.csv", {"params": [1e6], "accuracy": [0.5]})
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    cases = [([str(tmp_path / "missing.csv")], "not found"), ([bad_csv], "needs columns"),
             ([str(empty_run)], "no log.jsonl")]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            scaling.main(["fit", *args])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scaling.py"), "fit",
                           str(tmp_path / "missing.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ")
    with pytest.raises(UserError, match="subcommand"):
        scaling.main(["fitt"])
    with pytest.raises(UserError, match="unknown GPU"):
        scaling.main(["plan", "--gpu=TPU", "--hours=1", "--law=epoch"])


def test_a_law_file_that_is_not_a_law_is_one_line(tmp_path):
    (tmp_path / "law.txt").write_text("E = 1.8\n")
    with pytest.raises(UserError, match="is not JSON"):
        scaling.main(["table", f"--law={tmp_path / 'law.txt'}"])
    (tmp_path / "law.json").write_text(json.dumps(dict(scaling.LAWS["epoch"], alpha="0.35")))
    with pytest.raises(UserError, match="positive numbers"):
        scaling.main(["table", f"--law={tmp_path / 'law.json'}"])


@pytest.mark.parametrize("option, message", [
    ("--hours=-5", "--hours must be at least 0"), ("--gpus=0", "--gpus must be at least 1"),
    ("--dollars=-100", "--dollars must be"), ("--mfu=1.5", "--mfu is a fraction"),
    ("--price_per_gpu_hour=-2", "--price_per_gpu_hour must be")])
def test_plan_refuses_a_bad_budget(option, message):
    with pytest.raises(UserError, match=message):
        scaling.main(["plan", "--gpu=H100", "--hours=1", "--dollars=100",
                      "--price_per_gpu_hour=2", "--law=epoch", option])


def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "fit_law", lambda *args: pytest.fail("the fit ran"))
    with pytest.raises(UserError, match="folder .*nodir does not exist"):
        scaling.main(["fit", CHINCHILLA_CSV, f"--law_out={tmp_path / 'nodir' / 'law.json'}"])
    with pytest.raises(UserError, match="is a folder"):
        scaling.main(["plan", "--gpu=H100", "--hours=1", "--law=epoch", f"--plan_out={tmp_path}"])


def test_a_csv_with_columns_but_no_rows_says_so(tmp_path):
    with pytest.raises(UserError, match="no data rows"):
        scaling.main(["fit", write_csv(tmp_path / "header.csv", {"N": [], "D": [], "loss": []})])


def test_ctrl_c_is_one_line_and_exit_130():
    # Ctrl-C inside main (during a fit, say): configurator.parse, which main calls first, stands in
    # for the work
    code = ("import configurator, runpy\ndef interrupt(*args): raise KeyboardInterrupt\n"
            "configurator.parse = interrupt\nrunpy.run_path('scaling.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, "fit"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 130 and done.stderr == "interrupted\n"


def test_points_that_are_not_finite_and_negative_counts_are_one_line(tmp_path, capsys):
    good = dict(N=[1e6, 2e6, 4e6, 8e6, 16e6, 32e6], D=[1e9] * 6,
                loss=[4.0, 3.8, 3.6, 3.5, 3.4, 3.3])
    for loss, count in [([4.0, 3.8, float("inf"), 3.5, 3.4, 3.3], 1),
                        ([float("nan")] * 2 + [3.6, 3.5, 3.4, 3.3], 2)]:
        # an inf fitted E = 0; a NaN was dropped as highest
        path = write_csv(tmp_path / "points.csv", dict(good, loss=loss))
        message = f"{count} of 6 points have an N, D or loss that is not a positive finite number"
        with pytest.raises(UserError, match=message):
            scaling.main(["fit", path, "--drop_highest=2", "--bootstrap=0"])
    with pytest.raises(UserError, match="--drop_highest must be at least 0, got -1"):
        scaling.main(["fit", write_csv(tmp_path / "good.csv", good), "--drop_highest=-1"])


def test_degenerate_fits_and_bad_settings_are_one_line(tmp_path):
    same = write_csv(tmp_path / "same.csv", dict(N=[1e6] * 6, D=[1e9] * 6, loss=[3.0] * 6))
    one_d = write_csv(tmp_path / "one_d.csv", dict(N=[1e6 * 2 ** k for k in range(6)],
                                                    D=[1e9] * 6, loss=[4, 3.8, 3.6, 3.5, 3.4, 3.3]))
    for path, message in ((same, "have 1 and 1"), (one_d, "have 6 and 1")):
        with pytest.raises(UserError, match=f"3 or more distinct N and D; these points {message}"):
            scaling.main(["fit", path])
    cases = [(["fit", CHINCHILLA_CSV, "--huber_delta=0"], "--huber_delta must be more than 0"),
             (["fit", CHINCHILLA_CSV, "--bootstrap=-3"], "--bootstrap must be at least 0"),
             (["table", "--sizes=[-1e9]"], "--sizes must be a list of positive"),
             (["table", "--sizes=[]"], "--sizes must be a list of positive"),
             (["plan", "--gpu=H100", "--hours=inf", "--law=epoch"], "hours must be a finite number, got inf")]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            scaling.main(argv)


def test_a_fit_at_its_bound_warns(tmp_path, capsys):
    # no irreducible loss in these points: E goes to its bound 0
    n, d = np.geomspace(1e6, 1e9, 6).repeat(6), np.tile(np.geomspace(1e8, 1e11, 6), 6)
    path = write_csv(tmp_path / "e0.csv", dict(N=n, D=d, loss=300 / n ** 0.3 + 900 / d ** 0.3))
    result = run_json(["fit", path, "--bootstrap=0"], capsys)
    assert any(w.startswith("E = ") and "sits at a bound" in w for w in result["warnings"])


def test_exponents_that_disagree_beyond_their_intervals_warn(capsys):
    fit = dict(law=dict(E=1.0, A=1.0, B=1.0, alpha=0.3, beta=0.3, a_opt=0.5), points=9, warnings=[],
               ci95=dict(a_opt=[0.45, 0.55],
                         **{k: [0.9, 1.1] for k in ("E", "A", "B", "alpha", "beta")}))
    iso = dict(power_laws=dict(N=dict(exponent=0.76, coefficient=1.0, ci95=[0.7, 0.8])))
    _, notes = scaling.checked(fit, iso)
    assert len(notes) == 1 and "disagree beyond their 95% intervals" in notes[0]
    assert "warning: isoflop's N_opt ~ C^0.760" in capsys.readouterr().err
    iso["power_laws"]["N"]["ci95"] = [0.5, 1.0]  # overlapping: no warning
    assert scaling.checked(fit, iso)[1] == []


def test_a_plan_beyond_a_few_epochs_of_its_data_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_dataset("tiny", repeats=20)
    plan = run_json(["plan", "--gpu=H100", "--hours=1e-5", "--law=epoch", "--dataset=tiny",
                     "--plan_block_size=32"], capsys)
    assert plan["epochs"] > scaling.FEW_EPOCHS and plan["config"] == "out-scaling/plan.py"
    assert os.path.isfile(tmp_path / "out-scaling" / "plan.py")  # ignored by git: /out*/
    assert f"{plan['epochs']:,.0f} epochs of data/tiny" in plan["warnings"][0]


def test_a_sweep_never_touches_a_live_run(tmp_path, monkeypatch):
    from files import locked_folder
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out-sweep" / "C5e+09_L1_E8"
    run.mkdir(parents=True)
    (run / "train.log").write_text("a live run's log\n")
    with locked_folder(str(run), "train.py"):  # as a train.py of an earlier sweep holds it
        with pytest.raises(UserError, match="is in use by train.py"):
            scaling.main(["sweep", "--budgets=[5e9]", "--shapes=[(1,8),(1,16),(1,32)]"])
    assert (run / "train.log").read_text() == "a live run's log\n"


def test_a_killed_sweep_takes_its_runs_with_it(tmp_path):
    import signal
    import time
    sweep = subprocess.Popen([sys.executable, os.path.join(ROOT, "scaling.py"), "sweep",
                              "--budgets=[1e15]", "--shapes=[(1,8),(1,16),(1,32)]", "--jobs=1"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "out-sweep" / "C1e+15_L1_E8" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and b"train.py" in lock.read_bytes()) and time.time() < deadline:
        assert sweep.poll() is None, "the sweep ended before its first run started"
        time.sleep(0.2)
    child = int(lock.read_bytes().split(b"pid ")[1].rstrip(b")"))
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(child, 0)
            time.sleep(0.2)
        except ProcessLookupError:
            break
    else:
        pytest.fail("the sweep's train.py outlived it")
