"""Complete stage: arrival times per study → the studies that have been quiet for ``stable_seconds``.

Knows nothing of DICOM, disks or Celery; time comes in as numbers (monotonic seconds), so the rule
is tested on its own.
"""

import threading


class StudyCompletionTracker:
    """A study is complete once ``stable_seconds`` pass without a new instance. Thread-safe."""

    def __init__(self, stable_seconds: float) -> None:
        self.stable_seconds = stable_seconds
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, study_uid: str, at: float) -> None:
        """An instance of ``study_uid`` arrived at ``at``."""
        with self._lock:
            self._last_seen[study_uid] = max(at, self._last_seen.get(study_uid, at))

    def due(self, now: float) -> list[tuple[str, float]]:
        """Complete studies as (study UID, last arrival), oldest first; they stay tracked until settled."""
        with self._lock:
            quiet = [(uid, last) for uid, last in self._last_seen.items() if now - last >= self.stable_seconds]
        return sorted(quiet, key=lambda item: item[1])

    def settle(self, study_uid: str, last_seen: float) -> None:
        """Forget the study — unless an instance arrived after ``last_seen``, which starts the next round."""
        with self._lock:
            if self._last_seen.get(study_uid) == last_seen:
                del self._last_seen[study_uid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._last_seen)
