import json
import random
import re

import pytest

from a3t.envs.base import TerminalReason
from a3t.envs.webshop import (
    BUY_NOW,
    INVALID_ACTION,
    WebShopEnv,
    WebShopSite,
    explore_action,
    instruction_query,
    walkthrough,
    webshop_site,
)
from a3t.envs.webshop_catalog import (
    NO_PRICE_LIMIT,
    CatalogError,
    Goal,
    Product,
    generate_catalog,
    load_webshop_catalog,
)
from a3t.envs.webshop_reward import content_words, normalize_color, token_set_ratio, webshop_reward


@pytest.fixture(scope="module")
def site() -> WebShopSite:
    return webshop_site()  # the default generated catalogue, as the rollout will use it


def _product(asin="B000000001", title="Lumora Clip-In Hair Extensions, Natural Looking", **kw) -> Product:
    fields = dict(
        category="beauty", query="hair extensions",
        product_category="Beauty & Personal Care › Hair Care › Hair Extensions, Wigs & Accessories › Extensions",
        price=25.0, price_tag="$25.0", description="Soft and light.", bullet_points=("Blends in",),
        attributes=("natural looking", "heat resistant"),
        options={"color": ("black", "light grey", "red"), "size": ("16 inch", "18 inch")},
    )
    fields.update(kw)
    return Product(asin=asin, title=title, **fields)


def _goal(attributes=("natural looking", "heat resistant"), options=("black", "18 inch"), price_upper=30.0) -> Goal:
    return Goal("test/0", "B000000001", "i need hair extensions", attributes, options, price_upper)


# ---------------------------------------------------------------- the reward, by hand


def test_reward_full_match_is_one():
    goal_product = _product()
    info = webshop_reward(goal_product, {"color": "black", "size": "18 inch"}, _goal(), goal_product)
    assert info.reward == 1.0 and info.r_type == 1.0 and info.price_ok


def test_reward_missing_or_wrong_option():
    p = _product()
    assert webshop_reward(p, {"color": "black"}, _goal(), p).reward == pytest.approx(4 / 5)
    # size matches exactly only: 16 inch is not 18 inch, however close the strings are
    assert webshop_reward(p, {"color": "black", "size": "16 inch"}, _goal(), p).reward == pytest.approx(4 / 5)
    assert webshop_reward(p, {"color": "red", "size": "18 inch"}, _goal(), p).reward == pytest.approx(4 / 5)


def test_reward_over_the_price_limit():
    p = _product(price=35.0, price_tag="$35.0")
    info = webshop_reward(p, {"color": "black", "size": "18 inch"}, _goal(price_upper=30.0), p)
    assert not info.price_ok and info.reward == pytest.approx(4 / 5)


def test_reward_missing_attribute():
    p = _product(attributes=("natural looking",))  # "heat resistant" is nowhere in its text either
    assert webshop_reward(p, {"color": "black", "size": "18 inch"}, _goal(), p).reward == pytest.approx(4 / 5)
    # an attribute found in the description counts, as in WebShop
    q = _product(attributes=("natural looking",), description="Heat resistant up to 180 C.")
    assert webshop_reward(q, {"color": "black", "size": "18 inch"}, _goal(), q).reward == 1.0


def test_reward_wrong_product_type_is_zero():
    goal_product = _product()
    chair = _product(asin="B000000002", title="Oakhurst Office Chair, Lumbar Support", query="office chair",
                     product_category="Home & Kitchen › Furniture › Home Office Furniture › Home Office Chairs")
    info = webshop_reward(chair, {"color": "black"}, _goal(), goal_product)
    assert info.r_type == 0.0 and info.reward == 0.0
    assert not info.query_match and not info.category_match and info.title_score == 0.0


