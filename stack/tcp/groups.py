"""Pending SYNs grouped by destination or by source, for fair caps.

The demux keeps one `PendingGroups` per kind of group (destination address
and port; application address). Each knows its groups' sizes and, at a
constant cost per SYN, which group is the largest: under a flood from ten
thousand spoofed sources there are as many groups as pending SYNs, and
scanning them for each dropped SYN would cost more than the SYN itself.
Groups are kept by size in buckets (as an LFU cache keeps frequencies),
and the largest size is tracked as groups grow and shrink by one.
"""

from __future__ import annotations

from collections.abc import Hashable

from stack.tcp.events import FlowKey


class PendingGroups:
    """Flows in groups, oldest first in each, with the largest group at hand."""

    __slots__ = ("_by_size", "_largest", "_members")

    def __init__(self) -> None:
        self._members: dict[Hashable, dict[FlowKey, None]] = {}
        # size -> the groups of that size (dicts as ordered sets)
        self._by_size: dict[int, dict[Hashable, None]] = {}
        self._largest = 0

    def size(self, group: Hashable) -> int:
        """How many flows `group` has."""
        members = self._members.get(group)
        return 0 if members is None else len(members)

    def largest(self) -> tuple[Hashable, int] | None:
        """A group of the largest size, and that size; None when all are empty."""
        if not self._largest:
            return None
        return next(iter(self._by_size[self._largest])), self._largest

    def oldest(self, group: Hashable) -> FlowKey:
        """The flow that has been in `group` longest."""
        return next(iter(self._members[group]))

    def add(self, group: Hashable, key: FlowKey) -> None:
        """Put `key` in `group` (it must not be in it)."""
        members = self._members.setdefault(group, {})
        old = len(members)
        members[key] = None
        # The group moves to the next size's bucket (here and in `remove`
        # written out, not in a helper: each runs twice per connection).
        by_size = self._by_size
        if old:
            bucket = by_size[old]
            del bucket[group]
            if not bucket:
                del by_size[old]
        by_size.setdefault(old + 1, {})[group] = None
        if old + 1 > self._largest:
            self._largest = old + 1

    def remove(self, group: Hashable, key: FlowKey) -> None:
        """Take `key` out of `group` (it must be in it)."""
        members = self._members[group]
        old = len(members)
        del members[key]
        if not members:
            del self._members[group]
        by_size = self._by_size
        bucket = by_size[old]
        del bucket[group]
        if not bucket:
            del by_size[old]
        if old > 1:
            by_size.setdefault(old - 1, {})[group] = None
        if old == self._largest and old not in self._by_size:
            # The group was the last of the largest size; it is now one
            # smaller, so the next size down is the largest (or none is).
            self._largest = old - 1
