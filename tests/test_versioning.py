"""Dataset versions with real git and DVC in a temporary workspace: pointer-only commits
that leave a user's changes alone, one tag per round, exact rollback checked by hash,
refusal of dirty tracked data, the run lock, and a DVC remote in a local folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from a3t.versioning import (
    DVC_INIT_FILES,
    WorkspaceBusy,
    WorkspaceError,
    check_clean,
    dataset_hash,
    ensure_workspace,
    list_versions,
    lock_holder,
    parse_tag,
    rollback,
    tag_name,
    version_dataset,
    workspace_lock,
)

DATA = ["data/games", "data/trajectories"]
# DVC 3.67's own use of pygtrie's deprecated API; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc")


@pytest.fixture(autouse=True)
def no_git_identity(tmp_path, monkeypatch):
    """Git as on a CI machine: no global or system config, hence no identity."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)


def git(root, *args) -> str:
    """The user's own git commands (with an identity given on the command line)."""
    cmd = ["git", "-c", "user.name=user", "-c", "user.email=user@example.com", *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout.rstrip()


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def workspace(tmp_path):
    """A user's repository with one commit, a staged change and an unstaged one, made a
    workspace, with games and round 0's trajectories written."""
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "--quiet")
    write(root, "notes.txt", "v1\n")
    write(root, "code.py", "print(1)\n")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "user's work")
    write(root, "staged.txt", "staged\n")
    git(root, "add", "staged.txt")
    write(root, "notes.txt", "v2, not staged\n")
    ensure_workspace(root)
    write(root, "data/games/json_2.1.1/train/g1/game.tw-pddl", "{}\n")
    write(root, "data/trajectories/c/round_0/rollout.jsonl", '{"episode": 1}\n')
    return root


def user_changes_untouched(root):
    status = git(root, "status", "--porcelain", "--", "notes.txt", "staged.txt", "code.py").splitlines()
    assert sorted(status) == [" M notes.txt", "A  staged.txt"]
    assert (root / "notes.txt").read_text() == "v2, not staged\n"


def test_tag_names_round_trip_and_are_valid_git_refs(tmp_path):
    tag = tag_name("paper.v1", 3)
    assert tag == "a3t/paper.v1/round-3" and parse_tag(tag) == ("paper.v1", 3)
    subprocess.run(["git", "check-ref-format", f"refs/tags/{tag}"], check=True)
    for bad in ["a..b", "x.lock", "a/b", "-x", "", "a b"]:
        with pytest.raises(WorkspaceError, match="campaign name"):
            tag_name(bad, 0)
    with pytest.raises(WorkspaceError, match="round"):
        tag_name("c", -1)
    with pytest.raises(WorkspaceError, match="not an a3t dataset tag"):
        parse_tag("v1.0")