@pytest.mark.parametrize("goal_title, r_type", [
    ("Lumora Hair Extensions Natural Looking Wavy Blonde Set", 0.5),  # 1 of 8 title words shared
    ("Lumora Hair Extensions Natural Looking Long Wavy Blonde Piece Set Gift", 0.1),  # 1 of 11: under 0.1
])
def test_reward_type_when_few_title_words_are_shared(goal_title, r_type):
    other = _product(asin="B000000003", title="Wavy Beach Towel", query="towel",
                     product_category="Home & Kitchen › Bath › Towels")  # no query or category match
    assert webshop_reward(other, {}, _goal(), _product(title=goal_title)).r_type == r_type


def test_reward_matching_rules_follow_webshop():
    assert normalize_color("light grey") == "grey" and normalize_color("16 inch") == "16 inch"
    assert token_set_ratio("long-lasting", "Long Lasting") == 100
    assert token_set_ratio("", "x") == 0
    p = _product()
    # colours are normalised: "light grey" is bought for a "grey" goal
    info = webshop_reward(p, {"color": "light grey", "size": "18 inch"}, _goal(options=("grey", "18 inch")), p)
    assert info.reward == 1.0
    assert content_words("The Best Hair-Extensions for 2 kids") == ["best", "hair", "extensions", "kids"]


# ---------------------------------------------------------------- the generated catalogue


def test_catalogue_is_deterministic_and_every_goal_product_exists(site):
    small = generate_catalog(seed=3, products=300, train_goals=100, test_goals=50)
    assert small == generate_catalog(seed=3, products=300, train_goals=100, test_goals=50)
    assert small.products != generate_catalog(seed=4, products=300, train_goals=100, test_goals=50).products
    catalog = site.catalog
    assert len(catalog.products) == 3000 and len({p.asin for p in catalog.products}) == 3000
    assert len(catalog.task_ids("test")) == 500 and len(catalog.task_ids("train")) == 1500
    assert {p.category for p in catalog.products} == {"beauty", "electronics", "fashion", "food", "furniture"}
    goal_asins = [g.asin for split in ("train", "test") for g in catalog.goals[split]]
    assert len(set(goal_asins)) == len(goal_asins)  # one goal per product: test products are unseen in train
    for goal in catalog.goals["test"]:
        product = catalog.product(goal.asin)
        assert set(goal.attributes) <= set(product.attributes)
        assert set(goal.options) <= {v for vs in product.options.values() for v in vs}
        assert product.price <= goal.price_upper
        assert goal.instruction.endswith(f"price lower than {goal.price_upper:.2f} dollars")
        assert goal.instruction == goal.instruction.lower()
    with pytest.raises(KeyError, match="no WebShop task"):
        catalog.goal("test/99999")


@pytest.mark.parametrize("fmt", ["sep", "react"])
def test_oracle_gets_reward_one_on_every_test_instruction(site, fmt):
    for task_id in site.catalog.task_ids("test"):
        env = WebShopEnv(site, task_id, observation_format=fmt)
        env.reset()
        for action in walkthrough(site, env.goal):
            step = env.step(action)
            assert step.valid, (task_id, action)
        assert step.done and step.won and step.reward == 1.0, (task_id, env.reward_info)
        assert env.terminal_reason is TerminalReason.WON and env.invalid_actions == 0


# ---------------------------------------------------------------- pages and actions


