"""A client for a real WebShop server: WebShop's own Flask site (web_agent_site/app.py) in text mode.

Users who run WebShop's site with its full data (``python -m web_agent_site.app``, port 3000) get the
real benchmark: the real 1.18 M products, its search engine and its reward, computed by the server.
The client keeps the browser's place (page, query, result page, product, chosen options) and asks
the site for each page by URL, as the ReAct harness does:

    /<session>                                              search page
    /search_results/<session>/<query>/<page>                results
    /item_page/<session>/<asin>/<query>/<page>/<options>    item (options: a Python dict literal)
    /item_sub_page/<session>/<asin>/<query>/<page>/<Description|Features|Reviews>/<options>
    /done/<session>/<asin>/<options>                        buys; the page shows the score

Each page's HTML is walked as WebShop's text env walks it (the visible text nodes in order; a
<button> is a button, a <label> an option value, an <a class="product-link"> a product), giving the
same page elements, observations, actions and exploration as the local WebShopEnv.

Sessions: the site gives a session named ``fixed_<i>`` WebShop's goal i (in its fixed shuffled
order); goals 0-499 are WebShop's test split, 500-1499 its validation split, the rest train.
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import quote

import httpx

from a3t.envs.webshop import (
    DEFAULT_MAX_STEPS,
    SCORE_LABEL,
    Browse,
    BrowserEnv,
    Element,
    ObservationFormat,
    done_elements,
)

# WebShop's split of its goals by index (the IL and ReAct evaluations use the first 500).
SERVER_SPLITS = {"test": (0, 500), "valid": (500, 1500), "train": (1500, 12087)}
_INVISIBLE = {"style", "script", "head", "title", "meta", "[document]"}  # WebShop's tag_visible
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


class WebShopServerError(RuntimeError):
    """The WebShop server could not be reached or answered with an error; the message has the URL."""


def server_task_ids(split: str, limit: int | None = None) -> list[str]:
    """Session names of a split's goals on a WebShop server: fixed_<goal index>."""
    if split not in SERVER_SPLITS:
        raise KeyError(f"no WebShop split {split!r}; splits: {sorted(SERVER_SPLITS)}")
    start, stop = SERVER_SPLITS[split]
    stop = stop if limit is None else min(stop, start + limit)
    return [f"fixed_{i}" for i in range(start, stop)]


class _PageWalker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.radios: dict[str, str] = {}  # radio input id -> its group name
        self.elements: list[Element] = []
        self.has_search_bar = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if tag == "input" and attrs.get("type") == "radio":
            self.radios[attrs.get("id", "")] = attrs.get("name", "")
        if tag == "input" and attrs.get("id") == "search_input":
            self.has_search_bar = True
        if tag not in _VOID:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed tags, as browsers do
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        text = data.strip()
        parent, attrs = self.stack[-1] if self.stack else ("[document]", {})
        if not text or parent in _INVISIBLE:
            return
        if parent == "button":
            self.elements.append(Element("button", text))
        elif parent == "label":
            self.elements.append(Element("option", text, self.radios.get(attrs.get("for", ""), "")))
        elif parent == "a" and "product-link" in attrs.get("class", "").split():
            self.elements.append(Element("product", text))
        else:
            self.elements.append(Element("text", text))


def html_elements(html: str) -> tuple[list[Element], bool]:
    """(the page's visible elements in order, whether it has the search box)."""
    walker = _PageWalker()
    walker.feed(html)
    walker.close()
    return walker.elements, walker.has_search_bar


def _segment(value: str) -> str:
    # A '/' cannot travel inside one path segment (the server decodes %2F before routing).
    return quote(value.replace("/", " "), safe="")


class WebShopServerEnv(BrowserEnv):
    """One goal (session) of a real WebShop server behind the a3t environment API."""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", session: str = "fixed_0",
                 max_steps: int = DEFAULT_MAX_STEPS, observation_format: ObservationFormat = "sep",
                 timeout_s: float = 30.0, client: httpx.Client | None = None):
        super().__init__(max_steps, observation_format)
        self.base_url = base_url.rstrip("/")
        self.session = self.task_id = session
        self._client = client or httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    @property
    def current_url(self) -> str | None:
        return self.url(self._at) if self._at else None

    def url(self, at: Browse) -> str:
        s, query, options = self.session, _segment(at.query), _segment(str(at.options))
        if at.page == "search":
            return f"{self.base_url}/{s}"
        if at.page == "results":
            return f"{self.base_url}/search_results/{s}/{query}/{at.page_num}"
        if at.page == "item":
            return f"{self.base_url}/item_page/{s}/{at.asin}/{query}/{at.page_num}/{options}"
        if at.page == "done":
            return f"{self.base_url}/done/{s}/{at.asin}/{options}"
        return f"{self.base_url}/item_sub_page/{s}/{at.asin}/{query}/{at.page_num}/{at.page}/{options}"

    def _get(self, url: str) -> str:
        try:
            response = self._client.get(url)
        except httpx.HTTPError as e:
            raise WebShopServerError(f"{url}: WebShop server not reachable ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            raise WebShopServerError(f"{url}: WebShop server answered HTTP {response.status_code}")
        return response.text

    def _load(self, at: Browse) -> list[Element]:
        url = self.url(at)
        elements, has_search_bar = html_elements(self._get(url))
        texts = [e.text for e in elements]
        if at.page == "done":
            if SCORE_LABEL not in texts[:-1]:
                raise WebShopServerError(f"{url}: the done page shows no score")
            score = texts[texts.index(SCORE_LABEL) + 1]
            try:
                at.reward = float(score)
            except ValueError:
                raise WebShopServerError(f"{url}: the score is not a number ({score!r})") from None
            return done_elements(at.reward)  # the page's MTurk code and hidden debug texts left out
        if at.page == "search":
            if not has_search_bar or "Instruction:" not in texts[:-1]:
                raise WebShopServerError(f"{url}: not a WebShop search page (no search box or instruction)")
            self.instruction = texts[texts.index("Instruction:") + 1]
        return elements
