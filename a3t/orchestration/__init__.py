"""The orchestration layer: the `a3t` command (cli), Prefect tasks (steps) and flows, MLflow
tracking. Everything that imports Prefect or MLflow lives here; the rest of ``a3t`` is the
library these call, plain functions over files."""
