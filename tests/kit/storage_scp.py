"""A small storage SCP for tests, in a process of its own (``python storage_scp.py PORT [TRANSFER_SYNTAX,…]``,
by default pynetdicom's uncompressed syntaxes): it counts associations and stored instances, and on cue
ends its associations or fails chosen C-STOREs.

Commands, one JSON array per line on stdin, each answered by one JSON line on stdout:
``["state"]`` → {"associations", "released", "stored", "received"} ("received": per SOP Instance UID the
transfer syntax it came in and the sha256 of its data set's bytes as they arrived);
``["drop_all", "release" | "abort"]``;
``["abort_once" | "abort_always" | "refuse", SOP_INSTANCE_UID]`` (that instance's C-STORE aborts the
association once / every time, or is answered Out of Resources); ``["stop"]``.
"""

import hashlib
import json
import sys
import threading

from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


class StorageScp:
    def __init__(self, port: int, transfer_syntaxes: list[str]) -> None:
        self.associations, self.released, self.stored = 0, 0, []
        self.received: dict[str, tuple[str, str]] = {}
        self.cues: dict[str, set[str]] = {"abort_once": set(), "abort_always": set(), "refuse": set()}
        self.lock = threading.Lock()
        ae = AE(ae_title="TESTSCP")
        for sop_class in (ComputedRadiographyImageStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, transfer_syntaxes)
        handlers = [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_C_STORE, self._store),
        ]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def answer(self, command: str, argument: str | None) -> dict | None:
        if command == "state":
            with self.lock:
                return {
                    "associations": self.associations,
                    "released": self.released,
                    "stored": self.stored,
                    "received": self.received,
                }
        if command == "drop_all":
            for association in self.server.active_associations:
                association.release() if argument == "release" else association.abort()
        else:
            self.cues[command].add(argument)
        return None

    def _accepted(self, event) -> None:
        with self.lock:
            self.associations += 1

    def _released(self, event) -> None:
        with self.lock:
            self.released += 1

    def _store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.cues["abort_always"] or uid in self.cues["abort_once"]:
            self.cues["abort_once"].discard(uid)
            event.assoc.abort()
            return OUT_OF_RESOURCES  # never sent: the association is gone
        if uid in self.cues["refuse"]:
            return OUT_OF_RESOURCES
        data_set = hashlib.sha256(event.request.DataSet.getvalue()).hexdigest()
        with self.lock:
            self.stored.append(uid)
            self.received[uid] = (str(event.context.transfer_syntax), data_set)
        return SUCCESS


def main(port: int, transfer_syntaxes: list[str]) -> None:
    scp = StorageScp(port, transfer_syntaxes)
    print(json.dumps("listening"), flush=True)
    for line in sys.stdin:
        command, *argument = json.loads(line)
        if command == "stop":
            break
        print(json.dumps(scp.answer(command, argument[0] if argument else None)), flush=True)
    scp.server.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else DEFAULT_TRANSFER_SYNTAXES)
