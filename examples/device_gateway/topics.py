"""MQTT topic filters indexed as a trie, so a PUBLISH finds its subscribers without looking at
every subscription of every session.

A fleet of thousands of devices under one user, each subscribed to its own
``devices/<id>/commands/#``, would otherwise make each message cost O(subscriptions): the
first version of this gateway did that and spent most of its CPU matching topics. The trie
walks the topic's levels once, following the literal level, ``+`` and ``#`` children.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["SubscriptionIndex", "topic_matches"]

S = TypeVar("S", bound=Hashable)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+`` one level, ``#`` the rest; a filter
    starting with a wildcard does not match a ``$`` topic, MQTT-4.7.2-1)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels = topic.split("/")
    wanted = topic_filter.split("/")
    for index, want in enumerate(wanted):
        if want == "#":
            return True
        if index >= len(levels) or (want != "+" and want != levels[index]):
            return False
    return len(levels) == len(wanted)


class _Node(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        #: Subscribers whose filter ends at this node, with their granted QoS.
        self.subscribers: dict[S, int] = {}


class SubscriptionIndex(Generic[S]):
    """Topic filter -> subscribers (any hashable: the gateway uses its Device objects)."""

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """Subscriptions held (one per subscriber and filter)."""
        return self._count

    def add(self, subscriber: S, topic_filter: str, qos: int) -> None:
        """Subscribe (a repeated filter replaces the earlier QoS, MQTT-3.8.4-3)."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        if subscriber not in node.subscribers:
            self._count += 1
        node.subscribers[subscriber] = qos

    def remove(self, subscriber: S, topic_filter: str) -> None:
        """Unsubscribe; unknown filters are ignored (MQTT-3.10.4-5 answers UNSUBACK anyway)."""
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].subscribers.pop(subscriber, None) is None:
            return
        self._count -= 1
        # Prune nodes left empty, so a churning fleet does not grow the trie for ever.
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> dict[S, int]:
        """Every subscriber matching ``topic``, with the highest QoS among its matching
        filters."""
        found: dict[S, int] = {}

        def take(node: _Node[S]) -> None:
            for subscriber, qos in node.subscribers.items():
                if found.get(subscriber, -1) < qos:
                    found[subscriber] = qos

        levels = topic.split("/")
        nodes = [self._root]
        for depth, level in enumerate(levels):
            following: list[_Node[S]] = []
            for node in nodes:
                # Wildcards at the first level never match a $SYS-style topic (MQTT-4.7.2-1).
                wild = depth > 0 or not topic.startswith("$")
                if wild:
                    rest = node.children.get("#")
                    if rest is not None:
                        take(rest)
                    one = node.children.get("+")
                    if one is not None:
                        following.append(one)
                exact = node.children.get(level)
                if exact is not None:
                    following.append(exact)
            nodes = following
            if not nodes:
                return found
        for node in nodes:
            take(node)
            # "a/#" also matches "a" itself (MQTT-4.7.1-2).
            rest = node.children.get("#")
            if rest is not None:
                take(rest)
        return found
