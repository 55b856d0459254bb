"""Training on the tiny Mistral: LoRA updates, the loss through the HF Trainer, QLoRA on CPU,
adapter averaging, resuming from epoch checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402

from a3t.config import TrainConfig  # noqa: E402
from a3t.data import Example, build_examples  # noqa: E402
from a3t.train import ADAPTER_FILE, A3TTrainer, Collator, ExampleDataset, average_adapters, train_adapter  # noqa: E402
from a3t.trajectory import StepRecord, Trajectory  # noqa: E402
from factories import make_trajectory  # noqa: E402

INITIAL = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
    "and a sinkbasin 1.\n\nYour task is to: put a clean mug in cabinet."
)
STEPS = [
    StepRecord(thought="First I need to find a mug.", action="go to countertop 1",
               observation="On the countertop 1, you see a mug 1."),
    StepRecord(thought="Now I take the mug.", action="take mug 1 from countertop 1",
               observation="You pick up the mug 1 from the countertop 1."),
    StepRecord(thought="Next, I clean it.", action="clean mug 1 with sinkbasin 1",
               observation="You clean the mug 1 using the sinkbasin 1."),
]


def traj(task_id: str, success: bool, n: int, steps: int = 2) -> Trajectory:
    return make_trajectory(task_id, success, attempt=n, episode_id=f"{task_id}-{n}",
                           task_type="pick_clean_then_place_in_recep", task="put a clean mug in cabinet",
                           initial_observation=INITIAL, steps=STEPS[:steps])


def lora_model(model_dir, load_in_4bit: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from a3t.llm.models import load_model

    model, tokenizer = load_model(model_dir, load_in_4bit=load_in_4bit, trainable=True)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def make_trainer(model, tokenizer, examples, out, callbacks=None, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), per_device_train_batch_size=1, learning_rate=1e-2, lr_scheduler_type="constant",
                  optim="adamw_torch", save_strategy="no", logging_steps=1, report_to=[],
                  remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0, seed=0)
    kwargs.update(overrides)
    return A3TTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=ExampleDataset(examples),
                      data_collator=Collator(tokenizer.pad_token_id), callbacks=callbacks)


def short_examples(tokenizer, weights=(1.0, 1.0)) -> list[Example]:
    """Tiny sequences: a prompt that is not in the loss, then an agent turn that is."""
    out = []
    for i, w in enumerate(weights):
        prompt = tokenizer(f"[INST] On the countertop {i + 1}, you see a mug 1. [/INST]").input_ids
        turn = tokenizer(f"Thought: I take it.\nAction: take mug 1 from countertop {i + 1}</s>",
                         add_special_tokens=False).input_ids
        out.append(Example(prompt + turn, [0] * len(prompt) + [1] * len(turn), w, f"e{i}"))
    return out


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    return lora_model(tiny_model_dir, load_in_4bit=False)


def trim(e: Example, context: int = 12) -> Example:
    """The example without most of its prompt (the instruction and the 1-shot example, never in
    the loss): the same loss tokens in a sequence a third as long, for speed."""
    start = max(e.loss_mask.index(1) - context, 0)
    return Example(e.input_ids[start:], e.loss_mask[start:], e.weight, e.episode_id)


@pytest.fixture(scope="module")
def examples(fp32):
    """Weighted examples built from trajectories by a3t.data (then trimmed)."""
    _, tokenizer = fp32
    ts = [traj("a", True, 0, steps=2), traj("a", False, 1, steps=3), traj("a", True, 2, steps=3),
          traj("b", False, 0, steps=2)]
    return {variant: [trim(e) for e in build_examples(ts, tokenizer, variant=variant, max_length=1024)]
            for variant in ("sft", "pg")}


def batch_of(tokenizer, examples) -> dict:
    collate = Collator(tokenizer.pad_token_id)
    return collate([ExampleDataset(examples)[i] for i in range(len(examples))])


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "qlora-nf4"])
def test_training_steps_change_every_lora_parameter(tiny_model_dir, tmp_path, load_in_4bit):
    from transformers import TrainerCallback

    model, tokenizer = lora_model(tiny_model_dir, load_in_4bit)
    if load_in_4bit:  # QLoRA on CPU: the frozen base is bitsandbytes nf4
        import bitsandbytes as bnb

        quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    before = lora_params(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point}
    assert len(before) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(torch.count_nonzero(v) == 0 for n, v in before.items() if "lora_B" in n)  # LoRA B starts at 0

    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshots.append(lora_params(model))

    trainer = make_trainer(model, tokenizer, short_examples(tokenizer), tmp_path, max_steps=2, callbacks=[Snapshot()])
    trainer.train()
    assert trainer.state.global_step == 2 and len(snapshots) == 2
    changed = lambda a, b: not torch.equal(a, b)  # noqa: E731
    # step 1: with B = 0 the gradient of A is 0, so only B moves (Adam's update of a zero gradient is 0)
    assert all(changed(before[n], snapshots[0][n]) for n in before if "lora_B" in n)
    assert not any(changed(before[n], snapshots[0][n]) for n in before if "lora_A" in n)
    # step 2: every LoRA tensor has moved
    after = lora_params(model)
    unchanged = [n for n in before if not changed(before[n], after[n])]
    assert not unchanged, f"LoRA parameters that training did not change: {unchanged}"
    assert all(torch.isfinite(v).all() for v in after.values())
    # the base model is frozen
    now = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], now[n].detach()) for n in frozen)


def masked_logprob(model, example: Example) -> torch.Tensor:
    """Sum of log p of the example's loss tokens, computed here with log_softmax + gather."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return (logp * torch.tensor(example.loss_mask[1:], dtype=logp.dtype)).sum()


