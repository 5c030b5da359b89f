"""The SCU's association pool against real peers: a small pynetdicom storage SCP in a process of its
own on a free loopback port (it counts associations and can release, abort or refuse on cue) and a
real Orthanc.

(The SCP runs in another process, as a PACS does: in this one its threads would compete with the SCU's
for the GIL and widen a race in pynetdicom's reactor — a C-STORE response taken by the association's
reactor thread instead of ``send_c_store``, which then waits for the DIMSE timeout — that the delivery
task survives by its retry, but that would make these tests flaky.)"""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from pydicom.uid import generate_uid

from common.ports import free_port
from common.scu import AssociationPool, DeliveryError, Destination, send_datasets
from tests.kit import storage_scp
from tests.kit.dicom_fixtures import make_image
from tests.kit.orthanc import Orthanc
from tests.kit.wait import wait_until
from tests.kit.wakeups import counted_wakeups, wakeups_while_idle

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
WAIT_S = 20.0  # bound of every wait for something to happen (never a timing assertion)
SCP_SCRIPT = storage_scp.__file__


class ScpProcess:
    """The test's handle on tests/kit/storage_scp.py, run in its own process."""

    def __init__(self, transfer_syntaxes: list[str] | None = None) -> None:
        self.port = free_port()
        accepted = [",".join(transfer_syntaxes)] if transfer_syntaxes else []  # default: the uncompressed ones
        self.process = subprocess.Popen(
            [sys.executable, str(SCP_SCRIPT), str(self.port), *accepted],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.process.stdout.readline()) == "listening"

    @property
    def destination(self) -> Destination:
        return Destination("TESTSCP", "127.0.0.1", self.port)

    def ask(self, command: str, argument: str | None = None):
        self.process.stdin.write(json.dumps([command] + ([argument] if argument else [])) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    @property
    def associations(self) -> int:
        return self.ask("state")["associations"]

    @property
    def released(self) -> int:
        return self.ask("state")["released"]

    @property
    def stored(self) -> list[str]:
        return self.ask("state")["stored"]

    @property
    def received(self) -> dict[str, list[str]]:
        """Per SOP Instance UID: [transfer syntax it came in, sha256 of its data set's bytes as they arrived]."""
        return self.ask("state")["received"]

    def stop(self) -> None:
        self.process.communicate('["stop"]\n', timeout=WAIT_S)


@pytest.fixture
def scp() -> Iterator[ScpProcess]:
    server = ScpProcess()
    yield server
    server.stop()


@pytest.fixture
def pool() -> Iterator[AssociationPool]:
    kept = AssociationPool(idle_s=60)
    yield kept
    kept.close()


def study(count: int = 2) -> list:
    """A study's result objects as the worker sends them (two per study: the SC and the SR)."""
    study_uid = generate_uid()
    return [make_image(study_uid=study_uid) for _ in range(count)]


def uids(datasets) -> list[str]:
    return [str(dataset.SOPInstanceUID) for dataset in datasets]


def test_without_a_pool_every_study_has_its_own_association(scp) -> None:
    studies = [study() for _ in range(3)]
    for datasets in studies:
        assert send_datasets(scp.destination, datasets) == [SUCCESS, SUCCESS]
    wait_until(lambda: scp.released == 3, WAIT_S, interval_s=0.05, message="three associations released")
    assert scp.associations == 3
    assert scp.stored == [uid for datasets in studies for uid in uids(datasets)]


def test_the_studies_of_a_burst_share_one_association_released_when_the_pool_closes(scp, pool) -> None:
    studies = [study() for _ in range(3)]
    for datasets in studies:
        assert send_datasets(scp.destination, datasets, pool=pool) == [SUCCESS, SUCCESS]
    assert scp.associations == 1
    assert pool.idle_count() == 1
    assert scp.stored == [uid for datasets in studies for uid in uids(datasets)]
    pool.close()
    wait_until(lambda: scp.released == 1, WAIT_S, interval_s=0.05, message="the kept association released at close")
    assert send_datasets(scp.destination, study(), pool=pool) == [SUCCESS, SUCCESS]  # closed: keeps nothing more
    wait_until(
        lambda: scp.released == 2, WAIT_S, interval_s=0.05, message="the association after close released at once"
    )
    assert pool.idle_count() == 0


def test_an_idle_association_is_released_after_the_idle_time_and_the_next_study_opens_one(scp) -> None:
    pool = AssociationPool(idle_s=0.3)
    try:
        send_datasets(scp.destination, study(), pool=pool)
        wait_until(
            lambda: scp.released == 1, WAIT_S, interval_s=0.05, message="the idle association released by the reaper"
        )
        assert pool.idle_count() == 0
        assert send_datasets(scp.destination, study(), pool=pool) == [SUCCESS, SUCCESS]
        assert scp.associations == 2
    finally:
        pool.close()


@pytest.mark.parametrize("how", ["release", "abort"])
def test_an_association_the_peer_ended_while_idle_is_replaced(scp, pool, how) -> None:
    send_datasets(scp.destination, study(), pool=pool)
    scp.ask("drop_all", how)
    later = study()
    assert send_datasets(scp.destination, later, pool=pool) == [SUCCESS, SUCCESS]
    assert scp.associations == 2
    assert scp.stored[-2:] == uids(later)


def test_a_kept_association_that_dies_at_the_first_store_is_replaced_and_the_study_sent_once_more(scp, pool) -> None:
    send_datasets(scp.destination, study(), pool=pool)
    later = study()
    scp.ask("abort_once", uids(later)[0])  # looks established when lent, gone when used
    assert send_datasets(scp.destination, later, pool=pool) == [SUCCESS, SUCCESS]
    assert scp.associations == 2
    assert scp.stored[-2:] == uids(later)
    assert pool.idle_count() == 1


def test_a_failure_on_a_new_association_is_raised_for_the_retry_and_nothing_failed_is_kept(scp, pool) -> None:
    """The delivery task retries transient DeliveryErrors with back-off and dead-letters the last one."""
    failing = study()
    scp.ask("abort_always", uids(failing)[0])
    with pytest.raises(DeliveryError) as aborted:
        send_datasets(scp.destination, failing, pool=pool)
    assert aborted.value.transient and aborted.value.status is None
    assert pool.idle_count() == 0

    refused = study()
    scp.ask("refuse", uids(refused)[1])
    with pytest.raises(DeliveryError) as out_of_resources:
        send_datasets(scp.destination, refused, pool=pool)
    assert out_of_resources.value.status == OUT_OF_RESOURCES and out_of_resources.value.transient
    assert out_of_resources.value.delivered == (uids(refused)[0],)
    assert pool.idle_count() == 0  # aborted after the failure, not kept
    assert send_datasets(scp.destination, study(), pool=pool) == [SUCCESS, SUCCESS]
    assert scp.associations == 3


def test_a_kept_association_that_keeps_failing_is_raised_after_one_new_attempt(scp, pool) -> None:
    send_datasets(scp.destination, study(), pool=pool)
    failing = study()
    scp.ask("abort_always", uids(failing)[0])
    with pytest.raises(DeliveryError) as aborted:
        send_datasets(scp.destination, failing, pool=pool)
    assert aborted.value.transient
    assert scp.associations == 2  # the kept one, then one new one: no loop
    assert pool.idle_count() == 0


def test_concurrent_callers_each_get_an_association_of_their_own(scp, pool) -> None:
    studies = [study() for _ in range(4)]
    errors: list[BaseException] = []

    def send(datasets) -> None:
        try:
            send_datasets(scp.destination, datasets, pool=pool)
        except BaseException as error:  # (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=send, args=(datasets,)) for datasets in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert errors == []
    assert sorted(scp.stored) == sorted(uid for datasets in studies for uid in uids(datasets))
    assert pool.idle_count() == scp.associations  # each one kept, none lent twice at once


def test_the_workers_deliveries_share_its_process_pool_until_worker_shutdown(scp, tmp_path) -> None:
    from config.settings import load_settings
    from worker.deliver import close_association_pool, send_files

    destination = {"name": "scp", "ae_title": "TESTSCP", "host": "127.0.0.1", "port": scp.port}
    studies = []
    for number, datasets in enumerate(study() for _ in range(3)):
        studies.append([tmp_path / f"{number}-{index}.dcm" for index in range(len(datasets))])
        for dataset, path in zip(datasets, studies[-1]):
            dataset.save_as(path, enforce_file_format=True)
    try:
        for files in studies[:2]:
            send_files(load_settings(destinations=[destination]), "scp", files)
        assert scp.associations == 1
        close_association_pool()  # what worker_process_shutdown does
        wait_until(
            lambda: scp.released == 1, WAIT_S, interval_s=0.05, message="the kept association released at shutdown"
        )
        send_files(load_settings(destinations=[destination], delivery={"association_idle_s": 0}), "scp", studies[2])
        wait_until(
            lambda: scp.released == 2,
            WAIT_S,
            interval_s=0.05,
            message="the association of a pool that keeps nothing released at once",
        )
        assert scp.associations == 2
    finally:
        close_association_pool()


# --- a real Orthanc -------------------------------------------------------------------------------


def test_orthanc_gets_a_burst_over_kept_associations_and_after_its_crash_a_new_one(tmp_path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    pool = AssociationPool(idle_s=60)
    destination = Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port)
    try:
        burst = [study() for _ in range(3)]
        for datasets in burst:
            assert send_datasets(destination, datasets, pool=pool) == [SUCCESS, SUCCESS]
        assert pool.idle_count() == 1
        orthanc.process.kill()  # a crash (a clean stop would wait for the kept association to be released)
        orthanc.process.wait(timeout=WAIT_S)
        orthanc.start()  # same ports: the kept association died with the old process
        after = study()
        assert send_datasets(destination, after, pool=pool) == [SUCCESS, SUCCESS]
        for datasets in [*burst, after]:
            assert sorted(
                i["SOPInstanceUID"] for i in orthanc.study_instances(str(datasets[0].StudyInstanceUID))
            ) == sorted(uids(datasets))
    finally:
        pool.close()
        orthanc.stop()


def test_a_kept_association_waits_for_the_next_study_without_polling(scp, pool, monkeypatch) -> None:
    """Polling would wake each of its threads ≈ 500 times in half a second (and cost a worker ≈ 45 ms of CPU per
    study while it analyses the next one); sleeping, about 0.5 / IDLE_WAIT_S times."""
    with counted_wakeups(monkeypatch) as wakeups:
        assert send_datasets(scp.destination, study(), pool=pool) == [SUCCESS, SUCCESS]
        idle = wakeups_while_idle(wakeups)
        assert send_datasets(scp.destination, study(), pool=pool) == [SUCCESS, SUCCESS]
    assert scp.associations == 1
    assert 0 < idle["dul"] < 100 and 0 < idle["reactor"] < 100, idle
