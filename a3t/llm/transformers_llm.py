"""In-process transformers backend: batched generation that reuses encoded prompts.

A ReAct episode's prompt grows by one observation per turn, while the system prompt,
the 1-shot example and the history stay the same. Re-encoding all of it each turn is
what makes a naive loop slow, so each session (episode) keeps the keys and values of
the prompt it was last given, and a new prompt starts from the longest common token
prefix it has with any encoded prompt: its own session's (all of it when the chat only
grew), another live session's, or a shared prefix. Rows of one call that share a long
prefix no session holds yet (new episodes of a task type: the system prompt and the
same 1-shot example) get it encoded once, kept as a shared prefix for later episodes.

One call's keys and values live in buffers allocated once (the prompt plus room for the
turn) and written in place, every row's next token in the same column: a cache that
grows by concatenation copies all of itself at every decode step. Rows have different
cached lengths and different new text, so each row is padded on the left of each part
and the padding is masked out; position ids count only real tokens, so a row's positions
are what they would be alone. Rows whose new text differs much in length are encoded in
separate forwards (padding costs as much as text). A row that has finished leaves the
decode batch (the last row takes its place), so decode forwards compute only rows that
are still generating.

A decode forward on a CPU costs about the same for one token per row as for a few: it is
bound by reading the weights. So each row also feeds a draft of the next tokens, what
followed the latest earlier occurrence of its last tokens in its prompt or generation
(prompt lookup: a ReAct turn copies object names and phrases from the observations), and
keeps the draft tokens the model would have picked itself, plus the model's next one.
Greedy text is unchanged; sampling stays exact (speculative sampling). Rejected draft
tokens leave masked holes in the cache, closed when the room runs out.

Constrained rows (``choices``) decode under a token trie of their choices: at every position
the logits of tokens that continue no choice are masked out before the token is picked (greedy
or sampled, drafts verified the same way), so a row can only ever write one of its choices, and
a choice's tokens are the ones it has in context, end-of-turn token included. A draft follows
the trie: the prompt-lookup draft as far as the trie allows it, then the tokens the trie forces.

When a row finishes, its session keeps the real positions of its prompt and of every token
it fed the model. The agent writes the assistant turn back into the chat in its canonical
"Thought: ...\\nAction: ..." form, and the next prompt reuses the cache only as far as its
tokens are the same ones, so what the model conditions on is exactly what training will render;
the action after a thought, and the next turn after an action, then encode only what is new.

With ``lanes`` > 1 a call's rows are split over that many threads, each a batch of its own on
its share of torch's threads: on a few cores, one lane's Python work between forwards (drafts,
stop rules, the next inputs) and its small single-threaded ops run beside the other lane's
forward, where one batch on all cores leaves them idle or spinning.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from a3t.llm.base import Chat, Completion, Sampling, StopRule

# A prefix shared by several rows of a call is encoded once when that saves at least this
# many tokens per row; rows whose new text differs by more than this many tokens are
# encoded in separate forwards. About the tokens one extra forward costs on a CPU.
MIN_SHARED_TOKENS = 64
PAD_SLACK_TOKENS = 64
SHARED_PREFIXES = 8  # shared prefixes kept (least recently used dropped), ~35 MB each for SmolLM2
SHARE_ROUNDS = 3  # levels of shared prefixes encoded per call: system prompt, example, ...
DRAFT_TOKENS = 4  # prompt-lookup draft per row and decode step (0: one token per step)
DRAFT_NGRAM = 3  # the draft follows the latest earlier occurrence of the row's last 3 (else 2, 1) tokens


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, a3t_grouped=False, **kwargs):
    """SDPA, except for the engine's decode forwards of a few tokens per row (``a3t_grouped``):
    there the queries of each key/value head are grouped and attend with two matmuls. SDPA
    would copy every key/value head ``heads / kv_heads`` times (grouped-query attention with
    a mask and more than one query), and its CPU kernel is slow for a few queries over a long
    cache: 2-3x the cost of the whole forward's linear layers at 5 tokens per row."""
    if not a3t_grouped or attention_mask is None:  # no mask: SDPA's causal flag does the masking
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, queries, dim = query.shape
    group = heads // key.shape[1]  # heads g*group ... g*group+group-1 read key/value head g
    scores = torch.matmul(query.reshape(rows, key.shape[1], group * queries, dim), key.transpose(-1, -2))
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:  # rows x 1 x queries x keys, the same for every head
        scores.masked_fill_(~attention_mask.repeat(1, 1, group, 1), float("-inf"))
    out = torch.matmul(scores.softmax(-1), value).reshape(rows, heads, queries, dim)
    return out.transpose(1, 2).contiguous(), None


