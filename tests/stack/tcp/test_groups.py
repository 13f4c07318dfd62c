"""PendingGroups against a plain model: sizes, oldest members, the largest group."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stack.tcp import FlowKey
from stack.tcp.groups import PendingGroups


def flow(n: int) -> FlowKey:
    return FlowKey(b"\x0a\x00\x00\x01", n, b"\x0a\x01\x00\x01", 443)


def test_the_largest_group_follows_adds_and_removes() -> None:
    groups = PendingGroups()
    assert groups.largest() is None
    groups.add("a", flow(1))
    groups.add("a", flow(2))
    groups.add("b", flow(3))
    assert groups.largest() == ("a", 2) and groups.oldest("a") == flow(1)
    groups.remove("a", flow(1))
    assert groups.largest() in {("a", 1), ("b", 1)} and groups.oldest("a") == flow(2)
    groups.remove("a", flow(2))
    assert groups.largest() == ("b", 1) and groups.size("a") == 0
    groups.remove("b", flow(3))
    assert groups.largest() is None


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 15)), max_size=80))
def test_matches_a_plain_model(steps: list[tuple[bool, int, int]]) -> None:
    groups = PendingGroups()
    model: dict[int, list[FlowKey]] = {}
    for add, group, n in steps:
        key = flow(n)
        members = model.setdefault(group, [])
        if add and key not in members:
            groups.add(group, key)
            members.append(key)
        elif not add and key in members:
            groups.remove(group, key)
            members.remove(key)
        sizes = {g: len(m) for g, m in model.items() if m}
        for g in range(4):
            assert groups.size(g) == sizes.get(g, 0)
        largest = groups.largest()
        if not sizes:
            assert largest is None
        else:
            assert largest is not None
            top, size = largest
            assert size == max(sizes.values()) == sizes[top]
            assert groups.oldest(top) == model[top][0]
