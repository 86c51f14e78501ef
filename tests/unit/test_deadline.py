"""Deadline: input that must arrive whole, counted from its first byte."""

from __future__ import annotations


def test_deadline_counts_from_its_first_start_unless_restarted() -> None:
    from twisted.internet.task import Clock

    from mailplugins.deadline import Deadline

    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(lambda: fired.append(clock.seconds()))
    deadline.start(clock, 5)
    clock.advance(3)
    deadline.start(clock, 5)  # more of the same line: still counted from the first byte
    clock.advance(2)
    assert fired == [5] and not deadline.running
    deadline.start(clock, 5)
    clock.advance(4)
    deadline.start(clock, 5, restart=True)  # a new line began
    clock.advance(4)
    assert fired == [5]
    deadline.stop()
    clock.advance(10)
    assert fired == [5] and clock.getDelayedCalls() == []


def test_deadline_follow_line_restarts_only_for_a_new_line() -> None:
    from twisted.internet.task import Clock

    from mailplugins.deadline import Deadline

    clock = Clock()
    fired: list[float] = []
    deadline = Deadline(lambda: fired.append(clock.seconds()))
    deadline.follow_line(clock, 5, pending=True, data=b"AUTH\t1")
    clock.advance(3)
    deadline.follow_line(clock, 5, pending=True, data=b"\tPLAIN")  # the same line trickles on
    clock.advance(2)
    assert fired == [5]
    deadline.follow_line(clock, 5, pending=True, data=b"x")
    clock.advance(4)
    deadline.follow_line(clock, 5, pending=True, data=b"end\nnext")  # a new line began
    clock.advance(4)
    deadline.follow_line(clock, 5, pending=False, data=b"\n")  # complete: nothing pending
    clock.advance(10)
    assert fired == [5]
