"""An OpenAI-compatible HTTP API and a one-page browser chat over one checkpoint, with KV caches kept between requests.

    python serve.py --out_dir=out-sft                  # http://127.0.0.1:8000 is the chat page, the API is under /v1
    python serve.py --out_dir=out --port=8001          # a base checkpoint: /v1/completions continues a prompt
    python serve.py --out_dir=out-sft --host=0.0.0.0 --api_key=KEY    # other machines too, with a key

    curl -N http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

GET / (serve.html), POST /v1/chat/completions and /v1/completions (stream, temperature, top_p, max_tokens, stop,
seed), GET /v1/models, GET /health. --out_dir may be a run or a Hugging Face folder, as for sample.py.

The API is stateless: every request carries the whole conversation. So the server keeps the KV caches of recent
conversations (an LRU within --cache_mb), and a request whose tokens start with a kept cache's prefills only the
rest; usage.prompt_tokens_details.cached_tokens says how many it did not prefill. A conversation longer than the
context drops its oldest exchanges, as sample.py --chat does (sample.Chat serves both). One thread runs the model,
one request at a time in order of arrival; a client that disconnects stops its reply at the next token.
"""

import asyncio
import collections
import contextlib
import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

import configurator  # first: Ctrl-C during the imports is one line
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError
from starlette.exceptions import HTTPException

from configurator import UserError
from sample import Chat, TextStream, cut_at, decoding, load, resume, shared_length
from tokenizer import render_chat


@dataclass
class ServeConfig:
    out_dir: str = "out"
    ckpt: str = "ckpt.pt"            # "best.pt" for the best by validation loss
    host: str = "127.0.0.1"          # this machine only; 0.0.0.0 listens on every interface (give --api_key then)
    port: int = 8000                 # 0 = any free port (printed)
    api_key: str = ""                # when set, /v1/ requests need the header "Authorization: Bearer <api_key>"
    cache_mb: float = 1024.0         # KV caches of recent conversations kept within this many MB; 0 keeps none
    max_new_tokens: int = 512        # the most tokens a request may ask for (max_tokens), and its default
    max_request_kb: int = 1024       # a larger request body is refused
    device: str = "auto"             # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"              # as sample.py: on a CPU the faster of float32 and bfloat16, measured
    threads: int = 0                 # CPU threads while decoding; 0 = the fastest count, measured (sample.decoding)


# ----------------------------------------------------------------------------- requests, in OpenAI's format

class ApiError(Exception):
    """A request the server refuses or could not answer: its HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.body = status, dict(error=dict(message=message, type=kind, param=param, code=code))


def joined_text(content):
    """A message's content as text: a string, or OpenAI's list of text parts."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
        raise ValueError('content must be a string or a list of {"type": "text", "text": "..."} parts')
    return "".join(part["text"] for part in content)


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(joined_text)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False  # a last chunk with the usage


class Sampling(BaseModel):
    """What both endpoints take, by OpenAI's names and defaults. Other fields (model, user, ...) are ignored."""
    model_config = ConfigDict(strict=True)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)            # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=4),
                    BeforeValidator(lambda stop: [stop] if isinstance(stop, str) else stop)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


async def parse(request, schema, limit):
    """The request's JSON body as `schema`; one that is too large, not JSON, or not the schema is refused."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, this server's limit (--max_request_kb)")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise ApiError(400, f"{where}: {error['msg']}" if where else error["msg"], param=where or None) from e


def split_conversation(messages):
    """A chat's messages as the system message, the finished exchanges (user, assistant) and the new message."""
    system = messages[0].content if messages[0].role == "system" else ""
    rest = messages[1:] if messages[0].role == "system" else messages
    if len(rest) % 2 == 0 or any(m.role != ("user", "assistant")[i % 2] for i, m in enumerate(rest)):
        raise ApiError(400, "messages must be an optional system message, then user and assistant messages in turn, "
                            "ending with a user message", param="messages")
    exchanges = [[dict(role="user", content=rest[i].content), dict(role="assistant", content=rest[i + 1].content)]
                 for i in range(0, len(rest) - 1, 2)]
    return system, exchanges, rest[-1].content


# ----------------------------------------------------------------------------- the kept caches

def cache_bytes(cache):
    return cache.k.nbytes + cache.v.nbytes + cache.tokens.nbytes


