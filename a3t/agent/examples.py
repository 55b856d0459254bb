"""One worked example per ALFWorld task type, and one WebShop example, for the 1-shot ReAct
and ActRe prompts.

Written for a3t: ALFWorld's observations and actions are the planner walkthroughs of generated
train games (seed 2024) played through the environment; the thoughts are the plan's reasons. They use
the ReAct-era phrasing "put X in/on Y"; ``example_for(..., phrasing="move")`` converts.
WebShop's is a train goal of the generated catalogue of seed 2024 (not the default seed 0),
bought with reward 1 in our own actions and thoughts, its pages in both observation formats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from a3t.envs.alfworld_reasons import plan_reason
from a3t.envs.base import PageFormat, Phrasing, convert_action


@dataclass(frozen=True)
class Example:
    task_type: str
    observation: str  # the first observation, with the task
    steps: tuple[tuple[str, str, str], ...]  # (thought, action, observation)


# The planner's actions and the engine's answers of each example; the thoughts are the plan's
# reasons (a3t.envs.alfworld_reasons), the same plain sentences that ActRe falls back to and that
# the walkthroughs of pipeline.walkthrough_reasons=plan are annotated with.
_PLAYED = {
    "pick_and_place_simple": (
        "You are in the middle of a room. Looking quickly around you, you see a armchair 1, a drawer "
        "5, a drawer 4, a drawer 3, a drawer 2, a drawer 1, a sidetable 2, and a sidetable 1.\n\nYour "
        "task is to: put a keychain in drawer.",
        (
            ("go to armchair 1",
             "You arrive at armchair 1. On the armchair 1, you see a keychain 2, and a laptop "
             "1."),
            ("take keychain 2 from armchair 1",
             "You pick up the keychain 2 from the armchair 1."),
            ("go to drawer 5",
             "You arrive at drawer 5. The drawer 5 is closed."),
            ("open drawer 5",
             "You open the drawer 5. The drawer 5 is open. In it, you see nothing."),
            ("put keychain 2 in/on drawer 5",
             "You put the keychain 2 in/on the drawer 5."),
        ),
    ),
    "look_at_obj_in_light": (
        "You are in the middle of a room. Looking quickly around you, you see a coffeetable 1, a "
        "drawer 3, a drawer 2, a drawer 1, a dresser 1, a sidetable 2, a sidetable 1, and a sofa "
        "1.\n\nYour task is to: examine the remotecontrol with the floorlamp.",
        (
            ("go to coffeetable 1",
             "You arrive at coffeetable 1. On the coffeetable 1, you see a remotecontrol 2, "
             "and a remotecontrol 1."),
            ("take remotecontrol 2 from coffeetable 1",
             "You pick up the remotecontrol 2 from the coffeetable 1."),
            ("go to sidetable 2",
             "You arrive at sidetable 2. On the sidetable 2, you see a floorlamp 1."),
            ("use floorlamp 1",
             "You turn on the floorlamp 1."),
        ),
    ),
    "pick_clean_then_place_in_recep": (
        "You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet "
        "1, a coffeemachine 1, a countertop 1, a diningtable 1, a drawer 1, a fridge 1, and a "
        "sinkbasin 1.\n\nYour task is to: put a clean spoon in diningtable.",
        (
            ("go to sinkbasin 1",
             "You arrive at sinkbasin 1. On the sinkbasin 1, you see a fork 1, and a spoon 1."),
            ("take spoon 1 from sinkbasin 1",
             "You pick up the spoon 1 from the sinkbasin 1."),
            ("clean spoon 1 with sinkbasin 1",
             "You clean the spoon 1 using the sinkbasin 1."),
            ("go to diningtable 1",
             "You arrive at diningtable 1. On the diningtable 1, you see a butterknife 2."),
            ("put spoon 1 in/on diningtable 1",
             "You put the spoon 1 in/on the diningtable 1."),
        ),
    ),
    "pick_heat_then_place_in_recep": (
        "You are in the middle of a room. Looking quickly around you, you see a cabinet 4, a cabinet "
        "3, a cabinet 2, a cabinet 1, a microwave 1, a shelf 1, a sinkbasin 1, and a toaster "
        "1.\n\nYour task is to: heat some cup and put it in shelf.",
        (
            ("go to cabinet 2",
             "You arrive at cabinet 2. The cabinet 2 is closed."),
            ("open cabinet 2",
             "You open the cabinet 2. The cabinet 2 is open. In it, you see a cup 1."),
            ("take cup 1 from cabinet 2",
             "You pick up the cup 1 from the cabinet 2."),
            ("go to microwave 1",
             "You arrive at microwave 1. The microwave 1 is closed."),
            ("heat cup 1 with microwave 1",
             "You heat the cup 1 using the microwave 1."),
            ("go to shelf 1",
             "You arrive at shelf 1. On the shelf 1, you see nothing."),
            ("put cup 1 in/on shelf 1",
             "You put the cup 1 in/on the shelf 1."),
        ),
    ),
    "pick_cool_then_place_in_recep": (
        "You are in the middle of a room. Looking quickly around you, you see a countertop 1, a "
        "drawer 5, a drawer 4, a drawer 3, a drawer 2, a drawer 1, a fridge 1, and a sinkbasin "
        "1.\n\nYour task is to: put a cool pot in sinkbasin.",
        (
            ("go to countertop 1",
             "You arrive at countertop 1. On the countertop 1, you see a pot 1."),
            ("take pot 1 from countertop 1",
             "You pick up the pot 1 from the countertop 1."),
            ("go to fridge 1",
             "You arrive at fridge 1. The fridge 1 is closed."),
            ("cool pot 1 with fridge 1",
             "You cool the pot 1 using the fridge 1."),
            ("go to sinkbasin 1",
             "You arrive at sinkbasin 1. On the sinkbasin 1, you see a fork 2, a fork 1, and "
             "a potato 1."),
            ("put pot 1 in/on sinkbasin 1",
             "You put the pot 1 in/on the sinkbasin 1."),
        ),
    ),
    "pick_two_obj_and_place": (
        "You are in the middle of a room. Looking quickly around you, you see a bathtubbasin 1, a "
        "countertop 1, a drawer 4, a drawer 3, a drawer 2, a drawer 1, a garbagecan 1, and a "
        "toiletpaperhanger 1.\n\nYour task is to: put two soapbottle in garbagecan.",
        (
            ("go to drawer 4",
             "You arrive at drawer 4. The drawer 4 is closed."),
            ("open drawer 4",
             "You open the drawer 4. The drawer 4 is open. In it, you see a soapbottle 1, and "
             "a tissuebox 1."),
            ("take soapbottle 1 from drawer 4",
             "You pick up the soapbottle 1 from the drawer 4."),
            ("go to garbagecan 1",
             "You arrive at garbagecan 1. On the garbagecan 1, you see a soapbar 1."),
            ("put soapbottle 1 in/on garbagecan 1",
             "You put the soapbottle 1 in/on the garbagecan 1."),
            ("go to drawer 1",
             "You arrive at drawer 1. The drawer 1 is closed."),
            ("open drawer 1",
             "You open the drawer 1. The drawer 1 is open. In it, you see a soapbottle 2, a "
             "spraybottle 1, and a tissuebox 2."),
            ("take soapbottle 2 from drawer 1",
             "You pick up the soapbottle 2 from the drawer 1."),
            ("go to garbagecan 1",
             "You arrive at garbagecan 1. On the garbagecan 1, you see a soapbar 1, and a "
             "soapbottle 1."),
            ("put soapbottle 2 in/on garbagecan 1",
             "You put the soapbottle 2 in/on the garbagecan 1."),
        ),
    ),
}


def _planned(task_type: str, observation: str, played) -> Example:
    task = observation.split("Your task is to: ")[1]
    steps = tuple((plan_reason(task, played[:k], action), action, answer) for k, (action, answer) in enumerate(played))
    return Example(task_type, observation, steps)


EXAMPLES = {task_type: _planned(task_type, *example) for task_type, example in _PLAYED.items()}  # put phrasing


def convert_observation(observation: str, phrasing: Phrasing) -> str:
    """The engine's answer to a put action, in either phrasing."""
    if phrasing == "move":
        return re.sub(r"^You put the (.+) in/on the (.+)\.$", r"You move the \1 to the \2.", observation)
    return re.sub(r"^You move the (.+) to the (.+)\.$", r"You put the \1 in/on the \2.", observation)


