"""WebShop's products and goals: a generated catalogue, or WebShop's own data files.

WebShop's data (1.18 M scraped products, 12 k human instructions) cannot be downloaded here, so
``generate_catalog`` builds a catalogue of the same shape from a seed: WebShop's five categories,
thirty product types with their Amazon-style category paths, attributes, buying options (colour,
size, scent, flavour...), prices, titles, descriptions and bullet points, and goals written like
WebShop's human instructions ("i need a long clip-in hair extension which is natural looking, and
price lower than 40.00 dollars"). Every goal is drawn from one product, so its goal product exists.

``load_webshop_catalog`` reads WebShop's own ``items_shuffle*.json`` (products) with
``items_ins_v2*.json`` (attributes, synthetic instructions) and optionally ``items_human_ins.json``
(human instructions), applying WebShop's own cleaning (engine.load_products) and goal rules
(goal.get_human_goals / get_synthetic_goals), so a user who has the files gets the real catalogue.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from a3t.envs.webshop_reward import options_match

# WebShop's five categories (its goals are spread over these).
CATEGORIES = ("beauty", "electronics", "fashion", "food", "furniture")
SPLITS = ("train", "valid", "test")


class CatalogError(ValueError):
    """A catalogue file that cannot be used; the message names the file, the product and the field."""


@dataclass(frozen=True)
class Review:
    title: str
    score: int
    body: str


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    category: str  # one of CATEGORIES for generated products; WebShop's own field otherwise
    query: str  # the search query the product was listed under (r_type compares it)
    product_category: str  # Amazon's path, "Beauty & Personal Care › Hair Care › ..."
    price: float  # the price the reward compares with the goal's limit
    price_tag: str  # what the pages show: "$12.99" or "$10.0 to $15.0"
    description: str
    bullet_points: tuple[str, ...]
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option name -> values, page order
    rating: str = "N.A."
    reviews: tuple[Review, ...] = ()


@dataclass(frozen=True)
class Goal:
    goal_id: str  # "<split>/<index>", the task id
    asin: str  # the product the instruction was written for
    instruction: str
    attributes: tuple[str, ...]
    options: tuple[str, ...]  # option values only, as WebShop's reward reads them
    price_upper: float  # 1000000.0 when the instruction names no limit (WebShop's convention)


@dataclass(frozen=True)
class Catalog:
    products: tuple[Product, ...]
    goals: dict[str, tuple[Goal, ...]]  # split -> goals
    source: str  # what it was built from, for logs

    def __post_init__(self):
        object.__setattr__(self, "_by_asin", {p.asin: p for p in self.products})

    def product(self, asin: str) -> Product:
        return self._by_asin[asin]

    def has_product(self, asin: str) -> bool:
        return asin in self._by_asin

    def task_ids(self, split: str) -> list[str]:
        if split not in self.goals:
            raise KeyError(f"no split {split!r} in the WebShop catalogue ({self.source}); splits: {sorted(self.goals)}")
        return [g.goal_id for g in self.goals[split]]

    def goal(self, task_id: str) -> Goal:
        split, _, index = task_id.partition("/")
        try:
            return self.goals[split][int(index)]
        except (KeyError, ValueError, IndexError):
            raise KeyError(f"no WebShop task {task_id!r} in {self.source} (ids are <split>/<index>)") from None


# ---------------------------------------------------------------- goal rules shared by both sources

NO_PRICE_LIMIT = 1000000.0
# WebShop (goal.py): the limit is the larger of two of the four multiples of 10 above the price.
_PRICE_STEPS = [10.0 * i for i in range(1, 100)]


def price_upper_for(price: float, rng: random.Random) -> float:
    above = [p for p in _PRICE_STEPS if p > price][:4]
    if len(above) < 2:
        return NO_PRICE_LIMIT
    return max(rng.sample(above, 2))


def price_clause(price_upper: float) -> str:
    return "" if price_upper >= NO_PRICE_LIMIT else f", and price lower than {price_upper:.2f} dollars"


def _split_goals(goals: list[Goal], test: int, valid: int) -> dict[str, tuple[Goal, ...]]:
    """WebShop's split of its shuffled goals: the first `test` are test, the next `valid` valid, the rest train."""
    parts = {"test": goals[:test], "valid": goals[test : test + valid], "train": goals[test + valid :]}
    return {
        split: tuple(Goal(f"{split}/{i}", g.asin, g.instruction, g.attributes, g.options, g.price_upper)
                     for i, g in enumerate(items))
        for split, items in parts.items()
    }


