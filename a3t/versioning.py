"""Dataset versions of a workspace: DVC keeps the data, git keeps the pointers and the tags.

The workspace is the directory `a3t run` works in, the root of a git repository (a3t's own
clone or a user's repo). ``data/games`` and ``data/trajectories`` are tracked with ``dvc add``:
their content goes into DVC's local cache (and to a remote when one is set), and their pointers
``data/games.dvc`` and ``data/trajectories.dvc`` are committed to git. Each round ends with one
commit of the pointers and an annotated tag ``a3t/<campaign>/round-<k>``; rolling back checks
the pointers out of a tag, lets DVC restore the data and checks it by hash.

The user's repository is shared ground, so every git operation here is narrow: commits are
limited by pathspec to the pointers and DVC's ``.gitignore`` (a user's other staged and
unstaged changes stay exactly as they were), no git config is written, no ``.gitignore`` of
the user's is edited, and only DVC-tracked data is ever restored or overwritten.

Git runs as a subprocess (the user's git, with the user's config); DVC runs in-process through
``dvc.repo.Repo``: the same operations as the ``dvc`` command, without its 0.5-1 s start-up
per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from a3t.config import CAMPAIGN_NAME

# DVC sends usage analytics from a background process unless told not to: a3t works offline
# and sends nothing anywhere (a user's own setting wins).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

log = logging.getLogger(__name__)

# The DVC remote a3t configures from its one setting (pipeline.dvc_remote).
REMOTE_NAME = "a3t"
# DVC's own files that `dvc init` stages; a3t commits exactly these after initializing.
DVC_INIT_FILES = (".dvc/.gitignore", ".dvc/config", ".dvcignore")
# Folders a run writes that git must never see, with the .gitignore that makes each ignore
# itself when the repository does not already ignore it (a user's .gitignore is not edited).
SELF_IGNORED = {
    "data/runs": "*\n",
    ".a3t": "*\n",
    "mlflow": "*\n!.gitignore\n!README.md\n",
}
LOCK_FILE = ".a3t/run.lock"
LOCK_INFO = ".a3t/run.json"  # who holds the lock, for the refusal message
# Commits need an identity; CI machines often have none. Used only where git has none.
FALLBACK_IDENTITY = {"user.name": "a3t", "user.email": "a3t@localhost"}

# Campaign names as config.PipelineConfig allows them, minus what git refuses in a ref name.
_CAMPAIGN = re.compile(CAMPAIGN_NAME)
_TAG = re.compile(r"a3t/(?P<campaign>[^/]+)/round-(?P<round>\d+)")


class WorkspaceError(RuntimeError):
    """A workspace problem the user must act on; the message says what and what to do."""


class WorkspaceBusy(WorkspaceError):
    """Another a3t run holds the workspace (its lock)."""


@dataclass(frozen=True)
class DatasetVersion:
    """A versioned state of the tracked datasets."""

    tag: str
    commit: str  # the commit the tag points to (rollback: the commit recording the rollback)
    hashes: dict[str, str]  # tracked path (relative to the workspace) -> DVC md5 (".dir" for folders)
    new_commit: bool  # a commit was made (False: the pointers were already committed as they are)
    moved_from: str | None = None  # the tag existed for other data (a round redone): its old commit


class Version(NamedTuple):
    round: int
    tag: str
    commit: str


# ---- tags -------------------------------------------------------------------------------


def tag_name(campaign: str, round_: int) -> str:
    """``a3t/<campaign>/round-<k>``: one git tag per campaign round, listable by prefix."""
    if not _CAMPAIGN.fullmatch(campaign) or ".." in campaign or campaign.endswith((".", ".lock")):
        raise WorkspaceError(
            f"campaign name {campaign!r} cannot be part of a git tag: use letters, digits, '_', '-' "
            "and single dots, starting with a letter or digit (not ending with '.' or '.lock')"
        )
    if round_ < 0:
        raise WorkspaceError(f"round must be 0 or more, got {round_}")
    return f"a3t/{campaign}/round-{round_}"


def parse_tag(tag: str) -> tuple[str, int]:
    """(campaign, round) of an a3t tag."""
    match = _TAG.fullmatch(tag)
    if match is None:
        raise WorkspaceError(f"{tag!r} is not an a3t dataset tag (a3t/<campaign>/round-<k>)")
    return match["campaign"], int(match["round"])


def list_versions(root: Path, campaign: str) -> list[Version]:
    """The campaign's tagged rounds, by round."""
    tag_name(campaign, 0)  # validates the name
    # %(*objectname) is the commit an annotated tag points to, %(objectname) a lightweight one's.
    listing = _git(root, "for-each-ref", "--format=%(refname:lstrip=2) %(objectname) %(*objectname)",
                   f"refs/tags/a3t/{campaign}/")
    versions = []
    for line in listing.splitlines():
        tag, target, peeled = (line.split() + [""])[:3]
        if _TAG.fullmatch(tag):
            versions.append(Version(parse_tag(tag)[1], tag, peeled or target))
    return sorted(versions)


