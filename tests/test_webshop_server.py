"""The WebShop server client against a real HTTP server on 127.0.0.1 that serves pages shaped like
WebShop's Flask site (its templates' structure: head, scripts, instruction block, forms with
buttons, radio inputs with labels, product links, the done page's hidden debug block)."""

import ast
import random
import threading
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from a3t.envs.base import TerminalReason
from a3t.envs.webshop import PRODUCTS_PER_PAGE, WebShopEnv, WebShopSite, explore_action, walkthrough
from a3t.envs.webshop_catalog import generate_catalog
from a3t.envs.webshop_reward import webshop_reward
from a3t.envs.webshop_server import (
    WebShopServerEnv,
    WebShopServerError,
    html_elements,
    server_task_ids,
)

HEAD = """<!DOCTYPE html>
<html>
  <head>
    <title>WebShop</title>
    <link rel="stylesheet" href="/static/style.css">
    <style>.btn { color: red; }</style>
    <script src="jquery.min.js"></script>
  </head>
  <body>
    <!-- Code reference: a comment that is not visible -->
    <div class="container py-5">
"""
TAIL = """    </div>
  </body>
  <script>
    $(document).ready(function() { let options = JSON.parse(`{}`); });
  </script>
</html>"""


def _instruction(goal) -> str:
    return f"""      <div id="instruction-text" class="text-center">
        <h4>Instruction:<br>{escape(goal.instruction)}</h4>
      </div>
"""


def _form(label: str, css: str = "btn btn-primary") -> str:
    return f"""        <form method="post" action="/x"><button type="submit" class="{css}">{escape(label)}</button></form>\n"""


def render(site: WebShopSite, parts: list[str]) -> tuple[int, str]:
    """One page of the test site, from the URL's path segments."""
    kind, session, *rest = parts
    goal = site.catalog.goal(f"test/{int(session.removeprefix('fixed_'))}")
    if kind == "search":
        return 200, HEAD + f"""      <div id="logo" class="text-center"><h2>WebShop</h2></div>
{_instruction(goal)}      <form role="form" method="post" action="/{session}">
        <input id="search_input" class="form-control" type="text" name="search_query" placeholder="Search..." required/>
        <button class="btn btn-success" type="submit"><i class="glyphicon glyphicon-search"></i>Search</button>
      </form>
      <iframe src="https://example.invalid/slides"></iframe>
""" + TAIL
    if kind == "search_results":
        query, page = rest[0], int(rest[1])
        results = site.search(query)
        html = HEAD + _instruction(goal) + _form("Back to Search", "btn btn-success")
        html += f"      <div><h1 style='display:none'></h1><p>Page {page} (Total results: {len(results)})</p></div>\n"
        if page > 1:
            html += _form("< Prev")
        if page * PRODUCTS_PER_PAGE < len(results):
            html += _form("Next >")
        html += '      <div class="grid-container">\n'
        for p in results[(page - 1) * PRODUCTS_PER_PAGE : page * PRODUCTS_PER_PAGE]:
            html += f"""        <div class="grid-item"><img src="{p.asin}.jpg" class="result-img">
          <h4 class="product-asin"><a class="product-link" href="/item_page/{session}/{p.asin}">{p.asin}</a></h4>
          <h4 class="product-title">{escape(p.title)}</h4>
          <div class="d-flex"><h5 class="product-price">{escape(p.price_tag)}</h5></div>
        </div>
"""
        return 200, html + "      </div>\n" + TAIL
    product = site.catalog.product(rest[0])
    options = ast.literal_eval(rest[-1])
    if kind == "done":
        reward = webshop_reward(product, options, goal, site.catalog.product(goal.asin)).reward
        return 200, HEAD + f"""      <div id="thankyou" class="text-center"><h1>Thank you for shopping with us!</h1></div>
      <div id="stats" class="text-center">
        <h3 align="mturk_code">Your code: </h3><p><pre>ABCDEF1234</pre> (Paste it in your MTurk interface.)</p>
        <div style="display:none"><h2 align="left">Purchased</h2><h4 id="asin">asin<pre>{product.asin}</pre></h4>
          <h4 id="goal-instruction-text">instuction text<pre>{escape(goal.instruction)}</pre></h4></div>
        <h3 id="reward">Your score (min 0.0, max 1.0)<pre>{reward}</pre></h3>
        <h4 hidden>Reward Details <div id="reward_info"><pre>{{'r_type': 1.0}}</pre></div></h4>
      </div>
""" + TAIL
    html = HEAD + _instruction(goal) + _form("Back to Search", "btn btn-success") + _form("< Prev")
    if kind == "item_page":
        for name, values in product.options.items():
            html += f"      <div class='row'><h4>{escape(name)}</h4><div class='radio-toolbar'>\n"
            for i, value in enumerate(values):
                html += (f'        <input type="radio" id="radio_{escape(name)}{i}" name="{escape(name)}" '
                         f'value="{escape(value)}" data-url="/x">\n'
                         f'        <label for="radio_{escape(name)}{i}">{escape(value)}</label>\n')
            html += "      </div></div>\n"
        html += (f"      <h2>{escape(product.title)}</h2><h4>Price: {escape(product.price_tag)}</h4>"
                 f"<h4>Rating: {product.rating}</h4>\n")
        for sub in ("Description", "Features", "Reviews"):
            html += f'      <div class="col-sm-3" name="{sub.lower()}">' + _form(sub) + "</div>\n"
        return 200, html + _form("Buy Now", "btn btn-lg purchase") + TAIL
    sub = rest[-2]
    if sub == "Description":
        html += f'      <p class="product-info">{escape(product.description)}</p>\n'
    elif sub == "Features":
        html += "      <ul>" + "".join(f'<li><p class="product-info"> {escape(b)}</p></li>'
                                       for b in product.bullet_points) + "</ul>\n"
    else:
        html += "      <h4>No reviews found</h4>\n"
    return 200, html + TAIL


