"""A small OpenAI-compatible chat server over any object that implements the LLM protocol.

It lets other processes use a model that a3t holds in-process (e.g. a ``TransformersLLM``
with its adapter) through the OpenAI chat API, and it is what the HTTP client's tests run
against. Standard library only: ``http.server.ThreadingHTTPServer``, one lock around the
model, so requests are answered one at a time.

Endpoints:

* ``POST /v1/chat/completions``: ``messages``, ``temperature``, ``top_p``, ``max_tokens``
  (or ``max_completion_tokens``), ``seed``, ``stop`` (string or list of strings; the text is
  cut before the first one). Other fields are ignored; ``stream: true`` and ``n > 1`` are
  refused. The reply has ``id``, ``object``, ``created``, ``model``,
  ``choices[0].message.content``, ``choices[0].finish_reason`` (``stop`` or ``length``) and
  ``usage``.
* Constrained decoding, in the three forms :mod:`a3t.llm.openai_http` sends: ``response_format``
  ``{"type": "json_schema", "json_schema": {"schema": {"type": "string", "enum": [...]}}}``
  (the reply is the choice as a JSON string), vLLM's ``structured_outputs: {"choice": [...]}``
  and/or ``guided_choice: [...]``, or a llama.cpp ``grammar`` that is exactly
  ``root ::= "a" | "b" | ...`` (the reply is the bare choice). The model is called with
  ``choices``; on a continued assistant message, choices that all start with a space get it
  stripped (it is the protocol's space after "Action:", which the model adds itself) and put
  back in the reply. Any other constraint (other schemas, grammars or structured outputs,
  ``guided_json`` ...) is refused with 400 rather than ignored: an unconstrained answer would
  pass for a constrained one.
* ``GET /v1/models``: the one model served.

Errors are JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed
request (the message says what is wrong), 404 for an unknown path, 500 if the model fails.

Run ``python -m a3t.llm.server MODEL_PATH [--adapter PATH] [--port 8000]`` to serve a local
Hugging Face model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from a3t.llm.base import LLM, Chat, Sampling, StopRule

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
_ROLES = {"system", "user", "assistant", "tool", "developer"}


class BadRequest(ValueError):
    """A malformed request: the message says what is wrong (and ``param`` where)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class LLMHTTPServer(ThreadingHTTPServer):
    """The HTTP server; holds the model and the lock around it. ``shutdown()`` stops serving
    and closes the listening socket."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], llm: LLM, default_max_tokens: int):
        self.llm = llm
        self.lock = threading.Lock()
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        super().__init__(address, _Handler)

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


def serve(
    llm: LLM,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    default_max_tokens: int = Sampling().max_new_tokens,
) -> tuple[LLMHTTPServer, threading.Thread]:
    """Serve ``llm`` on ``host:port`` (0 picks a free port) from a daemon thread. The bound
    address is ``server.server_address``; ``server.shutdown()`` stops it. ``default_max_tokens``
    applies to requests that give no ``max_tokens``."""
    server = LLMHTTPServer((host, port), llm, default_max_tokens)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"a3t-llm-server:{server.server_address[1]}", daemon=True)
    thread.start()
    return server, thread


# -- parsing a request -----------------------------------------------------------------------


def parse_chat_request(body: Any, default_max_tokens: int) -> tuple[Chat, Sampling, StopRule | None]:
    """The chat, sampling and stop rule of a chat-completions request body, or ``BadRequest``."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("stream"):
        raise BadRequest("streaming is not supported: send stream=false or leave it out", "stream")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise BadRequest(f"only n=1 is supported, got {n!r}", "n")
    chat = _parse_messages(body.get("messages"))

    temperature = _number(body, "temperature", 0.0)
    if temperature < 0:
        raise BadRequest(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise BadRequest(f"{key} must be a positive integer, got {max_tokens!r}", key)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest(f"seed must be an integer or null, got {seed!r}", "seed")
    sampling = Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)
    return chat, sampling, _stop_strings_rule(body.get("stop"))