# ---------------------------------------------------------------- the generated catalogue

_COLORS = ("black", "white", "navy", "grey", "beige", "red", "pink", "olive", "brown", "purple", "ivory",
           "gold", "silver", "teal", "burgundy", "khaki", "orange", "turquoise")
_CLOTHES = ("x-small", "small", "medium", "large", "x-large", "xx-large")
_SHOES = ("6", "6.5", "7", "7.5", "8", "8.5", "9", "9.5", "10", "10.5", "11", "12")
_BEDS = ("twin", "full", "queen", "king", "california king")
_FL_OZ = ("1 fl oz (pack of 1)", "1.7 fl oz (pack of 1)", "3.4 fl oz (pack of 1)", "3.4 fl oz (pack of 2)",
          "6.8 fl oz (pack of 1)", "8 fl oz (pack of 3)")
_OUNCES = ("4 ounce (pack of 1)", "8 ounce (pack of 1)", "12 ounce (pack of 2)", "16 ounce (pack of 1)",
           "24 ounce (pack of 4)", "2 pound (pack of 1)")
_PACKS = ("1 count", "2 count", "6 count", "12 count", "24 count")


@dataclass(frozen=True)
class _Type:
    category: str
    query: str  # WebShop's "query" field: the search the product was listed under
    noun: str  # what an instruction asks for
    heads: tuple[str, ...]  # title heads
    path: str  # product_category
    attributes: tuple[str, ...]
    options: tuple[tuple[str, tuple[str, ...]], ...]
    price: tuple[float, float]
    blurb: str  # one sentence for the description


def _t(category, query, noun, heads, path, attributes, options, price, blurb) -> _Type:
    return _Type(category, query, noun, tuple(heads.split("|")), path, tuple(attributes.split("|")),
                 tuple(options), price, blurb)


