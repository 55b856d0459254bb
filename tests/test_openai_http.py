"""The OpenAI-compatible HTTP client and a3t's own server, against real HTTP servers on
127.0.0.1: a3t's server (over a scripted model and over the tiny in-process model) and small
stdlib servers that misbehave on purpose (sleep, 500, bad JSON, ignoring the action
constraint, ...)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from a3t.llm.base import Completion, Sampling, stop_after_action_line
from a3t.llm.openai_http import LLMServerError, OpenAICompatibleLLM
from a3t.llm.server import serve

FAST = {"api_key_env": None}


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    """The openai client waits 0.5 s, 1 s, ... between attempts; a few ms here keeps the tests short."""
    monkeypatch.setattr(openai._base_client, "INITIAL_RETRY_DELAY", 0.01)
OK_REPLY = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
CHAT = [{"role": "user", "content": "hi"}]


# -- a stdlib server whose every answer is scripted by the test --------------------------------


class Recorder:
    """What a stdlib server saw: one (path, headers, body) per request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)


Answer = Callable[[int, dict], "tuple[int, bytes | dict | str] | None"]  # request number, headers -> status, body


@contextmanager
def stdlib_server(answer: Answer, sleep_s: float = 0.0) -> Iterator[tuple[str, Recorder]]:
    """A ThreadingHTTPServer on 127.0.0.1 that records each POST and replies with
    ``answer(n, headers)`` after sleeping ``sleep_s``. Yields (base_url, recorder)."""
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.title(): v for k, v in self.headers.items()}  # HTTP header names ignore case
            with recorder.lock:
                recorder.requests.append((self.path, headers, body))
                n = len(recorder.requests)
            time.sleep(sleep_s)
            status, payload = answer(n, headers)
            data = payload if isinstance(payload, bytes) else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout)
                pass

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", recorder
    finally:
        server.shutdown()
        server.server_close()


# -- a3t's server over a scripted model ---------------------------------------------------------


class ScriptedLLM:
    """Implements the LLM protocol; always answers a ReAct turn followed by junk."""

    name = "scripted"
    adapter = None

    def __init__(self) -> None:
        self.calls: list[tuple[list, Sampling]] = []

    def complete(self, chats, sampling, stop=None, sessions=None, choices=None):
        self.calls.append((chats, sampling))
        text = f"Think: {chats[0][-1]['content']}\nAction: go to desk 1\nObservation: made up\n"
        stopped = False
        if stop is not None and (cut := stop(text)) is not None:
            text, stopped = text[:cut], True
        return [Completion(text=text, prompt_tokens=7, completion_tokens=11, stopped=stopped) for _ in chats]

    def release(self, sessions):
        pass


@contextmanager
def a3t_server(llm) -> Iterator[str]:
    server, thread = serve(llm)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_client_over_a3t_server_with_scripted_model():
    llm = ScriptedLLM()
    with a3t_server(llm) as url:
        client = OpenAICompatibleLLM(url, "scripted", **FAST)
        chats = [[{"role": "user", "content": f"task {i}"}] for i in range(3)]
        sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=20, seed=3)
        out = client.complete(chats, sampling, stop=stop_after_action_line, sessions=["a", "b", "c"])
        client.release(["a", "b", "c"])
        # no rule: the whole text, and the server's finish_reason "length" means not stopped
        [raw] = client.complete(chats[:1], sampling)
    assert [c.text for c in out] == [f"Think: task {i}\nAction: go to desk 1\n" for i in range(3)]
    assert all(c.stopped and c.prompt_tokens == 7 and c.completion_tokens == 11 for c in out)
    assert raw.text.endswith("Observation: made up\n") and not raw.stopped
    # the sampling went through HTTP and back into a Sampling intact
    assert {s for _, s in llm.calls} == {sampling}
    assert sorted(c[0][0]["content"] for c, _ in llm.calls[:3]) == ["task 0", "task 1", "task 2"]


