"""Remember what textworld's text parsers return, instead of parsing the same text again.

textworld's PDDL engine parses text with Tatsu grammars while it plays, and most of that text
is the same every time: each step derives every admissible command from its grammar template
(``textgen``), checks each grammar rule's condition and each list query (``Rule.
parse_conjunctive_query``), and each game load parses the game's grammar, which is the same
for every ALFWorld game of one phrasing (``pddl.logic``). In an evaluation of 12 games on 2
cores these parses took 14.5 of 127 s; a parse is a pure function of its text, so each text
is parsed once per process and callers get a deep copy of the result (textworld writes to
the symbols it gets, e.g. their ``context``).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable

MAX_TEXTS = 20_000  # per parser; a campaign's games use a few thousand distinct texts


class ParseCache:
    """A parser function with its results remembered by arguments (deep-copied on the way out)."""

    def __init__(self, parse: Callable[..., Any]):
        self.parse = parse
        self.results: dict = {}
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # not a text: parse it as textworld would
            return self.parse(*args, **kwargs)
        with self.lock:
            result = self.results.get(key)
        if result is None:
            result = self.parse(*args, **kwargs)
            with self.lock:
                if len(self.results) >= MAX_TEXTS:
                    self.results.clear()
                self.results[key] = result
                self.misses += 1
        else:
            self.hits += 1
        return copy.deepcopy(result)


def install() -> list[ParseCache]:
    """Put a ParseCache in front of textworld's three parsers (once per process); returns them."""
    from textworld import logic
    from textworld.envs.pddl import logic as pddl_logic
    from textworld.envs.pddl import textgen

    caches = []
    for module in (textgen, pddl_logic, logic):
        if not isinstance(module._parse_and_convert, ParseCache):
            module._parse_and_convert = ParseCache(module._parse_and_convert)
        caches.append(module._parse_and_convert)
    return caches