# ---- the workspace ----------------------------------------------------------------------


def ensure_workspace(root: Path) -> list[str]:
    """Make ``root`` a workspace: a git repository (initialized if it is none) with DVC
    initialized (its own files committed, nothing else) and the run's folders ignored.
    Returns what it did, one sentence each, for the caller to show."""
    root = Path(root)
    done = []
    top = _git(root, "rev-parse", "--show-toplevel", check=False)
    if top is None:
        _git(root, "init", "--quiet")
        done.append(f"initialized a git repository in {root}")
    elif Path(top).resolve() != root.resolve():
        raise WorkspaceError(
            f"{root} is inside the git repository {top} but is not its root; "
            f"run a3t from {top} (its data/ lives at the repository root)"
        )
    if not (root / ".dvc").is_dir():
        from dvc.repo import Repo

        with _quiet_dvc():
            Repo.init(os.fspath(root)).close()  # stages DVC_INIT_FILES, and only those
        files = [f for f in DVC_INIT_FILES if (root / f).exists()]
        _commit(root, files, "a3t: initialize DVC")
        done.append(f"initialized DVC and committed its files ({', '.join(files)}); nothing else was committed")
    for folder in SELF_IGNORED:
        if _make_self_ignored(root, folder):
            done.append(f"created {folder}/.gitignore so that git ignores {folder}/")
    return done


def _make_self_ignored(root: Path, folder: str) -> bool:
    (root / folder).mkdir(parents=True, exist_ok=True)
    ignore_file = root / folder / ".gitignore"
    # A repository that already ignores the folder (a3t's own .gitignore does) gets no new file.
    if ignore_file.exists() or _git_ignore_rule(root, f"{folder}/a3t-probe") is not None:
        return False
    ignore_file.write_text(SELF_IGNORED[folder])
    return True


