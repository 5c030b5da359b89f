"""Spool: durable store, duplicates, rounds, restart scan, retention, path safety — no network."""

import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from common.spool import ArrivalRecord, Spool
from common.uids import InvalidUid
from tests.kit.group_commit import second_writer_is_not_held_up

STUDY = "1.2.3.4"


def record(sop_uid: str, received_at: float = 1000.0, calling_ae: str | None = "MODALITY") -> ArrivalRecord:
    return ArrivalRecord(
        sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        series_instance_uid="1.2.3.4.5",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae=calling_ae,
        received_at=received_at,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


def payload(spool: Spool, name: str = "rx", data: bytes = b"dicom bytes") -> Path:
    """A file where the network layer would have left it."""
    path = spool.receiving_dir / name
    path.write_bytes(data)
    return path


def test_store_moves_the_payload_into_the_study_with_its_arrival_record(spool: Spool) -> None:
    source = payload(spool)
    assert spool.store(STUDY, record("1.2.3.4.5.1"), source)
    stored = spool.root / "studies" / STUDY / "incoming" / "1.2.3.4.5.1.dcm"
    assert stored.read_bytes() == b"dicom bytes" and not source.exists()
    assert ArrivalRecord.from_bytes(stored.with_suffix(".json").read_bytes()) == record("1.2.3.4.5.1")


def test_the_same_sop_instance_uid_is_stored_once_even_after_dispatch(spool: Spool) -> None:
    assert spool.store(STUDY, record("9.1"), payload(spool, "a", b"first"))
    assert not spool.store(STUDY, record("9.1"), payload(spool, "b", b"second"))
    spool.seal_round(STUDY)
    assert not spool.store(STUDY, record("9.1"), payload(spool, "c", b"third"))
    assert [path.read_bytes() for path in spool.root.rglob("9.1.dcm")] == [b"first"]


def test_a_stored_instance_folder_is_synced_outside_the_study_lock(spool: Spool, monkeypatch) -> None:
    """Associations sending one study share the journal commits of its folder's fsyncs (a group commit): while
    one instance's folder fsync is held up, another instance of the study is stored; neither store returns
    before its folder's fsync."""
    assert spool.store(STUDY, record("5.1"), payload(spool, "a"))  # the study's folders exist
    first, second = payload(spool, "b"), payload(spool, "c")
    listed_at_fsync = second_writer_is_not_held_up(
        monkeypatch,
        lambda: spool.store(STUDY, record("5.2"), first),
        lambda: spool.store(STUDY, record("5.3"), second),
        counts=lambda descriptor: stat.S_ISDIR(os.fstat(descriptor).st_mode),
        seen=lambda descriptor: set(os.listdir(f"/proc/self/fd/{descriptor}")),
    )
    assert "5.2.dcm" in listed_at_fsync[0] and {"5.2.dcm", "5.3.dcm"} <= listed_at_fsync[1]
    incoming = spool.root / "studies" / STUDY / "incoming"
    assert sorted(path.name for path in incoming.glob("*.dcm")) == ["5.1.dcm", "5.2.dcm", "5.3.dcm"]


@pytest.mark.parametrize("study_uid", ["../../x", "1.2/../../x", "", "1." * 40 + "1", "/tmp/x"])
def test_unsafe_study_uids_never_become_paths(spool: Spool, tmp_path: Path, study_uid: str) -> None:
    source = payload(spool)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(InvalidUid):
        spool.store(study_uid, record("1.2"), source)
    assert set(tmp_path.rglob("*")) == before


def test_unsafe_sop_instance_uid_never_becomes_a_file_name(spool: Spool) -> None:
    with pytest.raises(InvalidUid):
        spool.store(STUDY, record("../../../evil"), payload(spool))
    assert not list(spool.root.rglob("*evil*"))


def test_sealing_freezes_incoming_as_numbered_rounds(spool: Spool) -> None:
    assert spool.seal_round(STUDY) is None
    spool.store(STUDY, record("1.1"), payload(spool, "a"))
    spool.store(STUDY, record("1.2"), payload(spool, "b"))
    first = spool.seal_round(STUDY)
    assert first is not None and first.number == 1
    assert [path.name for path in first.instance_paths()] == ["1.1.dcm", "1.2.dcm"]
    assert spool.seal_round(STUDY) is None
    spool.store(STUDY, record("1.3"), payload(spool, "c"))
    second = spool.seal_round(STUDY)
    assert second is not None and second.number == 2 and len(second.instance_paths()) == 1


def test_recover_finds_pending_studies_and_unqueued_rounds_and_drops_half_writes(spool: Spool) -> None:
    spool.store("5.5", record("5.5.1", received_at=1234.5), payload(spool, "a"))
    spool.store(STUDY, record("1.1"), payload(spool, "b"))
    sealed = spool.seal_round(STUDY)
    (sealed.path / "message.json.tmp").write_bytes(b"{half")
    orphan = spool.root / "studies" / "5.5" / "incoming" / "5.5.9.json"  # record written, instance never landed
    orphan.write_bytes(record("5.5.9").to_bytes())
    recovered = spool.recover()
    assert recovered.pending == {"5.5": 1234.5}
    assert [(item.study_uid, item.number) for item in recovered.unqueued] == [(STUDY, 1)]
    assert not orphan.exists() and not (sealed.path / "message.json.tmp").exists()
    spool.mark_queued(sealed, b"{}")
    assert spool.recover().unqueued == []


def test_prepare_deletes_partial_receives_left_by_a_stop(spool: Spool) -> None:
    payload(spool, "half-received")
    assert spool.prepare() == 1
    assert not any(spool.receiving_dir.iterdir())


def test_sweep_deletes_only_old_queued_rounds_old_own_objects_and_stale_partials(spool: Spool) -> None:
    now = time.time()
    old = now - 10 * 86400
    spool.store("7.1", record("7.1.1"), payload(spool, "a"))
    queued_old = spool.seal_round("7.1")
    spool.mark_queued(queued_old, b"{}")
    os.utime(queued_old.queued_path, (old, old))
    spool.store("7.2", record("7.2.1"), payload(spool, "b"))
    queued_young = spool.seal_round("7.2")
    spool.mark_queued(queued_young, b"{}")
    spool.store("7.3", record("7.3.1"), payload(spool, "c"))
    unqueued_old = spool.seal_round("7.3")
    os.utime(unqueued_old.path / "7.3.1.dcm", (old, old))
    spool.store("7.4", record("7.4.1"), payload(spool, "d"), own=True)
    os.utime(spool.root / "studies" / "7.4" / "own" / "7.4.1.dcm", (old, old))
    stale = payload(spool, "stale")
    os.utime(stale, (old, old))
    fresh = payload(spool, "fresh")

    report = spool.sweep(now, retention_s=7 * 86400, stale_partial_s=3600)

    assert (report.rounds_removed, report.own_removed, report.studies_removed, report.partials_removed) == (1, 1, 2, 1)
    studies = {path.name for path in (spool.root / "studies").iterdir()}
    assert studies == {"7.2", "7.3"}  # young queued round kept; an unqueued round is never deleted
    assert fresh.exists() and not stale.exists()


def test_watermark_is_evaluated_on_every_call_so_it_recovers_by_itself(spool: Spool) -> None:
    spool.min_free_bytes = spool.free_bytes() + 2**50
    assert not spool.has_room()
    spool.min_free_bytes = 0
    assert spool.has_room()


def _hold_study_lock(root: Path, study_uid: str, held, release) -> None:
    spool = Spool(root, min_free_bytes=0)
    with spool._lock(study_uid):
        held.set()
        release.wait(30)


def test_a_study_lock_excludes_other_processes_not_only_threads(spool: Spool) -> None:
    """Receiving processes and the node's dispatcher share the spool: its per-study lock must hold across them."""
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    other = context.Process(target=_hold_study_lock, args=(spool.root, "1.2.3", held, release))
    other.start()
    try:
        assert held.wait(30)
        acquired = threading.Event()

        def take() -> None:
            with spool._lock("1.2.3"):
                acquired.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not acquired.wait(0.5), "took the study's lock while another process held it"
        release.set()
        assert acquired.wait(30)
    finally:
        release.set()
        other.join(30)