# Six product types per WebShop category. Attribute phrases are chosen so that none is a substring
# of another or of a title head: WebShop's reward also finds an attribute by substring in the text.
_TYPES = (
    _t("beauty", "hair extensions", "hair extension", "Clip-In Hair Extensions|Hair Extension Set|Ponytail Extension",
       "Beauty & Personal Care › Hair Care › Hair Extensions, Wigs & Accessories › Extensions",
       "natural looking|heat resistant|easy to apply|long lasting|human hair|synthetic hair|tangle free",
       [("color", _COLORS[:10]), ("size", ("14 inch", "16 inch", "18 inch", "20 inch", "22 inch"))], (12, 80),
       "Blends in with your own hair in minutes."),
    _t("beauty", "deodorant", "deodorant", "Natural Deodorant|Deodorant Stick|Roll-On Deodorant",
       "Beauty & Personal Care › Personal Care › Deodorants & Antiperspirants › Deodorants",
       "aluminum free|sensitive skin|paraben free|cruelty free|travel size|long lasting|baking soda free",
       [("scent", ("bright citrus", "calming lavender", "ginger fresh", "unscented", "coconut", "rosemary mint")),
        ("size", _FL_OZ[:4])], (6, 30), "Keeps you fresh all day without irritation."),
    _t("beauty", "lipstick", "lipstick", "Matte Lipstick|Liquid Lipstick|Lip Color Set",
       "Beauty & Personal Care › Makeup › Lips › Lipstick",
       "long lasting|waterproof|highly pigmented|cruelty free|moisturizing formula|vegan ingredients|smudge proof",
       [("color", ("red", "pink", "burgundy", "nude", "coral", "plum", "brown"))], (5, 35),
       "Rich color that stays put from morning to night."),
    _t("beauty", "face moisturizer", "face moisturizer", "Face Moisturizer|Daily Face Cream|Hydrating Gel Cream",
       "Beauty & Personal Care › Skin Care › Face › Creams & Moisturizers",
       "oil free|fragrance free|sensitive skin|hyaluronic acid|anti aging|dermatologist tested|non greasy",
       [("size", _FL_OZ)], (8, 60), "Absorbs quickly and hydrates for hours."),
    _t("beauty", "nail polish", "nail polish", "Nail Polish|Gel Nail Polish Kit|Quick Dry Nail Lacquer",
       "Beauty & Personal Care › Foot, Hand & Nail Care › Nail Art & Polish › Nail Polish",
       "quick drying|chip resistant|non toxic|high gloss|easy to remove|salon quality|long wearing",
       [("color", _COLORS[5:15])], (4, 30), "A smooth, even coat in one stroke."),
    _t("beauty", "shampoo", "shampoo", "Shampoo|Shampoo and Conditioner Set|Clarifying Shampoo",
       "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
       "sulfate free|paraben free|dry hair|color safe|tea tree|argan oil|dandruff control",
       [("scent", ("coconut", "unscented", "eucalyptus", "rosemary mint", "vanilla", "green apple")),
        ("size", _FL_OZ[2:])], (6, 45), "Cleans gently and leaves hair soft."),
    _t("electronics", "wireless earbuds", "wireless earbuds", "Wireless Earbuds|Bluetooth Earphones|True Wireless Headphones",
       "Electronics › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones",
       "noise cancelling|bluetooth 5.0|long battery life|water resistant|fast charging|built-in microphone|touch control",
       [("color", ("black", "white", "navy", "pink", "grey"))], (15, 150),
       "Clear sound and a secure fit for workouts and calls."),
    _t("electronics", "phone case", "phone case", "Phone Case|Shockproof Phone Cover|Slim Phone Case",
       "Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
       "shock absorbing|wireless charging compatible|slim fit|scratch resistant|raised edges|drop protection|kickstand",
       [("color", _COLORS[:12]), ("style", ("iphone 12", "iphone 13", "iphone 14", "galaxy s21", "galaxy s22", "pixel 7"))],
       (6, 40), "Protects your phone without adding bulk."),
    _t("electronics", "hdmi cable", "hdmi cable", "HDMI Cable|High Speed HDMI Cord|Braided HDMI Cable",
       "Electronics › Television & Video › Accessories › Cables › HDMI Cables",
       "high speed|gold plated|4k resolution|braided nylon|ethernet support|plug and play|low latency",
       [("size", ("3 feet", "6 feet", "10 feet", "15 feet", "25 feet")), ("style", _PACKS[:3])], (6, 35),
       "Sharp picture and sound for TVs, monitors and consoles."),
    _t("electronics", "portable charger", "portable charger", "Portable Charger|Power Bank|Battery Pack",
       "Cell Phones & Accessories › Chargers & Power Adapters › Portable Power Banks",
       "fast charging|usb c|high capacity|led display|dual output|compact design|airline approved",
       [("color", ("black", "white", "navy", "pink", "silver")),
        ("size", ("5000mah", "10000mah", "20000mah", "26800mah"))], (15, 90),
       "Keeps your devices going all day away from a socket."),
    _t("electronics", "security camera", "security camera", "Security Camera|WiFi Home Camera|Outdoor Surveillance Camera",
       "Electronics › Camera & Photo › Video Surveillance › Surveillance Cameras › Dome Cameras",
       "night vision|motion detection|two-way audio|1080p hd|weatherproof housing|cloud storage|easy installation",
       [("style", ("1 camera", "2 cameras", "4 cameras"))], (25, 200), "Watch over your home from your phone."),
    _t("electronics", "bluetooth speaker", "bluetooth speaker", "Bluetooth Speaker|Portable Wireless Speaker|Outdoor Speaker",
       "Electronics › Portable Audio & Video › Portable Speakers & Docks › Portable Bluetooth Speakers",
       "waterproof|deep bass|24 hour playtime|stereo pairing|built-in microphone|lightweight design|dustproof",
       [("color", ("black", "navy", "red", "teal", "grey", "olive"))], (20, 160), "Big sound that fits in a bag."),
    _t("fashion", "men's t-shirt", "t-shirt", "T-Shirt|Crew Neck Tee|Short Sleeve Shirt",
       "Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
       "machine wash|cotton blend|short sleeve|classic fit|moisture wicking|tagless collar|pre shrunk",
       [("color", _COLORS), ("size", _CLOTHES)], (8, 35), "A soft everyday layer that keeps its shape."),
    _t("fashion", "women's running shoes", "running shoes", "Running Shoes|Athletic Sneakers|Walking Shoes",
       "Clothing, Shoes & Jewelry › Women › Shoes › Athletic › Running › Road Running",
       "non slip|rubber sole|memory foam|breathable mesh|arch support|lightweight design|lace up",
       [("color", _COLORS[:12]), ("size", _SHOES)], (25, 120), "Cushioned for long runs and all-day wear."),
    _t("fashion", "women's jumpsuit", "jumpsuit", "Jumpsuit|Casual Romper|Wide Leg Jumpsuit",
       "Clothing, Shoes & Jewelry › Women › Clothing › Jumpsuits, Rompers & Overalls",
       "high waist|polyester spandex|daily wear|slim fit|hand wash|button closure|elastic waistband",
       [("color", _COLORS[3:15]), ("size", _CLOTHES)], (18, 60), "Dress it up or down for any occasion."),
    _t("fashion", "winter jacket", "winter jacket", "Winter Jacket|Puffer Coat|Hooded Parka",
       "Clothing, Shoes & Jewelry › Men › Clothing › Jackets & Coats › Down & Down Alternative",
       "water resistant|zip closure|detachable hood|quilted lining|machine wash|windproof shell|warm fleece",
       [("color", _COLORS[:10]), ("size", _CLOTHES)], (35, 180), "Warm through the coldest days."),
    _t("fashion", "leather wallet", "wallet", "Leather Wallet|Bifold Wallet|Slim Card Holder",
       "Clothing, Shoes & Jewelry › Men › Accessories › Wallets, Card Cases & Money Organizers › Wallets",
       "genuine leather|rfid blocking|slim profile|gift box|coin pocket|id window|hand stitched",
       [("color", ("black", "brown", "navy", "burgundy", "khaki"))], (10, 70), "Holds what you need, nothing more."),
    _t("fashion", "yoga pants", "yoga pants", "Yoga Pants|High Waisted Leggings|Workout Leggings",
       "Clothing, Shoes & Jewelry › Women › Clothing › Active › Active Pants › Leggings",
       "tummy control|four way stretch|squat proof|hidden pocket|moisture wicking|high waist|buttery soft",
       [("color", _COLORS[:12]), ("size", _CLOTHES[:5])], (12, 50), "Stays in place through every pose."),
    _t("food", "coffee beans", "coffee", "Whole Bean Coffee|Ground Coffee|Coffee Roast",
       "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Coffee › Whole Coffee Beans",
       "medium roast|dark roast|fair trade|usda organic|single origin|low acid|freshly roasted",
       [("flavor name", ("original", "vanilla", "hazelnut", "french roast", "colombian", "espresso")),
        ("size", _OUNCES[:5])], (8, 45), "Smooth and full-bodied in every cup."),
    _t("food", "protein bars", "protein bar", "Protein Bars|Snack Bars|Keto Protein Bar",
       "Grocery & Gourmet Food › Snack Foods › Bars › Protein Bars",
       "gluten free|high protein|low sugar|keto friendly|non gmo|plant based|individually wrapped",
       [("flavor name", ("peanut butter", "cookie dough", "birthday cake", "almond", "mixed berry", "sea salt")),
        ("size", _PACKS[1:])], (10, 50), "A filling snack on the go."),
    _t("food", "green tea", "green tea", "Green Tea|Matcha Green Tea Powder|Loose Leaf Green Tea",
       "Grocery & Gourmet Food › Beverages › Coffee, Tea & Cocoa › Tea › Green",
       "usda organic|caffeine free|non gmo|sugar free|natural ingredients|individually wrapped|rich in antioxidants",
       [("flavor name", ("jasmine", "ginger", "original", "honey", "peppermint", "pomegranate")),
        ("size", _PACKS)], (5, 30), "A calm cup any time of day."),
    _t("food", "beef jerky", "beef jerky", "Beef Jerky|Jerky Sticks|Smoked Meat Snack",
       "Grocery & Gourmet Food › Snack Foods › Jerky & Dried Meats › Beef",
       "high protein|gluten free|low fat|grass fed|no preservatives|ready to eat|resealable bag",
       [("flavor name", ("original", "teriyaki", "peppered", "sweet and spicy", "barbecue")),
        ("size", _OUNCES[:4])], (6, 40), "Slow smoked for deep flavor."),
    _t("food", "olive oil", "olive oil", "Extra Virgin Olive Oil|Cold Pressed Olive Oil|Olive Oil Bottle",
       "Grocery & Gourmet Food › Pantry Staples › Cooking Oils, Vinegars & Sprays › Oils › Olive",
       "cold pressed|first harvest|usda organic|non gmo|glass bottle|single estate|low acidity",
       [("size", ("8.5 fl oz", "16.9 fl oz", "25.3 fl oz", "33.8 fl oz", "101 fl oz"))], (8, 50),
       "Fruity and peppery, for cooking and dressing."),
    _t("food", "dark chocolate", "dark chocolate", "Dark Chocolate Bar|Chocolate Squares|Cacao Bar",
       "Grocery & Gourmet Food › Candy & Chocolate › Chocolate › Chocolate Bars",
       "dairy free|fair trade|low sugar|gluten free|vegan ingredients|gift box|individually wrapped",
       [("flavor name", ("sea salt", "almond", "orange", "raspberry", "mint")), ("size", _PACKS[:4])], (5, 35),
       "Intense cocoa with a smooth finish."),
    _t("furniture", "office chair", "office chair", "Office Chair|Ergonomic Desk Chair|Mesh Task Chair",
       "Home & Kitchen › Furniture › Home Office Furniture › Home Office Chairs › Home Office Desk Chairs",
       "lumbar support|adjustable height|swivel wheels|breathable mesh|padded armrests|easy assembly|high back",
       [("color", ("black", "grey", "white", "navy", "pink"))], (50, 250), "Comfortable through the longest workday."),
    _t("furniture", "bed frame", "bed frame", "Bed Frame|Platform Bed|Metal Bed Frame",
       "Home & Kitchen › Furniture › Bedroom Furniture › Beds, Frames & Bases › Bed Frames",
       "easy assembly|under bed storage|noise free|solid wood|no box spring needed|heavy duty|wooden slats",
       [("color", ("black", "white", "grey", "brown", "beige")), ("size", _BEDS)], (90, 400),
       "A sturdy base for a good night's sleep."),
    _t("furniture", "bookshelf", "bookshelf", "Bookshelf|Ladder Bookcase|Storage Shelf",
       "Home & Kitchen › Furniture › Living Room Furniture › Bookcases",
       "easy assembly|engineered wood|space saving|metal frame|living room|wall mounted|adjustable shelves",
       [("color", ("black", "white", "brown", "grey", "olive")), ("size", ("3 tier", "4 tier", "5 tier"))],
       (35, 200), "Room for books, plants and display pieces."),
    _t("furniture", "throw pillow covers", "throw pillow covers", "Throw Pillow Covers|Cushion Case Set|Decorative Pillow Case",
       "Home & Kitchen › Bedding › Decorative Pillows, Inserts & Covers › Throw Pillow Covers",
       "machine washable|hidden zipper|double sided|living room|velvet fabric|set of 2|farmhouse style",
       [("color", _COLORS[:14]), ("size", ("16 x 16 inch", "18 x 18 inch", "20 x 20 inch", "24 x 24 inch"))],
       (8, 40), "An easy way to refresh a sofa."),
    _t("furniture", "coffee table", "coffee table", "Coffee Table|Lift Top Coffee Table|Round Coffee Table",
       "Home & Kitchen › Furniture › Living Room Furniture › Tables › Coffee Tables",
       "storage space|easy assembly|solid wood|tempered glass|living room|mid century|lift top",
       [("color", ("black", "white", "brown", "grey", "walnut"))], (60, 300), "The centerpiece of the living room."),
    _t("furniture", "shower curtain", "shower curtain", "Shower Curtain|Fabric Shower Curtain|Waterproof Curtain Liner",
       "Home & Kitchen › Bath › Bathroom Accessories › Shower Curtains, Hooks & Liners › Shower Curtains",
       "machine washable|water repellent|rust proof grommets|hooks included|mildew resistant|weighted hem|quick drying",
       [("color", _COLORS[:12]), ("size", ("72 x 72 inch", "72 x 84 inch", "36 x 72 inch"))], (10, 45),
       "Brightens the bathroom and keeps the floor dry."),
)