def check_clean(root: Path, tracked: Sequence[Path | str], allow: Sequence[Path | str] = ()) -> None:
    """Raise WorkspaceError if a tracked dataset differs from what its committed pointer records:
    data changed since it was last versioned, data missing, or a pointer with uncommitted git
    changes. Changes inside ``allow`` (e.g. the folder of a round being resumed) are expected.
    Nothing else in the repository is looked at."""
    root = Path(root)
    paths = [_relative(root, p) for p in tracked]
    pointers = [_pointer(p) for p in paths]
    git_status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *pointers)
    for entry in filter(None, git_status.splitlines()):
        state, pointer = entry[:2], entry[3:]
        what = "is not committed" if state == "??" else "has uncommitted changes"
        raise WorkspaceError(
            f"{pointer} (the DVC pointer of {pointer[: -len('.dvc')]}) {what}; a3t commits pointers itself. "
            f"Commit it (git add {pointer} && git commit), or restore it "
            f"(git checkout -- {pointer} && dvc checkout {pointer}), then run again."
        )
    existing = [p for p in pointers if (root / p).exists()]
    if not existing:
        return
    allowed = [_relative(root, p) for p in allow]
    with _dvc(root) as repo:
        for pointer in existing:
            path, state = pointer[: -len(".dvc")], _out_state(repo, root, pointer)
            if state is None:
                continue
            if not (root / path).exists():
                raise WorkspaceError(
                    f"{path} is missing from the workspace but versioned in {pointer}: restore it with "
                    f"`dvc checkout {pointer}` (or `dvc pull {pointer}` from the DVC remote), then run again."
                )
            # "not in cache": the version is not in the local cache (cleared, or a fresh clone),
            # so DVC cannot tell whether the data changed; the hash can.
            if state == "not in cache" and dataset_hash(root / path) == _md5((root / pointer).read_text()):
                continue
            files = {
                f: kind
                for f, kind in _changed_files(repo, path).items()
                if not any(f == a or f.startswith(a + "/") for a in allowed)
            }
            if files or state != "modified":
                listed = sorted(files)
                shown = ", ".join(f"{f} ({files[f]})" for f in listed[:5]) + (" …" if len(listed) > 5 else "")
                raise WorkspaceError(
                    f"{path} has changes not recorded in {pointer}{': ' + shown if shown else ''}. a3t stops "
                    f"rather than mix them into a round. Record them (dvc add {path} && git commit {pointer} "
                    f"{_sibling_gitignore(path)}) or discard them (dvc checkout --force {pointer}), then run again."
                )


def _out_state(repo, root: Path, pointer: str) -> str | None:
    """modified/deleted/not in cache when the output of ``pointer`` differs from what the
    pointer records; None when it matches. (DVC names paths relative to the current
    directory here, so the state is taken without its path.)"""
    status = repo.status(targets=[os.fspath(root / pointer)])
    states = [
        state
        for changes in status.values()
        for change in changes
        if isinstance(change, dict)
        for state in change.get("changed outs", {}).values()
    ]
    return states[0] if states else None


def _changed_files(repo, path: str) -> dict[str, str]:
    """File -> added/modified/deleted, for the files of tracked ``path`` that differ from its
    pointer (data_status takes and gives paths relative to the repository root)."""
    status = repo.data_status(targets=[path], granular=True)
    return {
        f: kind
        for kind, files in status.get("uncommitted", {}).items()
        for f in files
        if not f.endswith("/")  # the folder's own entry
    }


# ---- versions ---------------------------------------------------------------------------


def version_dataset(
    root: Path,
    paths: Sequence[Path | str],
    campaign: str,
    round_: int,
    message: str,
    remote: str | None = None,
) -> DatasetVersion:
    """Record ``paths`` (folders or files) as the dataset of ``campaign``'s round ``round_``:
    ``dvc add`` them, commit only their pointers (and DVC's .gitignore), tag the commit, and
    push the data to ``remote`` (a folder, s3://, ssh://…) when given.

    Idempotent: the same data again makes no commit and keeps the tag. A tag already pointing
    at other data (the round redone after a rollback) is moved; ``moved_from`` is its old commit.
    A failed push raises after the commit and the tag exist: call again to retry it."""
    root = Path(root)
    tag = tag_name(campaign, round_)
    paths = [_relative(root, p) for p in paths]
    pointers = [_pointer(p) for p in paths]
    for path in paths:
        if not (root / path).exists():
            raise WorkspaceError(f"{root / path} does not exist: there is nothing to version")
    for pointer in pointers:
        _refuse_ignored(root, pointer)
    with _dvc(root) as repo:
        repo.add([os.fspath(root / p) for p in paths])
        if remote:
            _set_remote(repo, remote)
    # DVC lists its outputs in the .gitignore beside them, unless git ignores them already.
    files = pointers + sorted({g for p in paths if (root / (g := _sibling_gitignore(p))).exists()})
    new_commit = _commit(root, files, message)
    head = _git(root, "rev-parse", "HEAD")
    hashes = _hashes(root, head, paths)
    old = _tag_commit(root, tag)
    if old is not None and all(_blob(root, old, p) == _blob(root, head, p) for p in pointers):
        commit, moved_from = old, None
    else:
        body = "\n".join(f"{p}: {h}" for p, h in hashes.items())
        redone = f"\n\nRedone; this tag was on {old}." if old else ""
        _git(root, *_identity(root), "tag", "--force", "--annotate", "--message", f"{message}\n\n{body}{redone}",
             tag, head)
        commit, moved_from = head, old
    if remote:
        with _dvc(root) as repo:
            try:
                repo.push(targets=[os.fspath(root / p) for p in pointers], remote=REMOTE_NAME)
            except Exception as e:  # each remote file system raises its own errors (OSError, S3, SSH…)
                raise WorkspaceError(
                    f"dvc push -r {REMOTE_NAME} ({remote}) failed: {e!r}; {tag} is committed and tagged "
                    "locally: call again to retry the push"
                ) from e
    return DatasetVersion(tag, commit, hashes, new_commit, moved_from)


