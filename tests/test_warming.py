"""What to warm and how aggressively (coordinator/warming.py): pure decisions, no I/O."""

from __future__ import annotations

from coordinator.warming import (
    REGISTRY_ONLY_BAR,
    Aggressiveness,
    Candidate,
    WarmOutcome,
    keep,
    outcome_of,
    plan,
    warm_budget,
)

MB = 1 << 20


def test_warms_get_only_idle_bandwidth() -> None:
    link = 12.5e6  # 100 Mbit/s
    assert warm_budget(link, 0.0, 10.0, 0.25) == int(link * 10 * 0.25)
    assert warm_budget(link, link / 2, 10.0, 0.25) == int(link / 2 * 10 * 0.25)
    assert warm_budget(link, 0.9 * link, 10.0, 0.5) == 0  # running pulls, migrations, workloads first
    assert warm_budget(0.0, 0.0, 10.0, 0.5) == 0


def test_the_plan_takes_the_most_probable_that_fit() -> None:
    candidates = [
        Candidate("sha256:a", 0.95, 300 * MB),
        Candidate("sha256:b", 0.9, 50 * MB),
        Candidate("sha256:c", 0.85, 10 * MB),
        Candidate("sha256:d", 0.8, 0),  # size unknown
        Candidate("sha256:e", 0.75, 20 * MB),
        Candidate("sha256:f", 0.5, 1 * MB),  # under the threshold
    ]
    agg = Aggressiveness(threshold=0.7, max_layers=8)
    got = plan(candidates, held={"sha256:b"}, in_flight=set(), aggressiveness=agg, budget_bytes=100 * MB)
    assert [c.digest for c in got] == ["sha256:c", "sha256:e"]  # a does not fit, b is held, d unknown
    got = plan(candidates, held=set(), in_flight={"sha256:c"}, aggressiveness=agg, budget_bytes=1 << 40)
    assert [c.digest for c in got] == ["sha256:a", "sha256:b", "sha256:e"]
    one = Aggressiveness(threshold=0.7, max_layers=1)
    assert [c.digest for c in plan(candidates, set(), set(), one, 1 << 40)] == ["sha256:a"]


def test_the_plan_keeps_the_expected_waste_of_its_warms_within_the_bound() -> None:
    candidates = [
        Candidate("sha256:a", 0.95, 10 * MB),
        Candidate("sha256:b", 0.6, 10 * MB),  # (0.05 + 0.4) / 2 = 0.225 expected waste: taken
        Candidate("sha256:c", 0.5, 10 * MB),  # (0.05 + 0.4 + 0.5) / 3 = 0.32: not, nor anything after
        Candidate("sha256:d", 0.45, 1 * MB),
    ]
    agg = Aggressiveness(threshold=0.4, max_layers=8)
    got = plan(candidates, set(), set(), agg, 1 << 40, max_expected_waste=0.25)
    assert [c.digest for c in got] == ["sha256:a", "sha256:b"]
    assert len(plan(candidates, set(), set(), agg, 1 << 40)) == 4  # no bound: the threshold alone
    # a lone warm at P 0.7 expects 0.3 of its bytes wasted: over the bound, not made
    assert plan([Candidate("sha256:b", 0.7, MB)], set(), set(), agg, 1 << 40, max_expected_waste=0.25) == []


def test_a_layer_only_the_registry_holds_has_a_lower_bar_and_goes_first() -> None:
    """A start that misses a layer no peer holds fetches it over the registry's link: warming it
    saves more, so its bar is threshold x REGISTRY_ONLY_BAR; one a peer holds keeps the threshold."""
    candidates = [
        Candidate("sha256:peer-high", 0.8, 10 * MB),
        Candidate("sha256:reg-high", 0.8, 10 * MB),
        Candidate("sha256:peer-low", 0.6, 10 * MB),
        Candidate("sha256:reg-low", 0.6, 10 * MB),  # 0.6 >= 0.7 x 0.75
        Candidate("sha256:reg-lowest", 0.5, 10 * MB),  # 0.5 < 0.525
    ]
    agg = Aggressiveness(threshold=0.7, max_layers=8)
    peers = {"sha256:peer-high", "sha256:peer-low"}
    got = plan(candidates, set(), set(), agg, 1 << 40, on_peers=peers)
    assert [c.digest for c in got] == ["sha256:reg-high", "sha256:peer-high", "sha256:reg-low"]
    assert REGISTRY_ONLY_BAR < 1 and 0.6 >= 0.7 * REGISTRY_ONLY_BAR > 0.5
    # with room for one, the registry's goes; unknown holders: the threshold for all, by P
    assert [c.digest for c in plan(candidates, set(), set(), agg, 10 * MB, on_peers=peers)] == ["sha256:reg-high"]
    got = plan(candidates, set(), set(), agg, 1 << 40)
    assert [c.digest for c in got] == ["sha256:peer-high", "sha256:reg-high"]