def test_server_models_and_reply_shape():
    with a3t_server(ScriptedLLM()) as url:
        models = httpx.get(f"{url}/models").json()
        reply = httpx.post(f"{url}/chat/completions", json={"messages": CHAT, "stop": "\nAction"}).json()
    assert models["data"][0]["id"] == "scripted"
    assert reply["object"] == "chat.completion" and reply["model"] == "scripted"
    assert reply["id"].startswith("chatcmpl-") and isinstance(reply["created"], int)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Think: hi"}  # cut before the stop string
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}


# (f) malformed requests to our server
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "'messages' is required"),
        (json.dumps({"messages": []}).encode(), "non-empty list"),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content must be a string"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "messages[0].role"),
        (json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), "temperature must be a number"),
        (json.dumps({"messages": CHAT, "top_p": 2}).encode(), "top_p"),
        (json.dumps({"messages": CHAT, "max_tokens": 0}).encode(), "max_tokens must be a positive integer"),
        (json.dumps({"messages": CHAT, "seed": 1.5}).encode(), "seed"),
        (json.dumps({"messages": CHAT, "stream": True}).encode(), "streaming is not supported"),
    ],
)
def test_server_rejects_malformed_request_with_400(body, needle):
    llm = ScriptedLLM()
    with a3t_server(llm) as url:
        response = httpx.post(f"{url}/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert llm.calls == []


def test_server_unknown_path_and_model_failure():
    class Broken(ScriptedLLM):
        def complete(self, chats, sampling, stop=None, sessions=None, choices=None):
            raise RuntimeError("out of memory")

    with a3t_server(Broken()) as url:
        assert httpx.get(f"{url}/nope").status_code == 404
        response = httpx.post(f"{url}/chat/completions", json={"messages": CHAT})
        assert response.status_code == 500 and "out of memory" in response.json()["error"]["message"]
        # the client reports the 500 after its attempts, with the server's message
        with pytest.raises(LLMServerError, match=r"HTTP 500.*out of memory"):
            OpenAICompatibleLLM(url, "m", max_retries=2, **FAST).complete([CHAT], Sampling())


# -- (b) timeout, (c) 5xx and retries, (d) unreachable, (e) the API key ----------------------------


def test_timeout_after_max_retries_retries():
    with stdlib_server(lambda n, h: (200, OK_REPLY), sleep_s=1.0) as (url, seen):
        client = OpenAICompatibleLLM(url, "m", timeout_s=0.2, max_retries=2, **FAST)
        started = time.monotonic()
        with pytest.raises(LLMServerError) as info:
            client.complete([CHAT], Sampling())
        elapsed = time.monotonic() - started
        assert seen.count == 3
    message = str(info.value)
    assert "timed out" in message and "0.2 s" in message and f"{url}/chat/completions" in message
    assert "3 attempts" in message
    assert elapsed < 3  # 3 x 0.2 s plus tiny backoff, not the server's 3 x 1 s


def test_http_500_is_retried_then_reported():
    with stdlib_server(lambda n, h: (500, {"error": {"message": "kaboom: CUDA error"}})) as (url, seen):
        with pytest.raises(LLMServerError) as info:
            OpenAICompatibleLLM(url, "m", max_retries=2, **FAST).complete([CHAT], Sampling())
        assert seen.count == 3
    message = str(info.value)
    assert "HTTP 500" in message and "kaboom: CUDA error" in message and url in message


def test_http_500_once_then_success():
    with stdlib_server(lambda n, h: (500, "overloaded") if n == 1 else (200, OK_REPLY)) as (url, seen):
        [out] = OpenAICompatibleLLM(url, "m", max_retries=3, **FAST).complete([CHAT], Sampling())
        assert seen.count == 2
    assert out == Completion(text="hello", prompt_tokens=5, completion_tokens=1, stopped=False)


def test_429_is_retried_but_other_4xx_is_not():
    with stdlib_server(lambda n, h: (429, "slow down") if n == 1 else (200, OK_REPLY)) as (url, seen):
        OpenAICompatibleLLM(url, "m", max_retries=3, **FAST).complete([CHAT], Sampling())
        assert seen.count == 2
    with stdlib_server(lambda n, h: (404, {"error": {"message": "model 'm' not found"}})) as (url, seen):
        with pytest.raises(LLMServerError, match=r"HTTP 404.*model 'm' not found"):
            OpenAICompatibleLLM(url, "m", max_retries=3, **FAST).complete([CHAT], Sampling())
        assert seen.count == 1


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ("<html>gateway</html>", "is not JSON"),
        ({"choices": []}, "lacks choices[0].message.content"),
        ({"choices": [{"message": {"role": "assistant"}}]}, "lacks choices[0].message.content"),
        ({"choices": [{"message": {"content": None}}]}, "non-text"),
    ],
)
def test_malformed_reply(payload, needle):
    with stdlib_server(lambda n, h: (200, payload)) as (url, seen):
        with pytest.raises(LLMServerError) as info:
            OpenAICompatibleLLM(url, "m", **FAST).complete([CHAT], Sampling())
        assert seen.count == 1  # a malformed reply is not retried
    assert needle in str(info.value) and url in str(info.value)


