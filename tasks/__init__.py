"""Prefect tasks: each wraps one a3t library call and passes plain data and paths."""