@pytest.fixture(scope="module")
def site() -> WebShopSite:
    return WebShopSite(generate_catalog(seed=7, products=120, train_goals=10, test_goals=10))


@pytest.fixture(scope="module")
def server(site):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            parts = [unquote(p) for p in self.path.split("/")[1:]]
            if len(parts) == 1:
                parts = ["search", parts[0]]
            try:
                status, body = render(site, parts)
            except (KeyError, ValueError, SyntaxError, IndexError):
                status, body = 404, "<h1>Not Found</h1>"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("fmt", ["sep", "react"])
def test_client_plays_like_the_local_env(site, server, fmt):
    for i in range(3):
        remote = WebShopServerEnv(server, session=f"fixed_{i}", max_steps=40, observation_format=fmt)
        local = WebShopEnv(site, f"test/{i}", max_steps=40, observation_format=fmt)
        first = remote.reset()
        assert first.observation == local.reset().observation and first.task == local.goal.instruction
        actions = walkthrough(site, local.goal)
        # a detour through every kind of page and an invalid action, then the oracle's purchase
        product_click = next(a for a in actions if a.startswith("click[B0"))
        detour = [actions[0], "click[Next >]", "click[< Prev]", product_click,
                  "click[Description]", "click[< Prev]", "click[Features]", "click[< Prev]", "click[Reviews]",
                  "click[< Prev]", "click[no such button]", "click[< Prev]", "click[Back to Search]"]
        for action in detour + actions:
            if local.terminal_reason is not None:
                break
            want, got = local.step(action), remote.step(action)
            assert got == want, (i, action)
            assert remote.clickables == local.clickables and remote.admissible_actions == local.admissible_actions
        assert got.won and got.reward == 1.0 and remote.terminal_reason is TerminalReason.WON
        assert remote.invalid_actions == local.invalid_actions >= 1
        remote.close()


def test_client_urls_follow_webshops_routes(server):
    env = WebShopServerEnv(server, session="fixed_1")
    env.reset()
    assert env.current_url == f"{server}/fixed_1"

    def segments():
        return [unquote(s) for s in env.current_url.removeprefix(server).split("/")[1:]]

    env.step("search[Hair / Extension]")  # lower-cased; a '/' cannot travel in a path segment
    assert segments() == ["search_results", "fixed_1", "hair   extension", "1"]
    asin = next(c for c in env.clickables if c.startswith("B0"))
    env.step(f"click[{asin}]")
    option = next(e for e in env._elements if e.kind == "option")
    env.step(f"click[{option.text}]")
    assert segments() == ["item_page", "fixed_1", asin, "hair   extension", "1", str({option.name: option.text})]
    env.step("click[Features]")
    assert segments()[:7] == ["item_sub_page", "fixed_1", asin, "hair   extension", "1", "Features",
                              str({option.name: option.text})]
    env.step("click[< Prev]")
    env.step("click[Buy Now]")
    assert segments() == ["done", "fixed_1", asin, str({option.name: option.text})]


def test_exploration_works_on_the_server(server):
    rng = random.Random(1)
    env = WebShopServerEnv(server, session="fixed_2")
    env.reset()
    assert explore_action(env, rng).startswith("search[")
    while True:
        step = env.step(explore_action(env, rng))
        assert step.valid
        if step.done:
            break


def test_server_errors_name_the_url(server):
    with pytest.raises(WebShopServerError, match=r"/fixed_999: WebShop server answered HTTP 404"):
        WebShopServerEnv(server, session="fixed_999").reset()
    with pytest.raises(WebShopServerError, match=r"127.0.0.1:9/fixed_0: WebShop server not reachable"):
        WebShopServerEnv("http://127.0.0.1:9", session="fixed_0", timeout_s=2).reset()


def test_html_walk_keeps_visible_texts_in_order():
    html = ('<html><head><title>T</title><script>var x = "hidden";</script></head><body>'
            '<h4>Instruction:<br>buy tea</h4><!-- gone --><button class="btn">&lt; Prev</button>'
            '<input type="radio" id="radio_size0" name="size" value="small"><label for="radio_size0">small</label>'
            '<a class="product-link" href="/x">B000TEA001</a><p>  </p><p>Price: $5.99</p>'
            '<input id="search_input" type="text"></body></html>')
    elements, has_search_bar = html_elements(html)
    assert [(e.kind, e.text, e.name) for e in elements] == [
        ("text", "Instruction:", ""), ("text", "buy tea", ""), ("button", "< Prev", ""), ("option", "small", "size"),
        ("product", "B000TEA001", ""), ("text", "Price: $5.99", "")]
    assert has_search_bar


def test_server_task_ids_follow_webshops_splits():
    assert server_task_ids("test")[:2] == ["fixed_0", "fixed_1"] and len(server_task_ids("test")) == 500
    assert server_task_ids("valid", limit=2) == ["fixed_500", "fixed_501"]
    with pytest.raises(KeyError, match="no WebShop split"):
        server_task_ids("dev")