def test_ensure_workspace_in_a_plain_folder(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    done = ensure_workspace(root)
    assert "initialized a git repository" in done[0] and "initialized DVC" in done[1]
    assert sorted(git(root, "show", "--name-only", "--format=", "HEAD").splitlines()) == sorted(DVC_INIT_FILES)
    assert git(root, "log", "-1", "--format=%an <%ae>") == "a3t <a3t@localhost>"
    assert subprocess.run(["git", "config", "user.name"], cwd=root).returncode == 1  # no config written
    # The run's folders ignore themselves; mlflow/ shows only its .gitignore (to be committed).
    write(root, "data/runs/r/adapter.bin", "x")
    write(root, ".a3t/run.lock", "")
    write(root, "mlflow/mlflow.db", "x")
    write(root, "mlflow/README.md", "how to open the UI")
    assert sorted(git(root, "status", "--porcelain", "--untracked-files=all").splitlines()) == [
        "?? mlflow/.gitignore", "?? mlflow/README.md"]
    assert ensure_workspace(root) == []


def test_ensure_workspace_keeps_a_users_staged_changes(workspace):
    # The fixture staged and changed files before ensure_workspace initialized DVC.
    assert git(workspace, "log", "-1", "--format=%s") == "a3t: initialize DVC"
    assert sorted(git(workspace, "show", "--name-only", "--format=", "HEAD").splitlines()) == sorted(DVC_INIT_FILES)
    user_changes_untouched(workspace)


def test_ensure_workspace_refuses_a_subfolder_of_a_repository(workspace):
    with pytest.raises(WorkspaceError, match="not its root"):
        ensure_workspace(workspace / "data")


def test_rounds_are_tagged_pointer_commits_and_rollback_restores_round_0(workspace):
    root = workspace
    v0 = version_dataset(root, DATA, "c", 0, "round 0 data")
    assert v0.tag == "a3t/c/round-0" and v0.new_commit and v0.moved_from is None
    assert sorted(git(root, "show", "--name-only", "--format=", v0.commit).splitlines()) == [
        "data/.gitignore", "data/games.dvc", "data/trajectories.dvc"]
    user_changes_untouched(root)
    assert v0.hashes == {p: dataset_hash(root / p) for p in DATA}

    write(root, "data/trajectories/c/round_0/rollout.jsonl", '{"episode": 1, "edited": true}\n')
    write(root, "data/trajectories/c/round_1/rollout.jsonl", '{"episode": 2}\n')
    v1 = version_dataset(root, DATA, "c", 1, "round 1 data")
    assert v1.new_commit and v1.commit != v0.commit
    assert v1.hashes["data/games"] == v0.hashes["data/games"]
    assert v1.hashes["data/trajectories"] != v0.hashes["data/trajectories"]
    assert sorted(git(root, "show", "--name-only", "--format=", v1.commit).splitlines()) == ["data/trajectories.dvc"]
    assert [(v.round, v.tag, v.commit) for v in list_versions(root, "c")] == [
        (0, v0.tag, v0.commit), (1, v1.tag, v1.commit)]
    assert list_versions(root, "other") == []
    # The same data again: no commit, the tag stays.
    assert version_dataset(root, DATA, "c", 1, "round 1 data") == replace(v1, new_commit=False)

    back = rollback(root, v0.tag, DATA)
    assert back.new_commit and back.hashes == v0.hashes
    assert not (root / "data/trajectories/c/round_1").exists()
    assert (root / "data/trajectories/c/round_0/rollout.jsonl").read_text() == '{"episode": 1}\n'
    assert {p: dataset_hash(root / p) for p in DATA} == v0.hashes
    rollback_message = git(root, "log", "-1", "--format=%s")
    assert rollback_message.startswith("a3t: rollback data/games, data/trajectories to a3t/c/round-0")
    check_clean(root, DATA)
    user_changes_untouched(root)

    # Round 1 redone from round 0: its tag moves to the new data.
    write(root, "data/trajectories/c/round_1/rollout.jsonl", '{"episode": 3}\n')
    redo = version_dataset(root, DATA, "c", 1, "round 1 redone")
    assert redo.moved_from == v1.commit and redo.commit == git(root, "rev-parse", "HEAD")
    assert git(root, "rev-parse", f"{v1.tag}^{{commit}}") == redo.commit
    assert list_versions(root, "c")[1].commit == redo.commit
    user_changes_untouched(root)


def test_dataset_hash_is_dvcs(workspace):
    # DVC sorts a folder's files by their path as a string: "a-b/..." before "a/...".
    for rel in ["a/b", "a-b/c", "a.b", "A/z", "é/x"]:
        write(workspace, f"data/trajectories/{rel}", rel)
    v = version_dataset(workspace, ["data/trajectories"], "c", 0, "round 0")
    assert dataset_hash(workspace / "data/trajectories") == v.hashes["data/trajectories"]
    write(workspace, "data/one.jsonl", "{}\n")
    v = version_dataset(workspace, ["data/one.jsonl"], "c", 1, "a single file")
    assert dataset_hash(workspace / "data/one.jsonl") == v.hashes["data/one.jsonl"]


def test_changes_to_tracked_data_stop_a_run_and_a_rollback(workspace):
    root = workspace
    v0 = version_dataset(root, DATA, "c", 0, "round 0")
    write(root, "data/trajectories/c/round_0/rollout.jsonl", "edited by hand\n")
    write(root, "data/trajectories/c/round_1/partial.jsonl", "{}\n")
    with pytest.raises(WorkspaceError) as refused:
        check_clean(root, DATA)
    message = str(refused.value)
    assert "data/trajectories has changes not recorded in data/trajectories.dvc" in message
    assert "data/trajectories/c/round_0/rollout.jsonl (modified)" in message
    assert "data/trajectories/c/round_1/partial.jsonl (added)" in message
    assert "dvc checkout --force data/trajectories.dvc" in message
    # A resumed round expects its own folder to have changed, and only that.
    with pytest.raises(WorkspaceError, match="round_0/rollout.jsonl"):
        check_clean(root, DATA, allow=["data/trajectories/c/round_1"])
    write(root, "data/trajectories/c/round_0/rollout.jsonl", '{"episode": 1}\n')
    check_clean(root, DATA, allow=["data/trajectories/c/round_1"])

    with pytest.raises(WorkspaceError, match="changes not recorded"):
        rollback(root, v0.tag, DATA)
    assert (root / "data/trajectories/c/round_1/partial.jsonl").exists()  # nothing touched
    rollback(root, v0.tag, DATA, force=True)
    assert not (root / "data/trajectories/c/round_1").exists()

    write(root, "data/games.dvc", (root / "data/games.dvc").read_text() + "# edited\n")
    with pytest.raises(WorkspaceError, match="data/games.dvc .* has uncommitted changes"):
        check_clean(root, DATA)
    git(root, "checkout", "--", "data/games.dvc")
    subprocess.run(["rm", "-r", str(root / "data/games")], check=True)
    with pytest.raises(WorkspaceError, match="data/games is missing .*`dvc checkout data/games.dvc`"):
        check_clean(root, DATA)
    user_changes_untouched(root)


def test_unknown_tags_and_untracked_paths_are_named(workspace):
    v0 = version_dataset(workspace, ["data/trajectories"], "c", 0, "round 0")
    with pytest.raises(WorkspaceError, match=r"unknown tag 'a3t/c/round-7'; tags of campaign 'c': a3t/c/round-0"):
        rollback(workspace, "a3t/c/round-7", DATA)
    with pytest.raises(WorkspaceError, match="a3t/c/round-0 does not version data/games"):
        rollback(workspace, v0.tag, DATA)
    with pytest.raises(WorkspaceError, match="nothing to version"):
        version_dataset(workspace, ["data/nothing"], "c", 1, "x")


def test_git_ignored_pointers_are_refused_with_the_rule(workspace):
    write(workspace, ".gitignore", "/data/\n")
    with pytest.raises(WorkspaceError, match=r"data/games.dvc is ignored by git \(.gitignore:1:/data/\)"):
        version_dataset(workspace, DATA, "c", 0, "round 0")
    # The rules the message suggests let the pointers through and keep the data ignored.
    write(workspace, ".gitignore", "/data/*\n!/data/*.dvc\n!/data/.gitignore\n")
    v0 = version_dataset(workspace, DATA, "c", 0, "round 0")
    assert "data/games.dvc" in git(workspace, "show", "--name-only", "--format=", v0.commit)


def test_a_local_folder_remote_gets_the_data_and_restores_a_lost_cache(workspace, tmp_path):
    remote = tmp_path / "remote"
    write(tmp_path, "not-a-folder", "")
    with pytest.raises(WorkspaceError, match="dvc push -r a3t .* failed.* committed and tagged locally: call again"):
        version_dataset(workspace, DATA, "c", 0, "round 0", remote=str(tmp_path / "not-a-folder"))
    v0 = version_dataset(workspace, DATA, "c", 0, "round 0", remote=str(remote))  # the retry
    assert not v0.new_commit and [v.tag for v in list_versions(workspace, "c")] == [v0.tag]
    objects = lambda store: sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    assert objects(remote) == objects(workspace / ".dvc/cache") and len(objects(remote)) == 4  # 2 files, 2 listings
    assert "a3t" in (workspace / ".dvc/config.local").read_text()
    assert git(workspace, "status", "--porcelain", "--", ".dvc") == ""  # the user's DVC config is untouched
    write(workspace, "data/trajectories/c/round_0/rollout.jsonl", "changed in round 1\n")
    version_dataset(workspace, DATA, "c", 1, "round 1", remote=str(remote))
    # Round 0's trajectories are now only in the remote.
    subprocess.run(["rm", "-r", str(workspace / ".dvc/cache")], check=True)
    rollback(workspace, v0.tag, DATA)
    assert {p: dataset_hash(workspace / p) for p in DATA} == v0.hashes
    # Without the remote, what is not in the cache cannot come back, and the error says so.
    (workspace / ".dvc/config.local").unlink()
    subprocess.run(["rm", "-r", str(workspace / ".dvc/cache")], check=True)
    before = git(workspace, "rev-parse", "HEAD")
    with pytest.raises(WorkspaceError, match="data of a3t/c/round-1 .* no DVC remote is set.* Nothing was rolled back"):
        rollback(workspace, "a3t/c/round-1", DATA)
    assert git(workspace, "rev-parse", "HEAD") == before and git(workspace, "status", "--porcelain", "--", "data") == ""
    assert {p: dataset_hash(workspace / p) for p in DATA} == v0.hashes


def test_dvc_stages_call_the_cli_beside_the_versioned_pointers(workspace):
    from dvc.repo import Repo

    repo_root = Path(__file__).resolve().parents[1]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo_root / name, workspace / name)
    version_dataset(workspace, DATA, "c", 0, "round 0")
    repo = Repo(str(workspace))
    try:
        # Building the graph is where DVC refuses outputs that overlap the pointers' data.
        stages = {getattr(stage, "name", None) or Path(stage.path).relative_to(workspace).as_posix(): stage
                  for stage in repo.index.graph.nodes}
    finally:
        repo.close()
    assert stages["games"].cmd == "a3t games generate --profile default"
    assert stages["round"].cmd == "a3t round --profile default --round 0 pipeline.campaign=default env.name=alfworld"
    assert {"data/games.dvc", "data/trajectories.dvc"} <= set(stages)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from a3t.versioning import workspace_lock
    with workspace_lock(sys.argv[1], command="a3t run --profile test"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_run_is_refused_until_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceError) as refused:
            with workspace_lock(tmp_path):
                pass
        assert f"another a3t run (pid {holder.pid}, started " in str(refused.value)
        assert "command 'a3t run --profile test') holds the lock on workspace" in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_holder(tmp_path) is None  # the killed holder's record names a dead process
    with workspace_lock(tmp_path, command="second"):
        assert lock_holder(tmp_path)["command"] == "second"
        with pytest.raises(WorkspaceError, match=r"command 'second'"):
            with workspace_lock(tmp_path):
                pass
    with workspace_lock(tmp_path):
        pass


def test_a_second_run_may_wait_for_the_first(tmp_path):
    """pipeline.when_busy=wait: the second run takes the workspace when the first lets it go."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace("time.sleep(60)", "time.sleep(2)"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceBusy):
            with workspace_lock(tmp_path):
                pass
        with workspace_lock(tmp_path, wait=True):
            assert holder.wait(timeout=30) == 0  # it finished before this run held the workspace
    finally:
        holder.kill()
        holder.wait()