class CachePool:
    """KV caches of recent conversations, least recently used first, as many as fit in `megabytes`. Each has
    room for a whole context, so the count is fixed by the budget; the one in use is out of the pool."""

    def __init__(self, model, megabytes):
        self.model, self.caches = model, [model.new_kv_cache(1)]
        self.cache_bytes = cache_bytes(self.caches[0])
        self.capacity = int(megabytes * 2**20 // self.cache_bytes)
        if megabytes and not self.capacity:
            raise UserError(f"--cache_mb={megabytes:g} cannot hold one conversation, which takes "
                            f"{self.cache_bytes / 2**20:.1f} MB: raise it, or 0 keeps none")
        self.caches = self.caches[:self.capacity]

    def take(self, ids):
        """The cache to continue `ids` in: the kept one that holds most of them, if they continue all of it;
        otherwise a new one, or the least recently used when the pool is full, given the start that the best
        kept one shares with them (a system message, an earlier turn), so that the best one stays intact."""
        best = max(reversed(self.caches), key=lambda cache: shared_length(cache, ids), default=None)
        shared = shared_length(best, ids) if best is not None else 0
        if best is not None and shared == best.pos:
            self.caches.remove(best)
            return best
        cache = self.caches.pop(0) if self.caches and len(self.caches) >= self.capacity else self.model.new_kv_cache(1)
        if shared and cache is not best:
            for name in ("k", "v"):
                getattr(cache, name)[..., :shared, :] = getattr(best, name)[..., :shared, :]
            cache.tokens[:, :shared] = best.tokens[:, :shared]
            cache.pos = shared
        return cache

    def keep(self, cache):
        if self.capacity:
            self.caches.append(cache)


# ----------------------------------------------------------------------------- the model's thread

@dataclass
class Reply:
    """How a reply ended and what it cost: the last event of each job."""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def usage(self):
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                    total_tokens=self.prompt_tokens + self.completion_tokens,
                    prompt_tokens_details=dict(cached_tokens=self.cached_tokens))


class Job:
    """One request's reply: `work`, a generator of events (text pieces, then a Reply), runs on the model's thread;
    the events reach the request's coroutine through an asyncio queue. Cancelled, it stops at the next event."""

    def __init__(self, work):
        self.work, self.loop = work, asyncio.get_running_loop()
        self.events, self.cancelled = asyncio.Queue(), threading.Event()

    def send(self, event):  # on the model's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self):  # on the event loop: the client is gone, and whoever waits for an event is told so
        self.cancelled.set()
        self.events.put_nowait(ApiError(499, "the client disconnected"))

    async def next(self):
        event = await self.events.get()
        if isinstance(event, ApiError):
            raise event
        return event


REMEMBERED_REPLIES = 1024  # Server.written keeps this many, the least recently used dropped first


