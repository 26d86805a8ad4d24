"""An OpenAI-compatible HTTP API and a one-page browser chat over one checkpoint.

    python serve.py --out_dir=out-sft            # http://127.0.0.1:8000 is the chat page; API: /v1
    python serve.py --out_dir=out --port=8001    # a base model: /v1/completions continues a prompt
    python serve.py --out_dir=out-sft --host=0.0.0.0 --api_key=KEY   # other machines, with a key
    curl -N http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

OpenAI's chat and text completions, /v1/models and /health; --out_dir: a run of train.py or sft.py.
"""

import asyncio
import concurrent.futures
import hmac
import json
import os
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

import configurator  # first: Ctrl-C during the imports is one line
import torch

from configurator import UserError
from engine import Chat, TextStream, cached_length, continue_cache, cut_at, load_model
from runtime import use_threads

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
except ImportError as e:  # an extra: the Quick start does not install it
    sys.exit(f"error: serve.py needs {e.name}: pip install fastapi uvicorn")


@dataclass
class ServeConfig:
    out_dir: str = "out"
    ckpt: str = "ckpt.pt"         # "best.pt" for the best by validation loss
    host: str = "127.0.0.1"       # this machine only; 0.0.0.0 is every interface (give --api_key)
    port: int = 8000              # 0 = any free port (printed)
    api_key: str = ""             # when set, /v1/ needs the header "Authorization: Bearer <key>"
    cache_mb: float = 1024.0      # KV caches of recent conversations kept in this many MB; 0: none
    max_new_tokens: int = 512     # the most a request may ask for (max_tokens), and its default
    max_request_kb: int = 1024    # a larger request body is refused
    device: str = "auto"          # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"           # the weights' dtype: bfloat16 on GPUs that have it, or float32
    threads: int = 0              # CPU threads; 0 = torch's default


class ApiError(Exception):
    """A request refused or failed: its HTTP status and OpenAI's error object and code, or null."""
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        self.status = status
        self.body = dict(error=dict(message=message, type=kind, param=param, code=code))


class Message(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)  # NaN passes range checks
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """What both endpoints take, by OpenAI's names and defaults; others (model...) are ignored."""
    model_config = Message.model_config
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=2)            # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=4),
                    BeforeValidator(lambda s: [s] if isinstance(s, str) else s)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] = {}  # a last chunk with the usage

    def generator(self, device):
        return torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str


