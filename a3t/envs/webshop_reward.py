"""WebShop's reward for a purchase (web_agent_site/engine/goal.py, get_reward), reimplemented.

reward = (matched attributes + matched options + [price <= limit]) / (#attributes + #options + 1) × r_type

Attributes and options match by fuzzy token-set ratio > 85 (thefuzz's scoring, computed with
rapidfuzz), or by substring in the product's title, bullet points or description; a "size" option
must match exactly; colours are normalised first (WebShop's normalize_color). Like WebShop, the
reward is not capped: extra purchased options that happen to match can push it above 1.

One substitution: WebShop's r_type compares the *nouns* of the two titles, found with spaCy's
en_core_web_lg, which cannot be downloaded here. We compare their *content words* instead (lower-case
words minus English stop words and numbers): adjectives count too, so a title score is a little
lower than spaCy's when titles share nouns but not adjectives. WebShop's thresholds (0.1, 0.2) and
its query and category tests are kept as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

if TYPE_CHECKING:
    from a3t.envs.webshop_catalog import Goal, Product

# WebShop's engine/normalize.py COLOR_SET, in its order: the first colour word found in a value wins.
COLOR_SET = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite",
    "grass", "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon",
    "leopard", "light", "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha",
    "multicolor", "mushroom", "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink",
    "plum", "purple", "rainbow", "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver",
    "skull", "slate", "steel", "stone", "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise",
    "violet", "walnut", "wheat", "white", "wine", "yellow",
)
EXACT_MATCH_OPTIONS = ("size",)
MATCH_THRESHOLD = 85

_STOP_WORDS = frozenset(
    "a about above after again all am an and any are as at be been before being below between both but by can "
    "could did do does doing down during each few for from further had has have having he her here hers him his "
    "how i if in into is it its itself just me more most my no nor not of off on once only or other our out over "
    "own same she should so some such than that the their them then there these they this those through to too "
    "under until up very was we were what when where which while who whom why will with you your".split()
)


def normalize_color(value: str) -> str:
    for color in COLOR_SET:
        if color in value:
            return color
    return value


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz's fuzz.token_set_ratio: ASCII only, default processing, rounded to an int."""
    a = default_process(a.encode("ascii", "ignore").decode())
    b = default_process(b.encode("ascii", "ignore").decode())
    if not a or not b:
        return 0
    return int(round(fuzz.token_set_ratio(a, b)))


def options_match(name: str, a: str, b: str) -> bool:
    """Whether the reward takes value `a` of option `name` for `b` (after colour normalisation)."""
    a, b = normalize_color(a), normalize_color(b)
    return a == b or (name.lower() not in EXACT_MATCH_OPTIONS and token_set_ratio(a, b) > MATCH_THRESHOLD)


def content_words(title: str) -> list[str]:
    """Our stand-in for spaCy's nouns of a title (see the module docstring)."""
    return [w for w in re.findall(r"[a-z]+(?:'[a-z]+)?", title.lower()) if w not in _STOP_WORDS and len(w) > 1]


@dataclass(frozen=True)
class RewardInfo:
    reward: float
    r_type: float
    attribute_matches: int
    option_matches: int
    price_ok: bool
    query_match: bool
    category_match: bool
    title_score: float


def _in_text(needle: str, product: Product) -> bool:
    return (needle in product.title.lower() or needle in " ".join(product.bullet_points).lower()
            or needle in product.description.lower())


def type_reward(purchased: Product, goal_product: Product) -> tuple[float, bool, bool, float]:
    """(r_type, query_match, category_match, title_score): is it the same kind of product?"""
    query_match = purchased.query == goal_product.query
    purchased_path = {x.strip() for x in purchased.product_category.split("›")}
    goal_path = {x.strip() for x in goal_product.product_category.split("›")}
    category_match = len(purchased_path & goal_path) >= 2
    desired = content_words(goal_product.title)
    title_score = len(set(content_words(purchased.title)) & set(desired)) / len(desired) if desired else 0.2
    r_type = 1.0 if query_match or category_match or title_score > 0.2 else 0.5
    if title_score < 0.1:  # WebShop checks these last: a title with no shared word overrides a query match
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, query_match, category_match, title_score


def attribute_matches(purchased: Product, goal: Goal) -> int:
    matches = 0
    for wanted in goal.attributes:
        fuzzy = any(token_set_ratio(have, wanted) > MATCH_THRESHOLD for have in purchased.attributes)
        matches += fuzzy or _in_text(wanted, purchased)
    return matches


def option_matches(purchased: Product, chosen: dict[str, str], goal: Goal) -> int:
    """Counted over the options the buyer chose, as WebShop does."""
    wanted = [normalize_color(v) for v in goal.options]
    matches = 0
    for name, value in chosen.items():
        value = normalize_color(value)
        if name.lower() in EXACT_MATCH_OPTIONS:
            matched = value in wanted
        else:
            matched = any(token_set_ratio(w, value) > MATCH_THRESHOLD for w in wanted)
        matches += matched or _in_text(value, purchased)
    return matches


def webshop_reward(purchased: Product, chosen_options: dict[str, str], goal: Goal, goal_product: Product) -> RewardInfo:
    """The reward of buying `purchased` with `chosen_options` (option name -> value) for `goal`."""
    r_type, query_match, category_match, title_score = type_reward(purchased, goal_product)
    attrs = attribute_matches(purchased, goal)
    opts = option_matches(purchased, chosen_options, goal)
    price_ok = purchased.price <= goal.price_upper
    reward = (attrs + opts + price_ok) / (len(goal.attributes) + len(goal.options) + 1) * r_type
    return RewardInfo(reward, r_type, attrs, opts, price_ok, query_match, category_match, title_score)