class Server:
    """The model, its tokenizer and chat template, the kept caches, and the queue in front of the model's thread."""

    def __init__(self, model, tokenizer, checkpoint, cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.template = checkpoint.get("chat_template")
        self.name = os.path.basename(os.path.normpath(cfg.out_dir))
        self.device = model.lm_head.weight.device
        self.caches = CachePool(model, cfg.cache_mb)
        self.written = collections.OrderedDict()  # reply text -> its ids, for the replies that encode otherwise
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self.run_jobs, name="model", daemon=True)
        self.thread.start()

    def run_jobs(self):
        with decoding(self.model, self.cfg.threads):
            while (job := self.jobs.get()) is not None:
                if not job.cancelled.is_set():
                    self.run(job)

    def run(self, job):
        """Send the job's events until it ends or is cancelled. Whatever goes wrong is this request's error, and
        the thread goes on to the next."""
        try:
            with contextlib.closing(job.work()) as events:
                for event in events:
                    if job.cancelled.is_set():
                        return
                    job.send(event)
        except ApiError as e:
            job.send(e)
        except UserError as e:  # a message the tokenizer cannot encode, a conversation that cannot fit
            job.send(ApiError(400, str(e)))
        except Exception as e:
            traceback.print_exc()
            job.send(ApiError(500, f"the server failed on this request: {type(e).__name__}: {e}", kind="server_error"))

    def close(self):
        self.jobs.put(None)

    def max_tokens(self, request):
        asked = request.max_completion_tokens or request.max_tokens or self.cfg.max_new_tokens
        if asked > self.cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens is {asked}, over this server's limit of {self.cfg.max_new_tokens} "
                                "(--max_new_tokens)", param="max_tokens")
        return asked

    def generator(self, request):
        return torch.Generator(self.device).manual_seed(request.seed) if request.seed is not None else None

    def events(self, request, pieces):
        """The job's events: the reply's text, one piece per token, cut at the request's stop strings, then the
        Reply. `pieces(request, reply)` generates the text and fills in the reply's counts."""
        reply, text, sent, found = Reply(), "", 0, False
        with contextlib.closing(pieces(request, reply)) as steps:
            for piece in steps:
                text += piece
                shown, found = cut_at(text, request.stop or [])
                yield shown[sent:]
                sent = len(shown)
                if found:
                    reply.finish_reason = "stop"
                    break
        if not found and len(text) > sent:  # the reply ended on what might have become a stop string
            yield text[sent:]
        yield reply

    def chat_pieces(self, request, reply):
        system, exchanges, message = split_conversation(request.messages)
        chat = Chat(self.model, self.tokenizer, self.template, system)
        chat.turns = [self.exchange_ids(chat, *exchange) for exchange in exchanges]
        max_tokens = self.max_tokens(request)
        turn = chat.fit(message, max_tokens)
        context = chat.context(turn)  # the context that the cache is picked for; respond fits again, a no-op by then
        reply.prompt_tokens = len(context)
        chat.cache = self.caches.take(context)
        steps = chat.respond(message, max_tokens, request.temperature, 0, request.top_p, self.generator(request))
        text = ""
        try:
            for piece in steps:
                reply.cached_tokens, reply.completion_tokens = chat.reused, reply.completion_tokens + 1
                text += piece
                yield piece
            reply.finish_reason = "stop" if chat.ended else "length"
            self.remember(text, chat.turns[-1][len(turn):], chat.end)
        finally:
            steps.close()
            self.caches.keep(chat.cache)

    def exchange_ids(self, chat, user, assistant):
        """An exchange's ids as Chat keeps them; a reply that this server wrote is read as the ids it was written in."""
        if assistant["content"] not in self.written:
            return render_chat(self.tokenizer, self.template, [user, assistant])[0][1:]
        self.written.move_to_end(assistant["content"])
        return chat.user_turn(user["content"]) + self.written[assistant["content"]]

    def remember(self, text, ids, end):
        """The ids of a reply (and its end_of_turn) when they are not the text's own encoding, as a token without
        text or a word split otherwise would make them: encoded again, the conversation would leave its cache."""
        if ids != self.tokenizer.encode(text) + end:
            self.written[text] = ids
            while len(self.written) > REMEMBERED_REPLIES:
                self.written.popitem(last=False)

    def completion_pieces(self, request, reply):
        """The prompt's continuation, as sample.py generates it, until max_tokens or the end-of-text token."""
        eot, block = self.tokenizer.eot_id, self.model.config.block_size
        ids = [eot] + self.tokenizer.encode(request.prompt)  # every training document starts with end-of-text
        if len(ids) >= block:
            raise ApiError(400, f"the prompt takes {len(ids)} tokens and the context holds {block}: shorten it",
                           param="prompt", code="context_length_exceeded")
        reply.prompt_tokens, max_tokens = len(ids), self.max_tokens(request)
        cache = self.caches.take(ids)
        try:
            new = resume(cache, ids)
            reply.cached_tokens, decoded = cache.pos, TextStream(self.tokenizer)
            steps = self.model.generate(new, min(max_tokens, block - len(ids)), request.temperature, 0, request.top_p,
                                        self.generator(request), kv_cache=cache, vocab_size=self.tokenizer.vocab_size)
            with contextlib.closing(steps):
                for token in steps:
                    reply.completion_tokens += 1
                    if token.item() == eot:
                        reply.finish_reason = "stop"
                        break
                    yield decoded.push(token.item())
            yield decoded.flush()
        finally:
            self.caches.keep(cache)


# ----------------------------------------------------------------------------- the HTTP side

def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def choice(chat, streamed, text, finish_reason):
    """One choice of a reply or of a chunk, in the shape of OpenAI's chat or text completions."""
    if not chat:
        return dict(index=0, text=text, logprobs=None, finish_reason=finish_reason)
    if streamed:
        return dict(index=0, delta=dict(content=text) if text else {}, logprobs=None, finish_reason=finish_reason)
    return dict(index=0, message=dict(role="assistant", content=text), logprobs=None, finish_reason=finish_reason)