def test_keeps_are_the_predicted_layers_held_within_the_room_highest_first() -> None:
    """A keep takes a lease on a layer the host holds (no fetch): only held layers at or above
    their bar, not kept already, by P highest first while they fit the room; no layer count, no
    byte budget of the link, no expected-waste bound (an unused keep wastes no bytes)."""
    candidates = [
        Candidate("sha256:a", 0.95, 30 * MB),
        Candidate("sha256:b", 0.9, 50 * MB),
        Candidate("sha256:c", 0.85, 10 * MB),
        Candidate("sha256:d", 0.8, 0),  # size unknown
        Candidate("sha256:e", 0.75, 20 * MB),
        Candidate("sha256:f", 0.5, 1 * MB),  # under the threshold
        Candidate("sha256:g", 0.99, 1 * MB),  # not held: a warm's, not a keep's
    ]
    held = {"sha256:a", "sha256:b", "sha256:c", "sha256:d", "sha256:e", "sha256:f"}
    agg = Aggressiveness(threshold=0.7, max_layers=1)
    got = keep(candidates, held, kept={"sha256:a"}, aggressiveness=agg, room_bytes=40 * MB)
    assert [c.digest for c in got] == ["sha256:c", "sha256:e"]  # a kept already, b does not fit
    got = keep(candidates, held, kept=set(), aggressiveness=agg, room_bytes=1 << 40)
    assert [c.digest for c in got] == ["sha256:a", "sha256:b", "sha256:c", "sha256:e"]
    assert keep(candidates, held, set(), agg, room_bytes=0) == []
    # the registry-only bar as in the plan: f, held and predicted at 0.5, is not kept at 0.7 x 0.75
    assert "sha256:f" not in [c.digest for c in keep(candidates, held, set(), agg, 1 << 40, on_peers=set())]
    low = Aggressiveness(threshold=0.6)
    assert "sha256:f" in [c.digest for c in keep(candidates, held, set(), low, 1 << 40, on_peers=set())]


def test_an_outcome_counts_warms_made_waste_settled_and_local_starts() -> None:
    outcome = outcome_of([(["a", "b"], ["a", "b"]), (["a", "c"], ["a"])], [10, 30, 40], [(10, True), (30, False)])
    assert outcome == WarmOutcome(
        warmed_bytes=80, wasted_bytes=30, settled_warms=2, starts=2, local_starts=1, warms=3, used_bytes=10
    )
    assert outcome.waste == 30 / 80 and outcome.hit_rate == 0.5
    # waste from warms of an earlier window, none made in this one: all of it is waste
    assert outcome_of([], [], [(10, False)]).waste == 1.0


def test_the_bound_takes_p_calibrated_to_the_lease_when_known() -> None:
    """A warm is wasted only if no start uses it before its lease ends: a layer at P 0.7 within the
    horizon but 0.95 within the lease expects 0.05 of its bytes wasted, within the bound."""
    agg = Aggressiveness(threshold=0.4, max_layers=8)
    horizon_only = [Candidate("sha256:a", 0.7, MB), Candidate("sha256:b", 0.5, MB)]
    assert plan(horizon_only, set(), set(), agg, 1 << 40, max_expected_waste=0.25) == []
    calibrated = [Candidate("sha256:a", 0.7, MB, 0.95), Candidate("sha256:b", 0.5, MB, 0.6)]
    got = plan(calibrated, set(), set(), agg, 1 << 40, max_expected_waste=0.25)
    assert [c.digest for c in got] == ["sha256:a", "sha256:b"]  # (0.05 + 0.4) / 2 = 0.225
    # the threshold still reads the horizon's P
    assert plan(calibrated, set(), set(), Aggressiveness(threshold=0.6, max_layers=8), 1 << 40, 0.25) == got[:1]