def test_missing_usage_counts_zero_and_client_side_stop_rule():
    reply = {"choices": [{"message": {"content": "Think: t\nAction: open drawer 1\nObservation: x"}, "finish_reason": "length"}]}
    with stdlib_server(lambda n, h: (200, reply)) as (url, seen):
        [out] = OpenAICompatibleLLM(url, "m", **FAST).complete([CHAT], Sampling(), stop=stop_after_action_line)
        sent = json.loads(seen.requests[0][2])
    assert out == Completion(text="Think: t\nAction: open drawer 1\n", prompt_tokens=0, completion_tokens=0, stopped=True)
    assert seen.requests[0][0] == "/v1/chat/completions"
    assert sent == {"model": "m", "messages": CHAT, "temperature": 0.0, "top_p": 1.0, "max_tokens": 128}


def free_port() -> int:
    """A port that was free a moment ago, with nobody listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMServerError) as info:
        OpenAICompatibleLLM(url, "m", max_retries=1, **FAST).complete([CHAT], Sampling())
    message = str(info.value)
    assert "cannot reach" in message and f"{url}/chat/completions" in message and "2 attempts" in message


def test_api_key_is_sent_and_never_shown(monkeypatch):
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("A3T_TEST_KEY", key)

    def answer(n, headers):  # a rude server that echoes the Authorization header in its errors
        return 500, {"error": f"bad gateway for {headers.get('Authorization')}"}

    with stdlib_server(answer) as (url, seen):
        client = OpenAICompatibleLLM(url, "m", api_key_env="A3T_TEST_KEY", max_retries=1)
        with pytest.raises(LLMServerError) as info:
            client.complete([CHAT], Sampling())
        headers = seen.requests[0][1]
    assert headers["Authorization"] == f"Bearer {key}"
    assert "bad gateway for Bearer ***" in str(info.value)
    assert key not in str(info.value) and key not in repr(info.value)
    assert key not in repr(client) and key not in str(client) and "A3T_TEST_KEY" in repr(client)
    # no key in the unreachable / timeout errors either
    with pytest.raises(LLMServerError) as info:
        OpenAICompatibleLLM(f"http://127.0.0.1:{free_port()}/v1", "m", api_key_env="A3T_TEST_KEY", max_retries=0).complete(
            [CHAT], Sampling()
        )
    assert key not in str(info.value)
    # and none sent when the variable is unset
    monkeypatch.delenv("A3T_TEST_KEY")
    with stdlib_server(lambda n, h: (200, OK_REPLY)) as (url, seen):
        OpenAICompatibleLLM(url, "m", api_key_env="A3T_TEST_KEY").complete([CHAT], Sampling())
        assert "Authorization" not in seen.requests[0][1]


def test_batch_requests_run_concurrently():
    with stdlib_server(lambda n, h: (200, OK_REPLY), sleep_s=0.3) as (url, seen):
        client = OpenAICompatibleLLM(url, "m", concurrency=4, **FAST)
        started = time.monotonic()
        out = client.complete([CHAT] * 4, Sampling())
        elapsed = time.monotonic() - started
        assert seen.count == 4
    assert [c.text for c in out] == ["hello"] * 4
    assert elapsed < 1.1  # 4 x 0.3 s one after the other would be 1.2 s


# -- (a) the tiny in-process model behind a3t's server --------------------------------------------


def test_client_over_a3t_server_with_tiny_model(tiny_model_dir):
    from a3t.llm.transformers_llm import TransformersLLM

    llm = TransformersLLM(tiny_model_dir)
    with a3t_server(llm) as url:
        client = OpenAICompatibleLLM(url, llm.name, timeout_s=120, **FAST)
        chats = [
            [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": f"Task {i}: find the apple."}]
            for i in range(3)
        ]
        sampling = Sampling(temperature=0.0, max_new_tokens=12, seed=0)
        out = client.complete(chats, sampling)
        # a rule that cuts after the third character is applied client-side to the real text
        cut = client.complete(chats, sampling, stop=lambda text: 3 if len(text) >= 3 else None)
        # and the action-line rule, on whatever the model said
        ruled = client.complete(chats, sampling, stop=stop_after_action_line)
    assert len(out) == 3
    for c in out:
        assert isinstance(c.text, str) and c.prompt_tokens > 0 and c.completion_tokens > 0
    for full, short in zip(out, cut, strict=True):  # greedy: same text, cut at 3 characters
        if len(full.text) >= 3:
            assert short.text == full.text[:3] and short.stopped
        else:
            assert short.text == full.text
    for full, r in zip(out, ruled, strict=True):
        end = stop_after_action_line(full.text)
        assert r.text == (full.text if end is None else full.text[:end])


# -- constrained decoding: the three wire forms, both sides --------------------------------------

# A constrained chat continues the assistant's "Action:"; odd choices exercise the escaping.
ACTION_CHAT = [{"role": "user", "content": "You are in a room."}, {"role": "assistant", "content": "Thought: t\nAction:"}]
CHOICES = ["go to desk 1", 'say "hi"', "type a\\b", "two\nlines"]
FORMS = ["json_schema", "guided_choice", "grammar"]
CONSTRAINT_KEYS = {"response_format", "structured_outputs", "guided_choice", "grammar"}


def reply_with(content, finish="stop"):
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}]}


@pytest.mark.parametrize(
    ("form", "content", "fields"),
    [
        ("json_schema", '"type a\\\\b"', {"response_format": {"type": "json_schema", "json_schema": {
            "name": "action", "schema": {"type": "string", "enum": CHOICES}, "strict": True}}}),
        ("guided_choice", " type a\\b", {"structured_outputs": {"choice": [" " + c for c in CHOICES]},
                                          "guided_choice": [" " + c for c in CHOICES]}),
        ("grammar", " type a\\b\n", {"grammar": 'root ::= " go to desk 1" | " say \\"hi\\"" | " type a\\\\b" | '
                                                '" two\\nlines"'}),
    ],
)
def test_client_sends_the_constraint_and_decodes_the_answer(form, content, fields):
    with stdlib_server(lambda n, h: (200, reply_with(content, finish="length"))) as (url, seen):
        [out] = OpenAICompatibleLLM(url, "m", structured_output=form, **FAST).complete(
            [ACTION_CHAT], Sampling(), stop=lambda text: 0, choices=[CHOICES])
        sent = json.loads(seen.requests[0][2])
    assert {k: sent[k] for k in CONSTRAINT_KEYS & sent.keys()} == fields
    assert sent["continue_final_message"] is True and sent["messages"] == ACTION_CHAT
    # the choice itself, whole: the stop rule (cut at 0) does not apply, the choice ended it
    assert out.text == "type a\\b" and out.stopped


def test_free_chats_send_no_constraint():
    def answer(n, headers):
        return 200, reply_with('"go to desk 1"')

    with stdlib_server(answer) as (url, seen):
        client = OpenAICompatibleLLM(url, "m", concurrency=2, **FAST)
        free, constrained = client.complete([CHAT, ACTION_CHAT], Sampling(), choices=[None, CHOICES])
        client.complete([ACTION_CHAT], Sampling())
        bodies = [json.loads(body) for _, _, body in seen.requests]
    by_chat = {json.dumps(b["messages"]): b for b in bodies[:2]}
    assert not CONSTRAINT_KEYS & by_chat[json.dumps(CHAT)].keys() and free.text == '"go to desk 1"'
    assert "response_format" in by_chat[json.dumps(ACTION_CHAT)] and constrained.text == "go to desk 1"
    assert not CONSTRAINT_KEYS & bodies[2].keys()  # choices=None: free text


@pytest.mark.parametrize("content", ['  "go to desk 1"\n', "go to desk 1", '" go to desk 1 "'])
def test_json_schema_reply_may_be_padded_or_bare(content):
    with stdlib_server(lambda n, h: (200, reply_with(content))) as (url, seen):
        [out] = OpenAICompatibleLLM(url, "m", **FAST).complete([ACTION_CHAT], Sampling(), choices=[CHOICES])
    assert out.text == "go to desk 1"


@pytest.mark.parametrize("form", FORMS)
def test_server_that_ignores_the_constraint_is_an_error(form, monkeypatch):
    key = "sk-test-constraint-0123456789"
    monkeypatch.setenv("A3T_TEST_KEY", key)

    def answer(n, headers):  # free text, and rude: it echoes the key
        return 200, reply_with(f"Thought: {headers.get('Authorization')}\nAction: go to desk 1")

    with stdlib_server(answer) as (url, seen):
        client = OpenAICompatibleLLM(url, "m", api_key_env="A3T_TEST_KEY", structured_output=form)
        with pytest.raises(LLMServerError) as info:
            client.complete([ACTION_CHAT], Sampling(), choices=[CHOICES])
        assert seen.count == 1  # not retried: the server would ignore it again
    message = str(info.value)
    assert f"{url}/chat/completions" in message and f"llm.structured_output={form}" in message
    assert "ignored the action constraint" in message and "none of the 4 admissible actions" in message
    others = [other for other in FORMS if other != form]
    assert f"try llm.structured_output={others[0]} (" in message and f" or {others[1]} (" in message
    assert key not in message and "Bearer ***" in message


def test_a_server_refusing_the_constraint_field_names_the_setting_to_change():
    # What llama-cpp-python's server (0.3) answers to a json_schema response_format.
    refusal = {"error": {"message": "1 validation error: ('body', 'response_format', 'type') Input should be "
                                    "'text' or 'json_object'", "type": "internal_server_error"}}
    with stdlib_server(lambda n, h: (500, refusal)) as (url, seen):
        with pytest.raises(LLMServerError) as info:
            OpenAICompatibleLLM(url, "m", max_retries=0, **FAST).complete([ACTION_CHAT], Sampling(), choices=[CHOICES])
    message = str(info.value)
    assert "HTTP 500" in message and "does not take llm.structured_output=json_schema" in message
    assert "try llm.structured_output=guided_choice (vLLM) or grammar (" in message and "llama-cpp-python" in message


def test_constrained_reply_cut_at_max_tokens_says_so():
    with stdlib_server(lambda n, h: (200, reply_with('"go to de', finish="length"))) as (url, seen):
        with pytest.raises(LLMServerError, match=r"stopped at max_tokens=3"):
            OpenAICompatibleLLM(url, "m", **FAST).complete([ACTION_CHAT], Sampling(max_new_tokens=3), choices=[CHOICES])


def test_client_checks_choices_and_setting():
    client = OpenAICompatibleLLM("http://127.0.0.1:9/v1", "m", **FAST)
    with pytest.raises(ValueError, match="2 chats but 1 choice lists"):
        client.complete([CHAT, CHAT], Sampling(), choices=[CHOICES])
    with pytest.raises(ValueError, match="at least one choice"):
        client.complete([ACTION_CHAT], Sampling(), choices=[[]])
    with pytest.raises(ValueError, match="structured_output must be one of"):
        OpenAICompatibleLLM("http://127.0.0.1:9/v1", "m", structured_output="regex", **FAST)


class ChoosingLLM(ScriptedLLM):
    """Records the choices it is given; a constrained chat gets its last choice."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list = []

    def complete(self, chats, sampling, stop=None, sessions=None, choices=None):
        self.choices.append(choices)
        if choices is None:
            return super().complete(chats, sampling, stop)
        return [Completion(text=options[-1], prompt_tokens=3, completion_tokens=2, stopped=True) for options in choices]


