"""serve.py against real clients on localhost: the official openai package gets sample.py's greedy
text, streamed or whole; later turns prefill only their new tokens; concurrent clients all get
their own replies within the cache budget; a client that disconnects stops its reply; bad requests
get 4xx in OpenAI's error shape, with OpenAI's codes and in API terms; max_tokens is held to the
context; the API key."""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai", reason="serve.py's tests need the openai client")
pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn")
import uvicorn  # noqa: E402

import configurator  # noqa: E402

import engine  # noqa: E402
import sample  # noqa: E402
import serve  # noqa: E402
from checkpoint import CHECKPOINT_VERSION  # noqa: E402
from configurator import UserError  # noqa: E402
from model import GPT, GPTConfig, PRESETS  # noqa: E402
from tokenizer import render_chat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {"kind": "char", "chars": "\nabcdefghijklmnopqrstuvwxyz <>:"}
TEMPLATE = {"user": "<u>", "assistant": "<a>", "end_of_turn": "<e>", "system": "<s>"}
WORDS = "the king and queen speak to their lords of war".split()


def tiny_model(block_size=64):
    """Random weights, scaled up so that greedy choices are not near-ties decided by rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**PRESETS["classic"], vocab_size=64, block_size=block_size, n_layer=2,
                          n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def write_run(out_dir, model=None, **extra):
    """A run directory holding a checkpoint with the keys train.py writes."""
    model = model or tiny_model()
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = dict(version=CHECKPOINT_VERSION, model=model.state_dict(), config={},
                      model_config=dataclasses.asdict(model.config), tokenizer=SPEC,
                      state=dict(step=0))
    torch.save({**checkpoint, **extra}, os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


def count_forward_tokens(monkeypatch, model):
    """Record, for every forward call, how many tokens it was given."""
    calls, real_forward = [], model.forward

    def forward(idx, *args, **kwargs):
        calls.append(idx.size(1))
        return real_forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


@pytest.fixture(autouse=True)
def quiet(one_thread):
    pass


@contextlib.contextmanager
def running(run_dir, **settings):
    """serve.py's app on a free localhost port, uvicorn in a thread of this process: the base URL
    and the Server."""
    cfg = serve.ServeConfig(out_dir=str(run_dir), port=0, dtype="float32", **settings)
    server = serve.Server(*engine.load_model(cfg.out_dir, dtype="float32"), cfg)
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
        server.thread.shutdown(wait=False)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("chat") / "run", model=tiny_model(block_size=512),
                    chat_template=TEMPLATE)
    with running(run, max_new_tokens=400) as (url, server):
        yield url, server


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"),
                         max_retries=0, **kwargs)


def sample_chat(server, messages, max_tokens):
    """engine.Chat's greedy replies to `messages`, one after the other, as sample.py --chat gives
    them."""
    chat = engine.Chat(server.model, server.tokenizer, TEMPLATE)
    return ["".join(chat.respond(m, max_tokens, temperature=0)) for m in messages]


def ask(openai_client, history, message, stream=False, **kwargs):
    """Send the conversation and `message`; the reply's text, its usage (from the last chunk when
    streamed) and finish_reason."""
    messages = history + [dict(role="user", content=message)]
    settings = dict(model="run", messages=messages, **{"temperature": 0, **kwargs})
    if not stream:
        response = openai_client.chat.completions.create(**settings)
        first = response.choices[0]
        return first.message.content, response.usage, first.finish_reason
    text, usage, finish = "", None, None
    chunks = openai_client.chat.completions.create(**settings, stream=True,
                                                   stream_options=dict(include_usage=True))
    for chunk in chunks:
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


def sample_py(*args):
    """What sample.py prints for these arguments: its text before the first separator."""
    out = io.StringIO()
    sample.main([*args, "--temperature=0", "--dtype=float32"], out=out)
    return out.getvalue().split("\n" + "-" * 40)[0]


def test_completions_equal_sample_py_greedy_text(chat_server):
    url, server = chat_server
    expected = sample_py(f"--out_dir={server.cfg.out_dir}", "--prompt=the queen",
                         "--max_new_tokens=30")[len("the queen"):]
    settings = dict(model="run", prompt="the queen", max_tokens=30, temperature=0)
    response = client(url).completions.create(**settings)
    assert response.choices[0].text == expected and response.usage.prompt_tokens == 10
    streamed = client(url).completions.create(**settings, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_a_seed_gives_the_same_sampled_reply(chat_server):
    url, _ = chat_server
    replies = [ask(client(url), [], "hello", temperature=1.0, seed=seed, max_tokens=30)[0]
               for seed in (1, 1, 2)]
    assert replies[0] == replies[1] != replies[2]


def test_each_later_turn_prefills_only_its_new_tokens(chat_server, monkeypatch):
    url, server = chat_server
    calls = count_forward_tokens(monkeypatch, server.model)
    encode, history, finish = server.tokenizer.encode, [], None
    for turn in range(10):
        message = " ".join(WORDS[turn:turn + 3])
        first_call = len(calls)
        text, usage, new_finish = ask(client(url), history, message, stream=turn % 2 == 1,
                                      max_tokens=12)
        prefilled = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
        assert calls[first_call] == prefilled  # what usage reports is what the model ran
        assert all(n == 1 for n in calls[first_call + 1:])  # then one token per forward
        history += [dict(role="user", content=message), dict(role="assistant", content=text)]
        rendered = render_chat(server.tokenizer, TEMPLATE, history)[0]
        # all but the reply itself
        assert usage.prompt_tokens == len(rendered) - len(encode(text + "<e>"))
        if turn:
            # the new message and its assistant marker, plus what the cache lacks of the last
            # reply: its last token when it ended at end_of_turn (sampled, never fed), or the
            # end_of_turn appended when it ran out of tokens
            lacked = 1 if finish == "stop" else len(encode("<e>"))
            assert prefilled == len(encode(f"<u>{message}<e><a>")) + lacked
        finish = new_finish
    assert server.caches  # the conversation's cache is kept


def test_a_long_conversation_drops_its_oldest_exchanges_as_sample_py_does(tmp_path):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=64), chat_template=TEMPLATE)
    with running(run) as (url, server):
        # one length, so both drop at the same turns
        messages = [f"{word:>5}" for word in WORDS[:7]]
        expected = sample_chat(server, messages, max_tokens=8)
        history = []
        for message, reply in zip(messages, expected):
            text, usage, _ = ask(client(url), history, message, max_tokens=8)
            assert text == reply and usage.prompt_tokens + 8 <= 64
            history += [dict(role="user", content=message), dict(role="assistant", content=text)]
        # the whole conversation outgrew the context, and each request still fit: exchanges went
        assert len(render_chat(server.tokenizer, TEMPLATE, history)[0]) > 64
        with pytest.raises(openai.BadRequestError, match="the message takes 70 tokens, but this "
                           "model's context holds 64") as refused:
            ask(client(url), history, "a" * 60)
        assert refused.value.code == "context_length_exceeded"
        # it goes on serving; without max_tokens a reply gets what fits, as in sample.py --chat
        assert ask(client(url), [], "hello")[0] == sample_chat(server, ["hello"], 63)[0]


def test_eight_concurrent_clients_get_their_own_replies_within_the_cache_budget(tmp_path):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=256), chat_template=TEMPLATE)
    with running(run, cache_mb=0.5) as (url, server):
        # fewer kept caches than clients: conversations are evicted and rebuilt
        assert server.caches.maxlen == 3
        conversations = [[f"{WORDS[c]} {WORDS[(c + t) % len(WORDS)]}" for t in range(5)]
                         for c in range(8)]
        expected = [sample_chat(server, messages, max_tokens=10) for messages in conversations]
        replies, errors = [None] * 8, []

        def talk(c):
            try:
                history, got = [], []
                for message in conversations[c]:
                    text, _, _ = ask(client(url), history, message, stream=c % 2 == 0,
                                     max_tokens=10)
                    history += [dict(role="user", content=message),
                                dict(role="assistant", content=text)]
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
        assert 0 < health["cached_conversations"] <= 3
        assert health["cache_mb"] <= health["cache_budget_mb"] == 0.5


def test_a_client_that_disconnects_stops_its_reply(chat_server, monkeypatch):
    url, server = chat_server
    forward = server.model.forward
    monkeypatch.setattr(server.model, "forward",
                        lambda *a, **k: time.sleep(0.01) or forward(*a, **k))
    calls = count_forward_tokens(monkeypatch, server.model)
    with client(url).completions.create(model="run", prompt="a", max_tokens=400,
                                        stream=True) as chunks:
        for n, _ in enumerate(chunks):
            if n == 3:
                break
    time.sleep(1.0)
    stopped_at = len(calls)
    time.sleep(0.5)
    assert len(calls) == stopped_at < 100  # of the 400 tokens asked for, it stopped within a few
    again = client(url).completions.create(model="run", prompt="a", max_tokens=3)
    assert again.usage.completion_tokens == 3


def post(url, body, headers=None):
    """The status and JSON answer of a raw request, whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_4xx_in_openai_error_shape_and_codes_and_the_server_goes_on(chat_server):
    url, _ = chat_server
    chat, text = url + "/v1/chat/completions", url + "/v1/completions"
    hello = [dict(role="user", content="hello")]
    bad = [  # where, body, status, the message's start or part, OpenAI's code
        (chat, b"{not json", 400, "Invalid JSON", "invalid_value"),
        (chat, b"[1, 2]", 400, "object", "invalid_type"),
        (chat, dict(), 400, "messages: Field required", "missing_required_parameter"),
        (chat, dict(messages="hello"), 400, "messages: Input should be a valid array",
         "invalid_type"),
        (chat, dict(messages=[]), 400, "messages: List should have at least 1 item", "empty_array"),
        (chat, dict(messages=[dict(role="tool", content="x")]), 400, "messages.0.role",
         "invalid_value"),
        (chat, dict(messages=[dict(role="user", content=5)]), 400,
         "messages.0.content: Input should be a valid string", "invalid_type"),
        (chat, dict(messages=hello * 2), 400, "user and assistant messages in turn",
         "invalid_value"),
        (chat, dict(messages=hello + [dict(role="assistant", content="x")]), 400,
         "ending with a user message", "invalid_value"),
        (chat, dict(messages=hello, temperature="hot"), 400,
         "temperature: Input should be a valid number", "invalid_type"),
        (chat, dict(messages=hello, temperature=5), 400,
         "temperature: Input should be less than or equal to 2", "integer_above_max_value"),
        (chat, dict(messages=hello, temperature=2.5), 400, "temperature",
         "decimal_above_max_value"),
        (chat, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
         "temperature: Input should be a finite number", "invalid_value"),
        (chat, dict(messages=hello, top_p=0), 400, "top_p", "integer_below_min_value"),
        (chat, dict(messages=hello, max_tokens=0), 400,
         "max_tokens: Input should be greater than or equal to 1", "integer_below_min_value"),
        (chat, dict(messages=hello, max_tokens=10**6), 400,
         "max_tokens is 1000000, over this server's limit: ask for at most 400",
         "integer_above_max_value"),
        (chat, dict(messages=hello, stream="yes"), 400, "stream: Input should be a valid boolean",
         "invalid_type"),
        (chat, dict(messages=hello, stop=["a", "b", "c", "d", "e"]), 400,
         "stop: List should have at most 4 items", "array_above_max_length"),
        (chat, dict(messages=hello, n=2), 400, "n: Input should be 1", "invalid_value"),
        (chat, dict(messages=hello, stream_options=dict(include_usage="yes")), 400,
         "stream_options.include_usage", "invalid_type"),
        (chat, dict(messages=[dict(role="user", content="HELLO")]), 400,
         "messages.0.content: this model cannot encode it: 4 characters not in the char "
         "vocabulary: 'EHLO'", "invalid_value"),
        (chat, dict(messages=[dict(role="user", content="a" * 600)]), 400,
         "the message takes 610 tokens, but this model's context holds 512: shorten it",
         "context_length_exceeded"),
        (chat, dict(messages=[dict(role="system", content="a" * 600)] + hello), 400,
         "the system message takes 606 tokens", "context_length_exceeded"),
        (chat, dict(messages=[dict(role="system", content="a" * 490)] + hello, max_tokens=20), 400,
         "the message with the system message takes 511 tokens, and max_tokens asks for 20 more, "
         "but this model's context holds 512: shorten it or lower max_tokens",
         "context_length_exceeded"),
        (chat, dict(messages=[dict(role="user", content="a" * 2_000_000)]), 413,
         "the request body is over 1048576 bytes, this server's limit", None),
        (text, dict(prompt=["a"]), 400, "prompt: Input should be a valid string", "invalid_type"),
        (text, dict(prompt="a" * 600), 400, "the prompt takes 601 tokens, but this model's "
         "context holds 512: shorten it", "context_length_exceeded"),
        (text, dict(prompt="a" * 300, max_tokens=300), 400, "the prompt takes 301 tokens, and "
         "max_tokens asks for 300 more", "context_length_exceeded"),
        (text, dict(prompt="A"), 400, "prompt: this model cannot encode it", "invalid_value"),
        (url + "/v1/nothing", dict(), 404, "POST /v1/nothing: Not Found", None),
    ]
    for where, body, status, message, code in bad:
        got, answer = post(where, body)
        assert (got, set(answer)) == (status, {"error"}), (body, answer)
        error = answer["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", error
        assert error["code"] == code, (body, error)
        # API terms: no command-line flags (--system, --tokenizer=sp, --max_new_tokens) in them
        assert not re.search(r"--\w", error["message"]), error
    params = [(chat, dict(messages=hello, temperature=5), "temperature"),
              (chat, dict(messages=hello, max_tokens=10**6), "max_tokens"),
              (chat, dict(messages=hello * 2), "messages"),
              (chat, dict(messages=[dict(role="user", content="HI")]), "messages.0.content"),
              (chat, dict(messages=[dict(role="user", content="a" * 600)]), "messages"),
              (text, dict(prompt="a" * 600), "prompt")]
    for where, body, param in params:
        assert post(where, body)[1]["error"]["param"] == param, body
    with pytest.raises(urllib.error.HTTPError, match="405"):
        urllib.request.urlopen(chat)  # a GET
    status, answer = post(chat, dict(messages=hello, temperature=0, stop="s", max_tokens=20))
    assert status == 200 and "s" not in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert json.load(urllib.request.urlopen(url + "/health"))["status"] == "ok"


def test_max_tokens_is_held_to_what_the_context_can_hold(tmp_path):
    run = write_run(tmp_path / "run", model=tiny_model(block_size=128), chat_template=TEMPLATE)
    with running(run) as (url, server):  # --max_new_tokens stays at its default, 512
        hello = [dict(role="user", content="a")]
        for where, body in (("/v1/completions", dict(prompt="a")),
                            ("/v1/chat/completions", dict(messages=hello))):
            status, answer = post(url + where, dict(body, max_tokens=512))
            assert status == 400 and answer["error"] == dict(
                message="max_tokens is 512, more than this model's context of 128 holds with "
                        "a prompt: ask for at most 127", type="invalid_request_error",
                param="max_tokens", code="integer_above_max_value")
        # asked, max_tokens is given in full or refused: earlier exchanges make room for it
        history = [dict(role="user", content="hi"), dict(role="assistant", content="o" * 40)] * 2
        status, answer = post(url + "/v1/chat/completions", dict(
            messages=history + [dict(role="user", content="and")], max_tokens=100, temperature=0))
        assert status == 200 and answer["usage"]["prompt_tokens"] + 100 <= 128
        # not asked, a reply gets what fits after the prompt
        answer = client(url).completions.create(model="run", prompt="a" * 100, temperature=0)
        assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= 128


def test_the_page_has_its_icon_inline_and_the_model_list(chat_server):
    url, _ = chat_server
    page = urllib.request.urlopen(url + "/").read().decode()
    assert "<script>" in page and "/v1/chat/completions" in page
    # nothing fetched from elsewhere, so it works offline (the SVG namespace is a name, not a fetch)
    assert not re.search(r"""(src|href)=["']?(https?:)?//|fetch\(["']https?:""", page)
    # an inline icon: browsers ask for /favicon.ico only when a page links none
    assert re.search(r'<link rel="icon" href="data:image/svg\+xml,[^"]+">', page)
    assert [m.id for m in client(url).models.list()] == ["run"]


def test_an_api_key_is_enforced_and_a_base_checkpoint_continues_prompts(tmp_path):
    run = write_run(tmp_path / "run")  # no chat template
    with running(run, api_key="secret") as (url, _):
        with pytest.raises(openai.AuthenticationError, match="a valid API key is needed") as e:
            client(url, api_key="wrong").completions.create(model="run", prompt="a", max_tokens=2)
        assert e.value.code == "invalid_api_key"
        assert post(url + "/v1/completions", dict(prompt="a"))[0] == 401
        keyed = client(url, api_key="secret")
        done = keyed.completions.create(model="run", prompt="a", max_tokens=2)
        assert done.usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError, match="a base model, without a chat template: "
                           "use /v1/completions"):
            ask(keyed, [], "hello")
        assert urllib.request.urlopen(url + "/").status == 200  # the page asks for the key itself
        assert json.load(urllib.request.urlopen(url + "/health"))["chat"] is False


