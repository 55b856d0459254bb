"""One base model per process: LLMs of one model share its weights, each call runs under its own
adapter, and a round's rollout, ActRe and evaluation load the model once."""

import threading

import pytest
import torch

from a3t.config import load_config
from a3t.llm import models
from a3t.llm.base import Sampling
from a3t.llm.shared import release_shared_models
from a3t.llm.transformers_llm import TransformersLLM

CHATS = [[{"role": "user", "content": "You are in a kitchen. Your task is to: put a mug in cabinet."}],
         [{"role": "user", "content": "You arrive at desk 1."}]]
GREEDY = Sampling(temperature=0.0, max_new_tokens=6)


@pytest.fixture(autouse=True)
def fresh_process_models():
    release_shared_models()
    yield
    release_shared_models()


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    load = models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


def save_adapter(model_dir, out, seed):
    """A LoRA adapter with random (non-zero) B matrices: it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model

    model, _ = models.load_model(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def texts(llm):
    return [c.text for c in llm.complete(CHATS, GREEDY)]


def alone(model_dir, adapter=None):
    """The outputs of a model loaded by itself (no sharing), with the adapter merged by peft."""
    model, tokenizer = models.load_model(model_dir, adapter=adapter)
    return texts(TransformersLLM(model=model, tokenizer=tokenizer))


def test_llms_of_one_model_share_it_and_switch_adapters(tiny_model_dir, tmp_path, count_loads):
    a = save_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    b = save_adapter(tiny_model_dir, tmp_path / "b", seed=2)
    expected = {None: alone(tiny_model_dir), a: alone(tiny_model_dir, a), b: alone(tiny_model_dir, b)}
    assert len(set(map(tuple, expected.values()))) == 3, "the adapters must change the outputs"
    count_loads.clear()

    base = TransformersLLM(tiny_model_dir)
    with_a, with_b = TransformersLLM(tiny_model_dir, adapter=a), TransformersLLM(tiny_model_dir, adapter=b)
    again_a = TransformersLLM(tiny_model_dir, adapter=a)
    assert len(count_loads) == 1, "the base model is loaded once"
    assert with_a.model is with_b.model is base.model is again_a.model
    # Interleaved calls: each one runs under its own adapter, the base model with none.
    for llm, adapter in ((with_a, a), (base, None), (with_b, b), (again_a, a), (base, None), (with_b, b)):
        assert texts(llm) == expected[adapter], adapter


def test_a_rewritten_adapter_folder_is_loaded_again(tiny_model_dir, tmp_path):
    folder = save_adapter(tiny_model_dir, tmp_path / "round_1", seed=1)
    assert texts(TransformersLLM(tiny_model_dir, adapter=folder)) == alone(tiny_model_dir, folder)
    save_adapter(tiny_model_dir, folder, seed=5)  # the round is trained again after a rollback
    assert texts(TransformersLLM(tiny_model_dir, adapter=folder)) == alone(tiny_model_dir, folder)


def test_threads_with_different_adapters_each_get_their_own(tiny_model_dir, tmp_path):
    a = save_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    expected = {None: alone(tiny_model_dir), a: alone(tiny_model_dir, a)}
    llms = {None: TransformersLLM(tiny_model_dir), a: TransformersLLM(tiny_model_dir, adapter=a)}
    got, errors = {None: [], a: []}, []

    def play(adapter):
        try:
            for _ in range(3):
                got[adapter].append(texts(llms[adapter]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=play, args=(adapter,)) for adapter in llms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(run == expected[adapter] for adapter, runs in got.items() for run in runs)


def test_a_round_loads_the_policy_model_once(tiny_model_dir, games_root, tmp_path, monkeypatch, count_loads):
    """Rollout (first attempts and retries, with ActRe on explored steps) and evaluation of both
    splits, as the flow calls them in one process: one load of the base model."""
    import shutil

    from a3t import pipeline
    from a3t.evaluate import evaluate_round

    monkeypatch.chdir(tmp_path)
    cfg = load_config(profile="smoke", overrides=[
        f"llm.model={tiny_model_dir}", f"games.root={games_root}", "pipeline.annotate_walkthroughs=0",
        "pipeline.train_tasks=2", "eval.tasks=1", "eval.splits=[valid_unseen]", "rollout.p_explore=0.5"])
    ws = pipeline.Workspace.of(cfg, tmp_path)
    shutil.copytree(save_adapter(tiny_model_dir, tmp_path / "a", seed=1), ws.adapter(0))
    count_loads.clear()
    pipeline.play_train_games(cfg, ws, 1)
    pipeline.play_train_games(cfg, ws, 1, retries=True)
    evaluate_round(cfg, ws, 1, "valid_unseen")
    assert count_loads == [tiny_model_dir]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_base_gets_its_exact_weights_back_after_adapter_switches(tiny_model_dir, tmp_path, dtype):
    """The active adapter is merged into the weights (no LoRA branch in the forward), and
    switching restores the weights saved before the merge: subtracting the update again would
    round them (~1e-3 in bfloat16) on every switch."""
    from peft.tuners.lora import LoraLayer

    a = save_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    base = TransformersLLM(tiny_model_dir, dtype=dtype)
    loaded = {k: v.clone() for k, v in base.model.state_dict().items()}
    first = texts(base)
    with_a = TransformersLLM(tiny_model_dir, adapter=a, dtype=dtype)
    adapted = texts(with_a)
    assert adapted != first, "the adapter must change the outputs"
    assert all(m.merged for m in with_a.model.modules() if isinstance(m, LoraLayer))
    for _ in range(3):
        assert texts(base) == first and texts(with_a) == adapted
    texts(base)
    weights = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in with_a.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(weights[k], v) for k, v in loaded.items())