@pytest.mark.parametrize("form", FORMS)
def test_client_over_a3t_server_with_each_constraint_form(form):
    llm = ChoosingLLM()
    with a3t_server(llm) as url:
        client = OpenAICompatibleLLM(url, "m", structured_output=form, concurrency=1, **FAST)
        constrained, free = client.complete([ACTION_CHAT, CHAT], Sampling(), choices=[CHOICES, None])
    assert constrained == Completion(text="two\nlines", prompt_tokens=3, completion_tokens=2, stopped=True)
    assert free.text.startswith("Think: hi")
    # the model got the protocol's choices: unescaped, and without the space the client put in front
    assert llm.choices == [[CHOICES], None]


@pytest.mark.parametrize(
    ("fields", "content"),
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {"type": "string", "enum": ["a b", "c"]}}}}, '"c"'),
        ({"structured_outputs": {"choice": [" a b", " c"]}}, " c"),  # the space goes back in front
        ({"guided_choice": ["a b", "c"]}, "c"),
        ({"grammar": 'root ::= " a b"\n  | " c"'}, " c"),
    ],
)
def test_a3t_server_answers_in_the_form_asked(fields, content):
    llm = ChoosingLLM()
    with a3t_server(llm) as url:
        reply = httpx.post(f"{url}/chat/completions", json={"messages": ACTION_CHAT, **fields}).json()
    assert reply["choices"][0]["message"]["content"] == content
    assert reply["choices"][0]["finish_reason"] == "stop" and llm.choices == [[["a b", "c"]]]


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format", "no other schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
         "response_format", "string"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": [1, 2]}}}},
         "response_format.json_schema.schema.enum", "non-empty list of strings"),
        ({"structured_outputs": {"regex": "a+"}}, "structured_outputs", "no other structured output"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list of strings"),
        ({"guided_choice": "a"}, "guided_choice", "non-empty list of strings"),
        ({"grammar": "root ::= [a-z]+"}, "grammar", "alternation of string literals"),
        ({"grammar": 'root ::= "a" | b'}, "grammar", "alternation of string literals"),
        ({"grammar": 'root ::= "\\q"'}, "grammar", "alternation of string literals"),
        ({"guided_regex": "a+"}, "guided_regex", "not supported"),
        ({"guided_choice": ["a"], "grammar": 'root ::= "a"'}, "guided_choice", "several constraints"),
        ({"guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}}, "structured_outputs",
         "several constraints"),
    ],
)
def test_a3t_server_rejects_malformed_constraint_with_400(fields, param, needle):
    llm = ChoosingLLM()
    with a3t_server(llm) as url:
        response = httpx.post(f"{url}/chat/completions", json={"messages": ACTION_CHAT, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"] and param in error["message"]
    assert llm.choices == []