async def cancel_when_gone(request, job):
    """Cancel the job once its client disconnects: once the body is read, the next ASGI message says so."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def answer(server, request, schema, chat):
    """Queue the request's reply and answer it whole, or as server-sent events. An error met before the first
    token (a conversation that cannot fit) is an HTTP status, not an event of a stream already begun."""
    body = await parse(request, schema, server.cfg.max_request_kb * 1024)
    if chat and not server.template:
        raise ApiError(400, f"{server.name} has no chat template (a base checkpoint): use /v1/completions, or "
                            "fine-tune it with sft.py")
    server.max_tokens(body)  # refused before it waits in the queue
    job = Job(lambda: server.events(body, server.chat_pieces if chat else server.completion_pieces))
    head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()), model=server.name,
                object=("chat.completion" if chat else "text_completion"))
    watcher = asyncio.create_task(cancel_when_gone(request, job))
    server.jobs.put(job)
    try:
        first = await job.next()
        if body.stream:
            chunk_head = dict(head, object=head["object"] + ".chunk" * chat)
            return StreamingResponse(stream(job, first, chat, chunk_head, body.stream_options.include_usage),
                                     media_type="text/event-stream")
        pieces = [first]
        while not isinstance(pieces[-1], Reply):
            pieces.append(await job.next())
        reply = pieces.pop()
        return dict(head, choices=[choice(chat, False, "".join(pieces), reply.finish_reason)], usage=reply.usage())
    finally:
        watcher.cancel()  # a stream's disconnect is Starlette's to notice from here on: it cancels stream()


async def stream(job, event, chat, head, include_usage):
    """The reply as server-sent events, each chunk as soon as its token is sampled, then [DONE]."""
    try:
        if chat:
            yield sse(dict(head, choices=[dict(index=0, delta=dict(role="assistant", content=""), logprobs=None,
                                               finish_reason=None)]))
        while not isinstance(event, Reply):
            if event:
                yield sse(dict(head, choices=[choice(chat, True, event, None)]))
            event = await job.next()
        yield sse(dict(head, choices=[choice(chat, True, "", event.finish_reason)]))
        if include_usage:
            yield sse(dict(head, choices=[], usage=event.usage()))
    except ApiError as e:
        yield sse(e.body)
    finally:
        job.cancel()  # a client gone mid-stream: its reply stops at the next token (a finished job ignores it)
    yield "data: [DONE]\n\n"


def make_app(server):
    app = FastAPI(title="small-lm", docs_url=None, redoc_url=None, openapi_url=None)
    with open(os.path.join(configurator.ROOT, "serve.html"), encoding="utf-8") as f:
        page = f.read()

    async def require_key(request: Request):
        given = request.headers.get("authorization", "")
        if server.cfg.api_key and not hmac.compare_digest(given.encode(), f"Bearer {server.cfg.api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def refused(request, e):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(HTTPException)  # no such path (404), or method (405)
    async def not_here(request, e):
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body,
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)  # a bug: the client still gets an answer in OpenAI's shape
    async def failed(request, e):
        return JSONResponse(ApiError(500, f"the server failed: {type(e).__name__}", kind="server_error").body,
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        pool = server.caches
        return dict(status="ok" if server.thread.is_alive() else "the model's thread has stopped", model=server.name,
                    chat=bool(server.template), queued=server.jobs.qsize(),
                    cached_conversations=len(pool.caches), cache_mb=len(pool.caches) * pool.cache_bytes / 2**20,
                    cache_budget_mb=server.cfg.cache_mb)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return dict(object="list", data=[dict(id=server.name, object="model", created=0, owned_by="small-lm")])

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        return await answer(server, request, ChatRequest, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: Request):
        return await answer(server, request, CompletionRequest, chat=False)

    return app


def listen(host, port):
    """A socket bound to host:port, before the model loads, so that a port in use is one line at once."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()  # from here on a client waits in the backlog until uvicorn accepts it
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host") from e
    return sock


def main(argv):
    cfg = configurator.build(ServeConfig, configurator.parse(argv, ServeConfig))
    configurator.check_at_least(cfg, port=0, cache_mb=0, max_new_tokens=1, max_request_kb=1, threads=0)
    if cfg.port > 65535:
        raise UserError(f"--port must be at most 65535, got {cfg.port}")
    sock = listen(cfg.host, cfg.port)
    server = Server(*load(cfg), cfg)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"serving {server.name} at http://{address}/ (the chat page; the API is under /v1); Ctrl-C stops",
          file=sys.stderr)
    if not cfg.api_key and not host.startswith("127.") and host != "::1":
        print(f"warning: listening on {host} without --api_key: anyone who reaches this machine can use the model",
              file=sys.stderr)
    config = uvicorn.Config(make_app(server), log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    configurator.run_script(main)
