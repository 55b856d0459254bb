"""``python -m a3t``: the ``a3t`` command."""

from a3t.orchestration.cli import app

app()
