"""serve.py against real clients on localhost: the official openai package gets sample.py's greedy text, streamed or
whole; later turns prefill only their new tokens; concurrent clients all get their own replies within the cache
budget; a client that disconnects stops its reply; bad requests get 4xx in OpenAI's error shape; the API key."""

import contextlib
import json
import shutil
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import uvicorn

import sample
import serve
from configurator import UserError
from test_sample import ROOT, TEMPLATE, count_forward_tokens, tiny_model, write_run
from tokenizer import render_chat

WORDS = "the king and queen speak to their lords of war".split()


@contextlib.contextmanager
def running(run_dir, **settings):
    """serve.py's app on a free localhost port, uvicorn in a thread of this process: the base URL and the Server."""
    cfg = serve.ServeConfig(out_dir=str(run_dir), port=0, dtype="float32", **settings)
    server = serve.Server(*sample.load(cfg), cfg)
    sock = serve.listen("127.0.0.1", 0)
    web = uvicorn.Server(uvicorn.Config(serve.make_app(server), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        web.should_exit = True
        thread.join(10)
        server.close()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("chat") / "run", model=tiny_model(block_size=512), chat_template=TEMPLATE)
    with running(run, max_new_tokens=600) as (url, server):
        yield url, server


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def sample_chat(server, messages, max_tokens):
    """sample.py's greedy replies to `messages`, one after the other, as sample.py --chat gives them."""
    chat = sample.Chat(server.model, server.tokenizer, TEMPLATE)
    return ["".join(chat.respond(m, max_tokens, temperature=0)) for m in messages]


def ask(openai_client, history, message, stream=False, **kwargs):
    """Send the conversation and `message`; the reply's text and its usage (from the last chunk when streamed)."""
    messages = history + [dict(role="user", content=message)]
    settings = dict(model="run", messages=messages, **{"temperature": 0, **kwargs})
    if not stream:
        response = openai_client.chat.completions.create(**settings)
        return response.choices[0].message.content, response.usage, response.choices[0].finish_reason
    text, usage, finish = "", None, None
    for chunk in openai_client.chat.completions.create(**settings, stream=True, stream_options=dict(include_usage=True)):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return text, usage, finish


def test_whole_and_streamed_replies_equal_sample_py_greedy_text(chat_server):
    url, server = chat_server
    messages = ["hello there", "and who are you", "speak to the king"]
    expected = sample_chat(server, messages, max_tokens=40)
    assert any(expected) and len(set(expected)) == 3
    for stream in (False, True):
        history = []
        for message, reply in zip(messages, expected):
            text, usage, finish = ask(client(url), history, message, stream=stream, max_tokens=40)
            assert text == reply and finish in ("stop", "length") and usage.completion_tokens > 0
            history += [dict(role="user", content=message), dict(role="assistant", content=text)]


def test_completions_equal_sample_py_greedy_text(chat_server, tmp_path):
    url, server = chat_server
    out = tmp_path / "sample.txt"
    with open(out, "w") as f:
        sample.sample(server.model, server.tokenizer, sample.SampleConfig(prompt="the queen", max_new_tokens=30,
                                                                          temperature=0), f)
    expected = out.read_text().split("\n" + "-" * 40)[0][len("the queen"):]
    response = client(url).completions.create(model="run", prompt="the queen", max_tokens=30, temperature=0)
    assert response.choices[0].text == expected and response.usage.prompt_tokens == 10
    streamed = client(url).completions.create(model="run", prompt="the queen", max_tokens=30, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_a_seed_gives_the_same_sampled_reply(chat_server):
    url, _ = chat_server
    replies = [ask(client(url), [], "hello", temperature=1.0, seed=seed, max_tokens=30)[0] for seed in (1, 1, 2)]
    assert replies[0] == replies[1] != replies[2]


def test_an_exported_hugging_face_folder_is_served_as_sample_py_reads_it(tmp_path):
    pytest.importorskip("transformers")
    import export
    write_run(tmp_path / "run")
    export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"])
    out = tmp_path / "sample.txt"
    with open(out, "w") as f:
        sample.main([f"--out_dir={tmp_path / 'hf'}", "--prompt=the king", "--temperature=0", "--max_new_tokens=20",
                     "--dtype=float32"], out=f)
    with running(tmp_path / "hf") as (url, _):
        response = client(url).completions.create(model="hf", prompt="the king", max_tokens=20, temperature=0)
    assert "the king" + response.choices[0].text == out.read_text().split("\n" + "-" * 40)[0]


def test_each_later_turn_prefills_only_its_new_tokens(chat_server, monkeypatch):
    url, server = chat_server
    calls = count_forward_tokens(monkeypatch, server.model)
    encode, history, finish = server.tokenizer.encode, [], None
    for turn in range(10):
        message = " ".join(WORDS[turn:turn + 3])
        first_call = len(calls)
        text, usage, new_finish = ask(client(url), history, message, stream=turn % 2 == 1, max_tokens=12)
        prefilled = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
        assert calls[first_call][0] == prefilled  # what usage reports is what the model ran
        assert all(n == 1 for n, _ in calls[first_call + 1:])  # then one token per forward
        history += [dict(role="user", content=message), dict(role="assistant", content=text)]
        rendered = render_chat(server.tokenizer, TEMPLATE, history)[0]
        assert usage.prompt_tokens == len(rendered) - len(encode(text + "<e>"))  # all but the reply itself
        if turn:
            # the new message and its assistant marker, plus what the cache lacks of the last reply: its last token
            # when it ended at end_of_turn (sampled, never fed), or the end_of_turn appended when it ran out of tokens
            assert prefilled == len(encode(f"<u>{message}<e><a>")) + (1 if finish == "stop" else len(encode("<e>")))
        finish = new_finish
    assert server.caches.caches  # the conversation's cache is kept


def test_a_long_conversation_drops_its_oldest_exchanges_as_sample_py_does(tmp_path, capfd):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=64), chat_template=TEMPLATE)
    with running(run) as (url, server):
        messages = [f"{word:>5}" for word in WORDS[:7]]  # one length, so both drop at the same turns
        expected = sample_chat(server, messages, max_tokens=8)
        history = []
        for message, reply in zip(messages, expected):
            text, usage, _ = ask(client(url), history, message, max_tokens=8)
            assert text == reply and usage.prompt_tokens + 8 <= 64
            history += [dict(role="user", content=message), dict(role="assistant", content=text)]
        assert "dropped the oldest" in capfd.readouterr().err
        with pytest.raises(openai.BadRequestError, match="that message takes 69 tokens and the context holds 64"):
            ask(client(url), history, "a" * 60)
        assert ask(client(url), [], "hello")[0] == sample_chat(server, ["hello"], 500)[0]  # it goes on serving


