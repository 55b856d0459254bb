"""Prefect flows: they only orchestrate the tasks in tasks/ (self-improvement rounds, evaluation, rollback)."""
