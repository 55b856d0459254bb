"""ActRe: the same LLM prompted the other way round. Given the episode so far and the
action that was taken next, it writes the reason, which becomes the step's thought.

Used for A3T's explored (randomly sampled) actions, and to turn any action sequence
(planner walkthroughs, recorded episodes) into full ReAct trajectories (``a3t annotate``).

A reason must pass three checks (``rejection``), else it is asked again (sampled) up to
``tries`` times, then replaced by a templated one (``fallback_reason``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from a3t.agent.examples import example_for, webshop_example
from a3t.agent.react import transcript
from a3t.envs.alfworld_reasons import plan_reason
from a3t.envs.base import PageFormat, Phrasing
from a3t.llm.base import LLM, Chat, Completion, Sampling, stop_after_first_line
from a3t.trajectory import StepRecord

SYSTEM = """You explain the actions of an agent {setting}.
You see the agent's task, what happened so far, and the action the agent takes next.
Answer with one line: the agent's reason for taking that action now, in the first person.
Do not repeat the observation and do not name another action.

Here is an example of a solved task. After each action comes the agent's reason for it.

{example}"""

THOUGHT_START = "Thought:"
# Later tries sample: the greedy answer was rejected and would only come again.
RESAMPLE_TEMPERATURE = 0.7


@dataclass(frozen=True)
class ActReRequest:
    task_type: str
    initial_observation: str
    steps: list[StepRecord]  # the episode before the action
    action: str
    webshop: PageFormat | None = None  # a WebShop episode: its page format; None: ALFWorld


def action_first_transcript(initial_observation: str, steps) -> str:
    """Observation / Action / Thought lines: the order in which ActRe sees a step (the action,
    then its reason). ``steps`` are (thought, action, observation) triples or StepRecords."""
    return transcript(initial_observation, steps, action_first=True)


def actre_chat(request: ActReRequest, phrasing: Phrasing) -> Chat:
    """The ActRe chat of a request: WebShop's example for a WebShop episode, else the ALFWorld
    example of its task type in ``phrasing``. The user turn is the episode in the example's
    order, ending with the action to explain; the reply is started with "Thought:" for the
    model (small models otherwise echo the observation)."""
    if request.webshop is not None:
        setting, example = "shopping in a web shop", webshop_example(request.webshop)
    else:
        setting, example = "in a household", example_for(request.task_type, phrasing)
    system = SYSTEM.format(setting=setting, example=action_first_transcript(example.observation, example.steps))
    history = action_first_transcript(request.initial_observation, request.steps)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{history}\nAction: {request.action}"},
        {"role": "assistant", "content": THOUGHT_START},
    ]


def parse_reason(text: str) -> str:
    """The reason without the "Thought:" label, whitespace collapsed as in policy
    thoughts; "" if the model wrote none."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        if sep and head.strip(" *_`>").lower() in ("thought", "reason"):
            line = rest
        return " ".join(line.strip(" *_`").split())
    return ""


# --------------------------------------------------------------------------- the checks

# How observations (ALFWorld's, WebShop's) and other transcript lines begin. ALFWorld's speak to
# the agent ("You arrive at ..."); a thought is the agent's own, in the first person, so one that
# begins with "You " or "You're" narrates (or invents) an observation.
_OBSERVATION_STARTS = (
    "observation", "action", "next action", "you ", "you'", "looking quickly", "on the ", "in it, ", "nothing happens",
    "your task is to", "instruction:", "webshop", "[back to search]", "your score",
)
_OBJECT = re.compile(r"\b([a-z]+) (\d+)\b")  # an ALFWorld object or receptacle: "cabinet 3"
_COMMAND_VERBS = ("go to", "take", "put", "move", "open", "close", "clean", "heat", "cool", "use", "examine")
_COMMAND = re.compile(rf"\b(?:{'|'.join(_COMMAND_VERBS)})\s+(?:the\s+)?([a-z]+ \d+)\b")
ECHO_SHARE = 0.5  # more than this share of a reason's word 3-grams found in an observation: an echo


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _objects(text: str) -> set[str]:
    return {f"{name} {number}" for name, number in _OBJECT.findall(text.lower())}


