"""The gateway's subscription trie agrees with the plain MQTT matching rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from device_gateway.topics import SubscriptionIndex, topic_matches

LEVEL = st.sampled_from(["a", "b", "dev1", "$SYS", ""])
TOPIC = st.lists(LEVEL, min_size=1, max_size=4).map("/".join)
FILTER = st.lists(st.sampled_from(["a", "b", "dev1", "$SYS", "", "+"]), min_size=1, max_size=4).map(
    "/".join
) | st.lists(st.sampled_from(["a", "b", "+"]), min_size=0, max_size=3).map(
    lambda levels: "/".join([*levels, "#"])
)


def test_rules_from_the_specification() -> None:
    assert topic_matches("sport/#", "sport")
    assert topic_matches("sport/+/player1", "sport/tennis/player1")
    assert not topic_matches("sport/+", "sport")
    assert not topic_matches("#", "$SYS/uptime")
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("x", "sport/#", 0)
    index.add("x", "sport/tennis", 1)
    index.add("y", "+/+", 1)
    assert index.match("sport/tennis") == {"x": 1, "y": 1}
    assert index.match("sport") == {"x": 0}
    assert index.match("$SYS/x") == {}


@settings(max_examples=400, deadline=None)
@given(subs=st.lists(st.tuples(st.sampled_from("pqrs"), FILTER, st.integers(0, 1))), topic=TOPIC)
def test_trie_matches_like_the_plain_rule(subs: list[tuple[str, str, int]], topic: str) -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    table: dict[tuple[str, str], int] = {}
    for who, topic_filter, qos in subs:
        index.add(who, topic_filter, qos)
        table[who, topic_filter] = qos
    expected: dict[str, int] = {}
    for (who, topic_filter), qos in table.items():
        if topic_matches(topic_filter, topic):
            expected[who] = max(qos, expected.get(who, -1))
    assert index.match(topic) == expected
    assert len(index) == len(table)
    for who, topic_filter in list(table):
        index.remove(who, topic_filter)
    assert len(index) == 0 and index.match(topic) == {}
    assert not index._root.children  # pruned back to nothing
