"""Complete stage: arrival times per study → the studies that have been quiet for ``stable_seconds``.

Knows nothing of DICOM, disks or Celery; time comes in as numbers (monotonic seconds), so the rule
is tested on its own.
"""

import math
import threading
from collections.abc import Callable


class StudyCompletionTracker:
    """A study is complete once ``stable_seconds`` pass without a new instance. Thread-safe.

    Instead of being scanned periodically, the tracker names the moment its next study falls quiet
    (:meth:`next_deadline`) and calls ``on_new_study`` when a study it did not track arrives: only
    such a study can bring that moment forward, since a later instance of a tracked study only
    postpones its own deadline.
    """

    def __init__(self, stable_seconds: float, on_new_study: Callable[[], None] = lambda: None) -> None:
        self.stable_seconds = stable_seconds
        self._on_new_study = on_new_study
        self._last_seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, study_uid: str, at: float) -> None:
        """An instance of ``study_uid`` arrived at ``at``."""
        with self._lock:
            is_new = study_uid not in self._last_seen
            self._last_seen[study_uid] = max(at, self._last_seen.get(study_uid, at))
        if is_new:
            self._on_new_study()

    def due(self, now: float) -> list[tuple[str, float]]:
        """Complete studies as (study UID, last arrival), oldest first; they stay tracked until settled."""
        with self._lock:
            quiet = [(uid, last) for uid, last in self._last_seen.items() if self._deadline(last) <= now]
        return sorted(quiet, key=lambda item: item[1])

    def next_deadline(self) -> float:
        """When the next tracked study falls quiet (``math.inf`` when none is tracked)."""
        with self._lock:
            return self._deadline(min(self._last_seen.values(), default=math.inf))

    def settle(self, study_uid: str, last_seen: float) -> None:
        """Forget the study — unless an instance arrived after ``last_seen``, which starts the next round."""
        with self._lock:
            if self._last_seen.get(study_uid) == last_seen:
                del self._last_seen[study_uid]

    def _deadline(self, last_seen: float) -> float:
        # one expression for "due" and "next deadline", so a wake-up at the deadline always finds the study due
        return last_seen + self.stable_seconds

    def __len__(self) -> int:
        with self._lock:
            return len(self._last_seen)