# Registered under its own name; a model the backend drives is switched to it only if it used SDPA.
# Calls without a3t_grouped (anyone else sharing the model object) run the stock SDPA path.
AttentionInterface.register("a3t_sdpa", _attention)
AttentionMaskInterface.register("a3t_sdpa", sdpa_mask)


@dataclass(eq=False)  # compared by identity: the shared-prefix list finds an entry by its object
class _Session:
    ids: list[int]  # the prompt tokens that keys/values encode
    keys: list[torch.Tensor]  # per layer: [kv_heads, length, head_dim]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def truncated(self, n: int) -> _Session | None:
        """The session's first n tokens (None if n == 0): what a new prompt shares with it."""
        if n == len(self.ids):
            return self
        if n == 0:
            return None
        return _Session(self.ids[:n], [k[:, :n] for k in self.keys], [v[:, :n] for v in self.values])


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most limit (at least one new token must be
    encoded to get the next-token logits)."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class _BufferLayer(DynamicLayer):
    """One layer's cache for one forward, over columns [start, end) of preallocated
    buffers (rows x kv_heads x columns x head_dim): the forward's new keys and values are
    written in place after ``end``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int):
        super().__init__()
        self.buffers, self.start, self.end = (keys, values), start, end
        self.is_initialized = True
        self.keys, self.values = keys[:, :, start:end], values[:, :, start:end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.buffers
        end = self.end + key_states.shape[-2]
        keys[:, :, self.end : end] = key_states
        values[:, :, self.end : end] = value_states
        self.end = end
        self.keys, self.values = keys[:, :, self.start : end], values[:, :, self.start : end]
        return self.keys, self.values


class _Batch:
    """The keys and values of one call's rows. Every row's prompt ends at column ``end``
    (left padding), so each decode step writes one column for all rows. Rows [0, active)
    are still generating; ``order[slot]`` is the call's row index held in a slot."""

    def __init__(self, model, rows: int, columns: int, device):
        cfg = model.config
        shape = (rows, cfg.num_key_value_heads, columns,
                 getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        dtype = model.get_input_embeddings().weight.dtype  # hidden states, hence keys, have its dtype
        # Zeros, not empty: a masked column is still multiplied by 0 in attention, and garbage could be NaN.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.mask = torch.zeros(rows, columns, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # real tokens per slot
        self.order = list(range(rows))
        self.active = rows
        self.end = 0

    def cache(self, rows: slice, start: int, end: int) -> Cache:
        return Cache(layers=[_BufferLayer(k[rows], v[rows], start, end) for k, v in zip(self.keys, self.values)])

    def put_past(self, slot: int, past: _Session, end: int) -> None:
        """A row's cached keys/values, ending at column ``end``."""
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[slot, :, end - past.length : end] = past.keys[layer]
            values[slot, :, end - past.length : end] = past.values[layer]
        self.mask[slot, end - past.length : end] = 1

    def session(self, slot: int, ids: list[int]) -> _Session:
        """A copy of a slot's real (unpadded) keys/values: ``ids``'s encoding."""
        real = self.mask[slot, : self.end].nonzero().squeeze(-1)
        return _Session(ids=ids, keys=[k[slot].index_select(1, real) for k in self.keys],
                        values=[v[slot].index_select(1, real) for v in self.values])

    def compact(self) -> None:
        """Close the holes that rejected draft tokens left: every active row's real columns move
        right-aligned to a new, smaller ``end``."""
        reals = [self.mask[slot, : self.end].nonzero().squeeze(-1) for slot in range(self.active)]
        end = max(len(real) for real in reals)
        for slot, real in enumerate(reals):
            for keys, values in zip(self.keys, self.values):
                keys[slot, :, end - len(real) : end] = keys[slot].index_select(1, real)
                values[slot, :, end - len(real) : end] = values[slot].index_select(1, real)
            self.mask[slot] = 0
            self.mask[slot, end - len(real) : end] = 1
        self.end = end

    def drop(self, slot: int) -> None:
        """Take a finished row out of the decode batch: the last active row moves into its slot."""
        last = self.active - 1
        if slot != last:
            for keys, values in zip(self.keys, self.values):
                keys[slot, :, : self.end] = keys[last, :, : self.end]
                values[slot, :, : self.end] = values[last, :, : self.end]
            self.mask[slot, : self.end] = self.mask[last, : self.end]
            self.lengths[slot] = self.lengths[last]
            self.order[slot] = self.order[last]
        self.active = last


def _groups(lengths: list[int], slack: int) -> list[list[int]]:
    """Rows (indices into lengths) in groups of similar length, longest first: one forward
    each, padded to its longest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] - lengths[i] <= slack:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _shared_prefixes(prompts: list[list[int]], cached: list[int], min_shared: int) -> list[list[int]]:
    """Prefixes that several prompts share, each at least ``min_shared`` tokens longer than
    what those prompts already have cached (``cached[i]`` tokens). In sorted order, prompts
    that share a prefix are neighbours; every run of neighbours whose common prefixes are
    all >= v shares v tokens (a prefix tree: the system prompt for all, an example for the
    prompts of one task type, ...). Shortest first: a longer one builds on a shorter one."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    common = [_common_prefix(prompts[a], prompts[b], min(len(prompts[a]), len(prompts[b])) - 1)
              for a, b in zip(order, order[1:])]
    found: dict[tuple[int, ...], None] = {}
    for i, v in enumerate(common):
        lo, hi = i, i + 1  # the run of prompts order[lo..hi] sharing v tokens
        while lo > 0 and common[lo - 1] >= v:
            lo -= 1
        while hi < len(common) and common[hi] >= v:
            hi += 1
        rows = order[lo : hi + 1]
        if v - max(cached[r] for r in rows) >= min_shared:
            found[tuple(prompts[rows[0]][:v])] = None
    return sorted((list(p) for p in found), key=len)


