"""An LLM backend that talks to any OpenAI-compatible chat server over HTTP.

``POST {base_url}/chat/completions`` as served by vLLM, the llama.cpp server, Ollama, OpenAI,
or a3t's own :mod:`a3t.llm.server`. A batch of chats becomes concurrent requests (a thread
pool over one ``httpx.Client``); the server batches and caches prefixes on its side, so
``sessions`` are ignored and ``release`` does nothing.

The stop rule is a Python callable, which no server understands: it is applied here, to the
text the server returns.

The API key is read once, from the environment variable named by ``api_key_env``, and sent
as ``Authorization: Bearer ...``. It never appears in ``repr``, logs or error messages (a
server that echoes it back in an error body gets it masked).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from a3t.llm.base import Chat, Completion, Sampling, StopRule

log = logging.getLogger(__name__)

_SNIPPET_CHARS = 300
_MAX_RETRY_AFTER_S = 60.0


class LLMServerError(RuntimeError):
    """The LLM server could not be reached, timed out, refused the request or sent a reply
    that is not an OpenAI chat completion. The message says what went wrong and where."""


class _Retryable(Exception):
    """One failed attempt that is worth trying again; carries the final message."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class OpenAICompatibleLLM:
    """The :class:`a3t.llm.base.LLM` protocol over an OpenAI-compatible chat API.

    ``base_url`` ends before ``/chat/completions``, e.g. ``http://127.0.0.1:8000/v1``.
    ``max_retries`` is the number of attempts per request in all (1 = no retry); attempts
    are repeated, with exponential backoff ``backoff_s * 2**k`` (or the server's
    ``Retry-After`` if longer), on connection errors, timeouts, HTTP 429 and 5xx. Other 4xx
    and malformed replies fail at once. ``timeout_s`` bounds each network wait (connect,
    send, each read), not the whole request.
    """

    adapter: str | None = None

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 8,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 1:
            raise ValueError(f"max_retries (attempts in all) must be >= 1, got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.name = model
        self.model = model
        self.adapter = None
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.concurrency = int(concurrency)
        key = os.environ.get(api_key_env) if api_key_env else None
        self._api_key: str | None = key or None
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def __repr__(self) -> str:
        key = "set" if self._api_key else "not set"
        return (
            f"OpenAICompatibleLLM(base_url={self.base_url!r}, model={self.name!r}, "
            f"api_key_env={self.api_key_env!r} ({key}), timeout_s={self.timeout_s}, "
            f"max_retries={self.max_retries}, concurrency={self.concurrency})"
        )

    # -- the LLM protocol -------------------------------------------------------------------

    def complete(
        self,
        chats: list[Chat],
        sampling: Sampling,
        stop: StopRule | None = None,
        sessions: list[str] | None = None,
    ) -> list[Completion]:
        if sessions is not None and len(sessions) != len(chats):
            raise ValueError(f"{len(chats)} chats but {len(sessions)} sessions")
        if not chats:
            return []
        if len(chats) == 1 or self.concurrency == 1:
            return [self._complete_one(chat, sampling, stop) for chat in chats]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chats))) as pool:
            futures = [pool.submit(self._complete_one, chat, sampling, stop) for chat in chats]
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

    def _payload(self, chat: Chat, sampling: Sampling) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.name,
            "messages": chat,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        if chat and chat[-1]["role"] == "assistant":
            # Continue the reply the chat starts (vLLM's and a3t's server's extension; other servers
            # answer with a new reply, which the agent's parser reads as well).
            payload |= {"continue_final_message": True, "add_generation_prompt": False}
        return payload

    def _complete_one(self, chat: Chat, sampling: Sampling, stop: StopRule | None) -> Completion:
        data = self._post_with_retries(self._payload(chat, sampling))
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
        stopped = choice.get("finish_reason") == "stop" if isinstance(choice, dict) else False
        if stop is not None:
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

    def _post_with_retries(self, payload: dict[str, Any]) -> Any:
        attempts = self.max_retries
        for attempt in range(1, attempts + 1):
            try:
                return self._post_once(payload)
            except _Retryable as failure:
                if attempt == attempts:
                    raise LLMServerError(
                        f"{failure.message} (gave up after {attempts} attempt{'s' * (attempts > 1)})"
                    ) from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                if failure.retry_after is not None:
                    delay = max(delay, failure.retry_after)
                delay *= 1 + 0.1 * random.random()  # jitter: concurrent requests do not retry in lockstep
                log.warning("%s; attempt %d/%d, retrying in %.2f s", failure.message, attempt, attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post_once(self, payload: dict[str, Any]) -> Any:
        # Errors are raised ``from None``: httpx exceptions hold the request, headers included.
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.TimeoutException as exc:
            raise _Retryable(
                f"LLM server at {self.url} timed out: no answer within timeout_s={self.timeout_s:g} s "
                f"({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise _Retryable(
                f"cannot reach LLM server at {self.url}: {type(exc).__name__}: {self._redact(str(exc))}"
            ) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"LLM server at {self.url} answered HTTP {status}: {self._error_snippet(response)}",
                retry_after=_retry_after(response),
            )
        if status >= 400:
            raise LLMServerError(
                f"LLM server at {self.url} refused the request with HTTP {status}: {self._error_snippet(response)}"
            )
        try:
            return response.json()
        except ValueError:
            raise LLMServerError(
                f"reply from LLM server at {self.url} (HTTP {status}) is not JSON: {self._snippet(response.text)}"
            ) from None

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

    def _error_snippet(self, response: httpx.Response) -> str:
        try:
            error = response.json()["error"]
            message = error["message"] if isinstance(error, dict) else error
            if isinstance(message, str) and message.strip():
                return self._snippet(message)
        except (ValueError, KeyError, TypeError):
            pass
        return self._snippet(response.text)


def _count(usage: Any, key: str) -> int:
    if not isinstance(usage, dict):
        return 0
    value = usage.get(key)
    return value if isinstance(value, int) and value >= 0 else 0


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
