"""The library is plain functions over files: Prefect and MLflow stay in a3t.orchestration."""

import subprocess
import sys

CHECK = """
import pkgutil, importlib, sys
import a3t
for module in pkgutil.walk_packages(a3t.__path__, "a3t."):
    if not module.name.startswith(("a3t.orchestration", "a3t.__main__")):
        importlib.import_module(module.name)
print(sorted({name.split(".")[0] for name in sys.modules} & {"prefect", "mlflow", "tasks", "flows"}))
"""


def test_the_library_imports_neither_prefect_nor_mlflow():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
