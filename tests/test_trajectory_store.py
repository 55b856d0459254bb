"""TrajectoryStore: append-only JSONL keyed by episode_id, with file:line errors, a
quarantine for bad lines, and the repair of a line a crash cut short."""

from __future__ import annotations

import json

import pytest

from a3t.trajectory import StepRecord, Trajectory, TrajectoryFileError, TrajectoryStore, TrajectoryWriteError
from factories import make_trajectory


def _t(i: int, **kw) -> Trajectory:
    return make_trajectory(f"train/task/trial_{i}", **({"timings": {"wall": 1.0, "llm": 0.5, "env": 0.1},
                                                        "tokens": {"prompt": 10, "completion": 5}} | kw))


def _store_with(tmp_path, n=3) -> TrajectoryStore:
    store = TrajectoryStore(tmp_path / "sub" / "t.jsonl")
    for i in range(n):
        assert store.append(_t(i))
    return store


def test_append_contains_len_and_read_order(tmp_path):
    store = TrajectoryStore(tmp_path / "sub" / "t.jsonl")
    assert len(store) == 0 and list(store.read()) == [] and not store.path.exists()
    ids = []
    for i in [2, 0, 1]:
        t = _t(i, attempt=i)
        assert store.append(t)
        ids.append(t.episode_id)
    assert len(store) == 3 and all(i in store for i in ids) and "r0/nope#a0" not in store
    assert [t.episode_id for t in store.read()] == ids
    assert [t for t in store.read()] == [_t(i, attempt=i) for i in [2, 0, 1]]  # a full round trip
    lines = store.path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["schema_version"] == 1 for line in lines)
    # a new store on the same file knows what is in it
    again = TrajectoryStore(store.path)
    assert len(again) == 3 and ids[1] in again


def test_duplicate_id_is_not_written(tmp_path):
    store = _store_with(tmp_path, 2)
    before = store.path.read_bytes()
    assert store.append(_t(1, success=True, reward=1.0)) is False
    assert store.path.read_bytes() == before and len(store) == 2
    reopened = TrajectoryStore(store.path)
    assert reopened.append(_t(0)) is False and store.path.read_bytes() == before


def test_malformed_line_in_the_middle(tmp_path):
    store = _store_with(tmp_path, 3)
    lines = store.path.read_text().splitlines(keepends=True)
    broken_json = '{"episode_id": "x", "oops\n'
    missing_field = json.dumps({k: v for k, v in json.loads(lines[2]).items() if k != "task"}) + "\n"
    store.path.write_text(lines[0] + broken_json + lines[1] + "\n" + missing_field + lines[2])
    # 1: good, 2: broken JSON, 3: good, 4: blank, 5: a record without its task, 6: good

    with pytest.raises(TrajectoryFileError, match=rf"^{store.path}:2: not a trajectory record"):
        list(store.read())
    reader = store.read()
    assert next(reader).episode_id == _t(0).episode_id  # records before the bad line are read
    with pytest.raises(TrajectoryFileError):
        next(reader)

    good = [_t(i).episode_id for i in range(3)]
    assert [t.episode_id for t in store.read(on_error="skip")] == good
    assert not store.quarantine.exists()

    reopened = TrajectoryStore(store.path)  # opening skips bad lines, and changes nothing
    assert len(reopened) == 3 and not reopened.quarantine.exists()

    assert [t.episode_id for t in store.read(on_error="quarantine")] == good
    assert store.quarantine == store.path.with_name("t.jsonl.quarantine")
    entries = [json.loads(line) for line in store.quarantine.read_text().splitlines()]
    assert [e["line"] for e in entries] == [broken_json.rstrip("\n"), missing_field.rstrip("\n")]
    assert entries[0]["reason"].startswith(f"{store.path}:2: ")
    assert entries[1]["reason"].startswith(f"{store.path}:5: ") and "task" in entries[1]["reason"]
    # a second read reports nothing new
    assert [t.episode_id for t in store.read(on_error="quarantine")] == good
    assert len(store.quarantine.read_text().splitlines()) == 2
    # the store file itself is left as it was
    assert len(store.path.read_text().splitlines()) == 6


def test_torn_last_line_is_quarantined_and_truncated(tmp_path):
    store = _store_with(tmp_path, 2)
    full = store.path.read_bytes()
    torn = _t(2).model_dump_json()[:57]
    store.path.write_bytes(full + torn.encode())

    reopened = TrajectoryStore(store.path)
    assert store.path.read_bytes() == full  # cut back to the last full line
    assert len(reopened) == 2
    (entry,) = [json.loads(line) for line in reopened.quarantine.read_text().splitlines()]
    assert entry["line"] == torn
    assert entry["reason"] == f"{store.path}:3: cut short by a crash"

    assert reopened.append(_t(2)) and reopened.append(_t(3))
    assert [t.episode_id for t in reopened.read()] == [_t(i).episode_id for i in range(4)]
    assert TrajectoryStore(store.path).path.read_bytes().count(b"\n") == 4  # nothing more to repair
    assert len(reopened.quarantine.read_text().splitlines()) == 1


def test_torn_only_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"episode_id": "r0/')
    store = TrajectoryStore(path)
    assert path.read_bytes() == b"" and len(store) == 0
    assert "cut short" in store.quarantine.read_text() and f"{path}:1:" in store.quarantine.read_text()
    assert store.append(_t(0)) and [t.episode_id for t in store.read()] == [_t(0).episode_id]


def test_empty_and_blank_files(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("")
    assert len(TrajectoryStore(path)) == 0
    path.write_text("\n\n")
    store = TrajectoryStore(path)
    assert len(store) == 0 and list(store.read()) == [] and not store.quarantine.exists()


def test_a_full_disk_loses_no_episode_and_leaves_no_torn_line(small_disk):
    disk, grow = small_disk
    store = TrajectoryStore(disk / "rollout-0.jsonl")
    step = StepRecord(thought="I look around the room before I decide. " * 20, action="look", observation="Nothing.")
    written = []
    with pytest.raises(TrajectoryWriteError, match="not written.*a rerun resumes after them"):
        for i in range(1000):
            store.append(make_trajectory(task_id=f"train/t{i}/trial_0", steps=[step] * 3))
            written.append(f"r0/train/t{i}/trial_0#a0")
    assert written and (disk / "rollout-0.jsonl").read_bytes().endswith(b"\n")
    rerun = TrajectoryStore(disk / "rollout-0.jsonl")
    assert [t.episode_id for t in rerun.read()] == written  # every one, none torn (read raises on a bad line)
    assert not rerun.quarantine.exists()

    grow()  # space freed: the rerun goes on where it stopped
    assert rerun.append(make_trajectory(task_id=f"train/t{len(written)}/trial_0"))
    assert len(list(TrajectoryStore(disk / "rollout-0.jsonl").read())) == len(written) + 1
