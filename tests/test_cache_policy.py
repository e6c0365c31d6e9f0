"""The layer cache's eviction policy (agent/cache/policy.py): a pure function, tested without I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cache.policy import MIB, Bound, Entry, Origin, freed_by, plan, recover_clock, value


def blob(i: int) -> str:
    return f"sha256:{i:064x}"


def sizes_for(*pairs: tuple[int, int]) -> dict[str, int]:
    return {blob(i): size for i, size in pairs}


def test_under_the_bound_nothing_goes() -> None:
    entries = [Entry("a", frozenset({blob(1)}))]
    p = plan(entries, sizes_for((1, 100)), frozenset(), Bound(high=100, low=50), clock=3.0)
    assert (p.evict, p.freed, p.short, p.clock) == ((), 0, 0, 3.0)


def test_equal_entries_go_least_recently_used_first() -> None:
    entries = [Entry(n, frozenset({blob(i)}), last_use=t) for i, (n, t) in enumerate([("a", 30), ("b", 10), ("c", 20)])]
    p = plan(entries, sizes_for((0, MIB), (1, MIB), (2, MIB)), frozenset(), Bound(high=2 * MIB, low=MIB), 0.0)
    assert p.evict == ("b", "c") and p.freed == 2 * MIB and p.short == 0


def test_frequency_and_refetch_cost_outweigh_recency() -> None:
    sizes = sizes_for((0, MIB), (1, MIB), (2, MIB))
    entries = [
        Entry("often", frozenset({blob(0)}), uses=5, last_use=1),
        Entry("imported", frozenset({blob(1)}), origin=Origin.ARCHIVE, last_use=2),
        Entry("recent", frozenset({blob(2)}), last_use=3),
    ]
    p = plan(entries, sizes, frozenset(), Bound(high=2 * MIB, low=2 * MIB), 0.0)
    assert p.evict == ("recent",)


def test_the_clock_ages_out_what_was_used_long_ago() -> None:
    """An entry used 5 times before the clock moved goes before one used once after it."""
    sizes = sizes_for((0, MIB), (1, MIB))
    old = Entry("old", frozenset({blob(0)}), uses=5, clock=0.0)
    late = value(0.0, 5, Origin.REGISTRY, MIB) + 1  # the clock after evicting an entry like `old`
    new = Entry("new", frozenset({blob(1)}), uses=1, clock=late)
    p = plan([old, new], sizes, frozenset(), Bound(high=MIB, low=MIB), late)
    assert p.evict == ("old",) and p.clock >= late


def test_shared_layers_are_freed_only_with_the_last_image_holding_them() -> None:
    sizes = sizes_for((0, 10 * MIB), (1, MIB), (2, MIB))
    a = Entry("a", frozenset({blob(0), blob(1)}), last_use=1)
    b = Entry("b", frozenset({blob(0), blob(2)}), last_use=2)
    assert freed_by([a], [b], frozenset(), sizes) == MIB
    p = plan([a, b], sizes, frozenset(), Bound(high=5 * MIB, low=5 * MIB), 0.0)
    assert p.evict == ("a", "b") and p.freed == 12 * MIB


def test_protected_entries_and_leased_blobs_stay() -> None:
    sizes = sizes_for((0, MIB), (1, MIB), (2, MIB))
    entries = [
        Entry("pinned", frozenset({blob(0)}), protected="pinned"),
        Entry("leased", frozenset({blob(1)})),
        Entry("free", frozenset({blob(2)}), last_use=5),
    ]
    p = plan(entries, sizes, frozenset({blob(1)}), Bound(high=MIB, low=MIB), 0.0)
    # "leased" would free nothing (its blob is leased): it stays, and the store stays over by a MiB.
    assert (p.evict, p.freed, p.short) == (("free",), MIB, MIB)


def test_an_image_peers_hold_goes_before_the_fleets_last_copy() -> None:
    """Same size, uses and clock: the image whose layers another host holds comes back from a peer,
    the other only from the registry, so the first goes; told nothing about peers, the older goes."""
    sizes = sizes_for((0, 20 * MIB), (1, 20 * MIB), (2, 10 * MIB), (3, 10 * MIB))
    entries = [
        Entry("only-here", frozenset({blob(0)}), last_use=1),
        Entry("on-a-peer", frozenset({blob(1)}), last_use=2),
        Entry("half-on-a-peer", frozenset({blob(2), blob(3)}), last_use=3),
    ]
    bound = Bound(high=40 * MIB, low=40 * MIB)
    assert plan(entries, sizes, frozenset(), bound, 0.0).evict == ("only-here",)
    on_peers = frozenset({blob(1), blob(2)})
    assert plan(entries, sizes, frozenset(), bound, 0.0, on_peers).evict == ("on-a-peer",)
    # more to free: the image partly on peers goes next, the last copy stays
    p = plan(entries, sizes, frozenset(), Bound(high=20 * MIB, low=20 * MIB), 0.0, on_peers)
    assert p.evict == ("on-a-peer", "half-on-a-peer")
    assert value(0.0, 1, Origin.REGISTRY, MIB, on_peers=MIB) == value(0.0, 1, Origin.PEER, MIB)


def test_recovered_clock_is_the_latest_recorded() -> None:
    assert recover_clock([]) == 0.0
    assert recover_clock([Entry("a", frozenset(), clock=2.5), Entry("b", frozenset(), clock=1.0)]) == 2.5


@st.composite
def caches(draw: st.DrawFn) -> tuple[list[Entry], dict[str, int], frozenset[str], Bound]:
    nblobs = draw(st.integers(1, 12))
    sizes = {blob(i): draw(st.integers(0, 64 * MIB)) for i in range(nblobs)}
    digests = sorted(sizes)
    entries = [
        Entry(
            name=f"img-{n}",
            blobs=frozenset(draw(st.lists(st.sampled_from(digests), min_size=1, max_size=5))),
            uses=draw(st.integers(1, 20)),
            clock=draw(st.floats(0, 100, allow_nan=False)),
            last_use=draw(st.floats(0, 1e9, allow_nan=False)),
            origin=draw(st.sampled_from(list(Origin))),
            protected=draw(st.sampled_from(["", "", "", "pinned", "in use by container c"])),
        )
        for n in range(draw(st.integers(0, 8)))
    ]
    held = frozenset(draw(st.lists(st.sampled_from(digests), max_size=3)))
    used = sum(sizes.values())
    high = draw(st.integers(1, max(1, used + MIB)))
    low = draw(st.integers(1, high))
    return entries, sizes, held, Bound(high=high, low=low)


@settings(max_examples=300, deadline=None)
@given(caches(), st.floats(0, 1000, allow_nan=False))
def test_a_plan_keeps_every_promise(
    cache: tuple[list[Entry], dict[str, int], frozenset[str], Bound], clock: float
) -> None:
    entries, sizes, held, bound = cache
    p = plan(entries, sizes, held, bound, clock, on_peers=frozenset(sorted(sizes)[::2]))
    used = sum(sizes.values())
    by_name = {e.name: e for e in entries}
    evicted = [by_name[n] for n in p.evict]
    kept = [e for e in entries if e.name not in p.evict]
    assert len(set(p.evict)) == len(p.evict)
    assert not any(e.protected for e in evicted), "never a protected entry"
    assert p.freed == freed_by(evicted, kept, held, sizes), "freed is exactly what containerd's GC drops"
    gone = set().union(*(e.blobs for e in evicted)) - set().union(held, *(e.blobs for e in kept))
    assert not gone & held, "never a leased blob"
    assert p.clock >= clock, "the clock never goes back"
    if used <= bound.high:
        assert p.evict == () and p.freed == 0
        return
    assert p.short == max(0, used - p.freed - bound.low)
    if p.short:  # could not reach the low mark: then nothing evictable that frees bytes was left
        assert (
            freed_by(evicted + [e for e in kept if not e.protected], [e for e in kept if e.protected], held, sizes)
            == p.freed
        )
    for e in evicted:  # no useless eviction: each one's going frees bytes the others' do not
        rest = [x for x in evicted if x is not e]
        assert freed_by(rest, [*kept, e], held, sizes) < p.freed