_BRANDS = ("Lumora", "Brightway", "Nordvik", "Casa Verde", "Peakline", "Oakhurst", "Solace", "Tidewell", "Everkin",
           "Marlo & Co", "Juniper Lane", "Kestrel", "Halcyon", "Riverstone", "Aurelio", "Vantio", "Cobalt Bay",
           "Fernleigh", "Quillon", "Sundry Supply", "Northpine", "Bellmare", "Ostara", "Greywick", "Zephyra",
           "Amberfield", "Ironbark", "Luxe Habit", "Wrenfield", "Calder")
_LINES = ("Classic", "Essential", "Pro", "Plus", "Select", "Premium", "Original", "Signature", "Everyday", "Studio",
          "Elite", "Basics", "Max", "Lite", "Heritage", "Urban")
_BENEFITS = ("for everyday use", "made to last", "loved by customers", "backed by a 30-day guarantee",
             "designed with care", "great as a gift", "tested for quality")
_OPENERS = ("i need", "i am looking for", "i want", "find me", "i'm looking for", "i would like", "get me",
            "search for")
_ASIN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _pick_option_values(rng: random.Random, name: str, values: tuple[str, ...]) -> tuple[str, ...]:
    """2-6 values of one option, no two that the reward's matching takes for each other (so a wrong
    pick does not score)."""
    wanted = rng.randint(2, min(6, len(values)))
    chosen: list[str] = []
    for value in rng.sample(values, len(values)):
        if len(chosen) == wanted:
            break
        if not any(options_match(name, value, other) for other in chosen):
            chosen.append(value)
    return tuple(sorted(chosen, key=values.index))