def test_pages_read_like_webshops_text_mode(site):
    env = WebShopEnv(site, "test/0")
    first = env.reset()
    assert first.observation == f"WebShop [SEP] Instruction: [SEP] {env.goal.instruction} [SEP] Search"
    assert first.task == env.goal.instruction and first.task_type == env.goal_product.category
    assert env.has_search_bar and env.admissible_actions == [f"search[{instruction_query(env.goal.instruction)}]"]

    results = env.step("search[hair extension]").observation
    assert results.startswith(f"Instruction: [SEP] {env.goal.instruction} [SEP] Back to Search [SEP] Page 1 "
                              "(Total results: 50) [SEP] Next > [SEP] B0")
    asins = [c for c in env.clickables if re.fullmatch(r"B0[A-Z0-9]{8}", c)]
    assert len(asins) == 10 and "< Prev" not in env.clickables
    assert env.step("click[Next >]").observation.split(" [SEP] ")[3:6] == ["Page 2 (Total results: 50)", "< Prev",
                                                                            "Next >"]
    page2 = [c for c in env.clickables if c.startswith("B0")]
    assert not set(page2) & set(asins)
    env.step("click[< Prev]")
    assert [c for c in env.clickables if c.startswith("B0")] == asins

    product = site.catalog.product(asins[0])
    item = env.step(f"click[{asins[0].lower()}]").observation  # clicks are case-insensitive, as in WebShop
    for part in ("Back to Search", "< Prev", product.title, f"Price: {product.price_tag}", "Rating: N.A.",
                 "Description [SEP] Features [SEP] Reviews [SEP] Buy Now"):
        assert part in item
    name, values = next(iter(product.options.items()))
    assert f"{name} [SEP] {' [SEP] '.join(values)}" in item
    assert set(env.clickables) >= {*values, "Description", "Features", "Reviews", BUY_NOW}

    assert env.step("click[Description]").observation.endswith(f"< Prev [SEP] {product.description}")
    assert "Buy Now" not in env.clickables
    env.step("click[< Prev]")
    assert env.step("click[Features]").observation.endswith(" [SEP] ".join(product.bullet_points))
    env.step("click[< prev]")
    assert env.step("click[Reviews]").observation.endswith("< Prev [SEP] No reviews found")
    env.step("click[< Prev]")
    assert env.page == "item"
    env.step("click[< Prev]")
    assert env.page == "results" and [c for c in env.clickables if c.startswith("B0")] == asins
    assert env.step("click[Back to Search]").observation == first.observation
    assert env.invalid_actions == 0


def test_react_format_follows_the_react_harness(site):
    env = WebShopEnv(site, "test/0", observation_format="react")
    assert env.reset().observation == f"WebShop \nInstruction: \n{env.goal.instruction} \n[Search]"
    results = env.step("search[hair extension]").observation
    assert results.startswith("[Back to Search] \nPage 1 (Total results: 50) \n[Next >] \n[B0")
    assert results.count("\n[B0") == 3  # the harness shows the first 3 results
    asin = env.clickables[-1]  # a 10th result still clicks
    item = env.step(f"click[{asin}]").observation
    product = site.catalog.product(asin)
    name, values = next(iter(product.options.items()))
    assert f"\n{name} " + "".join(f"[{v}]" for v in values) in item
    assert env.step(f"click[{values[0]}]").observation == f"You have clicked {values[0]}."
    env.step("click[Features]")
    assert f"[[{values[0]}]]" in env.step("click[< Prev]").observation  # the chosen option in double brackets
    assert env.step("click[nonsense]").observation == INVALID_ACTION
    step = env.step("click[Buy Now]")
    assert step.done and step.observation == f"Your score (min 0.0, max 1.0): {step.reward}"


def test_invalid_actions_change_nothing_and_are_counted(site):
    env = WebShopEnv(site, "test/1")
    first = env.reset().observation
    for action in ("click[Search]", "search[]", "click[Buy Now]", "buy the thing", "Search[red]", "click[B0XXXXXXXX]"):
        step = env.step(action)
        assert not step.valid and not step.done and step.reward == 0.0 and step.observation == first
    assert env.invalid_actions == 6 and env.steps_taken == 6
    env.step("search[coffee]")
    page = env.step("search[tea]")  # no search box outside the search page
    assert not page.valid and env.page == "results"
    assert env.invalid_actions == 7


def test_step_limit_ends_the_episode_with_reward_zero(site):
    env = WebShopEnv(site, "test/2", max_steps=3)
    env.reset()
    env.step("search[coffee]")
    env.step("click[Next >]")
    step = env.step("click[< Prev]")
    assert step.done and not step.won and step.reward == 0.0
    assert env.terminal_reason is TerminalReason.STEP_LIMIT and env.admissible_actions == []
    with pytest.raises(RuntimeError):
        env.step("click[Back to Search]")


