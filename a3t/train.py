"""Contrastive self-training: QLoRA with A3T's weighted log-likelihood, on the HF Trainer.

The loss of a batch is  -sum_i w_i * m_i * log p(x_i | x_<i) / N  where w_i is the weight
of the token's trajectory (a3t.filter.trajectory_weight), m_i its loss mask, and N the
number of loss tokens in the whole optimizer step (the Trainer's ``num_items_in_batch``,
so gradient accumulation gives the same loss as one big batch). Normalizing per token,
not per trajectory, is our choice: a long trajectory counts by its length, as in plain
language-model fine-tuning, and ``sft`` is then exactly the usual NLL on successes.

The Trainer brings gradient accumulation, epoch checkpoints, resuming and multi-GPU.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from a3t.config import TrainConfig
from a3t.data import Example

log = logging.getLogger("a3t.train")
ADAPTER_FILE = "adapter_model.safetensors"


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """-(sum of weight * log-prob of each next token) / number of loss tokens.

    logits [B, T, V]; labels [B, T] with -100 where a token is not in the loss; weights
    [B, T] (the trajectory's weight on each of its tokens). Position t predicts token t+1.
    """
    return next_token_nll(logits[:, :-1], labels[:, 1:], weights[:, 1:], num_items)


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                   num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """weighted_nll with the logits already aligned to their targets: logits [B, P, V] predict
    targets [B, P] (-100: not in the loss), weighted by weights [B, P]."""
    in_loss = targets != -100
    # Flattened to [B*P, V]: the same values as the [B, V, P] layout, 4-7x faster on CPU.
    logp = -torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view(targets.shape)
    total = (weights * logp * in_loss).sum()
    count = num_items if num_items is not None else in_loss.sum()
    return -total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions t (of any row) whose next token t+1 is in the loss: the only ones whose
    logits the loss reads. The vocabulary projection of the others is skipped."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {
            "input_ids": e.input_ids,
            "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)],
            "weights": [e.weight] * len(e.input_ids),
        }


class Collator:
    """Right-pads a batch; padding is outside the loss and the attention."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(key, value, dtype):
            return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch], dtype=dtype)

        ids = pad("input_ids", self.pad_id, torch.long)
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": pad("labels", -100, torch.long),
                "weights": pad("weights", 0.0, torch.float)}


class A3TTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss divides by the step's token count itself: the Trainer must not also
        # divide it by the gradient accumulation steps.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, weights = inputs.pop("labels"), inputs.pop("weights")
        # Logits only where a next token is in the loss (the model's logits_to_keep): with the
        # observations and the prompt out of the loss that is a small share of the positions,
        # and the vocabulary projection of the rest was a fifth of a SmolLM2 step. Same loss.
        keep = predicting_positions(labels)
        outputs = model(**inputs, logits_to_keep=keep)
        loss = next_token_nll(outputs.logits, labels[:, keep + 1], weights[:, keep + 1], num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens while DDP averages the
            # gradients over processes: scale back, as Trainer.compute_loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def average_adapters(folders: list[Path], out: Path) -> Path:
    """An adapter whose every tensor is the mean of the folders' (same shapes, same config)."""
    states = [load_file(str(Path(f) / ADAPTER_FILE)) for f in folders]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}
    out.mkdir(parents=True, exist_ok=True)
    save_file(mean, str(out / ADAPTER_FILE))
    shutil.copy(Path(folders[-1]) / "adapter_config.json", out / "adapter_config.json")
    return out


class TrainingWriteError(OSError):
    """A checkpoint or the adapter could not be written for lack of space; whole checkpoints are kept."""


def _disk_full(path: Path, error: Exception) -> bool:
    # torch.save and safetensors report a full disk as RuntimeError or SafetensorError, not OSError.
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return True
    existing = next(p for p in (path, *path.parents) if p.exists())  # a failure may come before out_dir exists
    return shutil.disk_usage(existing).free < 1 << 20


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The last checkpoint that was written whole, to resume from. The Trainer writes a
    checkpoint's trainer_state.json last, so a process killed while saving leaves a folder
    without it (or with it cut short): such folders are removed, or resuming would fail."""
    if not checkpoints.is_dir():
        return None
    complete = []
    for folder in checkpoints.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append(folder)
        except (OSError, ValueError):
            log.warning("removing %s: a checkpoint cut short by a crash", folder)
            shutil.rmtree(folder)
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def training_dtype(cfg: TrainConfig, device: str) -> str:
    """train.dtype with auto resolved for ``device``."""
    from a3t.llm.models import compute_dtype

    return compute_dtype(cfg.dtype, device)


def _optimizer(cfg: TrainConfig, device: str) -> str:
    if device == "cpu" and cfg.optimizer.startswith("paged_"):
        log.warning("paged optimizers need CUDA: using adamw_torch on CPU instead of %s", cfg.optimizer)
        return "adamw_torch"
    return cfg.optimizer


def train_adapter(
    examples: list[Example],
    base_model: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    epochs: float,
    init_adapter: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Train a LoRA adapter on ``examples`` into ``out_dir/adapter``; resumes from the last
    epoch checkpoint in ``out_dir/checkpoints`` if there is one. Returns the statistics
    also written to ``out_dir/adapter/train_stats.json``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    from a3t.llm.models import load_model

    if not examples:
        raise ValueError("no training examples: no trajectory has a non-zero weight")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    # trainable=True: bitsandbytes must not repack 4-bit weights for inference-only kernels.
    dtype = training_dtype(cfg, device)
    model, tokenizer = load_model(base_model, load_in_4bit=cfg.load_in_4bit, dtype=dtype, device=device, trainable=True)
    set_seed(cfg.seed)  # before LoRA's random init, not only before data order
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        layers = model.config.num_hidden_layers
        top = None if cfg.lora_top_layers is None else list(range(max(layers - cfg.lora_top_layers, 0), layers))
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), layers_to_transform=top, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    checkpoints = out_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        optim=_optimizer(cfg, device),
        save_strategy="epoch",
        save_total_limit=cfg.average_last,
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,  # the weights column is not a model input
        seed=cfg.seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
    )
    trainer = A3TTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                         data_collator=Collator(tokenizer.pad_token_id))
    resume = last_complete_checkpoint(checkpoints)
    adapter = out_dir / "adapter"
    try:
        trainer.train(resume_from_checkpoint=resume)
        last = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-cfg.average_last :]
        average_adapters(last, adapter)
        tokenizer.save_pretrained(str(adapter))
    except Exception as e:
        if not _disk_full(out_dir, e):
            raise
        raise TrainingWriteError(
            f"{out_dir}: the disk is full ({e}); the checkpoints written whole are kept (the last: "
            f"{last_complete_checkpoint(checkpoints) or 'none yet'}): free some space and rerun, training resumes from it"
        ) from e
    losses: dict[int, list[float]] = {}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            losses.setdefault(max(int(-(-entry["epoch"] // 1)), 1), []).append(entry["loss"])
    stats = {
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "loss_tokens": sum(sum(e.loss_mask) for e in examples),
        "steps": trainer.state.global_step,
        "epochs": epochs,
        "dtype": dtype,
        "loss_per_epoch": [sum(v) / len(v) for _, v in sorted(losses.items())],
        "averaged_checkpoints": [p.name for p in last],
        "resumed_from": Path(resume).name if resume else None,
        "init_adapter": str(init_adapter) if init_adapter is not None else None,  # continued from (lineage)
        "wall_s": time.perf_counter() - started,
    }
    (adapter / "train_stats.json").write_text(json.dumps(stats, indent=2))
    return stats
