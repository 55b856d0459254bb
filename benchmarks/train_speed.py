"""How fast a3t's trainer trains a LoRA adapter, against TRL's SFTTrainer, in one run.

The trainers get, in the same process:

- the same LoRA (r=16, alpha=32, q_proj/v_proj, TrainConfig's dropout, the same seed,
  float32 adapter weights: TRL casts QLoRA adapters to bfloat16, which we undo so that
  only the trainer and its loss differ);
- the same data, ``batch x accumulation x (steps + 1)`` rows (the warm-up step's and the
  timed steps'), of one of two kinds:

  - synthetic (the default): sequences of exactly ``--seq-len`` tokens, built with
    ``a3t.data.build_examples`` from synthetic ALFWorld-like Trajectory records with the A3T
    ``pg`` weights (tasks with successes and failures: weights 1.5 and -0.5, tasks with only
    successes: 1.0). A sequence is the start of a rendered trajectory when that start has
    loss tokens, else its last ``--seq-len`` tokens (the prompt alone is ~600-900 SmolLM2
    tokens);
  - real (``--data FILE``, a ``train_set.jsonl`` a campaign wrote): its trajectories rendered
    by ``a3t.data.build_examples`` exactly as the default campaign trains them
    (``a3t.pipeline.train_round`` with ``load_config()``'s train.loss,
    train.observations_in_loss, env.phrasing, train.max_length, webshop.observation_format
    and the trained policy's prompt), at their real, varying lengths (batch size 1 keeps
    them unpadded), repeated in turn when the steps need more rows than the file has;

  ours reads them through ``ExampleDataset``/``Collator``; TRL gets the same ``input_ids``
  and ``labels`` (-100 outside the loss mask) as a ``datasets.Dataset`` (max_length: the
  longest row, nothing is cut), so both compute the loss over the same tokens, normalized
  by the step's loss tokens. A checksum of every collated micro-batch (ids and labels,
  padding left out) checks that every run of every trainer got the same batches in the
  same order (``same_batches``);
- the same batch size, gradient accumulation, optimizer (adamw_torch on CPU,
  paged_adamw_32bit on CUDA), learning rate and schedule, ``max_steps``, logging every
  step, no checkpoints, no gradient checkpointing and no bf16 autocast (SFTConfig turns
  both on by default; ``train_adapter`` uses neither);
- the same base model, loaded by ``a3t.llm.models.load_model`` as training does: synthetic
  data in float32 on CPU, bfloat16 on CUDA; real data in ``a3t.train.training_dtype`` of
  the default TrainConfig, the dtype ``train_adapter`` trains in (bfloat16 on CUDA and on
  CPUs with AVX512-BF16, else float32).

What differs is the trainer: ours is ``A3TTrainer`` of a3t/train.py, its own
``compute_loss``: logits only at the positions whose next token is in the loss
(``predicting_positions``, the model's ``logits_to_keep``), then ``next_token_nll`` (per-token
weights, negative ones included); TRL's SFTTrainer computes the plain NLL with its fused LM
head (the logits in vocabulary tiles, never materialized, plus entropy and token accuracy
for its metrics). With real data a third trainer, "before", is a3t's trainer as it was
before logits_to_keep and the training dtype: A3TTrainer with the previous
``compute_loss`` (full logits, then ``weighted_nll``) on a float32 base model, as the default
campaign trained on CPU; the worker then holds a second, float32 base when the training
dtype is not float32. ours/before is the speed-up of a3t's trainer, ours/TRL how it stands
against TRL in the same dtype.

Timing: the wall time of the optimizer steps after the first one (a warm-up), from the end
of step 1 to the end of the last step (so data loading, collation, forward, loss, backward,
optimizer and logging all count; model loading does not). tokens/s = the real tokens of
those steps / that time, counted the same way for every trainer: the tokens (padding
excluded) of what each call of the trainer's data collator returned, past the first
``accumulation`` calls (the warm-up step's; no dataloader workers, so calls come in the order
the micro-batches are consumed). Each trainer runs ``--reps`` times, alternated (ours, TRL,
before, then before, TRL, ours, ...), with a fresh LoRA each time; figures are medians.
Peak memory: on CPU the process's peak RSS during ``train()`` minus its RSS just before
(the peak is reset with /proc/self/clear_refs, freed memory is given back with malloc_trim
first); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before.
Before the measured runs, each trainer trains one untimed step (one-time allocations of
the process would otherwise count in whichever trainer runs first).
Each quantization mode runs in its own worker process (so their memory does not mix),
with OMP_WAIT_POLICY=PASSIVE unless it is set: on this shared 2-core machine, 2 torch
threads that spin-wait while another process runs made every step 10-20x slower.
The load average is printed at the start; cpu/wall per trainer says whether it got its cores.

Where the time goes: per trainer, the split of the timed steps into forward+loss
(``compute_loss``), backward (rest of ``training_step``) and the rest (optimizer step,
data, logging); and a micro-benchmark of the LM head + loss alone (forward and backward,
from the backbone's hidden states of the first micro-batch, on ours' base model): ours
(logits at the loss positions + next_token_nll), before's full logits + weighted_nll, the
plain NLL on the full logits, and TRL's chunked log-prob function, with checks that ours
gives the full-logits loss, and TRL's when every weight is 1.

The paper's 7B model in 4-bit on a GPU (training and rollout): ``benchmarks/gpu.py``.

``--quick`` uses the tiny random Mistral of the tests (unless ``--model``): SmolLM2 trains a
few hundred tokens/s here at best, too slow for two trainers in a minute. The tiny model's
cost is mostly its LM head and loss, so --quick magnifies the part where the trainers differ.

Run:  python benchmarks/train_speed.py [--quick] [--model PATH | --tiny] [--data FILE | --seq-len N]
      [--steps N] [--4bit | --no-4bit] [--reps N] [--batch-size N] [--accumulation N] [--threads N]
Needs the ``bench`` extra (trl, datasets): pip install -e '.[bench]'.
The last line of stdout is one JSON object with the figures (DESIGN.md section 5).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}
console = Console(stderr=True)  # progress and notes on stderr; tables and the JSON on stdout


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _give_back_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory of a phase above what the process held when it began (MiB)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        _give_back_freed_memory()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = (_status_kb("VmRSS") or 0) * 1024
            try:  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = True
            except OSError:
                self.resettable = False
        return self

    def __exit__(self, *exc):
        import resource

        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.resettable and _status_kb("VmHWM") is not None:
            self.peak = _status_kb("VmHWM") * 1024
        else:  # no reset: the process's lifetime peak (an over-estimate for later phases)
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.before_mib = self.before / 2**20
        self.peak_mib = self.peak / 2**20
        self.delta_mib = (self.peak - self.before) / 2**20
        return False


# ----------------------------------------------------------------------------- data


def synthetic_trajectories(n_tasks: int, steps: int, seed: int):
    """ALFWorld-like trajectories, 4 attempts per task. Odd tasks: 2 successes and 2
    failures (baseline 0.5, pg weights 1.5 and -0.5); even tasks: 4 successes (weight 1)."""
    from a3t.envs.alfworld_gen import TASK_TYPES
    from a3t.trajectory import StepRecord, Trajectory

    rng = random.Random(seed)
    places = ["cabinet", "countertop", "drawer", "shelf", "sinkbasin", "fridge", "microwave", "garbagecan"]
    things = ["mug", "apple", "knife", "spatula", "plate", "bowl", "cup", "potato", "lettuce", "soapbar"]
    out = []
    for task in range(n_tasks):
        task_type = TASK_TYPES[task % len(TASK_TYPES)]
        goal = f"put a clean {rng.choice(things)} in {rng.choice(places)}."
        seen = ", ".join(f"a {p} {rng.randint(1, 4)}" for p in places)
        initial = (
            "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around "
            f"you, you see {seen}.\n\nYour task is to: {goal}"
        )
        for attempt in range(4):
            success = task % 2 == 0 or attempt in (0, 3)
            records = []
            for k in range(steps):
                place, i = rng.choice(places), rng.randint(1, 4)
                items = ", ".join(f"a {rng.choice(things)} {rng.randint(1, 3)}" for _ in range(rng.randint(1, 4)))
                records.append(StepRecord(
                    thought=f"I need to find the {goal.split()[3]}. It is more likely to appear in {place} {i} "
                            f"or {rng.choice(places)} {rng.randint(1, 4)}. Step {k}: let me check {place} {i}.",
                    action=f"go to {place} {i}",
                    observation=f"You arrive at {place} {i}. On the {place} {i}, you see {items}.",
                    explored=rng.random() < 0.1,
                ))
            out.append(Trajectory(
                episode_id=f"task{task}#r0a{attempt}", task_id=f"train/task{task}",
                game=f"data/games/json_2.1.1/train/task{task}/game.tw-pddl", task_type=task_type,
                task=goal, source="policy", initial_observation=initial, steps=records,
                reward=float(success), success=success,
                terminal_reason="won" if success else "step_limit", model="synthetic",
            ))
    return out


def build_rows(tokenizer, n: int, seq_len: int, seed: int) -> tuple[list, dict]:
    """``n`` Examples of exactly ``seq_len`` tokens (real masks and pg weights, see the
    module docstring) and a description of them."""
    from a3t.data import Example, build_examples

    steps = 12
    while True:
        trajectories = synthetic_trajectories(n_tasks=max(2, -(-min(n, 16) // 4)), steps=steps, seed=seed)
        examples = build_examples(trajectories, tokenizer, variant="pg", observations=True, max_length=10**7)
        if min(len(e.input_ids) for e in examples) >= seq_len:
            break
        steps *= 2
    windows = []
    from_start = 0
    for e in examples:
        if any(e.loss_mask[:seq_len]):
            ids, mask = e.input_ids[:seq_len], e.loss_mask[:seq_len]
            from_start += 1
        else:
            ids, mask = e.input_ids[-seq_len:], e.loss_mask[-seq_len:]
        windows.append(Example(ids, mask, e.weight, e.episode_id))
    rows = [windows[i % len(windows)] for i in range(n)]  # repeat the few rendered trajectories
    info = {
        "sequences": n,
        "distinct": len(windows),
        "from_start": from_start,
        "loss_token_fraction": sum(sum(r.loss_mask) for r in rows) / (n * seq_len),
        "weights": sorted({round(r.weight, 3) for r in rows}),
    }
    return rows, info


def campaign_rows(tokenizer, path: str, n: int) -> tuple[list, dict]:
    """``n`` Examples from a campaign's train_set.jsonl, rendered as the default campaign's
    ``a3t.pipeline.train_round`` renders them, at their real lengths (repeated in turn when
    ``n`` is more than the file holds), and a description of them."""
    from a3t.config import load_config
    from a3t.data import build_examples, load_trajectories
    from a3t.pipeline import shows_example

    cfg = load_config()
    t = cfg.train
    trajectories = load_trajectories([path])
    examples = build_examples(trajectories, tokenizer, t.loss, t.observations_in_loss, cfg.env.phrasing,
                              t.max_length, cfg.webshop.observation_format,
                              with_example=shows_example(cfg, adapter="trained"))
    if not examples:
        raise SystemExit(f"{path}: no trajectory with a non-zero weight under train.loss={t.loss}")
    rows = [examples[i % len(examples)] for i in range(n)]
    lengths = [len(r.input_ids) for r in rows]
    info = {
        "file": str(path), "rows": n, "distinct": min(n, len(examples)), "rendered": len(examples),
        "trajectories": len(trajectories),
        "mean_tokens_per_row": sum(lengths) / n, "min_tokens": min(lengths), "max_tokens": max(lengths),
        "loss_token_fraction": sum(sum(r.loss_mask) for r in rows) / sum(lengths),
        "weights": sorted({round(r.weight, 3) for r in rows}),
        "settings": {"loss": t.loss, "observations_in_loss": t.observations_in_loss, "phrasing": cfg.env.phrasing,
                     "max_length": t.max_length, "with_example": shows_example(cfg, adapter="trained")},
    }
    return rows, info


# ----------------------------------------------------------------------------- one training run


class _StepTimer:
    """A TrainerCallback (made a subclass at run time) that times the optimizer steps after
    the first, and the calls inside them."""

    sync = staticmethod(lambda: None)  # torch.cuda.synchronize on CUDA: kernels are asynchronous

    def __init__(self):
        self.t0 = self.c0 = None
        self.ends: list[float] = []
        self.cpu_end = None
        self.forward = self.train_step = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        now = time.perf_counter()
        if state.global_step == 1:  # the warm-up step ends: start the clocks, drop what it counted
            self.t0, self.c0 = now, time.process_time()
            self.forward = self.train_step = 0.0
        self.ends.append(now)
        self.cpu_end = time.process_time()


def before_trainer():
    """The trainer before logits_to_keep ("before"): A3TTrainer with its previous compute_loss,
    full logits then ``weighted_nll``. (Its DDP rescaling is left out: this runs in one process.)"""
    from a3t.train import A3TTrainer, weighted_nll

    class BeforeTrainer(A3TTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels, weights = inputs.pop("labels"), inputs.pop("weights")
            outputs = model(**inputs)
            loss = weighted_nll(outputs.logits, labels, weights, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return BeforeTrainer


def _fingerprint(batch: dict) -> int:
    """A checksum of a collated batch's input_ids and labels, padding left out (the trainers
    pad with their own pad ids)."""
    import zlib

    real = batch["attention_mask"].bool()
    return zlib.crc32(batch["labels"][real].numpy().tobytes(), zlib.crc32(batch["input_ids"][real].numpy().tobytes()))


def run_trainer(kind: str, base, tokenizer, rows: list, s: dict, warm_up_only: bool = False) -> dict | None:
    """Train a fresh LoRA on ``base`` with one trainer ("ours", "trl" or "before"); the base model
    is left as it was. ``warm_up_only``: one optimizer step, nothing measured (one-time
    allocations, lazy imports and kernel caches of the process then count in no measured run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

    from a3t.config import TrainConfig
    from a3t.train import A3TTrainer, Collator, ExampleDataset

    device = s["device"]
    set_seed(s["seed"])
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=TrainConfig().lora_dropout,
                      target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    timer_cls = type("StepTimer", (_StepTimer, TrainerCallback), {})
    timer = timer_cls()
    if device != "cpu":
        timer.sync = torch.cuda.synchronize
    tmp = tempfile.mkdtemp(prefix="a3t-train-speed-")
    common = dict(
        output_dir=tmp, max_steps=1 if warm_up_only else s["steps"] + 1, per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["accumulation"], learning_rate=TrainConfig().learning_rate,
        optim="adamw_torch" if device == "cpu" else "paged_adamw_32bit", save_strategy="no",
        logging_steps=1, report_to=[], seed=s["seed"], use_cpu=device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False,
    )
    patched = "forward" in vars(base)
    trainer = None
    try:
        if kind in ("ours", "before"):
            args = TrainingArguments(remove_unused_columns=False, **common)
            trainer_cls = A3TTrainer if kind == "ours" else before_trainer()
            trainer = trainer_cls(model=model, args=args, train_dataset=ExampleDataset(rows),
                                  data_collator=Collator(tokenizer.pad_token_id), callbacks=[timer])
        else:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            data = ExampleDataset(rows)
            dataset = Dataset.from_dict({
                "input_ids": [data[i]["input_ids"] for i in range(len(data))],
                "labels": [data[i]["labels"] for i in range(len(data))],
            })
            # max_length: the longest row, so that TRL cuts nothing
            args = SFTConfig(max_length=max(len(r.input_ids) for r in rows), dataset_num_proc=None, **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[timer])
            for p in model.parameters():  # TRL casts QLoRA adapters to bf16: keep ours (float32)
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()

        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log dict instead
        # What each collator call returns: its real tokens (rows vary in length with real data) and
        # a fingerprint (every trainer must get the same batches). dataloader_num_workers=0: the
        # calls come in the order the micro-batches are consumed.
        collate, batches = trainer.data_collator, []

        def counted_collate(features):
            batch = collate(features)
            batches.append((int(batch["attention_mask"].sum()), _fingerprint(batch)))
            return batch

        trainer.data_collator = counted_collate
        # Time the calls inside each step (instance attributes shadow the methods).
        compute_loss, training_step = trainer.compute_loss, trainer.training_step

        def timed_compute_loss(*a, **k):
            t = time.perf_counter()
            try:
                return compute_loss(*a, **k)
            finally:
                timer.sync()
                timer.forward += time.perf_counter() - t

        def timed_training_step(*a, **k):
            t = time.perf_counter()
            try:
                return training_step(*a, **k)
            finally:
                timer.sync()
                timer.train_step += time.perf_counter() - t

        trainer.compute_loss, trainer.training_step = timed_compute_loss, timed_training_step

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with PeakMemory(device) as mem:
            trainer.train()
        if warm_up_only:
            return None
        wall = timer.ends[-1] - timer.t0
        cpu = timer.cpu_end - timer.c0
        steps = len(timer.ends) - 1
        # The first `accumulation` micro-batches are the untimed first step's.
        timed = batches[s["accumulation"]: s["accumulation"] * (1 + steps)]
        tokens = sum(n for n, _ in timed)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        step_s = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
        result = {
            "kind": kind, "tokens_s": tokens / wall, "wall_s": wall, "cpu_s": cpu, "steps": steps,
            "tokens": tokens, "step_s": step_s, "forward_s": timer.forward,
            "backward_s": timer.train_step - timer.forward, "other_s": wall - timer.train_step,
            "peak_mem_delta_mib": mem.delta_mib, "mem_before_mib": mem.before_mib,
            "peak_mem_mib": mem.peak_mib, "first_loss": losses[0] if losses else None,
            "trainable_params": trainable, "batches": [f for _, f in batches[: s["accumulation"] * (1 + steps)]],
        }
    except torch.cuda.OutOfMemoryError as e:  # the 7B runs of benchmarks/gpu.py
        result = {"kind": kind, "error": f"CUDA OOM: {str(e).splitlines()[0]}"}
    finally:
        trainer = None  # drop the optimizer state before the next run
        model.unload()  # LoRA layers out: the base model as it was
        if not patched:
            vars(base).pop("forward", None)  # TRL's fused LM head patch
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- LM head + loss


def head_bench(base, rows: list, s: dict, reps: int) -> dict:
    """LM head + loss, forward and backward, from the backbone's hidden states of one
    micro-batch: ours (logits at the positions whose next token is in the loss, then
    next_token_nll, as A3TTrainer.compute_loss), before's full logits then weighted_nll, the
    plain NLL on the full logits (what weighting adds), and TRL's chunked log-probs (as
    SFTTrainer calls it: log-probs, entropy and top-1 for its metrics)."""
    import torch

    from a3t.train import Collator, ExampleDataset, next_token_nll, predicting_positions, weighted_nll

    device = s["device"]
    batch = Collator(0)([ExampleDataset(rows)[i] for i in range(s["batch_size"])])
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        decoder = base.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = base.get_output_embeddings()
    labels, weights = batch["labels"], batch["weights"]
    n_items = (labels[:, 1:] != -100).sum()
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    keep = predicting_positions(labels)

    def ours(w):
        h = hidden.detach().requires_grad_()
        return h, next_token_nll(head(h[:, keep]), labels[:, keep + 1], w[:, keep + 1], n_items)

    def full(w):
        h = hidden.detach().requires_grad_()
        return h, weighted_nll(head(h), labels, w, n_items)

    trl_fn = None
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # the vocabulary tile SFTTrainer uses

        def trl_fn():
            h = hidden.detach().requires_grad_()
            hs, lab = h[:, :-1], labels[:, 1:]
            mask = lab != -100
            lp, *_ = ChunkedLogProbFunction.apply(
                hs.reshape(-1, hs.size(-1)), head.weight, head.bias, lab.clamp(min=0).reshape(-1), 1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1"))
            lp = lp.view(mask.shape).masked_fill(~mask, 0)
            return h, -lp.sum() / n_items
    except ImportError:  # TRL's kernel API (1.x): another TRL version may not have it
        pass

    def plain():  # transformers' causal-LM loss (ForCausalLMLoss): the plain NLL on full logits
        h = hidden.detach().requires_grad_()
        logits = head(h)[:, :-1].float()
        return h, torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum") / n_items

    out = {"tokens": int(batch["attention_mask"].sum())}
    for name, fn in (("ours", lambda: ours(weights)), ("full", lambda: full(weights)), ("plain", plain),
                     ("trl", trl_fn)):
        if fn is None:
            continue
        fwd, bwd = [], []
        for _ in range(reps + 1):  # the first is a warm-up
            sync()
            t = time.perf_counter()
            h, loss = fn()
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            fwd.append(t1 - t)
            bwd.append(time.perf_counter() - t1)
        with PeakMemory(device) as mem:
            h, loss = fn()
            loss.backward()
        del h, loss
        out[name] = {"forward_ms": 1000 * statistics.median(fwd[1:]),
                     "backward_ms": 1000 * statistics.median(bwd[1:]), "peak_mem_delta_mib": mem.delta_mib}
    a, b = ours(weights)[1], full(weights)[1]  # fewer logits, the same loss
    out["same_loss_as_full_logits"] = bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))
    out["loss_ours"], out["loss_full"] = float(a), float(b)
    if trl_fn is not None:  # with every weight 1, ours is the plain NLL: it must equal TRL's
        _, a = ours(torch.ones_like(weights))
        _, b = trl_fn()
        out["same_loss_when_weights_1"] = bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))
        out["loss_ours_w1"], out["loss_trl"] = float(a), float(b)
    return out