def rollback(root: Path, tag: str, paths: Sequence[Path | str], force: bool = False) -> DatasetVersion:
    """Restore ``paths`` exactly as ``tag`` versioned them and commit the restored pointers
    ("a3t: rollback to TAG"), so that the next round continues from them. Files added to a
    tracked folder since are removed, changed ones restored; the result is checked by hash.
    Refuses when the tracked data has changes not versioned yet, unless ``force`` (they are
    then discarded). When the tagged data cannot be restored (not in the cache nor in the
    remote), the workspace is put back as it was and WorkspaceError says why."""
    root = Path(root)
    campaign, _ = parse_tag(tag)
    paths = [_relative(root, p) for p in paths]
    pointers = [_pointer(p) for p in paths]
    target = _tag_commit(root, tag)
    if target is None:
        known = ", ".join(v.tag for v in list_versions(root, campaign)) or "none"
        raise WorkspaceError(f"unknown tag {tag!r}; tags of campaign {campaign!r}: {known}")
    for pointer in pointers:
        if _blob(root, target, pointer) is None:
            raise WorkspaceError(f"{tag} does not version {pointer[: -len('.dvc')]} (no {pointer} in {target[:12]})")
    existing = [p for p in paths if (root / p).exists()]  # a missing dataset has nothing to lose
    if not force:
        check_clean(root, existing)
    if existing:
        # The data about to be replaced goes into the cache first, where it may be missing
        # (a cleared cache, a fresh clone); for data as versioned this is a no-op.
        with _dvc(root) as repo:
            repo.add([os.fspath(root / p) for p in existing])
    _git(root, "checkout", tag, "--", *pointers)
    expected = _hashes(root, target, paths)
    try:
        _checkout(root, pointers, f"the data of {tag}")
        for path, md5 in expected.items():
            if (actual := dataset_hash(root / path)) != md5:
                raise WorkspaceError(
                    f"{path} does not match {tag} after the checkout (md5 {actual}, expected {md5}); "
                    "check the DVC cache (`dvc doctor`, `dvc fetch`)"
                )
    except WorkspaceError as e:
        # Back to HEAD's pointers and their data (cached above), so that nothing is half done.
        at_head = [p for p in pointers if _blob(root, "HEAD", p) is not None]
        if at_head:
            _git(root, "checkout", "HEAD", "--", *at_head)
            _checkout(root, at_head, "the data as it was")
        if new := [p for p in pointers if p not in at_head]:
            _git(root, "rm", "--quiet", "--force", "--", *new)
        raise WorkspaceError(f"{e}. Nothing was rolled back.") from e
    new_commit = _commit(root, pointers, f"a3t: rollback {', '.join(paths)} to {tag} ({target[:12]})")
    return DatasetVersion(tag, _git(root, "rev-parse", "HEAD"), expected, new_commit)