def test_buying_the_wrong_product_ends_with_a_partial_reward(site):
    env = WebShopEnv(site, "test/3")
    env.reset()
    env.step(f"search[{instruction_query(env.goal.instruction)}]")
    other = next(c for c in env.clickables if c.startswith("B0") and c != env.goal.asin)
    env.step(f"click[{other}]")
    step = env.step("click[Buy Now]")
    assert step.done and not step.won and 0.0 <= step.reward < 1.0
    assert env.terminal_reason is TerminalReason.PURCHASED and env.reward_info.reward == step.reward
    assert env.reset().observation.startswith("WebShop [SEP]") and env.reward_info is None


def test_exploration_samples_valid_actions(site):
    rng = random.Random(0)
    for task_id in site.catalog.task_ids("train")[:40]:
        env = WebShopEnv(site, task_id)
        env.reset()
        words = set(instruction_query(env.goal.instruction).replace(",", " ").split())
        first = explore_action(env, rng)
        assert first.startswith("search[") and set(first[7:-1].split()) <= words
        while True:
            step = env.step(explore_action(env, rng))
            assert step.valid
            if step.done:
                break
        assert env.terminal_reason in (TerminalReason.STEP_LIMIT, TerminalReason.PURCHASED, TerminalReason.WON)


# ---------------------------------------------------------------- WebShop's own files


def _webshop_files(tmp_path, items=None, attributes=None, human=None):
    items = items if items is not None else [
        {"asin": "B07DKGJR74", "name": "Daily Ritual Women's Oversized V-Neck Sweater", "pricing": "$20.66 - $29.20",
         "category": "fashion", "query": "Women's Sweaters ", "product_category": "Clothing › Women › Sweaters",
         "full_description": "A cozy sweater.", "small_description": ["100% cotton", "machine wash"],
         "images": ["x.jpg"], "brand": "Daily Ritual",
         "customization_options": {"Size": [{"value": "Small", "image": None}, {"value": "X-Large", "image": None}],
                                   "Color": [{"value": "Navy/White", "image": "n.jpg"}], "Style": None}},
        {"asin": "B000TEA001", "name": "Organic Green Tea Bags", "pricing": "$5.99", "category": "food",
         "query": "green tea", "product_category": "Grocery › Beverages › Tea", "full_description": "",
         "small_description": "Calm cup", "images": [], "customization_options": None},
        {"asin": "nan", "name": "skipped", "category": "x", "query": "x", "product_category": "x"},
        {"asin": "B000TEA001", "name": "a duplicate, skipped", "category": "x", "query": "x", "product_category": "x"},
    ]
    attributes = attributes if attributes is not None else {
        "B07DKGJR74": {"attributes": ["machine wash", "cotton"], "instruction": "i want a machine wash sweater",
                       "instruction_attributes": ["machine wash"]},
    }
    paths = [tmp_path / "items_shuffle.json", tmp_path / "items_ins_v2.json"]
    paths[0].write_text(json.dumps(items))
    paths[1].write_text(json.dumps(attributes))
    if human is not None:
        paths.append(tmp_path / "items_human_ins.json")
        paths[2].write_text(json.dumps(human))
    return paths


def test_webshops_own_files_load_with_webshops_cleaning(tmp_path):
    items, attrs = _webshop_files(tmp_path)
    catalog = load_webshop_catalog(items, attrs)
    assert [p.asin for p in catalog.products] == ["B07DKGJR74", "B000TEA001"]
    sweater, tea = catalog.products
    assert sweater.options == {"size": ("small", "x-large"), "color": ("navy | white",)}
    assert 20.66 <= sweater.price <= 29.2 and sweater.price_tag == "$20.66 to $29.2"
    assert sweater.query == "women's sweaters" and sweater.attributes == ("machine wash", "cotton")
    assert tea.attributes == ("DUMMY_ATTR",) and tea.bullet_points == ("Calm cup",) and tea.price == 5.99
    # synthetic goals: the stored instruction with every combination of options
    goals = catalog.goals["test"]
    assert sorted(g.instruction.split(", and price")[0] for g in goals) == [
        "i want a machine wash sweater with color: navy | white, and size: small",
        "i want a machine wash sweater with color: navy | white, and size: x-large",
    ]
    site = WebShopSite(catalog)
    for goal in goals:
        env = WebShopEnv(site, goal.goal_id)
        env.reset()
        for action in walkthrough(site, goal):
            step = env.step(action)
        assert step.won