def _product(rng: random.Random, kind: _Type, asin: str, brand: str, line: str) -> Product:
    attributes = tuple(rng.sample(kind.attributes, rng.randint(2, 4)))
    head = rng.choice(kind.heads)
    title = f"{brand} {line} {head}, {attributes[0].title()} and {attributes[1].title()}"
    described = ", ".join(attributes[:-1]) + f" and {attributes[-1]}"
    description = (f"The {brand} {line} {head.lower()} is {described}. {kind.blurb} "
                   f"{rng.choice(_BENEFITS).capitalize()}.")
    bullets = tuple(f"{a.upper()}: {rng.choice(_BENEFITS)}" for a in attributes) + (f"Sold by {brand}",)
    options = {name: _pick_option_values(rng, name, values) for name, values in kind.options}
    price = round(rng.uniform(*kind.price), 2)
    return Product(asin=asin, title=title, category=kind.category, query=kind.query, product_category=kind.path,
                   price=price, price_tag=f"${price}", description=description, bullet_points=bullets,
                   attributes=attributes, options=options)


def _instruction(rng: random.Random, kind: _Type, attributes: tuple[str, ...], options: dict[str, str],
                 price_upper: float) -> str:
    """An instruction in the style of WebShop's human ones (lower case, attributes, options, price)."""
    first, rest = attributes[0], attributes[1:]
    if rng.random() < 0.5:
        text = f"{rng.choice(_OPENERS)} {_article(first)} {first} {kind.noun}"
    else:
        text = f"{rng.choice(_OPENERS)} {_article(kind.noun)} {kind.noun} with {first}"
    if rest:
        text += " and " + " and ".join(rest) if rng.random() < 0.5 else ", " + ", ".join(rest)
    if options:
        if rng.random() < 0.5:
            text += " with " + ", and ".join(f"{name}: {value}" for name, value in options.items())
        else:
            text += " in " + " and ".join(f"{value} {name}" for name, value in options.items())
    return text + price_clause(price_upper)