def echoes(request: ActReRequest, reason: str) -> bool:
    """The reason repeats a text instead of explaining the action: it begins like an observation
    (or a transcript label), it is the action itself or an earlier thought of the episode word
    for word (the model copies its first thought to later steps), or more than ECHO_SHARE of
    its word 3-grams occur in the last observation or in the first one. The first observation's
    task sentence is left out: restating the task ("I need to put a pen in the desk") is a
    reason. An earlier thought's frame reused for the new action is a reason too: only a whole
    copy is rejected."""
    words = _words(reason)
    copies = [request.action] + [step.thought for step in request.steps]
    if reason.lower().startswith(_OBSERVATION_STARTS) or any(words == _words(text) for text in copies):
        return True
    last = request.steps[-1].observation if request.steps else request.initial_observation
    room = request.initial_observation.split("Your task is to:")[0]
    grams = _trigrams(reason)
    return bool(grams) and any(len(grams & _trigrams(text)) > ECHO_SHARE * len(grams) for text in (last, room))


def names_other_action(request: ActReRequest, reason: str) -> bool:
    """ALFWorld: the reason speaks of doing something else, or of things this episode does not
    have. Objects are named "name n" ("cabinet 3"). Rejected: a command on an object the
    action does not name ("go to cabinet 3" for the action "go to cabinet 1"); an object that
    is neither in the action nor anywhere in the episode so far; or, numbered or not, a kind
    of object from the prompt's example that the episode never showed ("keychain" or
    "remotecontrol 2" in a cd task: copied from the example)."""
    if request.webshop is not None:  # WebShop names options and products, not "name n" objects
        return False
    named = _objects(request.action)
    if any(obj not in named for obj in _COMMAND.findall(reason.lower())):
        return True
    episode = " ".join([request.initial_observation, request.action]
                       + [f"{s.action} {s.observation}" for s in request.steps])
    if _objects(reason) - _objects(episode):
        return True
    example = " ".join(f"{action} {observation}" for _, action, observation in example_for(request.task_type).steps)
    unseen = {obj.split()[0] for obj in _objects(example)} - set(_words(episode))
    return any(word in unseen or word.rstrip("s") in unseen for word in _words(reason))


# Words a reason may use without the episode showing them: how an agent speaks of its task
# (what it needs, has, does and why), not things. Anything else must be a word of the episode.
_PLAIN_WORDS = frozenset("""
a about after again already also am an and another any are as at be because been before both bring but by can
carry carrying check checking close closed could do does done each empty find first for found from get go goes
going had has have having here hold holding i if in inside into is it it's its just look looking m me more must
my need needs next no not nothing now of on one onto open or other put s second see so some still t take taking
that the then there these this those to too two under up use using want was way what where which while will
with yet clean cleaned heat heated hot cool cooled cold warm turn turned light lamp them they their one ll ve
solve task goal done place room thing things object item often usually maybe probably likely might opened took
went picked looked checked arrived put found saw seen already finally ready say says ask asks asked said
""".split())


def ungrounded(request: ActReRequest, reason: str) -> bool:
    """ALFWorld: the reason speaks of things the episode never showed ("a glass of juice", "the
    kitchen", "the closet"): a word that is neither in the episode so far (task, observations,
    actions, the action explained) nor one of the plain words of acting (_PLAIN_WORDS). A 135M
    model invents such things in about a third of the reasons that pass the other checks."""
    if request.webshop is not None:  # a shopper's reasons speak of product qualities the page may not
        return False
    episode = " ".join([request.initial_observation, request.action]
                       + [f"{s.action} {s.observation}" for s in request.steps])
    known = set(_words(episode)) | _PLAIN_WORDS
    return any(w not in known and w.rstrip("s") not in known and not w.isdigit() for w in _words(reason))


