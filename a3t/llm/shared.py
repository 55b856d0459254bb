"""One loaded base model per process, shared by every in-process LLM that asks for it.

A round's rollout, ActRe and evaluation (and the next round's rollout) all use the same
base weights; only the LoRA adapter differs. Loading the base once and attaching each
adapter to it once (peft's ``load_adapter``), then switching with ``set_adapter`` (or
``disable_adapter`` for the plain base model) per call, replaces a model load per step
with a pointer switch. Rollout shards on threads share the model too: a lock makes each
call run under its own adapter from start to end.

Training loads its own copy (``a3t.train``): a model meant for inference may have its 4-bit
weights repacked into a layout without a backward pass (``a3t.llm.models.load_model``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from a3t.llm import models


@dataclass
class SharedModel:
    """A base model with the adapters attached to it so far, and the lock its calls take."""

    model: Any  # the base model; a peft PeftModel around it once an adapter is attached
    tokenizer: Any
    lock: threading.RLock = field(default_factory=threading.RLock)
    adapters: dict[tuple, str] = field(default_factory=dict)  # adapter's stamp -> its peft name
    merged: str | None = None  # the adapter whose weights are merged into the base weights now
    _saved: list = field(default_factory=list)  # (LoRA layer, its base weight before the merge)

    def attach(self, adapter: str | Path) -> str:
        """The peft name of ``adapter`` (a folder), loaded onto the base model the first time. An
        adapter folder rewritten since (a round trained again after a rollback) loads anew."""
        from peft import PeftModel

        stamp = _stamp(Path(adapter))
        with self.lock:
            if stamp not in self.adapters:
                name = f"adapter_{len(self.adapters)}"
                if isinstance(self.model, PeftModel):
                    self._unmerge()  # peft would unmerge by subtraction, rounding the weights
                    self.model.load_adapter(str(adapter), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(adapter), adapter_name=name)
                    self.model.eval()
                self.adapters[stamp] = name
            return self.adapters[stamp]

    @contextmanager
    def using(self, adapter_name: str | None):
        """Hold the model with ``adapter_name`` active (None: the base model alone).

        A full-precision base gets the active adapter merged into its weights (peft's
        merge_adapter): the forward then runs no LoRA branch, which cost a fifth of SmolLM2's
        decode time on a CPU in float32, and made bfloat16 slower than float32. Unmerging
        copies back the weights saved before the merge rather than subtracting the update
        again, so the base stays bit for bit itself in any dtype (a bfloat16 subtraction would
        round it by about 1e-3 per switch). A 4-bit base keeps its adapters unmerged (merging
        would quantize the adapter's weights)."""
        with self.lock:
            if not self.adapters:
                yield self.model
                return
            if self._mergeable():
                if self.merged != adapter_name:
                    self._unmerge()
                    if adapter_name is not None:
                        self._merge(adapter_name)
                if adapter_name is None:
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
            elif adapter_name is None:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(adapter_name)
                yield self.model

    def _mergeable(self) -> bool:
        return not getattr(self.model.base_model.model, "is_loaded_in_4bit", False)

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _merge(self, adapter_name: str) -> None:
        self.model.set_adapter(adapter_name)
        layers = [m for m in self._lora_layers() if adapter_name in m.lora_A]
        self._saved = [(m, m.get_base_layer().weight.detach().clone()) for m in layers]
        self.model.merge_adapter()
        self.merged = adapter_name

    def _unmerge(self) -> None:
        if self.merged is None:
            return
        for layer, weight in self._saved:
            layer.get_base_layer().weight.data.copy_(weight)
            layer.merged_adapters.clear()
        self._saved = []
        self.merged = None


def _stamp(adapter: Path) -> tuple:
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    weights = [p.stat() for p in sorted(adapter.glob("adapter_model.*"))]
    return (str(adapter.resolve()), *[(s.st_mtime_ns, s.st_size) for s in weights])


_LOADED: dict[tuple, SharedModel] = {}
_LOADING = threading.Lock()


def shared_model(path: str | Path, load_in_4bit: bool = False, dtype: str = "float32", device: str = "cpu") -> SharedModel:
    """This process's copy of the base model at ``path`` loaded this way, loaded on first use."""
    key = (str(Path(path).expanduser().resolve()), load_in_4bit, dtype, device)
    with _LOADING:
        if key not in _LOADED:
            model, tokenizer = models.load_model(path, load_in_4bit=load_in_4bit, dtype=dtype, device=device)
            _LOADED[key] = SharedModel(model, tokenizer)
        return _LOADED[key]


def release_shared_models() -> None:
    """Forget every shared model (their memory goes once no LLM holds them)."""
    with _LOADING:
        _LOADED.clear()