async def parse(request, schema, limit):
    """The request's JSON body as `schema`: too large, not JSON, or not the schema is refused."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, this server's limit")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:  # the first error, with OpenAI's code for its kind
        error = e.errors()[0]
        where, kind = ".".join(map(str, error["loc"])) or None, error["type"]
        number = "integer" if isinstance(error["input"], int) else "decimal"
        code = dict(missing="missing_required_parameter", too_short="empty_array",
                    too_long="array_above_max_length", greater_than=f"{number}_below_min_value",
                    less_than=f"{number}_above_max_value").get(kind.removesuffix("_equal"))
        raise ApiError(400, f"{where}: {error['msg']}" if where else error["msg"], where,
                       code or ("invalid_type" if kind.endswith("_type") else "invalid_value"))


@dataclass
class Reply:  # how a reply ended and what it cost: its last event
    finish_reason: str = "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def usage(self):
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                    total_tokens=self.prompt_tokens + self.completion_tokens,
                    prompt_tokens_details=dict(cached_tokens=self.cached_tokens))


class Server:
    """The model, its tokenizer and chat template, the kept caches, and the model's thread."""
    def __init__(self, model, tokenizer, checkpoint, cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.template = checkpoint.get("chat_template")
        if self.template:
            Chat(model, tokenizer, self.template)  # a template that lacks a marker: one line now
        self.name = os.path.basename(os.path.normpath(cfg.out_dir))
        self.block, self.device = model.config.block_size, model.lm_head.weight.device
        self.limit = min(cfg.max_new_tokens, self.block - 1)  # after at least end-of-text
        self.thread = concurrent.futures.ThreadPoolExecutor(1, "model")  # steps queue up in turn
        self.written = {}  # reply text -> the ids it was written in, where they differ (1024)
        probe = model.new_kv_cache(1)
        self.cache_bytes = probe.k.nbytes + probe.v.nbytes + probe.tokens.nbytes
        self.caches = deque(maxlen=int(cfg.cache_mb * 2**20 // self.cache_bytes))  # LRU first
        if cfg.cache_mb and not self.caches.maxlen:
            raise UserError(f"--cache_mb={cfg.cache_mb:g} cannot hold one conversation, which "
                            f"takes {self.cache_bytes / 2**20:.1f} MB: raise it, or 0 keeps none")

    def take(self, ids):
        """The kept cache that `ids` continue the most of, or a new one (none is ever cut back)."""
        best = max(reversed(self.caches), key=lambda c: cached_length(c, ids), default=None)
        if best is not None and cached_length(best, ids) == best.pos:
            self.caches.remove(best)
            return best
        return self.model.new_kv_cache(1)

    async def run(self, request, pieces):
        """The text cut at the stop strings, then the Reply; a reply that no one reads stops."""
        reply, text, sent, loop = Reply(), "", 0, asyncio.get_running_loop()
        steps = pieces(request, reply)
        try:
            while (piece := await loop.run_in_executor(self.thread, next, steps, None)) is not None:
                text += piece
                shown, found = cut_at(text, request.stop or [])
                yield shown[sent:]
                sent = len(shown)
                if found:
                    reply.finish_reason = "stop"
                    break
            else:  # it ended on what might have become a stop string
                yield text[sent:]
            yield reply
        except ApiError:
            raise
        except Exception as e:  # a bug: the client still gets an answer in OpenAI's shape
            traceback.print_exc()
            raise ApiError(500, f"the server failed on this request: {type(e).__name__}: {e}",
                           kind="server_error") from e
        finally:
            self.thread.submit(steps.close)  # after the step in flight, if any

    def max_tokens(self, request, what, tokens):
        """max_tokens as asked (or None), refused beyond the limit or where `tokens` leave none."""
        asked = request.max_completion_tokens or request.max_tokens
        if asked and asked > self.limit:
            why = (f"more than this model's context of {self.block} holds with a prompt"
                   if self.limit < self.cfg.max_new_tokens else "over this server's limit")
            raise ApiError(400, f"max_tokens is {asked}, {why}: ask for at most {self.limit}",
                           "max_tokens", "integer_above_max_value")
        if tokens + (asked or 1) > self.block:
            also = f", and max_tokens asks for {asked} more" if asked else ""
            raise ApiError(400, f"{what} takes {tokens} tokens{also}, but this model's context "
                           f"holds {self.block}: shorten it{' or lower max_tokens' * bool(asked)}",
                           "prompt" if what == "the prompt" else "messages",
                           "context_length_exceeded")
        return asked

    def encode(self, text, param):
        """The text's ids, or a refusal naming the field (not the tokenizer's advice after ';')."""
        try:
            return self.tokenizer.encode(text)
        except UserError as e:
            raise ApiError(400, f"{param}: this model cannot encode it: {str(e).split(';')[0]}",
                           param, "invalid_value") from e

    def chat_pieces(self, request, reply):
        first, messages = request.messages[0], request.messages
        for i, m in enumerate(messages):
            self.encode(m.content, f"messages.{i}.content")
        system, rest = (first.content, messages[1:]) if first.role == "system" else ("", messages)
        if [m.role for m in rest] != ["user", "assistant"] * (len(rest) // 2) + ["user"]:
            raise ApiError(400, "messages must be an optional system message, then user and "
                                "assistant messages in turn, ending with a user message",
                           "messages", "invalid_value")
        try:
            chat = Chat(self.model, self.tokenizer, self.template, system)
        except UserError as e:  # no system marker, or a system message that leaves no room
            raise ApiError(400, str(e), "messages", "context_length_exceeded"
                           if "system" in self.template else "invalid_value") from e
        # the finished exchanges as Chat keeps them, a reply written here in the ids it was
        chat.turns = [chat.user_turn(u.content) + self.written.get(
                          a.content, self.tokenizer.encode(a.content) + chat.end)
                      for u, a in zip(rest[:-1:2], rest[1::2])]
        turn = chat.user_turn(message := rest[-1].content)
        asked = self.max_tokens(request, "the message" + " with the system message" * bool(system),
                                len(chat.prefix) + len(turn))
        while asked and chat.turns and len(chat.context(turn)) + asked > self.block:
            chat.turns.pop(0)  # room for all of max_tokens (Chat.fit leaves at most half a block)
        context = chat.context(chat.fit(message, asked or self.limit))
        reply.prompt_tokens, chat.cache, text = len(context), self.take(context), ""
        steps = chat.respond(message, asked or self.limit, request.temperature, 0, request.top_p,
                             request.generator(self.device))
        try:
            for piece in steps:
                reply.cached_tokens, text = chat.reused, text + piece
                reply.completion_tokens += 1
                yield piece
            reply.finish_reason = "stop" if chat.ended else "length"
            ids = chat.turns[-1][len(turn):]  # the reply's tokens, then end_of_turn
            reply.completion_tokens = len(ids) - len(chat.end) * (not chat.ended)
            if ids != self.tokenizer.encode(text) + chat.end:  # kept, or the cache is missed
                self.written[text] = ids
                while len(self.written) > 1024:
                    del self.written[next(iter(self.written))]  # the oldest
        finally:
            self.caches.append(chat.cache)  # when full, the least recently used goes

    def completion_pieces(self, request, reply):
        ids = [self.tokenizer.eot_id] + self.encode(request.prompt, "prompt")  # as documents start
        asked = self.max_tokens(request, "the prompt", len(ids))
        reply.prompt_tokens, cache = len(ids), self.take(ids)
        try:
            new = continue_cache(cache, ids)
            reply.cached_tokens, decoded = cache.pos, TextStream(self.tokenizer)
            for token in self.model.generate(
                    new, min(asked or self.limit, self.block - len(ids)), request.temperature, 0,
                    request.top_p, request.generator(self.device), kv_cache=cache,
                    vocab_size=self.tokenizer.vocab_size):
                reply.completion_tokens += 1
                if token.item() == self.tokenizer.eot_id:
                    reply.finish_reason = "stop"
                    break
                yield decoded.push(token.item())
            yield decoded.flush()
        finally:
            self.caches.append(cache)


async def answer(server, request, schema, chat):
    """The reply, whole or as server-sent events; an error before the first token is a status."""
    body = await parse(request, schema, server.cfg.max_request_kb * 1024)
    if chat and not server.template:
        raise ApiError(400, f"{server.name} is a base model, without a chat template: use "
                            "/v1/completions", "messages", "invalid_value")
    events = server.run(body, server.chat_pieces if chat else server.completion_pieces)
    head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                model=server.name, object="chat.completion" if chat else "text_completion")
    first = await anext(events)

    def sse(data):
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(text, finish_reason):  # in the shape of OpenAI's chat or text completions
        key, value = (("text", text) if not chat else ("delta", dict(content=text) if text else {})
                      if body.stream else ("message", dict(role="assistant", content=text)))
        return {"index": 0, key: value, "logprobs": None, "finish_reason": finish_reason}

    async def stream(event):  # each chunk as soon as its token is sampled, then [DONE]
        try:
            while not isinstance(event, Reply):
                if event:
                    yield sse(dict(head, choices=[choice(event, None)]))
                event = await anext(events)
            yield sse(dict(head, choices=[choice("", event.finish_reason)]))
            if body.stream_options.get("include_usage", False):
                yield sse(dict(head, choices=[], usage=event.usage()))
        except ApiError as e:
            yield sse(e.body)
        yield "data: [DONE]\n\n"

    if body.stream:
        head["object"] += ".chunk" * chat
        return StreamingResponse(stream(first), media_type="text/event-stream")
    *pieces, reply = [first] + [piece async for piece in events]
    return dict(head, choices=[choice("".join(pieces), reply.finish_reason)], usage=reply.usage())


def make_app(server):
    def refused(request, e):  # ours, or Starlette's for no such path (404) or method (405)
        if isinstance(e, HTTPException):
            e = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}")
        return JSONResponse(e.body, status_code=e.status)

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={ApiError: refused, HTTPException: refused})
    with open(os.path.join(configurator.ROOT, "serve.html"), encoding="utf-8") as f:
        page = f.read()
    app.get("/", response_class=HTMLResponse)(lambda: page)  # its icon is inline: no /favicon.ico

    async def require_key(request: Request):
        given, key = request.headers.get("authorization", ""), server.cfg.api_key
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is needed: send the header Authorization: Bearer "
                                "<key>", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return dict(status="ok", model=server.name, chat=bool(server.template),
                    cached_conversations=len(server.caches), cache_budget_mb=server.cfg.cache_mb,
                    cache_mb=len(server.caches) * server.cache_bytes / 2**20)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        model = dict(id=server.name, object="model", created=0, owned_by="small-lm")
        return dict(object="list", data=[model])

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: Request):
        chat = request.url.path == "/v1/chat/completions"
        return await answer(server, request, ChatRequest if chat else CompletionRequest, chat)

    return app


def listen(host, port):
    """A socket bound to host:port before the model loads, so a port in use is one line at once."""
    try:  # from then on a client waits in the backlog until uvicorn accepts it
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): change --port") from e


def main(argv):
    cfg = configurator.build(ServeConfig, configurator.parse(argv, ServeConfig))
    configurator.check_at_least(cfg, port=0, cache_mb=0, max_new_tokens=1, max_request_kb=1,
                                threads=0)
    if cfg.port > 65535:
        raise UserError(f"--port must be at most 65535, got {cfg.port}")
    use_threads(cfg.threads)
    sock = listen(cfg.host, cfg.port)
    server = Server(*load_model(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype), cfg)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"serving {server.name} at http://{address}/ (API: /v1); Ctrl-C stops", file=sys.stderr)
    if server.limit < cfg.max_new_tokens:
        print(f"note: a reply gets at most {server.limit} tokens, what the model's context of "
              f"{server.block} holds after a prompt's first token", file=sys.stderr)
    if not cfg.api_key and not host.startswith("127.") and host != "::1":
        print(f"warning: no --api_key on {host}: anyone can use the model", file=sys.stderr)
    config = uvicorn.Config(make_app(server), log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    configurator.run_script(main)
