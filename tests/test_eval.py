"""eval.py on tiny random models: the adapter's log-likelihoods equal model.py's own (fp32), its
greedy generations sample.py's text, the offline task scores the same through the adapter as through
lm-eval's own hf backend on the export.py folder of the same model, and through lm-eval's console
script from another folder; accuracies are printed with their standard errors; each bad input is
one line. CPU only, no network."""

import dataclasses
import io
import json
import os
import re
import shutil
import string
import subprocess
import sys

import pytest
from conftest import random_gpt
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

import engine  # noqa: E402
import eval  # noqa: E402
import sample  # noqa: E402
from checkpoint import CHECKPOINT_VERSION  # noqa: E402
from configurator import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "\n !'(),-.:;?[]" + string.ascii_letters  # every character of the offline task's items
# 64: shorter than many items of the offline task, whose contexts are then cut on the left
TINY = dict(vocab_size=128, block_size=64, n_layer=2, n_head=4, n_embd=64)
BLOCK = TINY["block_size"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_run(out_dir, chars=CHARS, **arch):
    """A run directory whose checkpoint holds random weights (norms and biases too)."""
    model = random_gpt(**{**TINY, **arch})
    os.makedirs(out_dir, exist_ok=True)
    torch.save(dict(version=CHECKPOINT_VERSION, model=model.state_dict(), config={},
                    model_config=dataclasses.asdict(model.config), state=dict(step=0),
                    tokenizer={"kind": "char", "chars": chars}),
               os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


def harness_of(run, **settings):
    cfg = eval.EvalConfig(out_dir=run, dtype="float32", **settings)
    model, tokenizer, _ = engine.load_model(run, dtype="float32")
    return eval.Harness(model, tokenizer, cfg)


def export(run, to):
    """The export.py folder of a run, as its command line writes it."""
    pytest.importorskip("transformers", reason="export.py needs transformers")
    import export as export_py
    export_py.main([f"--out_dir={run}", f"--to={to}"])
    return str(to)


def requests(kind, *arguments):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in arguments]


def local_task(folder, docs, name="tiny_choice"):
    """A multiple-choice task in lm-eval's YAML format over a local JSON Lines file."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "docs.jsonl"), "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {folder}/docs.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
                "target_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                "    higher_is_better: true\n")
    return str(folder)


# ------------------------------------------------------------------ the adapter against model.py

def direct_logprob(model, ids, scored, vocab):
    """log p of the last `scored` of `ids` (each given the ones before it, within the last
    block_size + 1) among the first `vocab` ids, the ones the model can write, and whether each is
    the argmax, in one fp32 forward pass of model.py."""
    window = torch.tensor([ids[-(model.config.block_size + 1):]])
    logits, _ = model(window[:, :-1], window[:, 1:])
    logprobs = F.log_softmax(logits[0, -scored:, :vocab].float(), dim=-1)
    target = window[0, -scored:]
    greedy = bool((logprobs.argmax(-1) == target).all())
    return logprobs.gather(-1, target[:, None]).sum().item(), greedy


def test_loglikelihoods_equal_a_direct_computation_with_model_py(tmp_path):
    # 6 requests: batches of mixed lengths
    harness = harness_of(write_run(tmp_path / "run"), batch_size=3)
    encode, eot = harness.tokenizer.encode, harness.tokenizer.eot_id
    pairs = [("the king", " is dead"), ("", "Hello there"),
             (("A long night. " * 8).strip(), " And so"), ("a", "b"),
             ("ROMEO: But soft, what light", " through yonder window breaks?\n"),
             ("the king ", "is dead")]  # a trailing space goes to the continuation
    answers = harness.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, answers):
        if context.endswith(" "):
            context, continuation = context[:-1], " " + continuation
        # --bos: end-of-text first, as training documents start
        ids = [eot] + encode(context) + encode(continuation)
        expected, expected_greedy = direct_logprob(harness.model, ids, len(encode(continuation)),
                                                    harness.tokenizer.vocab_size)
        assert logprob == pytest.approx(expected, abs=1e-5) and greedy == expected_greedy
    assert len(encode(pairs[2][0])) > BLOCK  # that context was cut on the left


def test_rolling_loglikelihood_is_every_token_once_with_the_most_context_that_fits(tmp_path):
    harness = harness_of(write_run(tmp_path / "run"), batch_size=2)
    texts = ["To be, or not to be",
             "Now is the winter of our discontent, made glorious summer by this sun. " * 3]
    totals = harness.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                    *[(t,) for t in texts]))
    for text, total in zip(texts, totals):
        ids = [harness.tokenizer.eot_id] + harness.tokenizer.encode(text)
        # tokens 1.. of ids in chunks of block_size, each predicted by the block that ends with it
        chunks = ((s, min(s + BLOCK, len(ids) - 1)) for s in range(0, len(ids) - 1, BLOCK))
        expected = sum(direct_logprob(harness.model, ids[:end + 1], end - start,
                                      harness.tokenizer.vocab_size)[0] for start, end in chunks)
        assert total == pytest.approx(expected, abs=1e-4)
    assert len(texts[1]) > 3 * BLOCK


def test_greedy_generate_until_is_sample_py_s_greedy_text_cut_at_the_stop_sequence(tmp_path):
    run = write_run(tmp_path / "run")
    out = io.StringIO()
    sample.main([f"--out_dir={run}", "--prompt=the king", "--temperature=0",
                 "--max_new_tokens=40", "--dtype=float32"], out=out)
    expected = out.getvalue()[len("the king"):].split("\n" + "-" * 40 + "\n")[0]
    harness = harness_of(run)
    greedy = dict(max_gen_toks=40, do_sample=False)
    stop = expected[10:12]
    whole, cut = harness.generate_until(requests(
        "generate_until", ("the king", dict(greedy, until=[])),
        ("the king", dict(greedy, until=["@@", stop]))))
    assert len(expected) == 40 and whole == expected  # 40 characters: no end-of-text came before
    assert cut == expected[:expected.index(stop)] and len(cut) <= 10


# ----------------------------------------------------------------------------- the offline task

def test_the_offline_task_scores_the_same_through_lm_eval_s_hf_backend_on_the_export(tmp_path):
    from lm_eval import simple_evaluate
    run = write_run(tmp_path / "run", block_size=128)  # most items fit, end-of-text before them
    out = io.StringIO()
    ours = eval.main([f"--out_dir={run}", "--limit=40", "--dtype=float32", "--batch_size=8"],
                     out=out)
    scores = ours["results"]["shakespeare_completion"]
    assert "40 items" in out.getvalue()
    with open(os.path.join(run, "eval_shakespeare_completion.json")) as f:
        assert json.load(f)["results"] == json.loads(json.dumps(ours["results"]))
    for m in ("acc", "acc_norm"):  # lm-eval's table: each accuracy with its standard error
        value, error = scores[f"{m},none"], scores[f"{m}_stderr,none"]
        row = re.search(rf"\|{m} *\|[^|]*\| *([\d.]+)\|± *\| *([\d.]+)\|", out.getvalue())
        assert (float(row[1]), float(row[2])) == (round(value, 4), round(error, 4))
    assert 0 < scores["acc,none"] < 1 and 0 < scores["acc_stderr,none"] < 0.1

    hf_dir = export(run, tmp_path / "hf")
    HFLM = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval[hf] is needed").HFLM
    # add_bos_token: end-of-text before each request, as eval.py's --bos does
    hf = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=8, add_bos_token=True)
    theirs = simple_evaluate(model=hf, tasks=["shakespeare_completion"], limit=40,
                             log_samples=False,
                             task_manager=eval.task_manager(["shakespeare_completion"], ""))
    for metric in ("acc,none", "acc_norm,none"):
        assert scores[metric] == theirs["results"]["shakespeare_completion"][metric]


def test_lm_eval_s_console_script_runs_the_offline_task_from_another_folder(tmp_path):
    """eval.py's docstring command, as printed but for the paths, the CPU and float32: the
    `lm_eval` script (not `python -m lm_eval`, which puts the current folder on the path), from a
    folder that is not the repository's, on the export of a run, scores as eval.py does."""
    script = shutil.which("lm_eval", path=os.path.dirname(sys.executable)) or shutil.which(
        "lm_eval")
    if not script:
        pytest.skip("lm-eval's console script is not installed")
    for package in ("transformers", "accelerate"):
        pytest.importorskip(package, reason=f'lm-eval\'s hf backend needs {package}: pip install '
                                            '"lm-eval[hf]"')
    run = write_run(tmp_path / "run", block_size=128)
    ours = eval.main([f"--out_dir={run}", "--limit=20", "--dtype=float32"], out=io.StringIO())
    hf_dir = export(run, tmp_path / "hf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [script, "--model", "hf", "--model_args",
               f"pretrained={hf_dir},add_bos_token=True,dtype=float32", "--device", "cpu",
               "--include_path", os.path.join(ROOT, "eval_tasks"), "--tasks",
               "shakespeare_completion", "--limit", "20", "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shakespeare_completion" in result.stdout
    [written] = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files
                 if f.startswith("results")]
    with open(written) as f:
        theirs = json.load(f)["results"]["shakespeare_completion"]
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs[metric] == ours["results"]["shakespeare_completion"][metric]


def test_every_eval_py_command_in_its_docstring_takes_its_settings():
    """The commands as printed: their settings are eval.py's (the runs and the Hub they name are
    not here; the lm_eval one is run above)."""
    import configurator
    commands = [line.split("#")[0].split()[2:] for line in eval.__doc__.splitlines()
                if line.strip().startswith("python eval.py")]
    assert len(commands) == 4
    for argv in commands:
        cfg = configurator.build(eval.EvalConfig, configurator.parse(argv, eval.EvalConfig))
        assert all(f"--{k}" in " ".join(argv) or v == getattr(eval.EvalConfig, k)
                   for k, v in dataclasses.asdict(cfg).items())


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_are_one_line_each(tmp_path):
    run = write_run(tmp_path / "run", chars="\nabcdefghijklmnopqrstuvwxyz ")
    with pytest.raises(UserError, match="unknown task 'shakespeare_complet': did you mean "
                       "shakespeare_completion"):
        eval.main([f"--out_dir={run}", "--tasks=shakespeare_complet"])
    with pytest.raises(UserError, match="no checkpoint at"):
        eval.main([f"--out_dir={tmp_path / 'nothing'}"])
    tasks = local_task(tmp_path / "tasks",
                       [dict(context="which", choices=[" This", " that"], answer=0)])
    with pytest.raises(UserError, match="cannot encode: 1 characters not in the char vocabulary: "
                       "'T'"):
        eval.main([f"--out_dir={run}", f"--include_path={tasks}", "--tasks=tiny_choice",
                   "--dtype=float32"])
    with pytest.raises(UserError, match="--limit must be at least 0"):
        eval.main([f"--out_dir={run}", "--limit=-1"])
    with pytest.raises(UserError, match="--tasks is empty"):
        eval.main([f"--out_dir={run}", "--tasks=,"])
    with pytest.raises(UserError, match="threads must be at least 1, or 0"):
        eval.main([f"--out_dir={run}", "--threads=-2"])


def test_a_hub_task_without_network_fails_in_one_line(tmp_path):
    run = write_run(tmp_path / "run")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hub_choice.yaml").write_text(
        "task: hub_choice\ndataset_path: Rowan/hellaswag\ntest_split: validation\n"
        "output_type: multiple_choice\ndoc_to_text: ctx\ndoc_to_choice: endings\n"
        "doc_to_target: label\n")
    command = [sys.executable, os.path.join(ROOT, "eval.py"), f"--out_dir={run}",
               f"--include_path={hub}", "--tasks=hub_choice", "--dtype=float32"]
    offline = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=offline)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: a task's data set could not be fetched (Couldn't reach 'Rowan/hellaswag' on the "
        "Hub (OfflineModeIsEnabled)): the Hub's tasks need the network; "
        "--tasks=shakespeare_completion runs offline"]
