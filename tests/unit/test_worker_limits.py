"""streamproc.runtime.limits: the parts test_dlq_format.py does not cover -- malformed
settings, a limit with no room, the consumer's exact margin, and the per-batch input and
output checks (all or nothing per input, egress counters corrected, offset order kept).

Sizes are worked out by hand from librdkafka's framing bound: 36 bytes per record, plus
key and value, plus 10 + name + value per header.
"""

from __future__ import annotations

import pytest

from streamproc.errors import ConfigError, Reason
from streamproc.pipeline.core import BatchResult, BatchStats, InputRecord, OutputRecord, Quarantined
from streamproc.runtime.limits import (
    RecordLimit,
    check_consumer,
    derive_limit,
    enforce_output_limit,
    record_size,
    split_oversized,
)


def test_record_size_known_answers() -> None:
    assert record_size(None, None, ()) == 36
    assert record_size(b"abc", b"0123456789", [("h", b"12")]) == 36 + 3 + 10 + (10 + 1 + 2)
    assert record_size(b"", b"", [("trace", None), ("é", b"")]) == 36 + (10 + 5) + (10 + 2)


def test_a_non_integer_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^librdkafka property 'message.max.bytes' must be an integer$"):
        derive_limit(configured=None, producer_conf={"message.max.bytes": "1MB"}, topic_limits={})
    with pytest.raises(ConfigError, match=r"'receive.message.max.bytes' must be an integer"):
        check_consumer({"receive.message.max.bytes": "lots"}, {})


def test_a_limit_that_leaves_no_room_for_a_record_is_refused() -> None:
    # 36 + 1024 + 61 = 1121: the smallest max.message.bytes that still leaves room is 1122
    with pytest.raises(ConfigError, match=r"^topic 'tiny' max.message.bytes 1121 leaves no room for a record$"):
        derive_limit(configured=None, producer_conf={}, topic_limits={"tiny": 1121})
    assert derive_limit(configured=None, producer_conf={}, topic_limits={"tiny": 1122}).max_bytes == 1061


def test_a_configured_limit_equal_to_the_bound_is_accepted() -> None:
    assert derive_limit(configured=524_227, producer_conf={}, topic_limits={"t": 524_288}) == (
        RecordLimit(524_227, "max_record_bytes")
    )
    with pytest.raises(ConfigError, match="max_record_bytes 524228 exceeds"):
        derive_limit(configured=524_228, producer_conf={}, topic_limits={"t": 524_288})


def test_consumer_margin_is_512_bytes_over_the_source_limit() -> None:
    check_consumer({"receive.message.max.bytes": 1_000_512}, {"orders": 1_000_000})
    with pytest.raises(ConfigError, match=r"1000511 is below source topic 'orders' max.message.bytes 1000000 \+ 512"):
        check_consumer({"receive.message.max.bytes": 1_000_511}, {"orders": 1_000_000})
    # not reported: Kafka's default 1048588 is assumed
    with pytest.raises(ConfigError, match=r"max.message.bytes 1048588"):
        check_consumer({"receive.message.max.bytes": 1_049_099}, {"orders": None})
    check_consumer({"receive.message.max.bytes": 1_049_100}, {"orders": None})


def rec(offset: int, value: bytes, *, key: bytes | None = None, headers: tuple = (), partition: int = 0) -> InputRecord:
    return InputRecord("orders", partition, offset, key, value, None, headers)


def test_split_oversized_measures_key_value_and_headers() -> None:
    limit = RecordLimit(2000, "test")
    small = rec(1, b"x" * 10)
    exact = rec(2, b"x" * 1964)  # 36 + 1964 = 2000: fits
    over = rec(3, b"x" * 1965)  # 2001
    headed = rec(4, b"x" * 1900, key=b"k" * 40, headers=(("trace", b"t" * 10),))  # 36+40+1900+25 = 2001
    headed_ok = rec(5, b"x" * 1900, key=b"k" * 39, headers=(("trace", b"t" * 10),))  # 2000
    ok, big = split_oversized([small, exact, over, headed, headed_ok], limit)
    assert ok == [small, exact, headed_ok]
    assert big == [
        Quarantined(over, Reason.OVERSIZED, "2001 bytes > limit 2000"),
        Quarantined(headed, Reason.OVERSIZED, "2001 bytes > limit 2000"),
    ]


