"""Prefect flows: they only orchestrate the tasks of a3t.orchestration.steps (self-improvement rounds, evaluation, rollback, schedules)."""
