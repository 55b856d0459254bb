"""In-process transformers backend: batched generation that reuses each episode's KV cache.

A ReAct episode's prompt grows by one observation per turn, while the system prompt,
the 1-shot example and the history stay the same. Re-encoding all of it each turn is
what makes a naive loop slow, so each session (episode) keeps the keys and values of
the prompt it was last given; the next call reuses the longest common token prefix
(all of it when the chat only grew) and encodes only the rest.

One call runs a batch of rows. Rows have different cached lengths and different new
text, so the batch is padded on the left of each part and the padding is masked out;
position ids count only real tokens, so a row's positions are what they would be alone.
After the prompt is encoded, each session keeps its real positions only (the padding
is dropped). Generated tokens are not kept: the agent writes the assistant turn back
into the chat in its canonical "Thought: ...\nAction: ..." form, and that text is
encoded with the next observation, so what the model conditions on is exactly what
training will render.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from a3t.llm.base import Chat, Completion, Sampling, StopRule


@dataclass
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
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n


class TransformersLLM:
    """Any local HF causal LM folder, optionally with a peft adapter and 4-bit weights."""

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
    ):
        if model is None:
            from a3t.llm.models import load_model

            model, tokenizer = load_model(model_path, adapter=adapter, load_in_4bit=load_in_4bit, dtype=dtype, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.name = name or (Path(model_path).name if model_path else type(model).__name__)
        self.adapter = str(adapter) if adapter else None
        self.device = next(model.parameters()).device
        self._sessions: dict[str, _Session] = {}
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._end_ids = {i for i in eos + [tokenizer.eos_token_id] if i is not None}
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._end_ids))

    def release(self, sessions: list[str]) -> None:
        for session in sessions:
            self._sessions.pop(session, None)

    def render(self, chat: Chat) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def complete(
        self,
        chats: list[Chat],
        sampling: Sampling,
        stop: StopRule | None = None,
        sessions: list[str] | None = None,
    ) -> list[Completion]:
        if not chats:
            return []
        sessions = sessions or [None] * len(chats)
        # Tokenize the whole chat (cheap next to the model), as training will, so the
        # tokens the model sees are exactly the ones it is later trained on.
        prompts = [self.tokenizer(self.render(chat), add_special_tokens=False)["input_ids"] for chat in chats]
        pasts: list[_Session | None] = []
        new_ids: list[list[int]] = []
        for ids, session in zip(prompts, sessions):
            past = self._sessions.get(session) if session else None
            if past is not None:
                past = past.truncated(_common_prefix(past.ids, ids, limit=len(ids) - 1))
            pasts.append(past)
            new_ids.append(ids[len(past.ids) :] if past else ids)

        cache, mask = self._assemble(pasts)
        logits, mask = self._prefill(new_ids, cache, mask)
        for b, session in enumerate(sessions):
            if session:
                self._sessions[session] = self._extract(cache, mask, b, prompts[b])
        return self._decode(logits, cache, mask, sampling, stop, [len(ids) for ids in new_ids])

    def _assemble(self, pasts: list[_Session | None]) -> tuple[DynamicCache, torch.Tensor]:
        """Stack the rows' cached keys/values, left-padded to the longest."""
        cache = DynamicCache(config=self.model.config)
        longest = max((p.length for p in pasts if p), default=0)
        mask = torch.zeros(len(pasts), longest, dtype=torch.long, device=self.device)
        if longest == 0:
            return cache, mask
        template = next(p for p in pasts if p)
        for layer in range(len(template.keys)):
            heads, _, dim = template.keys[layer].shape
            keys = template.keys[layer].new_zeros(len(pasts), heads, longest, dim)
            values = torch.zeros_like(keys)
            for b, past in enumerate(pasts):
                if past:
                    keys[b, :, longest - past.length :] = past.keys[layer]
                    values[b, :, longest - past.length :] = past.values[layer]
            cache.update(keys, values, layer)
        for b, past in enumerate(pasts):
            if past:
                mask[b, longest - past.length :] = 1
        return cache, mask

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        # Positions count real tokens only, so padding anywhere in the row changes nothing.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, new_ids: list[list[int]], cache: DynamicCache, mask: torch.Tensor):
        width = max(len(ids) for ids in new_ids)
        input_ids = torch.full((len(new_ids), width), self._pad_id, dtype=torch.long, device=self.device)
        new_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(new_ids):
            if ids:
                input_ids[b, width - len(ids) :] = torch.tensor(ids, device=self.device)
                new_mask[b, width - len(ids) :] = 1
        mask = torch.cat([mask, new_mask], dim=1)
        return self._forward(input_ids, mask, cache), mask

    @staticmethod
    def _extract(cache: DynamicCache, mask: torch.Tensor, b: int, ids: list[int]) -> _Session:
        real = mask[b].nonzero().squeeze(-1)
        keys = [layer.keys[b].index_select(1, real) for layer in cache.layers]
        values = [layer.values[b].index_select(1, real) for layer in cache.layers]
        return _Session(ids=ids, keys=keys, values=values)

    def _pick(self, logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
        if sampling.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _decode(self, logits, cache, mask, sampling: Sampling, stop: StopRule | None, prompt_tokens: list[int]):
        rows = logits.shape[0]
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        generated: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        stopped = [False] * rows
        active = torch.ones(rows, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_new_tokens):
            tokens = self._pick(logits, sampling, generator)
            for b in active.nonzero().squeeze(-1).tolist():
                token = tokens[b].item()
                if token in self._end_ids:
                    stopped[b], active[b] = True, False
                    continue
                generated[b].append(token)
                text = self.tokenizer.decode(generated[b], skip_special_tokens=True)
                cut = stop(text) if stop else None
                if cut is not None:
                    text, stopped[b], active[b] = text[:cut], True, False
                texts[b] = text
            if not active.any() or step == sampling.max_new_tokens - 1:
                break
            step_ids = torch.where(active, tokens, torch.full_like(tokens, self._pad_id)).unsqueeze(-1)
            mask = torch.cat([mask, active.long().unsqueeze(-1)], dim=1)
            logits = self._forward(step_ids, mask, cache)
        return [
            Completion(text=texts[b], prompt_tokens=prompt_tokens[b], completion_tokens=len(generated[b]), stopped=stopped[b])
            for b in range(rows)
        ]
