"""LLM backends behind one protocol (a3t.llm.base.LLM)."""

from __future__ import annotations

from a3t.config import LLMConfig
from a3t.llm.base import LLM


def load_llm(cfg: LLMConfig) -> LLM:
    """The backend a config asks for: an in-process model or an OpenAI-compatible server."""
    if cfg.backend == "openai":
        from a3t.llm.openai_http import OpenAICompatibleLLM

        return OpenAICompatibleLLM(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                                   timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                                   structured_output=cfg.structured_output)
    from a3t.llm.models import compute_dtype, resolve_model_path
    from a3t.llm.transformers_llm import TransformersLLM

    path = resolve_model_path(cfg.model)
    return TransformersLLM(path, adapter=cfg.adapter, load_in_4bit=cfg.load_in_4bit, dtype=compute_dtype(cfg.dtype, cfg.device),
                           device=cfg.device,
                           draft_tokens=cfg.draft_tokens, lanes=cfg.lanes)