def _goal(rng: random.Random, product: Product, kind: _Type) -> Goal:
    attributes = tuple(rng.sample(product.attributes, rng.randint(1, min(3, len(product.attributes)))))
    names = [n for n in product.options if rng.random() < 0.8] or list(product.options)[:1]
    options = {n: rng.choice(product.options[n]) for n in names}
    price_upper = price_upper_for(product.price, rng)
    instruction = _instruction(rng, kind, attributes, options, price_upper)
    return Goal("", product.asin, instruction, attributes, tuple(options.values()), price_upper)


def generate_catalog(seed: int = 0, products: int = 3000, train_goals: int = 1500, test_goals: int = 500,
                     valid_goals: int = 0) -> Catalog:
    """A deterministic catalogue: the same arguments give the same products and goals.

    Goals are drawn from distinct products (test, then valid, then train), one goal per product.
    """
    if products < train_goals + test_goals + valid_goals:
        raise ValueError(f"{products} products cannot carry {train_goals + test_goals + valid_goals} goals "
                         "(one goal per product)")
    rng = random.Random(f"a3t-webshop:{seed}")
    asins: set[str] = set()
    titles: set[str] = set()
    catalog: list[Product] = []
    kinds: dict[str, _Type] = {}
    while len(catalog) < products:
        kind = _TYPES[len(catalog) % len(_TYPES)]
        asin = "B0" + "".join(rng.choices(_ASIN_CHARS, k=8))
        product = _product(rng, kind, asin, rng.choice(_BRANDS), rng.choice(_LINES))
        if asin in asins or product.title in titles:
            continue  # WebShop's asins are unique; unique titles let a title search find its product
        asins.add(asin)
        titles.add(product.title)
        catalog.append(product)
        kinds[asin] = kind
    rng.shuffle(catalog)  # WebShop's items_shuffle order: no type blocks
    chosen = rng.sample(catalog, test_goals + valid_goals + train_goals)
    goals = [_goal(rng, p, kinds[p.asin]) for p in chosen]
    return Catalog(tuple(catalog), _split_goals(goals, test_goals, valid_goals),
                   source=f"generated(seed={seed}, products={products})")