def test_eight_concurrent_clients_get_their_own_replies_within_the_cache_budget(tmp_path):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=256), chat_template=TEMPLATE)
    with running(run, cache_mb=0.5) as (url, server):
        assert server.caches.capacity == 3  # fewer kept caches than clients: conversations are evicted and rebuilt
        conversations = [[f"{WORDS[c]} {WORDS[(c + t) % len(WORDS)]}" for t in range(5)] for c in range(8)]
        expected = [sample_chat(server, messages, max_tokens=10) for messages in conversations]
        replies, errors = [None] * 8, []

        def talk(c):
            try:
                history, got = [], []
                for message in conversations[c]:
                    text, _, _ = ask(client(url), history, message, stream=c % 2 == 0, max_tokens=10)
                    history += [dict(role="user", content=message), dict(role="assistant", content=text)]
                    got.append(text)
                replies[c] = got
            except Exception as e:  # noqa: BLE001 -- reported below, with the client it happened to
                errors.append(f"client {c}: {e!r}")

        threads = [threading.Thread(target=talk, args=(c,)) for c in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors and replies == expected
        health = json.load(urllib.request.urlopen(url + "/health"))
        assert 0 < health["cached_conversations"] <= 3 and health["cache_mb"] <= health["cache_budget_mb"] == 0.5


def test_a_client_that_disconnects_stops_its_reply(chat_server, monkeypatch):
    url, server = chat_server
    forward = server.model.forward
    monkeypatch.setattr(server.model, "forward", lambda *a, **k: time.sleep(0.01) or forward(*a, **k))
    calls = count_forward_tokens(monkeypatch, server.model)
    with client(url).completions.create(model="run", prompt="a", max_tokens=500, stream=True) as chunks:
        for n, _ in enumerate(chunks):
            if n == 3:
                break
    time.sleep(1.0)
    stopped_at = len(calls)
    time.sleep(0.5)
    assert len(calls) == stopped_at < 100  # of the 500 tokens asked for (5 s), it stopped within a few
    assert client(url).completions.create(model="run", prompt="a", max_tokens=3).usage.completion_tokens == 3


def post(url, body, headers=None):
    """The status and JSON answer of a raw request, whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_4xx_in_openai_error_shape_and_the_server_goes_on(chat_server):
    url, _ = chat_server
    chat = url + "/v1/chat/completions"
    hello = [dict(role="user", content="hello")]
    bad = [
        (chat, b"{not json", 400, "Invalid JSON"),
        (chat, b"[1, 2]", 400, "object"),
        (chat, dict(), 400, "messages: Field required"),
        (chat, dict(messages="hello"), 400, "messages: Input should be a valid array"),
        (chat, dict(messages=[]), 400, "messages: List should have at least 1 item"),
        (chat, dict(messages=[dict(role="tool", content="x")]), 400, "messages.0.role"),
        (chat, dict(messages=[dict(role="user", content=5)]), 400, "messages.0.content: Input should be a valid string"),
        (chat, dict(messages=hello * 2), 400, "user and assistant messages in turn"),
        (chat, dict(messages=hello + [dict(role="assistant", content="x")]), 400, "ending with a user message"),
        (chat, dict(messages=hello, temperature="hot"), 400, "temperature: Input should be a valid number"),
        (chat, dict(messages=hello, temperature=5), 400, "temperature: Input should be less than or equal to 2"),
        (chat, dict(messages=hello, top_p=0), 400, "top_p"),
        (chat, dict(messages=hello, max_tokens=0), 400, "max_tokens: Input should be greater than or equal to 1"),
        (chat, dict(messages=hello, max_tokens=10**6), 400, "over this server's limit of 600"),
        (chat, dict(messages=hello, stream="yes"), 400, "stream: Input should be a valid boolean"),
        (chat, dict(messages=hello, stop=["a", "b", "c", "d", "e"]), 400, "stop: List should have at most 4 items"),
        (chat, dict(messages=hello, n=2), 400, "n: Input should be 1"),
        (chat, dict(messages=[dict(role="user", content="HELLO")]), 400, "not in the char vocabulary"),
        (chat, dict(messages=[dict(role="user", content="a" * 600)]), 400, "the context holds 512: shorten it"),
        (chat, dict(messages=[dict(role="user", content="a" * 2_000_000)]), 413, "over 1048576 bytes"),
        (url + "/v1/completions", dict(prompt=["a"]), 400, "prompt: Input should be a valid string"),
        (url + "/v1/completions", dict(prompt="a" * 600), 400, "the prompt takes 601 tokens"),
        (url + "/v1/nothing", dict(), 404, "Not Found"),
    ]
    for where, body, status, message in bad:
        got, answer = post(where, body)
        assert (got, set(answer)) == (status, {"error"}), (body, answer)
        assert message in answer["error"]["message"] and answer["error"]["type"], (body, answer)
    with pytest.raises(urllib.error.HTTPError, match="405"):
        urllib.request.urlopen(chat)  # a GET
    status, answer = post(chat, dict(messages=hello, temperature=0, stop="s", max_tokens=20))
    assert status == 200 and "s" not in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert json.load(urllib.request.urlopen(url + "/health"))["queued"] == 0


def test_the_page_and_the_model_list(chat_server):
    url, _ = chat_server
    page = urllib.request.urlopen(url + "/").read().decode()
    assert "<script>" in page and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: it works offline
    assert [m.id for m in client(url).models.list()] == ["run"]


def test_an_api_key_is_enforced_and_a_base_checkpoint_continues_prompts(tmp_path):
    run = write_run(tmp_path / "run")  # no chat template
    with running(run, api_key="secret") as (url, _):
        with pytest.raises(openai.AuthenticationError, match="a valid API key is needed"):
            client(url, api_key="wrong").completions.create(model="run", prompt="a", max_tokens=2)
        assert post(url + "/v1/completions", dict(prompt="a"))[0] == 401
        keyed = client(url, api_key="secret")
        assert keyed.completions.create(model="run", prompt="a", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            ask(keyed, [], "hello")
        assert urllib.request.urlopen(url + "/").status == 200  # the page asks for the key itself
        assert json.load(urllib.request.urlopen(url + "/health"))["chat"] is False


def test_settings_that_cannot_work_are_one_line_before_serving(tmp_path):
    run = write_run(tmp_path / "run", chat_template=TEMPLATE)
    with pytest.raises(UserError, match="cannot hold one conversation, which takes 0.0 MB"):
        serve.main([f"--out_dir={run}", "--port=0", "--cache_mb=0.00001", "--dtype=float32"])
    taken = serve.listen("127.0.0.1", 0)
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
        serve.main([f"--out_dir={run}", f"--port={taken.getsockname()[1]}"])
    with pytest.raises(UserError, match="--max_new_tokens must be at least 1"):
        serve.main([f"--out_dir={run}", "--max_new_tokens=0"])


def test_the_script_serves_until_ctrl_c(tmp_path):
    run = write_run(tmp_path / "run", chat_template=TEMPLATE)
    process = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={run}", "--port=0", "--dtype=float32"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = process.stderr.readline()
        assert line.startswith("serving run at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split("/ ")[0]
        assert ask(client(url), [], "hello", max_tokens=5)[1].completion_tokens <= 5
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 130


def test_the_page_streams_a_reply_in_a_real_browser_and_stops_it(chat_server, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver")
    from selenium.webdriver.common.by import By
    url, server = chat_server
    forward = server.model.forward  # slowed, so that the reply visibly grows token by token
    monkeypatch.setattr(server.model, "forward", lambda *a, **k: time.sleep(0.02) or forward(*a, **k))
    calls = count_forward_tokens(monkeypatch, server.model)
    torch.manual_seed(0)  # the page samples at temperature 1 from the global generator: this reply, every time
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--proxy-server=direct://"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        browser.get(url)
        box = browser.find_element(By.ID, "input")
        box.send_keys("hello there\n")
        seen = set()
        deadline = time.monotonic() + 20
        while len(seen) < 5 and time.monotonic() < deadline:
            seen.add(browser.find_element(By.CSS_SELECTOR, ".assistant").text)
        assert len(seen - {""}) >= 4  # the reply appeared piece by piece
        assert browser.find_element(By.ID, "send").text == "Stop"  # and is still being written
        browser.find_element(By.ID, "send").click()  # now a Stop button: the fetch is aborted, the server stops
        time.sleep(1.0)
        stopped_at = len(calls)
        time.sleep(0.5)
        assert len(calls) == stopped_at and browser.find_element(By.ID, "send").text == "Send"
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log div")][0] == "hello there"
    finally:
        browser.quit()
