"""authd's brute-force counters (authd.throttle): penalties, stale passwords, bounded memory."""

from __future__ import annotations

from authd.throttle import Throttle, network_key


def test_penalty_doubles_past_the_threshold_up_to_the_maximum() -> None:
    throttle = Throttle(threshold=2, initial=1, maximum=5, window=60, size=10)
    penalties = []
    for i in range(6):
        throttle.failure(["user:a"], bytes([i]), 0.0)
        penalties.append(throttle.penalty(["user:a"], 0.0))
    assert penalties == [0, 1, 2, 4, 5, 5]


def test_the_same_wrong_password_counts_once() -> None:
    throttle = Throttle(threshold=1, initial=1, maximum=8, window=60, size=10)
    for _ in range(5):
        throttle.failure(["user:a"], b"stale", 0.0)
    assert throttle.penalty(["user:a"], 0.0) == 1


def test_shared_counts_and_success() -> None:
    throttle = Throttle(threshold=2, initial=1, maximum=8, window=60, size=10)
    assert throttle.penalty(["ip:192.0.2.1"], 0.0, shared={"ip:192.0.2.1": 4}) == 4
    throttle.failure(["user:a"], b"x", 0.0)
    throttle.failure(["user:a"], b"y", 0.0)
    throttle.success("user:a")
    assert throttle.penalty(["user:a"], 0.0) == 0


def test_throttle_table_is_bounded() -> None:
    throttle = Throttle(threshold=1, initial=1, maximum=4, window=60, size=100)
    for i in range(1000):
        throttle.failure([f"user:{i}"], b"x", 0.0)
    assert len(throttle) == 100
    assert throttle.penalty(["user:999"], 1.0) == 1
    assert throttle.penalty(["user:999"], 100.0) == 0  # window passed


def test_network_keys() -> None:
    assert network_key("192.0.2.1", 48) == "ip:192.0.2.1"
    assert network_key("2001:db8:1:2::5", 48) == "ip:2001:db8:1::/48"
    assert network_key("::ffff:192.0.2.1", 48) == "ip:192.0.2.1"
    assert network_key("", 48) is None
    assert network_key("junk", 48) is None
