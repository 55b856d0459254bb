"""WebShop (Yao et al., 2022) in text mode, self-contained, behind the a3t environment API.

An episode is one goal: an instruction naming a product type, attributes, options and a price
limit. The agent moves through WebShop's pages with WebShop's two actions, written as WebShop
writes them: ``search[query]`` on the search page, ``click[button]`` for anything clickable (a
button, a product's ASIN on a results page, an option value on an item page). Pages:

- search: the instruction and the search box;
- results: BM25 over the catalogue, the top 50, 10 per page, with ``Back to Search``, ``< Prev``,
  ``Next >`` and each product's ASIN, title and price;
- item: the options (clicking a value selects it), title, price, rating, ``Description``,
  ``Features``, ``Reviews`` and ``Buy Now``; ``< Prev`` goes back to the results;
- description / features / reviews, each with ``< Prev`` back to the item.

``click[Buy Now]`` ends the episode with WebShop's reward (a3t.envs.webshop_reward); reward 1 is a
win. Observations come in one of two formats, built from the same list of page elements:

- ``sep`` (default): WebShop's own text mode, the page's visible texts joined by `` [SEP] ``
  ("Instruction: [SEP] i need ... [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] ...").
  An invalid action leaves the page as it is and shows it again, as WebShop's text env does.
- ``react``: the format of the ReAct WebShop harness that the ReAct and A3T prompts were written in
  ("[Back to Search] \\nPage 1 (Total results: 50) \\n[Next >] \\n[B078GWRC1J] ..."): clickables in
  brackets, a chosen option in double brackets, the first 3 results shown, "You have clicked X."
  after an option, "Invalid action!" for an invalid action.

Choices where WebShop leaves room, or where we had to substitute:
- Step limit: 15 actions (the ReAct WebShop harness gives an episode 15 steps). Reaching it ends the
  episode with reward 0.
- ``search[...]`` is valid on the search page only, where the site has its search box (WebShop's
  text env would search from any page; the ReAct harness and the real site do not).
- Search: BM25 (bm25s, Lucene's formula, k1=0.9, b=0.4 as pyserini's defaults) over WebShop's
  document text (title, description, first bullet point, options), with an S-stemmer for plurals
  instead of Lucene's Porter stemmer.
- Clicks match case-insensitively, as in WebShop (it lower-cases the argument).
"""

from __future__ import annotations

import functools
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import bm25s
import numpy as np

from a3t.envs.base import PageFormat, Reset, Step, TerminalReason
from a3t.envs.webshop_catalog import (
    Catalog,
    Goal,
    Product,
    generate_catalog,
    load_webshop_catalog,
)
from a3t.envs.webshop_reward import RewardInfo, webshop_reward

ObservationFormat = PageFormat
PageName = Literal["search", "results", "item", "Description", "Features", "Reviews", "done"]

DEFAULT_MAX_STEPS = 15  # the ReAct WebShop harness
SEARCH_RETURN_N = 50  # WebShop's engine: results kept per search
PRODUCTS_PER_PAGE = 10
REACT_RESULTS_SHOWN = 3  # the ReAct harness prints the first 3 results of a page

BUY_NOW = "Buy Now"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BACK_TO_SEARCH = "Back to Search"
SEARCH_BUTTON = "Search"  # on the search page; WebShop does not let it be clicked
SUB_PAGES = ("Description", "Features", "Reviews")
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
INVALID_ACTION = "Invalid action!"  # the ReAct harness's answer to an invalid action

_ACTION = re.compile(r"^(search|click)\[(.*)\]$", re.S)
_PRICE_CLAUSE = re.compile(r",?\s*and price lower than [\d.]+ dollars\s*$")
_QUERY_SKIP = frozenset("i i'm im am need want would like looking for find me get search a an the to buy some".split())


# ---------------------------------------------------------------- search