def rejection(request: ActReRequest, reason: str) -> str | None:
    """Why a reason is rejected ("empty", "echo", "other action", "ungrounded"), None if it passes."""
    if not reason:
        return "empty"
    if echoes(request, reason):
        return "echo"
    if names_other_action(request, reason):
        return "other action"
    if ungrounded(request, reason):
        return "ungrounded"
    return None


def fallback_reason(request: ActReRequest) -> str:
    """The thought when every try was rejected. ALFWorld: a plain, true reason read off the task
    and the episode (a3t.envs.alfworld_reasons: "I have the apple 1. I go to the microwave 1 to
    heat it."), so the step still carries where the agent stands in its task; a task sentence
    that is not ALFWorld's: the action tied to the task ("To <task>, I <action> next."); WebShop
    (no task sentence): the action alone. It passes the checks."""
    task = re.search(r"Your task is to: (.+?)\.?\s*$", request.initial_observation)
    if task is None:
        return f"I will {request.action} next."
    reason = plan_reason(task.group(1), [(s.action, s.observation) for s in request.steps], request.action)
    return reason or f"To {task.group(1)}, I {request.action} next."


class ActReAnnotator:
    """Writes the thought for a chosen action, in a batch; rejected reasons are asked again."""

    def __init__(self, llm: LLM, phrasing: Phrasing = "put", sampling: Sampling | None = None, tries: int = 3):
        """``tries`` LLM samples per reason before the fallback; 0: the fallback alone (no LLM call)."""
        self.llm = llm
        self.phrasing = phrasing
        # Greedy first try by default: the reason should be the model's most likely explanation.
        self.sampling = sampling or Sampling(temperature=0.0, max_new_tokens=64)
        self.tries = tries
        self.accepted = 0  # reasons that passed the checks, at any try
        self.rejected = 0  # samples that failed them
        self.fallbacks = 0  # requests whose every try failed: fallback_reason

    def _sampling(self, attempt: int) -> Sampling:
        if attempt == 0:
            return self.sampling
        return replace(self.sampling, temperature=RESAMPLE_TEMPERATURE, seed=(self.sampling.seed or 0) + attempt)

    def reasons(
        self, requests: list[ActReRequest], sessions: list[str] | None = None
    ) -> list[tuple[str, Completion]]:
        """The reason for each request's action, with the completion it came from (its tokens
        summed over the tries). Each try asks only the rejected rows, in one batch. Name a
        session per episode: its next request shares the history, which is then not encoded
        again (nor on a re-ask)."""
        chats = [actre_chat(r, self.phrasing) for r in requests]
        answers: list[str | None] = [None] * len(requests)
        completions: list[Completion | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        for attempt in range(self.tries):
            if not todo:
                break
            got = self.llm.complete([chats[i] for i in todo], self._sampling(attempt), stop_after_first_line,
                                    sessions=None if sessions is None else [sessions[i] for i in todo])
            rejected = []
            for i, completion in zip(todo, got):
                completions[i] = _add_tokens(completions[i], completion)
                reason = parse_reason(completion.text)
                if rejection(requests[i], reason) is None:
                    answers[i] = reason
                else:
                    rejected.append(i)
            self.accepted += len(todo) - len(rejected)
            self.rejected += len(rejected)
            todo = rejected
        for i in todo:
            self.fallbacks += 1
            answers[i] = fallback_reason(requests[i])
            completions[i] = completions[i] or Completion(text="", prompt_tokens=0, completion_tokens=0, stopped=True)
        return list(zip(answers, completions))


def _add_tokens(before: Completion | None, now: Completion) -> Completion:
    """The latest completion, charged with the tokens of the tries before it."""
    if before is None:
        return now
    return replace(now, prompt_tokens=before.prompt_tokens + now.prompt_tokens,
                   completion_tokens=before.completion_tokens + now.completion_tokens)