def _checkout(root: Path, pointers: list[str], what: str) -> None:
    """Make the data of ``pointers`` what they record (extra files go), fetching from the
    default DVC remote what the local cache lacks (e.g. in a fresh clone)."""
    from dvc.exceptions import CheckoutError, DvcException

    targets = [os.fspath(root / p) for p in pointers]
    with _dvc(root) as repo:
        try:
            repo.checkout(targets=targets, force=True)
            return
        except CheckoutError:
            remote = repo.config["core"].get("remote")
        if remote is None:
            raise WorkspaceError(
                f"{what} ({', '.join(pointers)}) is not all in the DVC cache, and no DVC remote is set to fetch "
                "it from (pipeline.dvc_remote, or `dvc remote add --default`)"
            )
        try:
            repo.fetch(targets=targets)
            repo.checkout(targets=targets, force=True)
        except DvcException as e:
            raise WorkspaceError(
                f"{what} ({', '.join(pointers)}) is neither all in the DVC cache nor in the DVC remote {remote!r}: {e}"
            ) from e


def dataset_hash(path: Path) -> str:
    """The md5 DVC records for ``path``, recomputed from the bytes on disk (no DVC state):
    a file's md5; for a folder, the md5 of the JSON list of its files' {"md5", "relpath"}
    sorted by relpath, with ".dir" appended, as DVC 3 builds it."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    entries = [
        {"md5": _file_md5(Path(folder) / name), "relpath": (Path(folder) / name).relative_to(path).as_posix()}
        for folder, _, names in os.walk(path)
        for name in names
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# ---- the run lock -----------------------------------------------------------------------


@contextmanager
def workspace_lock(root: Path, command: str | None = None, wait: bool = False) -> Iterator[None]:
    """Hold the workspace for one run. A second run in the same workspace is refused at once
    (WorkspaceBusy, with who holds it), or with ``wait`` waits until the holder is done (a log
    line says for whom). An OS file lock (flock): it goes when its process does, even killed.
    Not reentrant: take it once, where the command starts."""
    from filelock import FileLock, Timeout

    root = Path(root)
    _make_self_ignored(root, ".a3t")
    lock = FileLock(root / LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        if not wait:
            raise WorkspaceBusy(_holder(root)) from None
        log.warning("waiting for the workspace: %s", _holder(root))
        lock.acquire(timeout=-1)
    try:
        info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command or shlex.join(sys.argv)}
        staged = root / (LOCK_INFO + ".tmp")
        staged.write_text(json.dumps(info))
        staged.replace(root / LOCK_INFO)  # whole, so a refused run never reads half of it
        yield
    finally:
        (root / LOCK_INFO).unlink(missing_ok=True)
        lock.release()


def lock_holder(root: Path) -> dict | None:
    """Who holds the workspace (pid, started, command) when a live process does; None otherwise.
    Reads the record the holder wrote and never touches the lock, so it cannot delay a run."""
    try:
        info = json.loads((Path(root) / LOCK_INFO).read_text())
        os.kill(int(info["pid"]), 0)  # a record left by a killed run names a dead process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def _holder(root: Path) -> str:
    try:
        info = json.loads((root / LOCK_INFO).read_text())
        who = f"pid {info['pid']}, started {info['started']}, command {info['command']!r}"
        stop = f"wait for it to finish or stop it (kill {info['pid']})"
    except (OSError, ValueError, KeyError):
        who, stop = "it is starting", "wait for it to finish or stop it"
    return f"another a3t run ({who}) holds the lock on workspace {root.resolve()}: {stop}, then run again"


# ---- git and DVC helpers ----------------------------------------------------------------


def _git(root: Path, *args: str, check: bool = True) -> str | None:
    """git's stdout without its trailing newline; None for a failure when not ``check``."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        if not check:
            return None
        why = result.stderr.strip() or result.stdout.strip()
        raise WorkspaceError(f"git {shlex.join(args)} failed in {root}: {why}")
    return result.stdout.rstrip()


def _identity(root: Path) -> list[str]:
    """``-c`` options giving git an identity where it has none configured (CI); the user's
    config is never written."""
    options = []
    for key, value in FALLBACK_IDENTITY.items():
        if not _git(root, "config", "--get", key, check=False):
            options += ["-c", f"{key}={value}"]
    return options


