"""StudyCompletionTracker: quiet for stable_seconds → due; later arrivals survive settling — no network."""

import math

from dicom_node.completion import StudyCompletionTracker


def test_a_study_is_due_only_after_stable_seconds_without_arrivals() -> None:
    tracker = StudyCompletionTracker(stable_seconds=5)
    tracker.seen("1.1", at=100.0)
    tracker.seen("1.1", at=103.0)
    assert tracker.due(now=107.9) == []
    assert tracker.due(now=108.0) == [("1.1", 103.0)]


def test_out_of_order_arrival_times_never_move_the_clock_back() -> None:
    tracker = StudyCompletionTracker(stable_seconds=5)
    tracker.seen("1.1", at=110.0)
    tracker.seen("1.1", at=104.0)
    assert tracker.due(now=114.0) == []


def test_settle_forgets_the_study_unless_an_instance_arrived_meanwhile() -> None:
    tracker = StudyCompletionTracker(stable_seconds=1)
    tracker.seen("1.1", at=0.0)
    tracker.seen("2.2", at=0.0)
    due = dict(tracker.due(now=2.0))
    tracker.seen("2.2", at=2.5)  # arrives while 2.2's round is being dispatched
    tracker.settle("1.1", due["1.1"])
    tracker.settle("2.2", due["2.2"])
    assert len(tracker) == 1
    assert tracker.due(now=3.5) == [("2.2", 2.5)]  # → its next round


def test_due_lists_oldest_first() -> None:
    tracker = StudyCompletionTracker(stable_seconds=1)
    tracker.seen("2.2", at=5.0)
    tracker.seen("1.1", at=3.0)
    assert [uid for uid, _ in tracker.due(now=10.0)] == ["1.1", "2.2"]


def test_the_next_deadline_is_the_earliest_study_falling_quiet() -> None:
    tracker = StudyCompletionTracker(stable_seconds=5)
    assert tracker.next_deadline() == math.inf
    tracker.seen("1.1", at=100.0)
    tracker.seen("2.2", at=101.0)
    tracker.seen("1.1", at=103.0)  # postpones 1.1: now 2.2 falls quiet first
    assert tracker.next_deadline() == 106.0
    assert tracker.due(now=tracker.next_deadline()) == [("2.2", 101.0)]


def test_only_a_study_not_yet_tracked_announces_itself() -> None:
    announced: list[None] = []
    tracker = StudyCompletionTracker(stable_seconds=1, on_new_study=lambda: announced.append(None))
    tracker.seen("1.1", at=0.0)
    tracker.seen("1.1", at=0.5)  # a later instance only postpones 1.1's own deadline: nothing to announce
    assert len(announced) == 1
    tracker.settle("1.1", 0.5)
    tracker.seen("1.1", at=3.0)  # after settling it is a new round, tracked afresh
    assert len(announced) == 2