# ---------------------------------------------------------------- WebShop's own files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CatalogError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise CatalogError(f"{path}: not a text file ({e.reason})") from None


def _field(path: Path, where: str, record: dict, name: str, kind: type | tuple[type, ...], default: Any = ...):
    value = record.get(name, default)
    if value is ...:
        raise CatalogError(f"{path}: {where}: field '{name}' is missing")
    if value is not default and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CatalogError(f"{path}: {where}: field '{name}' should be {names}, not {type(value).__name__}")
    return value


def _str_list(path: Path, where: str, name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{path}: {where}: field '{name}' should be a list of strings")
    return tuple(value)


def _pricing(path: Path, where: str, pricing: str | None, rng: random.Random) -> tuple[float, str]:
    """WebShop's price: "$a" or "$a to $b" (a range is drawn once; WebShop draws it unseeded)."""
    if not pricing:
        return 100.0, "$100.0"
    try:
        values = [float(Decimal(re.sub(r"[^\d.]", "", p))) for p in pricing.split("$")[1:]][:2]
    except InvalidOperation:
        raise CatalogError(f"{path}: {where}: field 'pricing' is not a price ({pricing!r})") from None
    if not values:
        raise CatalogError(f"{path}: {where}: field 'pricing' has no $ amount ({pricing!r})")
    if len(values) == 1:
        return values[0], f"${values[0]}"
    return rng.uniform(*values), f"${values[0]} to ${values[1]}"


def _webshop_product(path: Path, index: int, raw: Any, attrs_path: Path, attrs: dict,
                     rng: random.Random) -> Product | None:
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: product {index}: should be an object, not {type(raw).__name__}")
    asin = _field(path, f"product {index}", raw, "asin", str)
    if asin == "nan" or len(asin) > 10:
        return None  # WebShop skips these
    where = f"product {index} (asin {asin})"
    bullets = _field(path, where, raw, "small_description", (list, str), "")
    bullets = _str_list(path, where, "small_description", bullets if isinstance(bullets, list) else [bullets])
    price, price_tag = _pricing(path, where, _field(path, where, raw, "pricing", str, None), rng)
    options: dict[str, tuple[str, ...]] = {}
    for name, contents in (_field(path, where, raw, "customization_options", dict, None) or {}).items():
        if contents is None:
            continue
        if not isinstance(contents, list) or not all(isinstance(c, dict) and isinstance(c.get("value"), str)
                                                     for c in contents):
            raise CatalogError(f"{path}: {where}: customization_options[{name!r}] should be a list of "
                               "objects with a string 'value'")
        # WebShop lower-cases values and writes '/' as ' | ' (it would break the site's URLs).
        options[name.lower()] = tuple(c["value"].strip().replace("/", " | ").lower() for c in contents)
    attributes = ("DUMMY_ATTR",)  # WebShop's placeholder for a product with no attributes
    if asin in attrs:
        record = attrs[asin]
        if not isinstance(record, dict):
            raise CatalogError(f"{attrs_path}: asin {asin}: should be an object, not {type(record).__name__}")
        if "attributes" in record:
            attributes = _str_list(attrs_path, f"asin {asin}", "attributes", record["attributes"])
    return Product(
        asin=asin, title=_field(path, where, raw, "name", str),
        category=_field(path, where, raw, "category", str),
        query=_field(path, where, raw, "query", str).lower().strip(),
        product_category=_field(path, where, raw, "product_category", str), price=price, price_tag=price_tag,
        description=_field(path, where, raw, "full_description", str, "") or "", bullet_points=bullets,
        attributes=attributes, options=options,
    )


def _human_goals(path: Path, data: Any, products: dict[str, Product], rng: random.Random) -> list[Goal]:
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: should map each asin to a list of instructions, not a {type(data).__name__}")
    goals = []
    for asin, items in data.items():
        if asin not in products:
            continue  # WebShop's goals come from the products it loaded
        if not isinstance(items, list):
            raise CatalogError(f"{path}: asin {asin}: should be a list of instructions")
        for k, item in enumerate(items):
            where = f"asin {asin}, instruction {k}"
            if not isinstance(item, dict):
                raise CatalogError(f"{path}: {where}: should be an object")
            text = _field(path, where, item, "instruction", str)
            attributes = _str_list(path, where, "instruction_attributes", item.get("instruction_attributes"))
            options = _str_list(path, where, "instruction_options", item.get("instruction_options", []))
            if not attributes:
                continue  # WebShop skips instructions without attributes
            price_upper = price_upper_for(products[asin].price, rng)
            goals.append(Goal("", asin, text.strip(".") + price_clause(price_upper), attributes, options, price_upper))
    return goals


def _synthetic_goals(path: Path, attrs: dict, products: list[Product], rng: random.Random) -> list[Goal]:
    """WebShop's synthetic goals: the stored instruction with every combination of the product's options."""
    goals = []
    for product in products:
        record = attrs.get(product.asin)
        if not isinstance(record, dict) or not record.get("instruction"):
            continue
        where = f"asin {product.asin}"
        text = _field(path, where, record, "instruction", str)
        attributes = _str_list(path, where, "instruction_attributes", record.get("instruction_attributes"))
        if not attributes:
            continue  # WebShop requires attributes of a synthetic goal
        price_upper = price_upper_for(product.price, rng)
        names = sorted(product.options)
        for combination in itertools.product(*(product.options[n] for n in names)):
            chosen = ", and ".join(f"{n}: {v}" for n, v in zip(names, combination))
            instruction = text + (f" with {chosen}" if chosen else "") + price_clause(price_upper)
            goals.append(Goal("", product.asin, instruction, attributes, tuple(combination), price_upper))
    return goals


def load_webshop_catalog(items_path: str | Path, attributes_path: str | Path,
                         human_instructions_path: str | Path | None = None, seed: int = 0,
                         test_goals: int = 500, valid_goals: int = 1000) -> Catalog:
    """WebShop's own catalogue from its data files; errors name the file, the product and the field.

    items_path: items_shuffle*.json (a list of scraped products: asin, name, pricing, category, query,
    product_category, full_description, small_description, customization_options).
    attributes_path: items_ins_v2*.json (asin -> {attributes, instruction, instruction_attributes}).
    human_instructions_path: items_human_ins.json (asin -> [{instruction, instruction_attributes,
    instruction_options}]); without it the synthetic goals of items_ins_v2 are used, as WebShop does.
    Goals are shuffled with WebShop's seed (233) and split as WebShop does: the first 500 are test,
    the next 1000 valid, the rest train. Prices of a range and price limits are drawn from `seed`.
    """
    items_path, attributes_path = Path(items_path), Path(attributes_path)
    raw_items = _read_json(items_path)
    if not isinstance(raw_items, list):
        raise CatalogError(f"{items_path}: should be a list of products, not a {type(raw_items).__name__}")
    attrs = _read_json(attributes_path)
    if not isinstance(attrs, dict):
        raise CatalogError(f"{attributes_path}: should map each asin to its attributes, not a {type(attrs).__name__}")
    rng = random.Random(seed)
    products: dict[str, Product] = {}
    for i, raw in enumerate(raw_items):
        product = _webshop_product(items_path, i, raw, attributes_path, attrs, rng)
        if product is not None and product.asin not in products:  # WebShop keeps the first of a duplicate
            products[product.asin] = product
    if not products:
        raise CatalogError(f"{items_path}: no usable product in it")
    if human_instructions_path is not None:
        human_path = Path(human_instructions_path)
        goals = _human_goals(human_path, _read_json(human_path), products, rng)
    else:
        goals = _synthetic_goals(attributes_path, attrs, list(products.values()), rng)
    if not goals:
        raise CatalogError(f"{human_instructions_path or attributes_path}: no goal for any product of {items_path}")
    random.Random(233).shuffle(goals)  # WebShop's fixed goal order
    return Catalog(tuple(products.values()), _split_goals(goals, test_goals, valid_goals), source=str(items_path))