def test_sft_loss_is_plain_nll_on_successes(fp32, examples, tmp_path):
    model, tokenizer = fp32
    model.eval()
    sft = examples["sft"]
    assert [e.episode_id for e in sft] == ["a-0", "a-2"] and all(e.weight == 1.0 for e in sft)
    assert len(sft[0].input_ids) != len(sft[1].input_ids)  # the batch is padded
    batch = batch_of(tokenizer, sft)
    trainer = make_trainer(model, tokenizer, sft, tmp_path)
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        hf_out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        hf = hf_out.loss
        n = (batch["labels"][:, 1:] != -100).sum()
        ours_n = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
        # and by hand: mean NLL of the loss tokens, with log_softmax + gather on the model's logits
        logp = torch.log_softmax(hf_out.logits[:, :-1].float(), dim=-1)
        targets = batch["input_ids"][:, 1:]
        in_loss = torch.tensor([e.loss_mask[1:] + [0] * (batch["input_ids"].shape[1] - len(e.loss_mask)) for e in sft])
        by_hand = -(logp.gather(2, targets[..., None])[..., 0] * in_loss).sum() / in_loss.sum()
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)
    assert ours_n.item() == pytest.approx(hf.item(), rel=1e-5)
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_pg_pushes_a_failed_trajectory_down(fp32, examples, tmp_path):
    model, tokenizer = fp32
    model.eval()
    pg = {e.episode_id: e for e in examples["pg"]}
    assert set(pg) == {"a-0", "a-1", "a-2"}  # task b has no success: weight 0, left out
    # task a: 2 successes of 3, baseline 2/3; the failure weighs -2/3, a success 1/3 + 1
    assert pg["a-1"].weight == pytest.approx(-2 / 3) and pg["a-0"].weight == pytest.approx(4 / 3)
    failed = pg["a-1"]
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    trainer = make_trainer(model, tokenizer, [failed], tmp_path)

    loss = trainer.compute_loss(model, batch_of(tokenizer, [failed]))
    g_loss = torch.autograd.grad(loss, params, allow_unused=True)
    logp = masked_logprob(model, failed)
    g_logp = torch.autograd.grad(logp, params, allow_unused=True)
    n = sum(failed.loss_mask[1:])
    # loss = -w * logp / N, so d loss / d logp = -w / N = (2/3) / N > 0 ...
    assert loss.item() == pytest.approx(-failed.weight * logp.item() / n, rel=1e-4)
    flat = lambda gs: torch.cat([g.flatten() for g, p in zip(gs, params) if g is not None])  # noqa: E731
    coefficient = -failed.weight / n
    assert coefficient > 0
    g1, g2 = flat(g_loss), coefficient * flat(g_logp)
    assert g1.abs().max() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4 * g1.abs().max().item())
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0).item() > 0.9999
    # ... and a gradient step on the loss lowers the failed trajectory's likelihood
    with torch.no_grad():
        before = masked_logprob(model, failed).item()
        saved = [p.detach().clone() for p in params]
        for p, g in zip(params, g_loss):
            if g is not None:
                p -= 1.0 * g
        after = masked_logprob(model, failed).item()
        for p, s in zip(params, saved):
            p.copy_(s)
    assert after < before