def _stem(word: str) -> str:
    """Harman's S-stemmer: plural to singular, enough for "extensions" to find "extension"."""
    if len(word) > 4 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def search_tokens(text: str) -> list[str]:
    return [_stem(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def search_document(product: Product) -> str:
    """The text WebShop indexes for a product (search_engine/convert_product_file_format.py)."""
    options = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product.options.items())
    first_bullet = product.bullet_points[0] if product.bullet_points else ""
    return " ".join([product.title, product.description, first_bullet, options]).lower()


class WebShopSite:
    """The shop every episode shares: the catalogue and its search index (build once per process)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._index = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
        self._index.index([search_tokens(search_document(p)) for p in catalog.products], show_progress=False)

    def search(self, query: str) -> list[Product]:
        """The top SEARCH_RETURN_N products with a positive score, best first (ties: catalogue order)."""
        tokens = search_tokens(query)
        if not tokens:
            return []
        scores = self._index.get_scores(tokens)
        top = np.argsort(-scores, kind="stable")[:SEARCH_RETURN_N]
        return [self.catalog.products[i] for i in top if scores[i] > 0]


@functools.lru_cache(maxsize=4)
def webshop_site(items_path: str | None = None, attributes_path: str | None = None,
                 human_instructions_path: str | None = None, seed: int = 0, products: int = 3000,
                 train_goals: int = 1500, test_goals: int = 500) -> WebShopSite:
    """The shop for a setting, built once per process: WebShop's own files when `items_path` and
    `attributes_path` are given, else the generated catalogue of `seed` and `products`."""
    if items_path is not None or attributes_path is not None:
        if items_path is None or attributes_path is None:
            raise ValueError("WebShop's own catalogue needs both items_path (items_shuffle*.json) and "
                             "attributes_path (items_ins_v2*.json)")
        catalog = load_webshop_catalog(Path(items_path), Path(attributes_path),
                                       Path(human_instructions_path) if human_instructions_path else None, seed=seed)
    else:
        catalog = generate_catalog(seed=seed, products=products, train_goals=train_goals, test_goals=test_goals)
    return WebShopSite(catalog)


# ---------------------------------------------------------------- pages and their text


@dataclass(frozen=True)
class Element:
    """One visible text of a page, in page order; the HTML client produces the same list."""

    kind: Literal["text", "button", "product", "option"]
    text: str
    name: str = ""  # for an option: the option's name (its radio group)


def _text(t: str) -> Element:
    return Element("text", t)


def _button(t: str) -> Element:
    return Element("button", t)


def format_sep(elements: list[Element]) -> str:
    return " [SEP] ".join(e.text for e in elements)


def format_react(elements: list[Element], page: PageName, chosen: set[str]) -> str:
    """The ReAct harness's rendering of a page (its webshop_text, in its non-simple mode)."""
    if page == "done":
        return f"{SCORE_LABEL}: {elements[-1].text}"
    out, texts, products = [], 0, 0
    for e in elements:
        if e.kind == "product":
            if products == REACT_RESULTS_SHOWN:
                break  # the rest of a results page is more products
            products += 1
            out.append(f"\n[{e.text}] ")
        elif e.kind == "button":
            out.append(f"\n[{e.text}] ")
        elif e.kind == "option":
            out.append(f"[[{e.text}]]" if e.text in chosen else f"[{e.text}]")
        else:
            texts += 1
            if page == "search" or texts > 2:  # it drops "Instruction:" and the instruction after the first page
                out.append(f"\n{e.text} ")
    return "".join(out).strip()


def done_elements(reward: float) -> list[Element]:
    """The done page's visible result (its MTurk code and hidden debug texts are left out)."""
    return [_text("Thank you for shopping with us!"), _text(SCORE_LABEL), _text(str(reward))]


def page_elements(page: PageName, instruction: str, *, product: Product | None = None, results=(), page_num: int = 1,
                  reward: float = 0.0) -> list[Element]:
    """The visible texts of a page, as WebShop's templates lay them out."""
    if page == "search":
        return [_text("WebShop"), _text("Instruction:"), _text(instruction), _button(SEARCH_BUTTON)]
    if page == "done":
        return done_elements(reward)
    head = [_text("Instruction:"), _text(instruction), _button(BACK_TO_SEARCH)]
    if page == "results":
        start = (page_num - 1) * PRODUCTS_PER_PAGE
        out = head + [_text(f"Page {page_num} (Total results: {len(results)})")]
        if page_num > 1:
            out.append(_button(PREV_PAGE))
        if page_num * PRODUCTS_PER_PAGE < len(results):
            out.append(_button(NEXT_PAGE))
        for p in results[start : start + PRODUCTS_PER_PAGE]:
            out += [Element("product", p.asin), _text(p.title), _text(p.price_tag)]
        return out
    assert product is not None
    out = head + [_button(PREV_PAGE)]
    if page == "item":
        for name, values in product.options.items():
            out += [_text(name)] + [Element("option", v, name) for v in values]
        out += [_text(product.title), _text(f"Price: {product.price_tag}"), _text(f"Rating: {product.rating}")]
        return out + [_button(b) for b in (*SUB_PAGES, BUY_NOW)]
    if page == "Description":
        return out + [_text(product.description or "No Description")]
    if page == "Features":
        return out + ([_text(b) for b in product.bullet_points] or [_text("No Features")])
    reviews = [_text(t) for r in product.reviews for t in (f'"{r.title}"', str(r.score), r.body)]
    return out + (reviews or [_text("No reviews found")])


def clickables(elements: list[Element]) -> list[str]:
    """What click[...] accepts on a page, as displayed (the search button is not clickable)."""
    return [e.text for e in elements if e.kind != "text" and e.text != SEARCH_BUTTON]


def parse_action(action: str) -> tuple[str, str] | None:
    """("search" | "click", argument) or None when the action is neither."""
    match = _ACTION.match(action.strip())
    return (match.group(1), match.group(2).strip()) if match else None


# ---------------------------------------------------------------- navigation, shared with the server client


@dataclass
class Browse:
    """Where the browser is: with the catalogue (or the server) this determines the page."""

    page: PageName = "search"
    query: str = ""
    page_num: int = 1
    asin: str = ""
    options: dict[str, str] = field(default_factory=dict)  # option name -> chosen value
    reward: float = 0.0


def target_of(elements: list[Element], arg: str) -> Element | None:
    """The clickable element that click[arg] names (case-insensitive, as WebShop), if any."""
    wanted = arg.lower()
    return next((e for e in elements if e.kind != "text" and e.text != SEARCH_BUTTON and e.text.lower() == wanted),
                None)


def navigate(at: Browse, target: Element) -> Browse:
    """The page a click leads to; Buy Now leads to "done" (the caller fills in the reward)."""
    if target.text == BACK_TO_SEARCH and target.kind == "button":
        return Browse()
    to = Browse(at.page, at.query, at.page_num, at.asin, dict(at.options))
    if target.kind == "product":
        to.page, to.asin, to.options = "item", target.text, {}
    elif target.kind == "option":
        to.options[target.name] = target.text
    elif target.text == BUY_NOW:
        to.page = "done"
    elif target.text == NEXT_PAGE:
        to.page_num += 1
    elif target.text == PREV_PAGE:
        if at.page == "results":
            to.page_num -= 1
        elif at.page == "item":
            to.page, to.asin, to.options = "results", "", {}
        else:
            to.page = "item"
    elif target.text in SUB_PAGES:
        to.page = target.text
    return to


def search_to(query: str) -> Browse:
    return Browse(page="results", query=query.lower())


def observation(elements: list[Element], at: Browse, fmt: ObservationFormat, clicked: Element | None) -> str:
    """The text of a page after an action (react: "You have clicked X." after an option)."""
    if fmt == "sep":
        return format_sep(elements)
    if clicked is not None and clicked.kind == "option":
        return f"You have clicked {clicked.text}."
    return format_react(elements, at.page, set(at.options.values()))


class BrowserEnv(ABC):
    """The a3t environment API over a WebShop site; subclasses say how a page is fetched
    (WebShopEnv: the local shop; WebShopServerEnv: a real WebShop server)."""

    instruction: str = ""  # the goal's instruction, known by the end of reset()
    task_type: str = "webshop"

    def __init__(self, max_steps: int, observation_format: ObservationFormat):
        if observation_format not in ("sep", "react"):
            raise ValueError(f"observation_format must be 'sep' or 'react', not {observation_format!r}")
        self.max_steps = max_steps
        self.observation_format = observation_format
        self._at: Browse | None = None
        self._elements: list[Element] = []
        self._steps = 0
        self._invalid = 0
        self._reason: TerminalReason | None = None

    @abstractmethod
    def _load(self, at: Browse) -> list[Element]:
        """The page's elements; for "done", set at.reward."""

    @property
    def page(self) -> PageName | None:
        return self._at.page if self._at else None

    @property
    def has_search_bar(self) -> bool:
        return self._at is not None and self._reason is None and self._at.page == "search"

    @property
    def clickables(self) -> list[str]:
        return clickables(self._elements) if self._at and self._reason is None else []

    @property
    def admissible_actions(self) -> list[str]:
        """click[...] for every clickable; on the search page, where any search[...] is valid, one
        search: the instruction without its price clause."""
        if self.has_search_bar:
            return [f"search[{instruction_query(self.instruction)}]"]
        return [f"click[{c}]" for c in self.clickables]

    @property
    def steps_taken(self) -> int:
        return self._steps

    @property
    def invalid_actions(self) -> int:
        return self._invalid

    @property
    def terminal_reason(self) -> TerminalReason | None:
        return self._reason

    def reset(self) -> Reset:
        self._steps, self._invalid, self._reason = 0, 0, None
        self._at = Browse()
        self._elements = self._load(self._at)
        return Reset(observation=observation(self._elements, self._at, self.observation_format, None),
                     task=self.instruction, task_type=self.task_type)

    def step(self, action: str) -> Step:
        if self._at is None or self._reason is not None:
            raise RuntimeError("step() before reset() or after the episode ended")
        self._steps += 1
        parsed, to, clicked = parse_action(action), None, None
        if parsed is not None and parsed[0] == "search":
            if self.has_search_bar and parsed[1]:
                to = search_to(parsed[1])
        elif parsed is not None:
            clicked = target_of(self._elements, parsed[1])
            to = navigate(self._at, clicked) if clicked is not None else None
        if to is not None:
            self._elements, self._at = self._load(to), to
        else:
            self._invalid += 1
        if self._at.page == "done":
            self._reason = TerminalReason.WON if self._at.reward >= 1.0 else TerminalReason.PURCHASED
        elif self._steps >= self.max_steps:
            self._reason = TerminalReason.STEP_LIMIT
        if to is None and self.observation_format == "react":
            text = INVALID_ACTION
        else:  # WebShop's text env shows an unchanged page again after an invalid action
            text = observation(self._elements, self._at, self.observation_format, clicked)
        return Step(observation=text, reward=self._at.reward, done=self._reason is not None,
                    won=self._reason is TerminalReason.WON, valid=to is not None)


class WebShopEnv(BrowserEnv):
    """One goal of a WebShopSite behind the a3t environment API (a3t.envs.base.TextEnv)."""

    def __init__(self, site: WebShopSite, task_id: str, max_steps: int = DEFAULT_MAX_STEPS,
                 observation_format: ObservationFormat = "sep"):
        super().__init__(max_steps, observation_format)
        self.site = site
        self.task_id = task_id
        self.goal: Goal = site.catalog.goal(task_id)
        self.goal_product = site.catalog.product(self.goal.asin)
        self.instruction = self.goal.instruction
        self.task_type = self.goal_product.category
        self.reward_info: RewardInfo | None = None  # the reward's parts, once bought
        self._searched: tuple[str, list[Product]] = ("", [])

    def reset(self) -> Reset:
        self.reward_info = None
        return super().reset()

    def _results(self, query: str) -> list[Product]:
        if self._searched[0] != query:  # paging and going back re-read the same search
            self._searched = (query, self.site.search(query))
        return self._searched[1]

    def _load(self, at: Browse) -> list[Element]:
        product = self.site.catalog.product(at.asin) if at.asin else None
        if at.page == "done":
            self.reward_info = webshop_reward(product, at.options, self.goal, self.goal_product)
            at.reward = self.reward_info.reward
        results = self._results(at.query) if at.page == "results" else ()
        return page_elements(at.page, self.instruction, product=product, results=results, page_num=at.page_num,
                             reward=at.reward)


# ---------------------------------------------------------------- exploration and the oracle


def instruction_query(instruction: str) -> str:
    """The instruction as a search query: its price clause dropped."""
    return _PRICE_CLAUSE.sub("", instruction).strip()


def explore_action(env: BrowserEnv, rng: random.Random) -> str:
    """A3T's exploration for WebShop: a random valid action of the current page.

    On the search page, a search for a random subset of the instruction's words (in order, at least
    half of them, filler words like "i need" left out); elsewhere a random clickable. Works for
    WebShopEnv and for the real-server client alike.
    """
    if env.has_search_bar:
        words = [w for w in instruction_query(env.instruction).replace(",", " ").split() if w not in _QUERY_SKIP]
        words = words or instruction_query(env.instruction).split()
        keep = sorted(rng.sample(range(len(words)), rng.randint((len(words) + 1) // 2, len(words))))
        return f"search[{' '.join(words[i] for i in keep)}]"
    return f"click[{rng.choice(env.clickables)}]"


def walkthrough(site: WebShopSite, goal: Goal) -> list[str]:
    """An oracle's actions for a goal: search the goal product's title, page to it, click it,
    choose the goal's options, buy. Raises ValueError if the search does not return the product."""
    product = site.catalog.product(goal.asin)
    query = product.title.lower()
    found = [p.asin for p in site.search(query)]
    if goal.asin not in found:
        raise ValueError(f"{goal.goal_id}: a search for its product's title does not return {goal.asin}")
    actions = [f"search[{query}]"] + [f"click[{NEXT_PAGE}]"] * (found.index(goal.asin) // PRODUCTS_PER_PAGE)
    actions.append(f"click[{goal.asin}]")
    values = {v for vs in product.options.values() for v in vs}
    actions += [f"click[{v}]" for v in goal.options if v in values]
    return actions + [f"click[{BUY_NOW}]"]
