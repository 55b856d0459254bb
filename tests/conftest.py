import os
import subprocess

import pytest

from a3t.envs.alfworld_gen import TASK_TYPES, game_jobs, generate_games


@pytest.fixture(scope="session")
def games_root(tmp_path_factory):
    """Games generated on the fly (about 1 s each): one train game per task type and
    two valid_unseen games. Generated, not committed, so the tests also cover the
    generator against whatever alfworld tables are installed."""
    root = tmp_path_factory.mktemp("games")
    jobs = game_jobs(root, {"train": len(TASK_TYPES), "valid_unseen": 2}, seed=0, size="small")
    list(generate_games(jobs, workers=2))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Mistral with the real Mistral v3 tokenizer, built once (about 2 s)."""
    from a3t.llm.models import build_tiny_mistral

    return build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"), seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model runs several times faster on one thread than on two when the
    machine's (two) cores are busy; restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of an `a3t` subprocess: its own Prefect home, offline, the workspace's MLflow store."""
    home = tmp_path_factory.mktemp("prefect-home")
    return dict(os.environ, PREFECT_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                MLFLOW_TRACKING_URI="", COLUMNS="200")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A fresh git repository for a module's campaign."""
    root = tmp_path_factory.mktemp("workspace")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB file system (tmpfs) that fills up: skipped where mounting is not allowed.
    Yields a function that gives it more room, as a user freeing space would."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")

    def grow(size: str = "16m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, grow
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