def test_a_system_message_to_a_template_without_a_system_marker_is_refused_in_api_terms(tmp_path):
    template = {k: v for k, v in TEMPLATE.items() if k != "system"}
    with running(write_run(tmp_path / "run", chat_template=template)) as (url, _):
        status, answer = post(url + "/v1/chat/completions", dict(messages=[
            dict(role="system", content="be brief"), dict(role="user", content="hi")]))
    assert status == 400 and answer["error"]["param"] == "messages"
    assert answer["error"]["message"] == ("this model's chat template has no system marker: it "
                                          "takes no system message")
    assert answer["error"]["code"] == "invalid_value"


def test_settings_that_cannot_work_are_one_line_before_serving(tmp_path):
    run = write_run(tmp_path / "run", chat_template=TEMPLATE)
    with pytest.raises(UserError, match="cannot hold one conversation, which takes 0.0 MB"):
        serve.main([f"--out_dir={run}", "--port=0", "--cache_mb=0.00001", "--dtype=float32"])
    taken = serve.listen("127.0.0.1", 0)
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
        serve.main([f"--out_dir={run}", f"--port={taken.getsockname()[1]}"])
    with pytest.raises(UserError, match="--max_new_tokens must be at least 1"):
        serve.main([f"--out_dir={run}", "--max_new_tokens=0"])
    with pytest.raises(UserError, match="--threads must be at least 0"):
        serve.main([f"--out_dir={run}", "--threads=-1"])
    with pytest.raises(UserError, match="--port must be at most 65535"):
        serve.main([f"--out_dir={run}", "--port=70000"])
    broken = dict(TEMPLATE)
    del broken["end_of_turn"]
    with pytest.raises(UserError, match="the chat template lacks end_of_turn"):
        serve.main([f"--out_dir={write_run(tmp_path / 'broken', chat_template=broken)}",
                    "--port=0", "--dtype=float32"])


