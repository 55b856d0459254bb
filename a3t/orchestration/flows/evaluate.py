"""Evaluation flow: a policy (the base model, an adapter, or a round's adapter) on the
evaluation splits: first-attempt success and success within k attempts, per task type."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from a3t import pipeline
from a3t.config import load_config
from a3t.orchestration import steps
from a3t.pipeline import Workspace


@flow(name="a3t-evaluate")
def evaluate(
    config_file: str | None = None,
    profile: str = "default",
    overrides: list[str] | None = None,
    workspace: str = ".",
    adapter: str | None = None,
    round_: int | None = None,
) -> dict[str, dict]:
    """Success rates per split of ``adapter`` (a peft folder), of round ``round_``'s adapter,
    or of the base model when neither is given. Episodes are kept beside the adapter's round
    (``data/runs/<campaign>/round_<k>/eval``) or in ``data/runs/eval/<name>``."""
    cfg = load_config(config_file, overrides or [], profile)
    ws = Workspace.of(cfg, workspace)
    if round_ is not None:
        trained = pipeline.policy_adapter(ws, round_)
        adapter, out = (str(trained) if trained else None), ws.round_run(round_) / "eval"
    else:
        out = ws.root / "data" / "runs" / "eval" / (Path(adapter).resolve().parent.name if adapter else "base")
    llm_task = steps.evaluate_policy.with_options(retries=cfg.pipeline.llm_task_retries, retry_delay_seconds=5)
    root = str(pipeline.eval_games_root(cfg, ws))
    return {split: llm_task(cfg, root, split, adapter, str(out / f"{split}.jsonl")) for split in cfg.eval.splits}