def test_gradient_accumulation_logs_the_loss_of_one_big_batch(tiny_model_dir, tmp_path):
    """The Trainer's num_items_in_batch reaches the loss: 2 micro-batches of 1 accumulate to the
    loss of one batch of 2 (the logged loss of step 1 is taken at the initial weights)."""
    model, tokenizer = lora_model(tiny_model_dir, load_in_4bit=False)
    model.eval()
    ex = short_examples(tokenizer, weights=(1.5, -0.5))
    ex[1] = Example(ex[1].input_ids[:-4], ex[1].loss_mask[:-4], ex[1].weight, ex[1].episode_id)  # unequal lengths
    with torch.no_grad():
        whole = make_trainer(model, tokenizer, ex, tmp_path).compute_loss(model, batch_of(tokenizer, ex)).item()
    trainer = make_trainer(model, tokenizer, ex, tmp_path, max_steps=1, gradient_accumulation_steps=2)
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[0] == pytest.approx(whole, rel=1e-4)


def test_multi_process_loss_scaling_matches_the_trainer(fp32, examples, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from transformers import Trainer

    model, tokenizer = fp32
    model.eval()
    sft = examples["sft"]
    batch = batch_of(tokenizer, sft)
    trainer = make_trainer(model, tokenizer, sft, tmp_path)
    assert trainer.args.average_tokens_across_devices
    n = (batch["labels"][:, 1:] != -100).sum()  # as if gathered from every process
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with torch.no_grad():
        plain = {k: v for k, v in batch.items() if k != "weights"}
        reference = Trainer.compute_loss(trainer, model, plain, num_items_in_batch=n)
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_average_adapters_is_the_elementwise_mean(tmp_path):
    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(3):
        folder = tmp_path / f"checkpoint-{i + 1}"
        folder.mkdir()
        save_file({"a.lora_A.weight": torch.randn(4, 8, generator=gen),
                   "a.lora_B.weight": torch.randn(8, 4, generator=gen).to(torch.bfloat16)},
                  str(folder / ADAPTER_FILE))
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "i": i}))
        folders.append(folder)
    out = average_adapters(folders, tmp_path / "avg")
    mean = load_file(str(out / ADAPTER_FILE))
    states = [load_file(str(f / ADAPTER_FILE)) for f in folders]
    assert mean.keys() == states[0].keys()
    for k in mean:
        assert mean[k].dtype == states[0][k].dtype and mean[k].shape == states[0][k].shape
        expected = sum(s[k].float() for s in states) / 3
        torch.testing.assert_close(mean[k].float(), expected.to(states[0][k].dtype).float())
    a = mean["a.lora_A.weight"]
    assert a[0, 0].item() == pytest.approx(sum(s["a.lora_A.weight"][0, 0].item() for s in states) / 3, rel=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # one folder: a copy
    one = load_file(str(average_adapters(folders[:1], tmp_path / "one") / ADAPTER_FILE))
    assert all(torch.equal(one[k], states[0][k]) for k in one)


def test_train_adapter_qlora_resumes_from_its_checkpoints(tiny_model_dir, fp32, tmp_path):
    from a3t.llm.models import load_model

    ex = short_examples(fp32[1], weights=(1.0, -0.5))
    cfg = TrainConfig(load_in_4bit=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=1,
                      gradient_accumulation=1, learning_rate=1e-3, optimizer="paged_adamw_32bit", average_last=2)
    out = tmp_path / "round_0"
    first = train_adapter(ex, tiny_model_dir, out, cfg, epochs=1)
    assert first["resumed_from"] is None
    assert first["steps"] == 2 and len(first["loss_per_epoch"]) == 1
    assert first["averaged_checkpoints"] == ["checkpoint-2"]

    second = train_adapter(ex, tiny_model_dir, out, cfg, epochs=2)
    assert second["resumed_from"] == "checkpoint-2"
    assert second["steps"] == 2 * first["steps"]
    assert second["loss_per_epoch"][0] == pytest.approx(first["loss_per_epoch"][0])
    assert len(second["loss_per_epoch"]) == 2
    assert second["averaged_checkpoints"] == ["checkpoint-2", "checkpoint-4"]

    adapter = out / "adapter"
    for name in ("adapter_config.json", ADAPTER_FILE, "tokenizer_config.json", "tokenizer.json", "train_stats.json"):
        assert (adapter / name).is_file(), name
    stats = json.loads((adapter / "train_stats.json").read_text())
    assert stats == json.loads(json.dumps(second))
    assert stats["tokens"] == sum(len(e.input_ids) for e in ex)
    assert stats["loss_tokens"] == sum(sum(e.loss_mask) for e in ex)
    assert stats["steps"] == 4 and stats["epochs"] == 2 and stats["examples"] == 2
    assert len(stats["loss_per_epoch"]) == 2 and all(isinstance(x, float) for x in stats["loss_per_epoch"])
    assert stats["wall_s"] > 0
    # the adapter is the mean of the last two epoch checkpoints
    mean = load_file(str(adapter / ADAPTER_FILE))
    ckpts = [load_file(str(out / "checkpoints" / c / ADAPTER_FILE)) for c in second["averaged_checkpoints"]]
    for k in mean:
        torch.testing.assert_close(mean[k], (ckpts[0][k] + ckpts[1][k]) / 2)
    # and it loads as an adapter on the base model
    model, tokenizer = load_model(tiny_model_dir, adapter=adapter, load_in_4bit=True)
    assert tokenizer.chat_template
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_train_adapter_is_seeded_by_the_config(tiny_model_dir, fp32, tmp_path):
    ex = short_examples(fp32[1], weights=(1.0,))
    cfg = TrainConfig(load_in_4bit=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=1,
                      gradient_accumulation=1, optimizer="adamw_torch", average_last=1, seed=7)
    adapters = []
    for i in range(2):
        torch.manual_seed(1000 + i)  # whatever the caller did before
        train_adapter(ex, tiny_model_dir, tmp_path / f"run{i}", cfg, epochs=1)
        adapters.append(load_file(str(tmp_path / f"run{i}" / "adapter" / ADAPTER_FILE)))
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_train_adapter_refuses_no_examples(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter([], tiny_model_dir, tmp_path / "x", TrainConfig(), epochs=1)


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from a3t.train import last_complete_checkpoint

    checkpoints = tmp_path / "checkpoints"
    assert last_complete_checkpoint(checkpoints) is None
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-4")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_training_dtype_is_bfloat16_where_the_hardware_has_it(monkeypatch):
    import bitsandbytes.functional

    from a3t.train import training_dtype

    assert training_dtype(TrainConfig(dtype="float32"), "cuda") == "float32"  # an explicit choice stands
    assert training_dtype(TrainConfig(), "cuda:0") == "bfloat16"
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: False)
    assert training_dtype(TrainConfig(), "cpu") == "float32"  # emulated bfloat16 would be slower
    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    assert training_dtype(TrainConfig(), "cpu") == "bfloat16"


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_the_rerun_resumes(fp32, tiny_model_dir, small_disk):
    from a3t.train import TrainingWriteError

    disk, grow = small_disk
    grow("128k")  # room for one epoch's checkpoint (about 80 KiB), not for two
    ex = short_examples(fp32[1], weights=(1.0, -0.5))
    cfg = TrainConfig(load_in_4bit=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=1,
                      gradient_accumulation=1, learning_rate=1e-3, optimizer="adamw_torch", average_last=2)
    out = disk / "round_0" / "train"
    with pytest.raises(TrainingWriteError, match="disk is full.*checkpoint-2.*resumes"):
        train_adapter(ex, tiny_model_dir, out, cfg, epochs=2)
    assert json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2

    grow()
    stats = train_adapter(ex, tiny_model_dir, out, cfg, epochs=2)
    assert stats["resumed_from"] == "checkpoint-2" and stats["steps"] == 4
    assert stats["averaged_checkpoints"] == ["checkpoint-2", "checkpoint-4"]


def test_an_error_before_the_output_folder_exists_is_not_taken_for_a_full_disk(tmp_path):
    from a3t.train import _disk_full

    assert not _disk_full(tmp_path / "round_0" / "train", RuntimeError("a shape mismatch"))
    assert _disk_full(tmp_path / "round_0" / "train", RuntimeError("No space left on device (os error 28)"))


def test_a_campaign_round_trains_in_a_child_process_as_in_its_own(tmp_path):
    """train.own_process: the adapter a spawned process trains for a round is bit for bit the one
    the campaign's process would train itself; a child process that dies is a clear error."""
    from a3t.config import load_config
    from a3t.pipeline import Workspace, build_training_set, in_child_process, train_round
    from a3t.trajectory import TrajectoryStore

    adapters = []
    for own in ("true", "false"):
        cfg = load_config(profile="smoke", overrides=[f"train.own_process={own}", "train.epochs_first_round=1"])
        ws = Workspace(tmp_path / own, "camp")
        played = TrajectoryStore(ws.round_data(0) / "rollout-0.jsonl")
        for n, won in enumerate((True, False, True)):
            played.append(traj("t", won, n))
        build_training_set(cfg, ws, 0)
        assert train_round(cfg, ws, 0)["examples"] == 3
        adapters.append(load_file(str(ws.adapter(0) / ADAPTER_FILE)))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    with pytest.raises(RuntimeError, match="the test child: its process ended abruptly"):
        in_child_process(os._exit, 3, what="the test child")