def test_the_docstring_s_commands_work_as_printed(tmp_path):
    """serve.py's own examples: each python command's settings are serve.py's (the runs they
    name are not here), and the curl command streams a reply, against a server's address."""
    doc = serve.__doc__
    for line in doc.splitlines():
        if line.strip().startswith("python serve.py"):
            argv = line.split("#")[0].split()[2:]
            cfg = configurator.build(serve.ServeConfig, configurator.parse(argv, serve.ServeConfig))
            assert cfg.out_dir in ("out", "out-sft")
    curl = doc[doc.index("curl -N"):].split("\n\n")[0].replace("\\\n", " ")
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    spec = dict(SPEC, chars=SPEC["chars"] + "H")  # "Hello"
    with running(write_run(tmp_path / "run", chat_template=TEMPLATE, tokenizer=spec)) as (url, _):
        command = curl.replace("http://127.0.0.1:8000", url)
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    events = [line for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert result.returncode == 0 and events[-1] == "data: [DONE]" and len(events) > 3
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_the_script_serves_until_ctrl_c(tmp_path):
    run = write_run(tmp_path / "run", chat_template=TEMPLATE)
    command = [sys.executable, "serve.py", f"--out_dir={run}", "--port=0", "--dtype=float32"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = process.stderr.readline()
        assert line.startswith("serving run at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split("/ ")[0]
        # the model's context of 64 holds fewer than --max_new_tokens' default 512
        assert process.stderr.readline() == ("note: a reply gets at most 63 tokens, what the "
                                             "model's context of 64 holds after a prompt's first "
                                             "token\n")
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
    monkeypatch.setattr(server.model, "forward",
                        lambda *a, **k: time.sleep(0.02) or forward(*a, **k))
    calls = count_forward_tokens(monkeypatch, server.model)
    torch.manual_seed(0)  # the page samples at temperature 1 from the global generator
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--proxy-server=direct://"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(shutil.which("chromedriver"))
    browser = webdriver.Chrome(service=service, options=options)
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
        # now a Stop button: the fetch is aborted, the server stops
        browser.find_element(By.ID, "send").click()
        time.sleep(1.0)
        stopped_at = len(calls)
        time.sleep(0.5)
        assert len(calls) == stopped_at and browser.find_element(By.ID, "send").text == "Send"
        log = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log div")]
        assert log[0] == "hello there"
        # the icon is inline: nothing the page asked for was missing (no /favicon.ico 404)
        assert not [e for e in browser.get_log("browser") if "404" in e["message"]]
    finally:
        browser.quit()