def test_human_instructions_give_the_goals(tmp_path):
    human = {"B000TEA001": [{"instruction": "i need organic green tea.", "instruction_attributes": ["organic"],
                             "instruction_options": []},
                            {"instruction": "no attributes: skipped", "instruction_attributes": [],
                             "instruction_options": []}],
             "B0UNKNOWN1": [{"instruction": "not in the items", "instruction_attributes": ["x"]}]}
    catalog = load_webshop_catalog(*_webshop_files(tmp_path, human=human))
    (goal,) = catalog.goals["test"]
    assert goal.asin == "B000TEA001" and goal.attributes == ("organic",) and goal.options == ()
    assert goal.instruction == "i need organic green tea, and price lower than " + f"{goal.price_upper:.2f} dollars"
    assert goal.price_upper in (10.0, 20.0, 30.0, 40.0) and goal.price_upper != NO_PRICE_LIMIT


@pytest.mark.parametrize("items, message", [
    ([{"asin": "B1", "category": "c", "query": "q", "product_category": "p"}],
     r"items_shuffle.json: product 0 \(asin B1\): field 'name' is missing"),
    ([{"asin": "B1", "name": 3, "category": "c", "query": "q", "product_category": "p"}],
     r"product 0 \(asin B1\): field 'name' should be str, not int"),
    ([{"name": "no asin"}], r"items_shuffle.json: product 0: field 'asin' is missing"),
    ([{"asin": "B1", "name": "n", "category": "c", "query": "q", "product_category": "p", "pricing": "$abc"}],
     r"product 0 \(asin B1\): field 'pricing' has no \$ amount|field 'pricing' is not a price"),
    ([{"asin": "B1", "name": "n", "category": "c", "query": "q", "product_category": "p",
       "customization_options": {"color": ["red"]}}], r"customization_options\['color'\] should be a list of objects"),
    ([{"asin": "B1", "name": "n", "category": "c", "query": "q", "product_category": "p", "small_description": [1]}],
     r"field 'small_description' should be a list of strings"),
    ({"asin": "B1"}, r"items_shuffle.json: should be a list of products, not a dict"),
    (["just a string"], r"product 0: should be an object, not str"),
])
def test_malformed_catalogue_gives_a_clear_error(tmp_path, items, message):
    with pytest.raises(CatalogError, match=message):
        load_webshop_catalog(*_webshop_files(tmp_path, items=items))


def test_unreadable_catalogue_files_are_named(tmp_path):
    items, attrs = _webshop_files(tmp_path)
    with pytest.raises(CatalogError, match=r"nowhere.json: file not found"):
        load_webshop_catalog(tmp_path / "nowhere.json", attrs)
    attrs.write_text("{not json")
    with pytest.raises(CatalogError, match=r"items_ins_v2.json: not JSON \(.* at line 1"):
        load_webshop_catalog(items, attrs)
    attrs.write_text(json.dumps({"B07DKGJR74": {"attributes": "machine wash"}}))
    with pytest.raises(CatalogError, match=r"items_ins_v2.json: asin B07DKGJR74: field 'attributes' should be a list of str"):
        load_webshop_catalog(items, attrs)
    attrs.write_text(json.dumps({"B07DKGJR74": ["machine wash"]}))
    with pytest.raises(CatalogError, match=r"items_ins_v2.json: asin B07DKGJR74: should be an object, not list"):
        load_webshop_catalog(items, attrs)
    attrs.write_text("{}")
    with pytest.raises(CatalogError, match=r"no goal for any product"):
        load_webshop_catalog(items, attrs)
    with pytest.raises(ValueError, match="needs both"):
        webshop_site(items_path=str(items))