def _commit(root: Path, files: list[str], message: str) -> bool:
    """Commit exactly ``files`` (as they are in the working tree), nothing else; False when
    they are committed as they are already."""
    _git(root, "add", "--", *files)
    has_head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False) is not None
    if has_head and _git(root, "diff", "--cached", "--quiet", "HEAD", "--", *files, check=False) is not None:
        return False
    # A pathspec commit (--only) takes these files alone: whatever else the user has staged
    # stays staged and uncommitted. --no-verify: hooks written for code commits (formatters,
    # linters) must neither block nor rewrite a data-pointer commit.
    _git(root, *_identity(root), "commit", "--quiet", "--no-verify", "--only", "--message", message, "--", *files)
    return True


def _git_ignore_rule(root: Path, path: str) -> str | None:
    """The rule ignoring ``path`` ("file:line:pattern"), or None when git does not ignore it."""
    if _git(root, "check-ignore", "--quiet", "--", path, check=False) is None:
        return None
    # --verbose alone would also name a negated rule ("!...") that un-ignores the path.
    return _git(root, "check-ignore", "--verbose", "--", path).split("\t")[0]


def _refuse_ignored(root: Path, pointer: str) -> None:
    rule = _git_ignore_rule(root, pointer)
    if rule is not None:
        folder = pointer.split("/")[0]
        raise WorkspaceError(
            f"{pointer} is ignored by git ({rule}), so the dataset version cannot be committed. Let git see "
            f"DVC's pointers: e.g. replace a '/{folder}/' rule by '/{folder}/*', '!/{folder}/*.dvc' and "
            f"'!/{folder}/.gitignore'."
        )


def _tag_commit(root: Path, tag: str) -> str | None:
    return _git(root, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}^{{commit}}", check=False)


def _blob(root: Path, commit: str, path: str) -> str | None:
    return _git(root, "rev-parse", "--verify", "--quiet", f"{commit}:{path}", check=False)


def _hashes(root: Path, commit: str, paths: list[str]) -> dict[str, str]:
    """Each path's md5 as its pointer at ``commit`` records it."""
    return {p: _md5(_git(root, "show", f"{commit}:{_pointer(p)}")) for p in paths}


def _md5(pointer_text: str) -> str:
    return yaml.safe_load(pointer_text)["outs"][0]["md5"]


def _relative(root: Path, path: Path | str) -> str:
    """``path`` relative to the workspace root, POSIX style (as git and pointers write it)."""
    try:
        return (root / path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise WorkspaceError(f"{path} is outside the workspace {root}") from None


def _pointer(path: str) -> str:
    return f"{path}.dvc"


def _sibling_gitignore(path: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/.gitignore" if parent else ".gitignore"


@contextmanager
def _dvc(root: Path):
    """A fresh DVC repo object per operation: git changes made in between are seen."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if not (root / ".dvc").is_dir():
        raise WorkspaceError(f"{root} has no DVC repository (.dvc/): call ensure_workspace first (`a3t run` does)")
    try:
        repo = Repo(os.fspath(root))
    except DvcException as e:
        raise WorkspaceError(f"cannot open the DVC repository in {root}: {e}") from e
    repo.scm_context.quiet = True  # a3t commits the pointers itself: no "git add" hints
    try:
        with _quiet_dvc():
            yield repo
    except DvcException as e:
        raise WorkspaceError(f"DVC failed in {root}: {e}") from e
    finally:
        repo.close()


@contextmanager
def _quiet_dvc():
    """DVC logs its progress to stdout as its command would; a3t reports for itself, so only
    DVC's warnings and errors get through."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _set_remote(repo, url: str) -> None:
    """Make ``url`` the default remote, named a3t, in .dvc/config.local: the setting lives in
    a3t's config, and the user's tracked .dvc/config stays unmodified."""
    if "://" not in url:  # a folder: DVC reads relative ones from .dvc/, so make it absolute
        url = os.fspath(Path(url).expanduser().resolve())
    with repo.config.edit("local") as config:
        config["remote"].setdefault(REMOTE_NAME, {})["url"] = url
        config["core"]["remote"] = REMOTE_NAME
