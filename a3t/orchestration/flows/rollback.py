"""Rollback flow: restore the dataset of a round's DVC tag; the next run continues from it.

Rounds after the tag's round are abandoned: their unversioned results (adapters, eval
episodes) are removed from the workspace and their MLflow runs marked rolled back (the
runs and registered versions stay in MLflow for comparison; the champion alias moves
back if it pointed at one of them). A round the champion gate rejected is no target: the
next run would roll its data back again.
"""

from __future__ import annotations

from prefect import flow

from a3t.config import load_config
from a3t.orchestration import steps
from a3t.pipeline import Workspace
from a3t.versioning import WorkspaceError, parse_tag, workspace_lock


@flow(name="a3t-rollback")
def rollback(
    tag: str,
    config_file: str | None = None,
    profile: str = "default",
    overrides: list[str] | None = None,
    workspace: str = ".",
    force: bool = False,
) -> dict:
    campaign, round_ = parse_tag(tag)
    cfg = load_config(config_file, [*(overrides or []), f"pipeline.campaign={campaign}"], profile)
    ws = Workspace.of(cfg, workspace)
    if round_ in ws.rejected_rounds():
        # Restored, its data would be rolled back again by the next run: the gate's rule stands.
        raise WorkspaceError(f"{tag} is the dataset of round {round_}, which the champion gate rejected "
                             f"({ws.round_summary(round_).decision.reason}); roll back to an accepted round's tag "
                             "(`a3t status` shows each round's decision)")
    with workspace_lock(ws.root):
        restored = steps.restore_dataset(cfg, workspace, tag, force)
        steps.abandon_later_rounds(cfg, workspace, round_)
    return restored