def example_for(task_type: str, phrasing: Phrasing = "put") -> Example:
    """The example of a task type in ``phrasing``, its thoughts reasoned in that phrasing too."""
    observation, played = _PLAYED[task_type]
    return _planned(task_type, observation, [(convert_action(action, phrasing), convert_observation(answer, phrasing))
                                             for action, answer in played])


_WEBSHOP_INSTRUCTION = ("i'm looking for a detachable hood winter jacket in olive color and medium size, and price "
                        "lower than 70.00 dollars")
_WEBSHOP_ITEM = ("color [SEP] white [SEP] olive [SEP] purple [SEP] size [SEP] small [SEP] medium [SEP] Amberfield "
                 "Premium Winter Jacket, Detachable Hood and Water Resistant [SEP] Price: $41.52 [SEP] Rating: N.A. "
                 "[SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
_WEBSHOP_SEP_HEAD = f"Instruction: [SEP] {_WEBSHOP_INSTRUCTION} [SEP] Back to Search [SEP] "
# (thought, action) and the page after the action in each format.
_WEBSHOP_TURNS = (
    (("I need a winter jacket with a detachable hood, in olive and in size medium, for less than 70 dollars. "
      "I search for its key words.", "search[detachable hood winter jacket olive medium]"),
     {"react": "[Back to Search] \nPage 1 (Total results: 50) \n[Next >] \n[B06P0N4E7C] \nAmberfield Premium Winter "
               "Jacket, Detachable Hood and Water Resistant \n$41.52 \n[B0G4PEOXJH] \nKestrel Plus Winter Jacket, "
               "Detachable Hood and Warm Fleece \n$102.35 \n[B0ZLSSYUR6] \nAmberfield Essential Winter Jacket, "
               "Detachable Hood and Machine Wash \n$88.3",
      "sep": _WEBSHOP_SEP_HEAD + "Page 1 (Total results: 50) [SEP] Next > [SEP] B06P0N4E7C [SEP] Amberfield Premium "
             "Winter Jacket, Detachable Hood and Water Resistant [SEP] $41.52 [SEP] B0G4PEOXJH [SEP] Kestrel Plus "
             "Winter Jacket, Detachable Hood and Warm Fleece [SEP] $102.35 [SEP] B0ZLSSYUR6 [SEP] Amberfield "
             "Essential Winter Jacket, Detachable Hood and Machine Wash [SEP] $88.3 [SEP] B0USZUYERP [SEP] Brightway "
             "Premium Winter Jacket, Detachable Hood and Windproof Shell [SEP] $177.83 [SEP] B0JED2VQS4 [SEP] "
             "Ironbark Urban Winter Jacket, Water Resistant and Detachable Hood [SEP] $145.8 [SEP] B0E1WZ34RB [SEP] "
             "Ironbark Everyday Winter Jacket, Detachable Hood and Machine Wash [SEP] $151.14 [SEP] B0NWO8VWEX "
             "[SEP] Ironbark Select Winter Jacket, Detachable Hood and Water Resistant [SEP] $41.01 [SEP] "
             "B02BUU9Q7G [SEP] Ostara Classic Winter Jacket, Detachable Hood and Machine Wash [SEP] $40.14 [SEP] "
             "B07LZWVNKR [SEP] Everkin Lite Winter Jacket, Zip Closure and Detachable Hood [SEP] $148.48 [SEP] "
             "B0NMQC6LM7 [SEP] Zephyra Max Winter Jacket, Detachable Hood and Warm Fleece [SEP] $177.41"}),
    (("The first result, B06P0N4E7C, is a winter jacket with a detachable hood for $41.52, under 70 dollars. "
      "I open it to see its options.", "click[B06P0N4E7C]"),
     {"react": "[Back to Search] \n[< Prev] \ncolor [white][olive][purple]\nsize [small][medium]\nAmberfield "
               "Premium Winter Jacket, Detachable Hood and Water Resistant \nPrice: $41.52 \nRating: N.A. \n"
               "[Description] \n[Features] \n[Reviews] \n[Buy Now]",
      "sep": _WEBSHOP_SEP_HEAD + "< Prev [SEP] " + _WEBSHOP_ITEM}),
    (("It comes in olive and in medium. I choose the color olive first.", "click[olive]"),
     {"react": "You have clicked olive.", "sep": _WEBSHOP_SEP_HEAD + "< Prev [SEP] " + _WEBSHOP_ITEM}),
    (("Now I choose the size medium.", "click[medium]"),
     {"react": "You have clicked medium.", "sep": _WEBSHOP_SEP_HEAD + "< Prev [SEP] " + _WEBSHOP_ITEM}),
    (("The color and the size match the instruction and the price is under 70 dollars. I buy it.",
      "click[Buy Now]"),
     {"react": "Your score (min 0.0, max 1.0): 1.0",
      "sep": "Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] 1.0"}),
)
_WEBSHOP_SEARCH_PAGE = {
    "react": f"WebShop \nInstruction: \n{_WEBSHOP_INSTRUCTION} \n[Search]",
    "sep": f"WebShop [SEP] Instruction: [SEP] {_WEBSHOP_INSTRUCTION} [SEP] Search",
}


def webshop_example(page_format: PageFormat = "react") -> Example:
    """The WebShop example, its pages as the environment shows them in ``page_format``."""
    steps = tuple((thought, action, pages[page_format]) for (thought, action), pages in _WEBSHOP_TURNS)
    return Example("fashion", _WEBSHOP_SEARCH_PAGE[page_format], steps)