class _ChoiceTrie:
    """A row's choices as a token trie: a node is a dict token -> child; a node where a choice's
    tokens end holds the choice text under the key None."""

    def __init__(self, sequences: dict[str, list[int]]):
        self.root: dict = {}
        self.longest = max(len(ids) for ids in sequences.values())
        for text, ids in sequences.items():
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node.setdefault(None, text)  # of two choices with the same tokens, the first one

    def walk(self, node: dict, tokens: list[int]) -> dict | None:
        """The node after ``tokens`` from ``node``; None if they leave the trie."""
        for token in tokens:
            node = node.get(token)
            if node is None:
                return None
        return node

    @staticmethod
    def allowed(node: dict) -> list[int]:
        return [token for token in node if token is not None]

    def draft(self, node: dict, lookup: list[int], budget: int) -> list[int]:
        """The lookup draft as far as the trie allows it, then the tokens the trie forces."""
        taken: list[int] = []
        for token in lookup:
            if len(taken) >= budget or token not in node:
                break
            taken.append(token)
            node = node[token]
        while len(taken) < budget and len(node) == 1 and None not in node:
            token = next(iter(node))
            taken.append(token)
            node = node[token]
        return taken


class TransformersLLM:
    """Any local HF causal LM folder, optionally with a peft adapter and 4-bit weights.

    Loaded from a folder, the base model is this process's shared copy (a3t.llm.shared): LLMs
    of the same model with different adapters hold one base model, each call under its own
    adapter. A ``model`` object passed in is used as it is."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        adapter: str | Path | None = None,
        load_in_4bit: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
        name: str | None = None,
        model=None,
        tokenizer=None,
        draft_tokens: int = DRAFT_TOKENS,
        lanes: int = 1,
    ):
        from a3t.llm.shared import SharedModel, shared_model

        if model is None:
            self._shared = shared_model(model_path, load_in_4bit=load_in_4bit, dtype=dtype, device=device)
            self._adapter_name = self._shared.attach(adapter) if adapter else None
        else:
            self._shared, self._adapter_name = SharedModel(model, tokenizer), None
        model, tokenizer = self._shared.model, self._shared.tokenizer
        self.tokenizer = tokenizer
        self.name = name or (Path(model_path).name if model_path else type(model).__name__)
        self.adapter = str(adapter) if adapter else None
        self.device = next(model.parameters()).device
        self._sessions: dict[str, _Session] = {}
        self._prefixes: list[_Session] = []  # shared prefixes, least recently used first
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._end_ids = {i for i in eos + [tokenizer.eos_token_id] if i is not None}
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._end_ids))
        self.draft_tokens = draft_tokens
        self.lanes = lanes
        # Else drafts go through the model's own attention. (A shared model may have it set already.)
        self._grouped = model.config._attn_implementation in ("sdpa", "a3t_sdpa")
        if self._grouped:
            model.set_attn_implementation("a3t_sdpa")

    @property
    def model(self):
        """The model (with a shared base: wrapped by peft once an adapter is attached)."""
        return self._shared.model

    def release(self, sessions: list[str]) -> None:
        for session in sessions:
            self._sessions.pop(session, None)

    def render(self, chat: Chat) -> str:
        """The prompt text; a chat that ends with an assistant message is continued from it (the
        start of the reply is written for the model), else a new reply is opened."""
        if chat and chat[-1]["role"] == "assistant":
            return self.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def complete(
        self,
        chats: list[Chat],
        sampling: Sampling,
        stop: StopRule | None = None,
        sessions: list[str] | None = None,
        choices: list[list[str] | None] | None = None,
    ) -> list[Completion]:
        if not chats:
            return []
        with self._shared.using(self._adapter_name):  # the whole call under this LLM's adapter
            return self._complete(chats, sampling, stop, sessions, choices)

    def _complete(self, chats, sampling, stop, sessions, choices) -> list[Completion]:
        sessions = sessions or [None] * len(chats)
        choices = choices or [None] * len(chats)
        # Tokenize the whole chat (cheap next to the model), as training will, so the
        # tokens the model sees are exactly the ones it is later trained on.
        texts = [self.render(chat) for chat in chats]
        prompts = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        tries = [None if options is None else self._trie(chat, text, ids, options)
                 for chat, text, ids, options in zip(chats, texts, prompts, choices)]
        pasts = [self._past(ids, session) for ids, session in zip(prompts, sessions)]
        for _ in range(SHARE_ROUNDS):  # shortest first: a longer shared prefix starts from a shorter one
            prefixes = _shared_prefixes(prompts, [p.length if p else 0 for p in pasts], MIN_SHARED_TOKENS)
            if not prefixes:
                break
            self._share([p for p in prefixes if not any(len(q) < len(p) and p[: len(q)] == q for q in prefixes)])
            pasts = [self._past(ids, session) for ids, session in zip(prompts, sessions)]
        new_ids = [ids[past.length :] if past else ids for ids, past in zip(prompts, pasts)]

        # Room for the turn; rejected draft tokens leave holes, closed (compact) if it runs out.
        turn = max([sampling.max_new_tokens] + [t.longest for t in tries if t is not None])
        lanes = min(self.lanes, len(chats))
        parts = [list(range(lane, len(chats), lanes)) for lane in range(lanes)]
        args = [([pasts[r] for r in rows], [new_ids[r] for r in rows], 2 * turn + self.draft_tokens,
                 _lane_sampling(sampling, lane), stop, [prompts[r] for r in rows], [tries[r] for r in rows],
                 [sessions[r] for r in rows]) for lane, rows in enumerate(parts)]
        if lanes == 1:
            done = [self._generate(*args[0])]
        else:  # each lane's share of the cores; a new thread would start with all of them
            threads = max(1, torch.get_num_threads() // lanes)
            jobs = [_lane_pool(lanes).submit(self._generate_in_lane, threads, *lane_args) for lane_args in args]
            wait(jobs)  # all of them, even after a failure: the model's lock is released on return
            done = [job.result() for job in jobs]
        completions: list[Completion] = [None] * len(chats)  # type: ignore[list-item]
        kept: list[_Session | None] = [None] * len(chats)
        for rows, (lane_completions, lane_kept) in zip(parts, done):
            for row, c, session in zip(rows, lane_completions, lane_kept):
                completions[row] = Completion(c.text, len(new_ids[row]), c.completion_tokens, c.stopped)
                kept[row] = session
        # Kept in row order, whichever lane finished first: _past takes the first of equally long
        # matches, so the order of the sessions must not depend on the threads' timing.
        for row, session in enumerate(kept):
            if sessions[row]:
                self._sessions[sessions[row]] = session
        return completions

    def _generate(self, pasts, new_ids, extra_columns, sampling, stop, prompts, tries, sessions):
        """The completions of some rows, and the session each row keeps."""
        batch, logits = self._prefill(pasts, new_ids, extra_columns=extra_columns)
        return self._decode(batch, logits[:, -1], sampling, stop, prompts, tries, sessions)

    def _generate_in_lane(self, threads: int, *args):
        torch.set_num_threads(threads)  # this thread's own OpenMP team
        with torch.inference_mode():  # a mode of the thread that sets it
            return self._generate(*args)

    def _trie(self, chat: Chat, prompt_text: str, prompt_ids: list[int], options: list[str]) -> _ChoiceTrie:
        """The token trie of a chat's choices: each choice's tokens as they are in the whole
        rendered turn (the chat's last message + " " + the choice, closed by the template), up to
        and including the end-of-turn token."""
        if not options:
            raise ValueError("a constrained chat needs at least one choice")
        if not chat or chat[-1]["role"] != "assistant":
            raise ValueError("a constrained chat ends with the assistant message its choice continues")
        head = chat[:-1]
        texts = [self.tokenizer.apply_chat_template(head + [{"role": "assistant", "content": chat[-1]["content"]
                                                              + " " + option}], tokenize=False)
                 for option in options]
        sequences = {}
        for option, ids in zip(options, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(f"the tokenizer merges the choice {option!r} into the prompt's last token: "
                                 "end the constrained message where a new word starts (e.g. after 'Action:')")
            tail = ids[len(prompt_ids) :]
            end = next((i for i, token in enumerate(tail) if token in self._end_ids), len(tail) - 1)
            sequences[option] = tail[: end + 1]
        return _ChoiceTrie(sequences)

    def _past(self, ids: list[int], session: str | None) -> _Session | None:
        """The longest encoded prefix of ``ids``: the session's own, another session's, or a shared one."""
        own = self._sessions.get(session) if session else None
        candidates = ([own] if own else []) + list(self._sessions.values()) + self._prefixes[::-1]
        best, best_n = None, 0
        for candidate in candidates:
            n = _common_prefix(candidate.ids, ids, limit=len(ids) - 1)
            if n > best_n:
                best, best_n = candidate, n
        if best in self._prefixes:  # used: most recently
            self._prefixes.remove(best)
            self._prefixes.append(best)
        return best.truncated(best_n) if best else None

    def _share(self, prefixes: list[list[int]]) -> None:
        """Encode prefixes that several rows share, and keep them for any later prompt."""
        pasts = [self._past(ids, None) for ids in prefixes]
        batch, _ = self._prefill(pasts, [ids[past.length :] if past else ids for ids, past in zip(prefixes, pasts)])
        for slot, row in enumerate(batch.order):
            self._prefixes.append(batch.session(slot, prefixes[row]))
        del self._prefixes[:-SHARED_PREFIXES]

    def _prefill(self, pasts: list[_Session | None], new_ids: list[list[int]], extra_columns: int = 0):
        """Encode every row's new tokens after its past, in groups of similar length; returns the
        batch (slots in group order) and each slot's next-token logits."""
        groups = _groups([len(ids) for ids in new_ids], PAD_SLACK_TOKENS)
        # per group: the longest past and the longest new part; all prompts end at column `end`
        widths = [(max((pasts[r].length for r in g if pasts[r]), default=0), max(len(new_ids[r]) for r in g))
                  for g in groups]
        end = max(p + n for p, n in widths)
        batch = _Batch(self.model, len(new_ids), end + extra_columns, self.device)
        batch.order = [row for g in groups for row in g]
        logits, first = [], 0
        for group, (past_width, width) in zip(groups, widths):
            slots = slice(first, first + len(group))
            input_ids = torch.full((len(group), width), self._pad_id, dtype=torch.long, device=self.device)
            for i, row in enumerate(group):
                if pasts[row]:
                    batch.put_past(first + i, pasts[row], end - width)
                ids = new_ids[row]
                input_ids[i, width - len(ids) :] = torch.tensor(ids, device=self.device)
                batch.mask[first + i, end - len(ids) : end] = 1
            start = end - width - past_width
            mask = batch.mask[slots, start:end]
            # Positions count real tokens only, so padding anywhere in the row changes nothing.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
            logits.append(self._forward(input_ids, mask, positions, batch.cache(slots, start, end - width)))
            first += len(group)
        batch.end = end
        batch.lengths = batch.mask[:, :end].sum(-1)
        return batch, torch.cat(logits)  # rows x 1 x vocabulary

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache,
                 keep: int = 1) -> torch.Tensor:
        """Logits (float) of each row's last ``keep`` positions: rows x keep x vocabulary."""
        width = input_ids.shape[1]
        # The kept positions by index, not by slice: an index copies their hidden states into a
        # contiguous tensor, whereas a slice of a prefill's last position is a strided view that
        # the LM head's matmul multiplies with a weight expanded per row, which bfloat16 on a CPU
        # materializes (the vocabulary's weights copied once per row: 40% of a prefill forward).
        keep_at = keep if keep == width else torch.arange(width - keep, width, device=self.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep_at,
            a3t_grouped=self._grouped and width > 1 and keep > 1,
        )
        return out.logits.float()

    @staticmethod
    def _probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def _verify(self, logits: torch.Tensor, drafts: list[list[int]], sampling: Sampling, generator) -> list[list[int]]:
        """The tokens each slot takes from one forward over [its last token, its draft]: the
        draft's tokens as long as they are what the model picks, then the model's own token.
        Greedy: a draft token is kept if it is the argmax. Sampling: kept with the probability
        the model gives it, else the next token is drawn with that token excluded; this is
        speculative sampling with a one-token draft distribution, so every token is distributed
        as if it had been sampled alone."""
        if sampling.temperature <= 0:
            best = logits.argmax(-1).tolist()
            picks = []
            for draft, row in zip(drafts, best):
                n = 0
                while n < len(draft) and draft[n] == row[n]:
                    n += 1
                picks.append(draft[:n] + [row[n]])
            return picks
        picks = []
        for draft, row in zip(drafts, logits):
            probs = self._probs(row[: len(draft) + 1], sampling)
            taken: list[int] = []
            for n, token in enumerate(draft):
                if torch.rand(1, generator=generator, device=self.device).item() >= probs[n, token].item():
                    rest = probs[n].clone()
                    rest[token] = 0.0
                    break
                taken.append(token)
            else:
                rest = probs[len(draft)]
            picks.append(taken + [torch.multinomial(rest, 1, generator=generator).item()])
        return picks

    def _decode(self, batch: _Batch, logits, sampling: Sampling, stop: StopRule | None, prompts: list[list[int]],
                tries: list[_ChoiceTrie | None], sessions: list[str | None]):
        """Each row's completion, and (rows with a session) the keys and values of its prompt and of
        every token it fed the model, taken when it leaves the batch: the next call of an episode
        (the action after its thought, the next turn) encodes only what is new."""
        rows = logits.shape[0]
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        generated: list[list[int]] = [[] for _ in range(rows)]
        fed: list[list[int]] = [[] for _ in range(rows)]  # the tokens in the row's cache after its prompt
        kept: list[_Session | None] = [None] * rows
        texts = [""] * rows
        stopped = [False] * rows
        nodes = [trie.root if trie else None for trie in tries]  # a constrained row's place in its trie
        if sampling.max_new_tokens <= 0:
            self._keep_sessions(batch, range(batch.active), prompts, fed, sessions, kept)
            batch.active = 0
        # picks[slot]: the tokens a slot's last forward gave it; the last of them is not in the cache yet
        logits = self._constrain(logits.unsqueeze(1), batch, nodes, [[]] * rows)
        picks = self._verify(logits, [[]] * rows, sampling, generator)
        while True:
            finished = []
            for slot in range(batch.active):
                row = batch.order[slot]
                if nodes[row] is not None:
                    if self._take_choice(row, picks[slot], nodes, generated, texts, stopped):
                        finished.append(slot)
                    continue
                for token in picks[slot]:
                    if token in self._end_ids:
                        stopped[row] = True
                        break
                    generated[row].append(token)
                    texts[row] = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                    cut = stop(texts[row]) if stop else None
                    if cut is not None:
                        texts[row], stopped[row] = texts[row][:cut], True
                        break
                    if len(generated[row]) >= sampling.max_new_tokens:
                        break
                else:
                    continue
                finished.append(slot)
            self._keep_sessions(batch, finished, prompts, fed, sessions, kept)
            for slot in reversed(finished):  # from the back: a moved row is never one still to drop
                batch.drop(slot)
                picks[slot] = picks[batch.active]
            if batch.active == 0:
                break
            active = slice(0, batch.active)
            # Each row's draft: what followed the latest earlier occurrence of its last tokens in its
            # prompt or generation (ReAct turns copy names and phrases from the observations).
            drafts = [self._row_draft(prompts[row] + generated[row], tries[row], nodes[row],
                                      self._draft_budget(generated[row], sampling, tries[row]))
                      for row in batch.order[: batch.active]]
            width = 1 + max(len(draft) for draft in drafts)
            if batch.end + width > batch.mask.shape[1]:
                batch.compact()
            input_ids = torch.full((batch.active, width), self._pad_id, dtype=torch.long, device=self.device)
            inputs = [[picks[slot][-1]] + draft for slot, draft in enumerate(drafts)]
            for slot, tokens in enumerate(inputs):
                input_ids[slot, : len(tokens)] = torch.tensor(tokens, device=self.device)
                batch.mask[slot, batch.end : batch.end + len(tokens)] = 1
            mask = batch.mask[active, : batch.end + width]
            positions = batch.lengths[active].unsqueeze(-1) + torch.arange(width, device=self.device)
            logits = self._forward(input_ids, mask, positions, batch.cache(active, 0, batch.end), keep=width)
            picks = self._verify(self._constrain(logits, batch, nodes, drafts), drafts, sampling, generator)
            for slot, (draft, taken) in enumerate(zip(drafts, picks)):
                # in the cache now: the last token and the draft tokens kept; rejected ones are holes
                fed[batch.order[slot]] += inputs[slot][: len(taken)]
                batch.mask[slot, batch.end + len(taken) : batch.end + 1 + len(draft)] = 0
                batch.lengths[slot] += len(taken)
            batch.end += width
        return [Completion(text=texts[b], prompt_tokens=0, completion_tokens=len(generated[b]), stopped=stopped[b])
                for b in range(rows)], kept

    @staticmethod
    def _keep_sessions(batch: _Batch, slots, prompts, fed, sessions: list[str | None], kept: list) -> None:
        """Before finished slots leave the batch: the cache of each that has a session."""
        for slot in slots:
            row = batch.order[slot]
            if sessions[row]:
                kept[row] = batch.session(slot, prompts[row] + fed[row])

    def _draft_budget(self, generated: list[int], sampling: Sampling, trie: _ChoiceTrie | None) -> int:
        """Draft tokens worth checking: the row can take at most max_new_tokens - 1 more after the next
        (a constrained row: its longest choice)."""
        limit = sampling.max_new_tokens if trie is None else trie.longest
        return max(0, min(self.draft_tokens, limit - len(generated) - 1))

    @staticmethod
    def _row_draft(context: list[int], trie: _ChoiceTrie | None, node: dict | None, budget: int) -> list[int]:
        if trie is None:
            return _draft(context, budget)
        return trie.draft(node, _draft(context, budget), budget)

    @staticmethod
    def _constrain(logits: torch.Tensor, batch: _Batch, nodes: list, drafts: list[list[int]]) -> torch.Tensor:
        """Mask, for each constrained slot and each position of its forward (its last token, then
        its draft), the tokens that continue none of its choices. A position after a draft token
        that leaves the trie, or ends a choice, is never used: verification stops there."""
        for slot in range(logits.shape[0]):
            node = nodes[batch.order[slot]]
            for n in range(len(drafts[slot]) + 1):
                allowed = _ChoiceTrie.allowed(node) if node is not None else []
                if not allowed:  # past the end of a choice (or off the trie): a position never used
                    break
                keep = torch.tensor(allowed, dtype=torch.long, device=logits.device)
                row = logits[slot, n]
                masked = torch.full_like(row, float("-inf"))
                masked[keep] = row[keep]
                logits[slot, n] = masked
                node = node.get(drafts[slot][n]) if n < len(drafts[slot]) else None
        return logits

    def _take_choice(self, row: int, picks: list[int], nodes: list, generated, texts, stopped) -> bool:
        """A constrained row takes its picked tokens (all in its trie); True when it has written a
        whole choice, which is then its text."""
        for token in picks:
            generated[row].append(token)
            nodes[row] = nodes[row][token]
            if None in nodes[row] and (token in self._end_ids or len(nodes[row]) == 1):
                texts[row], stopped[row] = nodes[row][None], True
                generated[row] = [t for t in generated[row] if t not in self._end_ids]
                return True
        return False


_LANE_POOLS: dict[int, ThreadPoolExecutor] = {}
_LANE_POOLS_LOCK = threading.Lock()


def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """The process's threads for calls split in ``lanes`` lanes (a call holds the model's lock, so
    one pool per lane count serves every LLM of the process)."""
    with _LANE_POOLS_LOCK:
        if lanes not in _LANE_POOLS:
            _LANE_POOLS[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix=f"a3t-lane{lanes}")
        return _LANE_POOLS[lanes]


def _lane_sampling(sampling: Sampling, lane: int) -> Sampling:
    """A lane's own seed: lanes that drew the same random numbers would sample alike."""
    return sampling if lane == 0 or sampling.seed is None else replace(sampling, seed=sampling.seed + 1_000_003 * lane)


def _draft(context: list[int], budget: int) -> list[int]:
    """Prompt lookup: the (up to ``budget``) tokens that followed the latest earlier
    occurrence of the context's last DRAFT_NGRAM tokens (else fewer); none if none occurs."""
    if budget <= 0 or len(context) < 2:
        return []
    ids = np.asarray(context)
    for n in range(min(DRAFT_NGRAM, len(ids) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # each ends before the last token
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return ids[start : start + budget].tolist()
    return []
