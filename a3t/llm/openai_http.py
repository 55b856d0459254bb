"""An LLM backend that talks to any OpenAI-compatible chat server over HTTP.

``POST {base_url}/chat/completions`` as served by vLLM, the llama.cpp server, Ollama, OpenAI,
or a3t's own :mod:`a3t.llm.server`, through the official ``openai`` client (its retries with
backoff and ``Retry-After``, its timeouts). A batch of chats becomes concurrent requests (a
thread pool over one client); the server batches and caches prefixes on its side, so
``sessions`` are ignored and ``release`` does nothing.

The stop rule is a Python callable, which no server understands: it is applied here, to the
text the server returns.

Constrained chats (``choices``) carry the server's own structured-output constraint, in the
form ``structured_output`` names, since servers understand different ones:

* ``json_schema``: ``response_format`` with the schema ``{"type": "string", "enum": choices}``
  (vLLM, llama.cpp's llama-server, OpenAI); the reply is that JSON string. llama-cpp-python's
  server (0.3) refuses it: use ``grammar`` there.
* ``guided_choice``: vLLM's ``structured_outputs.choice``, and the same list as the older
  top-level ``guided_choice`` (removed in vLLM 0.12), so that old and new vLLM both get it.
* ``grammar``: the GBNF ``grammar`` of llama.cpp's llama-server and of llama-cpp-python's server,
  ``root ::= "a" | "b" | ...``.

With the last two, a chat that continues its assistant message ("...Action:") gets each choice
with the protocol's one space in front (" go to desk 1"), so the model writes the words with
the tokens it has in "Action: go to desk 1", not glued to the colon. The reply, stripped (and
JSON-decoded), must be one of the choices: a server that ignores the constraint would
otherwise feed the agent free text as an action, so that is an :class:`LLMServerError` naming
the setting to change.

The API key is read once, from the environment variable named by ``api_key_env``, and sent
as ``Authorization: Bearer ...``; without one no Authorization header is sent (local servers
need none). It never appears in ``repr``, logs or error messages (a server that echoes it back
in an error body gets it masked).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from a3t.llm.base import Chat, Completion, Sampling, StopRule

_SNIPPET_CHARS = 300
STRUCTURED_OUTPUTS = ("json_schema", "guided_choice", "grammar")
# Fields of a chat completion request the ``openai`` client has no parameter for (servers'
# extensions): they travel in ``extra_body``.
_EXTENSIONS = ("continue_final_message", "add_generation_prompt", "structured_outputs", "guided_choice", "grammar")


class LLMServerError(RuntimeError):
    """The LLM server could not be reached, timed out, refused the request or sent a reply
    that is not an OpenAI chat completion. The message says what went wrong and where."""


class OpenAICompatibleLLM:
    """The :class:`a3t.llm.base.LLM` protocol over an OpenAI-compatible chat API.

    ``base_url`` ends before ``/chat/completions``, e.g. ``http://127.0.0.1:8000/v1``.
    ``max_retries`` is the number of retries after a failed attempt (0 = one attempt), on
    connection errors, timeouts, HTTP 408, 409, 429 and 5xx, with the ``openai`` client's
    exponential backoff (or the server's ``Retry-After``). Other 4xx and malformed replies fail
    at once. ``timeout_s`` bounds each network wait (connect, send, each read), not the whole
    request. ``structured_output`` is how constrained chats are asked for (module docstring).
    """

    adapter: str | None = None

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60,
        max_retries: int = 3,
        concurrency: int = 8,
        structured_output: str = "json_schema",
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if structured_output not in STRUCTURED_OUTPUTS:
            raise ValueError(f"structured_output must be one of {STRUCTURED_OUTPUTS}, got {structured_output!r}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.name = model
        self.model = model
        self.adapter = None
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.structured_output = structured_output
        key = os.environ.get(api_key_env) if api_key_env else None
        self._api_key: str | None = key or None
        # The client insists on a key; without one it gets a placeholder that is never sent
        # (each request omits the header).
        self._headers = {} if self._api_key else {"Authorization": openai.Omit()}
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key or "unused", timeout=self.timeout_s,
                                     max_retries=self.max_retries)

    def __repr__(self) -> str:
        key = "set" if self._api_key else "not set"
        return (
            f"OpenAICompatibleLLM(base_url={self.base_url!r}, model={self.name!r}, "
            f"api_key_env={self.api_key_env!r} ({key}), timeout_s={self.timeout_s}, "
            f"max_retries={self.max_retries}, concurrency={self.concurrency}, "
            f"structured_output={self.structured_output!r})"
        )

    # -- the LLM protocol -------------------------------------------------------------------

    def complete(
        self,
        chats: list[Chat],
        sampling: Sampling,
        stop: StopRule | None = None,
        sessions: list[str] | None = None,
        choices: list[list[str] | None] | None = None,
    ) -> list[Completion]:
        if sessions is not None and len(sessions) != len(chats):
            raise ValueError(f"{len(chats)} chats but {len(sessions)} sessions")
        if choices is not None and len(choices) != len(chats):
            raise ValueError(f"{len(chats)} chats but {len(choices)} choice lists")
        choices = choices or [None] * len(chats)
        if any(options is not None and not options for options in choices):
            raise ValueError("a constrained chat needs at least one choice")
        if not chats:
            return []
        if len(chats) == 1 or self.concurrency == 1:
            return [self._complete_one(*job, sampling, stop) for job in zip(chats, choices)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chats))) as pool:
            futures = [pool.submit(self._complete_one, *job, sampling, stop) for job in zip(chats, choices)]
            return [future.result() for future in futures]

    def release(self, sessions: list[str]) -> None:
        """Nothing to forget: the server does its own prefix caching."""

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatibleLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one request --------------------------------------------------------------------------

    def _payload(self, chat: Chat, sampling: Sampling, choices: list[str] | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.name,
            "messages": chat,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        continued = bool(chat) and chat[-1]["role"] == "assistant"
        if continued:
            # Continue the reply the chat starts (vLLM's and a3t's server's extension; other servers
            # answer with a new reply, which the agent's parser reads as well).
            payload |= {"continue_final_message": True, "add_generation_prompt": False}
        if choices is not None:
            payload |= self._constraint(choices, continued)
        return payload

    def _constraint(self, choices: list[str], continued: bool) -> dict[str, Any]:
        """The request fields that restrict the reply to ``choices``."""
        if self.structured_output == "json_schema":
            # No space here: the JSON string starts with its quote, the space would sit inside it.
            schema = {"name": "action", "schema": {"type": "string", "enum": choices}, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": schema}}
        if continued:  # the protocol's space after "Action:" (module docstring)
            choices = [" " + c for c in choices]
        if self.structured_output == "guided_choice":
            return {"structured_outputs": {"choice": choices}, "guided_choice": choices}
        return {"grammar": "root ::= " + " | ".join(gbnf_literal(c) for c in choices)}

    def _complete_one(
        self, chat: Chat, choices: list[str] | None, sampling: Sampling, stop: StopRule | None
    ) -> Completion:
        data = self._post(self._payload(chat, sampling, choices))
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMServerError(
                f"reply from LLM server at {self.url} lacks choices[0].message.content: "
                f"{self._snippet(json.dumps(data))}"
            ) from None
        if not isinstance(text, str):
            raise LLMServerError(
                f"reply from LLM server at {self.url} has a non-text choices[0].message.content "
                f"({type(text).__name__}): {self._snippet(json.dumps(data))}"
            )
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        stopped = finish == "stop"
        if choices is not None:
            text, stopped = self._chosen(text, choices, finish, sampling), True
        elif stop is not None:
            cut = stop(text)
            if cut is not None:
                text = text[:cut]
                stopped = True
        usage = data.get("usage") if isinstance(data, dict) else None
        return Completion(
            text=text,
            prompt_tokens=_count(usage, "prompt_tokens"),
            completion_tokens=_count(usage, "completion_tokens"),
            stopped=stopped,
        )

    def _chosen(self, text: str, choices: list[str], finish: Any, sampling: Sampling) -> str:
        """The choice a constrained reply names, or the error of a server that ignored the constraint."""
        answer = text.strip()
        if self.structured_output == "json_schema" and answer not in choices:
            try:
                decoded = json.loads(answer)
            except ValueError:
                decoded = None
            if isinstance(decoded, str):
                answer = decoded.strip()
        if answer in choices:
            return answer
        hint = (f"this server may not support {self.structured_output} structured output — "
                f"try llm.structured_output={self._other_forms()}")
        if finish == "length":  # a constrained reply cut short is not one of the choices either
            hint = f"the reply stopped at max_tokens={sampling.max_new_tokens}, maybe too few for the action; or {hint}"
        raise LLMServerError(
            f"LLM server at {self.url} ignored the action constraint "
            f"(llm.structured_output={self.structured_output}): it answered '{self._snippet(text)}', which is "
            f"none of the {len(choices)} admissible actions; {hint}"
        )

    def _post(self, payload: dict[str, Any]) -> Any:
        """The server's JSON reply to one request (the client retries); an LLMServerError else.
        Errors are raised ``from None``: the client's exceptions hold the request, headers included."""
        extra = {key: payload.pop(key) for key in _EXTENSIONS if key in payload}
        tries = f"gave up after {self.max_retries + 1} attempt{'s' * (self.max_retries > 0)}"
        try:
            # The raw reply: a3t checks it itself, to say what is wrong with a malformed one.
            response = self._client.chat.completions.with_raw_response.create(**payload, extra_body=extra or None,
                                                                        extra_headers=self._headers)
        except openai.APITimeoutError:
            raise LLMServerError(f"LLM server at {self.url} timed out: no answer within "
                                 f"timeout_s={self.timeout_s:g} s ({tries})") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise LLMServerError(f"cannot reach LLM server at {self.url}: {type(cause).__name__}: "
                                 f"{self._redact(str(cause))} ({tries})") from None
        except openai.APIStatusError as exc:
            status, body = exc.status_code, self._error_snippet(exc.response)
            body += self._constraint_hint(payload | extra, body)
            if status in (408, 409, 429) or status >= 500:
                raise LLMServerError(f"LLM server at {self.url} answered HTTP {status}: {body} ({tries})") from None
            raise LLMServerError(f"LLM server at {self.url} refused the request with HTTP {status}: {body}") from None
        reply = response.http_response
        try:
            return reply.json()
        except ValueError:
            raise LLMServerError(f"reply from LLM server at {self.url} (HTTP {reply.status_code}) is not JSON: "
                                 f"{self._snippet(reply.text)}") from None

    def _other_forms(self) -> str:
        return " or ".join(f"{o} ({SERVERS[o]})" for o in STRUCTURED_OUTPUTS if o != self.structured_output)

    def _constraint_hint(self, payload: dict[str, Any], body: str) -> str:
        """When a server refuses the constraint's own field (llama-cpp-python's server, say, takes
        ``grammar`` but not a json_schema ``response_format``): which setting to change."""
        fields = ("response_format", "grammar", "guided_choice", "structured_outputs")
        if not any(f in payload and f in body for f in fields):
            return ""
        return (f" — the server does not take llm.structured_output={self.structured_output}: "
                f"try llm.structured_output={self._other_forms()}")

    # -- keeping the key out of messages -------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _snippet(self, text: str) -> str:
        """A short, one-line, key-free view of a body: the message of an OpenAI-style
        ``{"error": {"message": ...}}`` body, else its start."""
        text = self._redact(text)
        text = " ".join(text.split())
        if len(text) > _SNIPPET_CHARS:
            text = text[:_SNIPPET_CHARS] + "..."
        return text or "(empty body)"

    def _error_snippet(self, response) -> str:
        try:
            error = response.json()["error"]
            message = error["message"] if isinstance(error, dict) else error
            if isinstance(message, str) and message.strip():
                return self._snippet(message)
        except (ValueError, KeyError, TypeError):
            pass
        return self._snippet(response.text)


SERVERS = {"json_schema": "vLLM, llama.cpp's llama-server, OpenAI", "guided_choice": "vLLM",
           "grammar": "llama.cpp's llama-server, llama-cpp-python's server"}


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal: quoted, with backslash, quote and line breaks escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _count(usage: Any, key: str) -> int:
    if not isinstance(usage, dict):
        return 0
    value = usage.get(key)
    return value if isinstance(value, int) and value >= 0 else 0