def test_split_oversized_without_a_limit_keeps_everything() -> None:
    inputs = [rec(1, b"x" * 10_000_000)]
    assert split_oversized(inputs, None) == (inputs, [])


def test_split_oversized_far_below_the_limit() -> None:
    inputs = [rec(1, b"x" * 1000, key=b"k"), rec(2, b"")]
    assert split_oversized(inputs, RecordLimit(1_000_000, "test")) == (inputs, [])


def out(topic: str, source: InputRecord, size: int) -> OutputRecord:
    return OutputRecord(topic, None, b"y" * (size - 36), [], source)  # record_size == size


def test_an_input_with_one_output_too_large_loses_all_its_outputs() -> None:
    a, b, c = rec(10, b"a"), rec(11, b"b"), rec(5, b"c", partition=1)
    outputs = [
        out("sanitized.analytics", a, 900),
        out("sanitized.fraud", a, 1001),  # too large: a's analytics output goes too
        out("sanitized.analytics", b, 900),
        out("sanitized.fraud", b, 1000),  # exactly the limit: fits
    ]
    stats = BatchStats(
        egress_records={("sanitized.analytics", "analytics"): 2, ("sanitized.fraud", "fraud"): 2},
        egress_bytes={("sanitized.analytics", "analytics"): 1728, ("sanitized.fraud", "fraud"): 1929},
        quarantined={Reason.TAMPERED: 1},
    )
    earlier = Quarantined(rec(3, b"t"), Reason.TAMPERED, "tag mismatch")
    result = BatchResult(outputs, [earlier], stats)
    early = [Quarantined(c, Reason.OVERSIZED, "5000 bytes > limit 1000")]
    audience = {"sanitized.analytics": "analytics", "sanitized.fraud": "fraud"}
    enforce_output_limit(result, early, RecordLimit(1000, "test"), audience.__getitem__)
    assert result.outputs == outputs[2:]
    assert stats.egress_records == {("sanitized.analytics", "analytics"): 1, ("sanitized.fraud", "fraud"): 1}
    assert stats.egress_bytes == {
        ("sanitized.analytics", "analytics"): 1728 - 864,
        ("sanitized.fraud", "fraud"): 1929 - 965,
    }
    # offset order per (topic, partition): orders[0]@3, orders[0]@10, orders[1]@5
    assert result.quarantined == [
        earlier,
        Quarantined(a, Reason.OVERSIZED, "output for 'sanitized.fraud' is 1001 bytes > limit 1000"),
        early[0],
    ]
    assert stats.quarantined == {Reason.TAMPERED: 1, Reason.OVERSIZED: 2}


def test_output_limit_only_counts_egress_it_knows() -> None:
    a = rec(1, b"a")
    result = BatchResult([out("unrouted", a, 2000)], [], BatchStats())
    enforce_output_limit(result, [], RecordLimit(1000, "test"), lambda _t: "")
    assert result.outputs == [] and result.stats.egress_records == {}
    assert [q.record for q in result.quarantined] == [a]


def test_without_a_limit_only_the_early_quarantines_are_merged() -> None:
    a = rec(1, b"a")
    outputs = [out("sanitized.fraud", a, 10_000_000)]
    early = [Quarantined(rec(0, b"z"), Reason.OVERSIZED, "big")]
    result = BatchResult(list(outputs), [], BatchStats())
    enforce_output_limit(result, early, None, lambda _t: "fraud")
    assert result.outputs == outputs
    assert result.quarantined == early and result.stats.quarantined == {Reason.OVERSIZED: 1}
    untouched = BatchResult(list(outputs), [], BatchStats())
    enforce_output_limit(untouched, [], None, lambda _t: "fraud")
    assert untouched.quarantined == [] and untouched.stats.quarantined == {}