# ----------------------------------------------------------------------------- workers


def _quiet():
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("trl").setLevel(logging.ERROR)


def worker(spec: dict) -> dict:
    """One quantization mode: load the base model(s) once, then alternate the trainers."""
    _quiet()
    import torch

    from a3t.config import TrainConfig
    from a3t.llm.models import load_model
    from a3t.train import training_dtype

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = dict(spec, device=device)
    real = spec.get("data") is not None
    # Real data: ours and TRL in the dtype training runs in (the same for both: a fair
    # comparison), "before" in float32 as the default campaign trained before.
    dtype = training_dtype(TrainConfig(), device) if real else ("float32" if device == "cpu" else "bfloat16")
    dtypes = {"ours": dtype, "trl": dtype, **({"before": "float32"} if real else {})}
    started = time.perf_counter()
    loaded = {d: load_model(spec["model"], load_in_4bit=spec["four_bit"], dtype=d, device=device, trainable=True)
              for d in sorted(set(dtypes.values()))}
    load_s = time.perf_counter() - started
    tokenizer = loaded[dtype][1]
    bases = {kind: loaded[d][0] for kind, d in dtypes.items()}
    n = spec["batch_size"] * spec["accumulation"] * (spec["steps"] + 1)
    if real:
        rows, data = campaign_rows(tokenizer, spec["data"], n)
    else:
        rows, data = build_rows(tokenizer, n, spec["seq_len"], spec["seed"])
    data["dtypes"] = dtypes
    kinds = list(dtypes)
    runs: dict[str, list] = {kind: [] for kind in kinds}
    for kind in kinds:
        run_trainer(kind, bases[kind], tokenizer, rows, s, warm_up_only=True)
    for rep in range(spec["reps"]):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
            console.print(f"  {'4-bit' if spec['four_bit'] else 'fp32'} rep {rep + 1}/{spec['reps']}: {kind} ...")
            runs[kind].append(run_trainer(kind, bases[kind], tokenizer, rows, s))
            r = runs[kind][-1]
            console.print(f"    {r['tokens_s']:.1f} tok/s, peak +{r['peak_mem_delta_mib']:.0f} MiB, "
                          f"cpu/wall {r['cpu_s'] / r['wall_s']:.2f}")
    # Every run of every trainer got the same micro-batches, in the same order.
    same_batches = len({tuple(r.pop("batches")) for rs in runs.values() for r in rs}) == 1
    head = head_bench(bases["ours"], rows, s, reps=3)
    return {"device": device, "threads": torch.get_num_threads(), "load_s": load_s, "data": data,
            "runs": runs, "same_batches": same_batches, "head": head,
            "model_params": sum(p.numel() for p in bases["ours"].parameters()),
            "vocab": bases["ours"].config.vocab_size, "worker_peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_worker(flag: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="a3t-train-speed-") as result:
        spec = dict(spec, result=result.name)
        # The worker's stdout goes to our stderr: stdout stays for the tables and the JSON.
        env = dict(os.environ)
        # On a shared machine, OpenMP threads that spin-wait at barriers while a sibling thread is
        # descheduled made every step 10-20x slower here (2 threads, 2 cores, another process
        # busy); passive waiting removes that (1.2 s instead of 12 s per forward). Export
        # OMP_WAIT_POLICY to override.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.run([sys.executable, __file__, flag, json.dumps(spec)], stdout=sys.stderr, env=env)
        text = Path(result.name).read_text()
        if proc.returncode != 0 or not text:
            raise SystemExit(f"train_speed worker {flag} failed (exit {proc.returncode})")
        return json.loads(text)


# ----------------------------------------------------------------------------- report


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tiny model (unless --model), few steps, 4-bit only: < 1 min on 2 cores")
    parser.add_argument("--model", metavar="PATH", help="HF model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random Mistral of the tests instead")
    parser.add_argument("--data", metavar="FILE",
                        help="a campaign's train_set.jsonl: train on its real trajectories (and time 'before' too)")
    parser.add_argument("--seq-len", type=int, help="synthetic data: tokens per sequence (default 512)")
    parser.add_argument("--steps", type=int,
                        help="timed optimizer steps per run, after 1 warm-up (default 3; --quick 2)")
    parser.add_argument("--4bit", dest="four_bit", action=argparse.BooleanOptionalAction, default=None,
                        help="QLoRA nf4 only / full precision only (default: both; --quick: 4-bit)")
    parser.add_argument("--reps", type=int, help="runs per trainer, alternated; medians (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (TrainConfig: 1)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker is not None:
        spec = json.loads(args._worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return

    if args.data is not None and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.data is not None and args.seq_len is not None:
        parser.error("--seq-len is for synthetic data: real rows keep their lengths")
    started = time.perf_counter()
    load_before = os.getloadavg()
    console.print(f"load average at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
                  f"on {os.cpu_count()} cores (a busy machine slows both trainers, not always equally)")
    q = args.quick
    seq_len = args.seq_len or 512
    steps = args.steps or (2 if q else 3)
    reps = args.reps or 2
    accumulation = args.accumulation or 2
    modes = [args.four_bit] if args.four_bit is not None else ([True] if q else [True, False])

    tmp = tempfile.TemporaryDirectory(prefix="a3t-train-speed-model-")
    if args.tiny or (q and not args.model):
        # --quick: SmolLM2 trains ~200-400 tokens/s here at best, so a minute cannot hold a
        # warm-up and timed steps for two trainers; the tiny model's cost is mostly its LM head
        # and loss (vocab 32768, hidden 64), i.e. the part where the two trainers differ.
        from a3t.llm.models import build_tiny_mistral

        model_path, model_name = build_tiny_mistral(Path(tmp.name) / "tiny"), "tiny-mistral"
    else:
        from a3t.llm.models import default_model_path

        model_path = Path(args.model) if args.model else default_model_path()
        model_name = model_path.name
    spec = {"model": str(model_path), "seq_len": seq_len, "steps": steps, "reps": reps,
            "batch_size": args.batch_size, "accumulation": accumulation, "seed": args.seed, "threads": args.threads,
            "data": args.data}

    results = {}
    for four_bit in modes:
        console.print(f"[bold]{model_name}, {'QLoRA 4-bit nf4' if four_bit else 'LoRA fp32'}[/]: worker starts")
        results[four_bit] = _run_worker("--_worker", dict(spec, four_bit=four_bit))
    device = next(iter(results.values()))["device"]

    tmp.cleanup()

    # ------------------------------------------------------------------ tables
    out = Console(width=max(Console().width, 150))
    first = next(iter(results.values()))
    d = first["data"]
    real = args.data is not None
    if real:
        shape = (f"{d['rows']} real rows of {d['distinct']} trajectories (mean {d['mean_tokens_per_row']:.0f} tokens) "
                 f"x batch {args.batch_size} x accumulation {accumulation}")
    else:
        shape = (f"{seq_len} tokens x batch {args.batch_size} x accumulation {accumulation} = "
                 f"{args.batch_size * accumulation * seq_len} tokens/step")
    table = Table(title=f"LoRA training speed on {device} ({first['threads']} threads), {model_name}: {shape}, "
                        f"{steps} timed steps after 1 warm-up, median of {reps} run(s) per trainer")
    for c in ("setup", "trainer", "dtype", "tokens/s", "s/step", "fwd+loss s", "backward s", "optim+rest s",
              "cpu/wall", "peak mem +MiB", "ours/this tok/s"):
        table.add_column(c, justify="left" if c in ("setup", "trainer", "dtype") else "right")
    fig: dict = {"bench": "train_speed", "quick": q, "device": device, "model": model_name,
                 "threads": first["threads"], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                 "data": "real" if real else "synthetic", "batch_size": args.batch_size,
                 "accumulation": accumulation, "steps": steps, "reps": reps, "dtype": d["dtypes"]["ours"],
                 "loss_token_fraction": d["loss_token_fraction"], "weights": d["weights"]}
    if real:
        fig.update({"data_file": d["file"], "rows": d["rows"], "distinct_trajectories": d["distinct"],
                    "mean_tokens_per_row": d["mean_tokens_per_row"], "before_dtype": d["dtypes"]["before"]})
    else:
        fig["seq_len"] = seq_len
    names = {"ours": "a3t A3TTrainer", "trl": "TRL SFTTrainer", "before": "a3t before"}
    # ours/TRL keeps its historical key names (ratio_4bit...); ours/before: ratio_vs_before_4bit...
    ratio_keys = {"trl": "ratio", "before": "ratio_vs_before"}
    for four_bit, res in results.items():
        tag = "4bit" if four_bit else "fp32"
        setup = "QLoRA nf4" if four_bit else "LoRA fp32"
        runs = res["runs"]
        fig[f"same_batches_{tag}"] = res["same_batches"]
        for kind, rs in runs.items():
            ratio = _med(runs["ours"], "tokens_s") / _med(rs, "tokens_s")
            table.add_row(setup, names[kind], res["data"]["dtypes"][kind], f"{_med(rs, 'tokens_s'):.1f}",
                          f"{statistics.median(x for r in rs for x in r['step_s']):.2f}",
                          f"{_med(rs, 'forward_s') / steps:.2f}", f"{_med(rs, 'backward_s') / steps:.2f}",
                          f"{_med(rs, 'other_s') / steps:.2f}",
                          f"{statistics.median(r['cpu_s'] / r['wall_s'] for r in rs):.2f}",
                          f"{_med(rs, 'peak_mem_delta_mib'):.0f}", "" if kind == "ours" else f"{ratio:.3f}")
            fig.update({
                f"{kind}_tok_s_{tag}": _med(rs, "tokens_s"), f"{kind}_tok_s_{tag}_runs": [r["tokens_s"] for r in rs],
                f"{kind}_peak_mem_mib_{tag}": _med(rs, "peak_mem_delta_mib"),
                f"{kind}_fwd_loss_s_{tag}": _med(rs, "forward_s") / steps,
                f"{kind}_backward_s_{tag}": _med(rs, "backward_s") / steps,
            })
            if kind in ratio_keys:
                fig[f"{ratio_keys[kind]}_{tag}"] = ratio
                # the same from the median step time (less swayed by one step another process slowed)
                fig[f"{ratio_keys[kind]}_median_step_{tag}"] = (
                    statistics.median(x for r in rs for x in r["step_s"])
                    / statistics.median(x for r in runs["ours"] for x in r["step_s"]))
        fig[f"load_s_{tag}"] = res["load_s"]
        h = res["head"]
        for k in ("ours", "full", "plain", "trl"):
            if k in h:
                fig[f"head_{k}_ms_{tag}"] = h[k]["forward_ms"] + h[k]["backward_ms"]
                fig[f"head_{k}_mem_mib_{tag}"] = h[k]["peak_mem_delta_mib"]
        fig[f"head_same_loss_as_full_{tag}"] = h["same_loss_as_full_logits"]
        if "same_loss_when_weights_1" in h:
            fig[f"head_same_loss_{tag}"] = h["same_loss_when_weights_1"]
    out.print(table)

    head = Table(title=f"Where the loss costs: LM head + loss alone on one micro-batch ({first['head']['tokens']} "
                       f"tokens, vocab {first['vocab']}, {d['dtypes']['ours']}), median of 3")
    for c in ("setup", "loss", "forward ms", "backward ms", "peak mem +MiB", "share of a micro-step"):
        head.add_column(c, justify="left" if c in ("setup", "loss") else "right")
    for four_bit, res in results.items():
        micro = statistics.median(x for r in res["runs"]["ours"] for x in r["step_s"]) / accumulation
        for k, label in (("ours", "ours: logits at loss positions + next_token_nll"),
                         ("full", "before: full logits + weighted_nll"), ("plain", "plain NLL on the full logits"),
                         ("trl", "TRL: fused head, chunked log-probs")):
            if k in res["head"]:
                h = res["head"][k]
                head.add_row("QLoRA nf4" if four_bit else "LoRA fp32", label, f"{h['forward_ms']:.0f}",
                             f"{h['backward_ms']:.0f}", f"{h['peak_mem_delta_mib']:.0f}",
                             f"{(h['forward_ms'] + h['backward_ms']) / 1000 / micro:.0%}")
    out.print(head)
    for four_bit, res in results.items():
        h = res["head"]
        out.print(f"{'4-bit' if four_bit else 'fp32'}: ours = the full-logits loss: {h['same_loss_as_full_logits']} "
                  f"({h['loss_ours']:.5f} vs {h['loss_full']:.5f}); every trainer got the same batches: "
                  f"{res['same_batches']}")
        if "same_loss_when_weights_1" in h:
            out.print(f"{'4-bit' if four_bit else 'fp32'}: with every weight 1 ours = TRL's NLL: "
                      f"{h['same_loss_when_weights_1']} ({h['loss_ours_w1']:.5f} vs {h['loss_trl']:.5f})")
    if real:
        out.print(f"data: {d['file']}: {d['rows']} rows taking the {d['rendered']} rendered trajectories (of "
                  f"{d['trajectories']} in the file) in turn, {d['distinct']} distinct, {d['min_tokens']}-"
                  f"{d['max_tokens']} tokens, mean {d['mean_tokens_per_row']:.0f}, {d['loss_token_fraction']:.0%} "
                  f"of tokens in the loss, weights {d['weights']}, rendered with {d['settings']}; "
                  f"dtypes {d['dtypes']}")
    else:
        out.print(f"data: {d['sequences']} sequences ({d['distinct']} distinct trajectories, {d['from_start']} from "
                  f"their start, the rest their last {seq_len} tokens), {d['loss_token_fraction']:.0%} of tokens in "
                  f"the loss, pg weights {d['weights']}; dtypes {d['dtypes']}")
    out.print("model load (excluded): " + ", ".join(f"{'4-bit' if k else 'fp32'} {v['load_s']:.1f} s"
                                                     for k, v in results.items()))

    fig["wall_s"] = time.perf_counter() - started
    fig["load_avg_before"] = load_before[0]
    fig["load_avg_after"] = os.getloadavg()[0]
    tags = ["4bit" if m else "fp32" for m in modes]

    def listed(key: str) -> str:
        return ", ".join(f"{fig[key + '_' + t]:.3f}" for t in tags)

    summary = f"ours/TRL tokens/s: {listed('ratio')} (target >= 0.9)"
    if real:
        summary += f"; ours/before: {listed('ratio_vs_before')} (target >= 2)"
        if len(tags) == 2:
            # The CPU default profile trains without 4-bit since 2026-12-03; before, it trained QLoRA.
            fig["ratio_default_vs_before_4bit"] = fig["ours_tok_s_fp32"] / fig["before_tok_s_4bit"]
            summary += (f"; ours without 4-bit (the CPU default) / before in 4-bit (the previous default): "
                        f"{fig['ratio_default_vs_before_4bit']:.3f}")
    out.print(f"{summary}; wall {fig['wall_s']:.0f} s")
    fig = {k: round(v, 3) if isinstance(v, float) else
           ([round(x, 3) if isinstance(x, float) else x for x in v] if isinstance(v, list) else v)
           for k, v in fig.items()}
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