def _parse_messages(messages: Any) -> Chat:
    if messages is None:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"'messages' must be a non-empty list, got {_short(messages)}", "messages")
    chat: Chat = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with role and content, got {_short(message)}", where)
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequest(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # the content-parts form: keep the text parts
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise BadRequest(
                        f"{where}.content[{j}] must be a text part {{type: 'text', text: ...}}, got {_short(part)}",
                        f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string, got {_short(content)}", f"{where}.content")
        chat.append({"role": role, "content": content})
    return chat


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number, got {value!r}", key)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _stop_strings_rule(stop: Any) -> StopRule | None:
    if stop is None:
        return None
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise BadRequest(f"stop must be a non-empty string or a list of them, got {_short(stop)}", "stop")
    if not strings:
        return None

    def rule(text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in strings) if i >= 0]
        return min(hits) if hits else None

    return rule


class Constraint(NamedTuple):
    """A request's restriction of the reply to one of ``choices``."""

    choices: list[str]  # as the model gets them
    lead: str  # put back before the choice in the reply: what was stripped from each
    as_json: bool  # the reply is the choice as a JSON string (response_format)

    def reply(self, text: str) -> str:
        return json.dumps(self.lead + text) if self.as_json else self.lead + text


# Constraint fields of vLLM and llama.cpp that this server cannot honour.
_UNSUPPORTED = ("guided_json", "guided_regex", "guided_grammar", "json_schema")
_ESCAPE = r'\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[nrt"\\\[\]])'  # GBNF's escapes
_LITERAL = rf'"(?:[^"\\\n]|{_ESCAPE})*"'
_ALTERNATION = re.compile(rf"\s*root\s*::=\s*{_LITERAL}(?:\s*\|\s*{_LITERAL})*\s*")
_UNESCAPED = {"n": "\n", "r": "\r", "t": "\t"}


def parse_constraint(body: dict, chat: Chat) -> Constraint | None:
    """The constraint of a chat-completions request, None if it has none, or ``BadRequest``."""
    for key in _UNSUPPORTED:
        if body.get(key) is not None:
            raise BadRequest(f"{key} is not supported: constrain the reply with response_format (a string enum), "
                             "structured_outputs.choice, guided_choice or grammar (an alternation of strings)", key)
    found: dict[str, list[str]] = {}
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        found["response_format"] = _enum_choices(fmt)
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict) or {k for k, v in outputs.items() if v is not None} != {"choice"}:
            raise BadRequest(f"structured_outputs must be {{choice: [...]}} (no other structured output is "
                             f"supported), got {_short(outputs)}", "structured_outputs")
        found["structured_outputs"] = _texts(outputs["choice"], "structured_outputs.choice")
    if body.get("guided_choice") is not None:
        found["guided_choice"] = _texts(body["guided_choice"], "guided_choice")
    if body.get("grammar") is not None:
        found["grammar"] = _grammar_choices(body["grammar"])
    if not found:
        return None
    # vLLM clients send the same list as structured_outputs.choice and guided_choice (old and new vLLM).
    if len(found) > 1 and not (found.keys() == {"structured_outputs", "guided_choice"}
                               and found["structured_outputs"] == found["guided_choice"]):
        raise BadRequest(f"the request gives several constraints ({', '.join(found)}): give one "
                         "(structured_outputs.choice and guided_choice may come together with the same list)",
                         next(iter(found)))
    choices = next(iter(found.values()))
    lead = ""
    if chat[-1]["role"] == "assistant" and all(c.startswith(" ") for c in choices):
        choices, lead = [c[1:] for c in choices], " "
    return Constraint(choices, lead, "response_format" in found)


def _enum_choices(fmt: Any) -> list[str]:
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not (isinstance(schema, dict) and schema.get("type", "string") == "string" and "enum" in schema):
        raise BadRequest("response_format must be {type: 'text'} or {type: 'json_schema', json_schema: {schema: "
                         f"{{type: 'string', enum: [...]}}}}}} (no other schema is supported), got {_short(fmt)}",
                         "response_format")
    return _texts(schema["enum"], "response_format.json_schema.schema.enum")


def _texts(value: Any, param: str) -> list[str]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise BadRequest(f"{param} must be a non-empty list of strings, got {_short(value)}", param)
    return value


def _grammar_choices(grammar: Any) -> list[str]:
    if not (isinstance(grammar, str) and _ALTERNATION.fullmatch(grammar)):
        raise BadRequest('grammar must be a GBNF alternation of string literals, root ::= "a" | "b" | ... '
                         f"(no other grammar is supported), got {_short(grammar)}", "grammar")
    try:
        return [re.sub(_ESCAPE, _unescape, literal[1:-1]) for literal in re.findall(_LITERAL, grammar)]
    except ValueError:  # a \U escape beyond Unicode
        raise BadRequest(f"grammar has an escape that is no character: {_short(grammar)}", "grammar") from None


def _unescape(match: re.Match) -> str:
    code = match.group()[1:]
    return chr(int(code[1:], 16)) if code[0] in "xuU" else _UNESCAPED.get(code, code)


# -- the handler ------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: LLMHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length
    timeout = 300  # seconds a socket read may wait: idle keep-alive connections end

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            model = {"id": self.server.llm.name, "object": "model", "created": self.server.created, "owned_by": "a3t"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif path in ("/health", "/v1/health"):
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path or '/'}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._discard_body()
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path or '/'}", "not_found_error")
            return
        try:
            body = self._read_json()
            chat, sampling, stop = parse_chat_request(body, self.server.default_max_tokens)
            constraint = parse_constraint(body, chat)
        except BadRequest as exc:
            self._send_error(HTTPStatus.BAD_REQUEST, str(exc), "invalid_request_error", exc.param)
            return
        try:
            with self.server.lock:
                choices = None if constraint is None else [constraint.choices]
                [completion] = self.server.llm.complete([chat], sampling, stop=stop, choices=choices)
        except Exception as exc:  # the model failed: say so, keep serving
            log.exception("the model failed on a chat-completions request")
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed: {type(exc).__name__}: {exc}", "server_error")
            return
        content = completion.text if constraint is None else constraint.reply(completion.text)
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.llm.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop" if completion.stopped else "length",
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }
        self._send_json(HTTPStatus.OK, reply)

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                raise BadRequest("chunked request bodies are not supported: send Content-Length")
            return 0
        try:
            length = int(raw)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length header: {raw!r}") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"Content-Length must be between 0 and {MAX_BODY_BYTES}, got {length}")
        return length

    def _discard_body(self) -> None:
        try:
            self.rfile.read(self._content_length())
        except BadRequest:
            pass

    def _read_json(self) -> Any:
        length = self._content_length()
        if length == 0:
            raise BadRequest("the request has no body: send a JSON object with 'messages'")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None

    def _send_error(self, status: HTTPStatus, message: str, kind: str, param: str | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _send_json(self, status: HTTPStatus, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away before the reply was sent")
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s - %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve a local model through an OpenAI-compatible chat API.")
    parser.add_argument("model", help="path or id of a Hugging Face causal LM")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    from a3t.llm.transformers_llm import TransformersLLM

    llm = TransformersLLM(args.model, adapter=args.adapter)
    server, thread = serve(llm, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {llm.name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
