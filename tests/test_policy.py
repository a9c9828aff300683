"""Tests of aioserve.policy: traffic validation, the traffic table and the route policies."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aioserve.policy as policy_module
from aioserve.exceptions import BackendNotFound, ConfigError, ConfigTypeError
from aioserve.policy import (
    RoutePolicy,
    TrafficTable,
    make_chooser,
    validate_shadow_proportion,
    validate_traffic,
)

# No example database: it would write a .hypothesis directory into the work tree.
quick = settings(database=None, max_examples=200)

KNOWN = ("a", "b", "c", "d")


class ForbiddenRandom(random.Random):
    """An RNG that fails the test if a chooser draws from it."""

    def random(self) -> float:
        raise AssertionError("the chooser drew from the RNG")


def shares(picks: list[str]) -> dict[str, float]:
    counts = Counter(picks)
    return {name: count / len(picks) for name, count in counts.items()}


def draw(policy: RoutePolicy, table: TrafficTable, n: int, **kwargs: object) -> list[str]:
    chooser = make_chooser(policy, table, rng=random.Random(1234), **kwargs)  # type: ignore[arg-type]
    return [chooser.choose(None) for _ in range(n)]


# --- RoutePolicy.parse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (RoutePolicy.PowerOfTwo, RoutePolicy.PowerOfTwo),
        ("random", RoutePolicy.Random),
        ("Random", RoutePolicy.Random),
        ("round_robin", RoutePolicy.RoundRobin),
        ("RoundRobin", RoutePolicy.RoundRobin),
        ("power_of_two", RoutePolicy.PowerOfTwo),
        ("PowerOfTwo", RoutePolicy.PowerOfTwo),
        ("fixed_packing", RoutePolicy.FixedPacking),
        ("FixedPacking", RoutePolicy.FixedPacking),
        ("ROUND-ROBIN", RoutePolicy.RoundRobin),
    ],
)
def test_parse_accepts_members_values_and_names(
    value: RoutePolicy | str, expected: RoutePolicy
) -> None:
    assert RoutePolicy.parse(value) is expected


def test_parse_rejects_an_unknown_name_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'least_loaded'.*'random', 'round_robin'"):
        RoutePolicy.parse("least_loaded")


def test_parse_rejects_a_non_string() -> None:
    with pytest.raises(ConfigTypeError, match=r"got 3 \(int\)"):
        RoutePolicy.parse(3)  # type: ignore[arg-type]


# --- validate_traffic ---------------------------------------------------------------------------


def test_validate_traffic_returns_a_clean_float_copy_keeping_zero_weights() -> None:
    given_traffic = {"a": Fraction(1, 4), "b": 0, "c": 0.75}
    clean = validate_traffic(given_traffic, KNOWN)
    assert clean == {"a": 0.25, "b": 0.0, "c": 0.75}
    assert all(type(weight) is float for weight in clean.values())
    assert list(clean) == ["a", "b", "c"]
    clean["a"] = 1.0
    assert given_traffic["a"] == Fraction(1, 4)


def test_validate_traffic_accepts_a_single_backend_with_int_weight() -> None:
    assert validate_traffic({"a": 1}, KNOWN) == {"a": 1.0}


@pytest.mark.parametrize("traffic", [None, "a", ["a"], [("a", 1.0)], 1.0])
def test_validate_traffic_rejects_a_non_dict(traffic: object) -> None:
    with pytest.raises(ConfigTypeError, match="must be a dict"):
        validate_traffic(traffic, KNOWN)


def test_validate_traffic_rejects_an_empty_dict() -> None:
    with pytest.raises(ConfigError, match="at least one backend"):
        validate_traffic({}, KNOWN)


def test_validate_traffic_rejects_a_non_string_key() -> None:
    with pytest.raises(ConfigTypeError, match=r"got 1 \(int\)"):
        validate_traffic({1: 1.0}, KNOWN)


def test_validate_traffic_names_the_unknown_backend_and_the_known_ones() -> None:
    with pytest.raises(BackendNotFound) as info:
        validate_traffic({"a": 0.5, "sumarize": 0.5}, ["summarize", "a"])
    assert str(info.value) == "No backend named 'sumarize'. Known backends: 'a', 'summarize'."
    assert isinstance(info.value, ValueError)


def test_validate_traffic_says_when_no_backend_exists() -> None:
    with pytest.raises(BackendNotFound, match="No backends exist yet"):
        validate_traffic({"a": 1.0}, ())


@pytest.mark.parametrize("weight", [True, False, "0.5", None, [1.0], 1j])
def test_validate_traffic_rejects_a_non_number_weight(weight: object) -> None:
    with pytest.raises(ConfigTypeError, match="must be a number"):
        validate_traffic({"a": weight}, KNOWN)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 10**400])
def test_validate_traffic_rejects_a_non_finite_weight(weight: float) -> None:
    with pytest.raises(ConfigError, match="must be finite"):
        validate_traffic({"a": weight}, KNOWN)


def test_validate_traffic_rejects_a_negative_weight_even_when_the_sum_is_one() -> None:
    with pytest.raises(ConfigError, match=r"'b' must not be negative, got -0.5"):
        validate_traffic({"a": 1.5, "b": -0.5}, KNOWN)


def test_validate_traffic_shows_a_wrong_sum_and_the_traffic() -> None:
    with pytest.raises(ConfigError) as info:
        validate_traffic({"a": 0.4, "b": 0.5}, KNOWN)
    assert str(info.value) == "Traffic weights must sum to 1, got 0.9 for {'a': 0.4, 'b': 0.5}."


def test_validate_traffic_rejects_all_zero_weights() -> None:
    with pytest.raises(ConfigError, match=r"must sum to 1, got 0\.0 "):
        validate_traffic({"a": 0, "b": 0.0}, KNOWN)


def test_validate_traffic_sum_tolerance_is_1e_8() -> None:
    assert validate_traffic({"a": 0.5, "b": 0.5 + 5e-9}, KNOWN) == {"a": 0.5, "b": 0.5 + 5e-9}
    with pytest.raises(ConfigError, match="must sum to 1"):
        validate_traffic({"a": 0.5, "b": 0.5 + 2e-8}, KNOWN)


def test_validate_traffic_accepts_float_sums_that_are_one_up_to_rounding() -> None:
    tenths = {name: 0.1 for name in "abcdefghij"}
    assert validate_traffic(tenths, "abcdefghij") == tenths


@st.composite
def valid_traffic(draw: st.DrawFn) -> dict[str, float]:
    """A traffic dict over KNOWN with some zero weights and at least one positive one."""
    names = draw(st.lists(st.sampled_from(KNOWN), min_size=1, max_size=len(KNOWN), unique=True))
    raw = draw(st.lists(st.integers(0, 1000), min_size=len(names), max_size=len(names)))
    if not any(raw):
        raw[draw(st.integers(0, len(raw) - 1))] = 1
    total = sum(raw)
    return {name: part / total for name, part in zip(names, raw, strict=True)}


@quick
@given(traffic=valid_traffic(), u=st.floats(0.0, 1.0, exclude_max=True))
def test_valid_traffic_is_accepted_and_picks_land_on_positive_weights(
    traffic: dict[str, float], u: float
) -> None:
    clean = validate_traffic(traffic, KNOWN)
    assert clean == traffic
    table = TrafficTable(clean)
    assert table.traffic == traffic
    assert table.backends == tuple(name for name, weight in traffic.items() if weight > 0)
    assert traffic[table.pick(u)] > 0


@quick
@given(traffic=valid_traffic(), extra=st.text(min_size=1).filter(lambda name: name not in KNOWN))
def test_traffic_naming_an_unknown_backend_is_always_rejected(
    traffic: dict[str, float], extra: str
) -> None:
    with pytest.raises(BackendNotFound, match="No backend named"):
        validate_traffic({**traffic, extra: 0.0}, KNOWN)


@quick
@given(traffic=valid_traffic(), data=st.data())
def test_traffic_with_a_negative_weight_is_always_rejected(
    traffic: dict[str, float], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(traffic)))
    negative = data.draw(st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False))
    with pytest.raises(ConfigError, match="must not be negative"):
        validate_traffic({**traffic, name: negative}, KNOWN)


@quick
@given(
    traffic=valid_traffic(),
    factor=st.floats(0.0, 10.0).filter(lambda factor: abs(factor - 1.0) > 1e-6),
)
def test_traffic_not_summing_to_one_is_always_rejected(
    traffic: dict[str, float], factor: float
) -> None:
    scaled = {name: weight * factor for name, weight in traffic.items()}
    with pytest.raises(ConfigError, match="must sum to 1"):
        validate_traffic(scaled, KNOWN)


@quick
@given(
    traffic=valid_traffic(),
    data=st.data(),
    bad=st.one_of(st.booleans(), st.text(), st.none(), st.lists(st.floats())),
)
def test_traffic_with_a_non_number_weight_is_always_rejected(
    traffic: dict[str, float], data: st.DataObject, bad: object
) -> None:
    name = data.draw(st.sampled_from(sorted(traffic)))
    with pytest.raises(ConfigTypeError, match="must be a number"):
        validate_traffic({**traffic, name: bad}, KNOWN)


# --- validate_shadow_proportion -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0.0), (1, 1.0), (0.25, 0.25), (Fraction(1, 2), 0.5)]
)
def test_shadow_proportion_accepts_numbers_in_zero_to_one(value: object, expected: float) -> None:
    result = validate_shadow_proportion(value)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5]])
def test_shadow_proportion_rejects_a_non_number(value: object) -> None:
    with pytest.raises(ConfigTypeError, match="must be a number between 0 and 1"):
        validate_shadow_proportion(value)


@pytest.mark.parametrize("value", [-0.01, 1.01, 2, math.nan, math.inf])
def test_shadow_proportion_rejects_values_outside_zero_to_one(value: float) -> None:
    with pytest.raises(ConfigError, match="must be between 0 and 1"):
        validate_shadow_proportion(value)


# --- TrafficTable -------------------------------------------------------------------------------


def test_table_keeps_zero_weights_in_traffic_but_never_picks_them() -> None:
    table = TrafficTable({"a": 0.2, "z": 0.0, "b": 0.8})
    assert table.traffic == {"a": 0.2, "z": 0.0, "b": 0.8}
    assert table.backends == ("a", "b")
    assert len(table) == 2
    assert repr(table) == "TrafficTable({'a': 0.2, 'z': 0.0, 'b': 0.8})"
    assert {table.pick(i / 1000) for i in range(1000)} == {"a", "b"}


def test_table_traffic_is_a_copy() -> None:
    given_traffic = {"a": 0.5, "b": 0.5}
    table = TrafficTable(given_traffic)
    given_traffic["a"] = 0.0
    table.traffic["b"] = 0.0
    assert table.traffic == {"a": 0.5, "b": 0.5}


def test_table_pick_follows_the_cumulative_weights() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    assert table.pick(0.0) == "a"
    assert table.pick(0.1999) == "a"
    assert table.pick(0.2) == "b"
    assert table.pick(0.4999) == "b"
    assert table.pick(0.5) == "c"
    assert table.pick(math.nextafter(1.0, 0.0)) == "c"


def test_table_normalises_weights_within_the_tolerance() -> None:
    table = TrafficTable({"a": 0.5 - 5e-9, "b": 0.5 - 5e-9})
    assert table.pick(math.nextafter(1.0, 0.0)) == "b"
    assert table.pick(0.49999) == "a"


def test_table_needs_a_positive_weight() -> None:
    with pytest.raises(ConfigError, match="positive weight"):
        TrafficTable({"a": 0.0})


def test_shard_is_stable_for_a_table_and_across_equal_tables() -> None:
    traffic = {"a": 0.2, "b": 0.3, "c": 0.5}
    table, twin = TrafficTable(traffic), TrafficTable(dict(traffic))
    keys = [f"user-{i}" for i in range(1000)]
    first = [table.shard(key) for key in keys]
    assert [table.shard(key) for key in keys] == first
    assert [twin.shard(key) for key in keys] == first
    assert len(set(first)) == 3


def test_shard_spreads_keys_by_weight() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5, "z": 0.0})
    got = shares([table.shard(f"session:{i}") for i in range(20_000)])
    assert set(got) == {"a", "b", "c"}
    for name, weight in {"a": 0.2, "b": 0.3, "c": 0.5}.items():
        assert got[name] == pytest.approx(weight, abs=0.02)


def test_shard_is_stable_across_processes_with_different_hash_seeds() -> None:
    keys = [f"k{i}" for i in range(200)] + ["", "ünïcode", "\ud800"]
    table = TrafficTable({"a": 0.25, "b": 0.25, "c": 0.5})
    expected = "".join(table.shard(key) for key in keys)
    script = (
        "from aioserve.policy import TrafficTable\n"
        "t = TrafficTable({'a': 0.25, 'b': 0.25, 'c': 0.5})\n"
        f"print(''.join(t.shard(k) for k in {keys!r}))\n"
    )
    root = str(Path(policy_module.__file__).resolve().parent.parent)
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_shard_on_a_single_backend_table_returns_it() -> None:
    assert TrafficTable({"only": 1.0, "z": 0.0}).shard("anything") == "only"


# --- choosers -----------------------------------------------------------------------------------

ALL_POLICIES = list(RoutePolicy)


def p2c_kwargs(loads: dict[str, int]) -> dict[str, Callable[[str], int]]:
    return {"load": loads.__getitem__}


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_a_shard_key_wins_whatever_the_policy(policy: RoutePolicy) -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    chooser = make_chooser(policy, table, rng=ForbiddenRandom(), load=lambda name: 0)
    for i in range(300):
        key = f"user-{i}"
        assert chooser.choose(key) == table.shard(key)


@pytest.mark.parametrize("policy", [RoutePolicy.RoundRobin, RoutePolicy.FixedPacking])
def test_a_shard_key_does_not_advance_the_rotation(policy: RoutePolicy) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.25, "c": 0.25})
    plain = make_chooser(policy, table, rng=random.Random(0))
    mixed = make_chooser(policy, table, rng=random.Random(0))
    expected = [plain.choose(None) for _ in range(40)]
    got = []
    for i in range(40):
        mixed.choose(f"key-{i}")
        got.append(mixed.choose(None))
    assert got == expected


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_a_single_backend_is_returned_without_touching_the_rng(policy: RoutePolicy) -> None:
    table = TrafficTable({"a": 0.0, "only": 1.0})
    chooser = make_chooser(policy, table, rng=ForbiddenRandom(), load=lambda name: 0)
    assert [chooser.choose(None) for _ in range(5)] == ["only"] * 5
    assert chooser.choose("key") == "only"
    assert repr(chooser) == "SingleChooser('only')"


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_a_zero_weight_backend_is_never_chosen(policy: RoutePolicy) -> None:
    table = TrafficTable({"a": 0.5, "zero": 0.0, "b": 0.5})
    loads = {"a": 3, "zero": -1, "b": 3}
    picks = draw(policy, table, 5_000, **p2c_kwargs(loads))
    assert set(picks) == {"a", "b"}


@pytest.mark.parametrize("policy", [RoutePolicy.Random, "random"])
def test_random_splits_by_weight(policy: RoutePolicy) -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    got = shares(draw(RoutePolicy.parse(policy), table, 100_000))
    assert got == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5}, abs=0.01)


def test_random_is_reproducible_with_a_seeded_rng() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    one = draw(RoutePolicy.Random, table, 200)
    assert draw(RoutePolicy.Random, table, 200) == one
    other = make_chooser(RoutePolicy.Random, table, rng=random.Random(99))
    assert [other.choose(None) for _ in range(200)] != one


def test_make_chooser_accepts_a_policy_name() -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    chooser = make_chooser("RoundRobin", table, rng=ForbiddenRandom())
    assert [chooser.choose(None) for _ in range(4)] == ["a", "b", "a", "b"]


def test_round_robin_gives_exact_counts_over_every_cycle() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    chooser = make_chooser(RoutePolicy.RoundRobin, table, rng=ForbiddenRandom())
    for _ in range(50):
        cycle = Counter(chooser.choose(None) for _ in range(10))
        assert cycle == {"a": 2, "b": 3, "c": 5}


def test_round_robin_is_smooth() -> None:
    table = TrafficTable({"a": 0.5, "b": 0.25, "c": 0.25})
    chooser = make_chooser(RoutePolicy.RoundRobin, table, rng=ForbiddenRandom())
    picks = [chooser.choose(None) for _ in range(400)]
    # Never three of a kind in a row on a 2:1:1 split.
    assert all(len(set(picks[i : i + 3])) > 1 for i in range(len(picks) - 2))
    # Every prefix stays within one request of its exact share.
    counts: Counter[str] = Counter()
    for n, name in enumerate(picks, start=1):
        counts[name] += 1
        for backend, weight in {"a": 0.5, "b": 0.25, "c": 0.25}.items():
            assert abs(counts[backend] - n * weight) < 1


def test_round_robin_with_equal_weights_cycles_in_insertion_order() -> None:
    table = TrafficTable({"c": 1 / 3, "a": 1 / 3, "b": 1 / 3})
    picks = draw(RoutePolicy.RoundRobin, table, 9)
    assert picks == ["c", "a", "b"] * 3


def test_round_robin_restarts_when_the_chooser_is_rebuilt() -> None:
    table = TrafficTable({"a": 0.25, "b": 0.75})
    first = draw(RoutePolicy.RoundRobin, table, 7)
    assert draw(RoutePolicy.RoundRobin, table, 7) == first


def test_power_of_two_prefers_the_less_loaded_backend() -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    picks = draw(RoutePolicy.PowerOfTwo, table, 1_000, **p2c_kwargs({"a": 10, "b": 2}))
    assert set(picks) == {"b"}


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    got = shares(
        draw(RoutePolicy.PowerOfTwo, table, 100_000, **p2c_kwargs({"a": 0, "b": 1, "c": 9}))
    )
    assert "c" not in got
    # "a" wins whenever it is one of the two distinct draws: 1 - P(b and c are drawn).
    p_a = 1 - (0.3 * 0.5 / 0.7 + 0.5 * 0.3 / 0.5)
    assert got["a"] == pytest.approx(p_a, abs=0.01)


def test_power_of_two_ties_go_to_the_first_draw() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    got = shares(
        draw(RoutePolicy.PowerOfTwo, table, 100_000, **p2c_kwargs(dict.fromkeys("abc", 4)))
    )
    assert got == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5}, abs=0.01)


def test_power_of_two_follows_load_changes() -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    loads = {"a": 0, "b": 5}
    chooser = make_chooser(
        RoutePolicy.PowerOfTwo, table, rng=random.Random(7), load=loads.__getitem__
    )
    assert chooser.choose(None) == "a"
    loads["a"] = 9
    assert chooser.choose(None) == "b"


def test_power_of_two_without_load_behaves_like_random() -> None:
    table = TrafficTable({"a": 0.2, "b": 0.3, "c": 0.5})
    assert draw(RoutePolicy.PowerOfTwo, table, 500) == draw(RoutePolicy.Random, table, 500)


def test_fixed_packing_sends_runs_of_three_by_default() -> None:
    table = TrafficTable({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    picks = draw(RoutePolicy.FixedPacking, table, 18)
    assert picks == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3 + ["b"] * 3 + ["c"] * 3


@pytest.mark.parametrize("packing_num", [1, 2, 5])
def test_fixed_packing_runs_have_length_packing_num(packing_num: int) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.25, "c": 0.25})
    picks = draw(
        RoutePolicy.FixedPacking,
        table,
        packing_num * 40,
        policy_kwargs={"packing_num": packing_num},
    )
    runs = [picks[i : i + packing_num] for i in range(0, len(picks), packing_num)]
    assert all(run == [run[0]] * packing_num for run in runs)
    owners = [run[0] for run in runs]
    # Runs rotate over the backends in round-robin order, by weight.
    assert owners == draw(RoutePolicy.RoundRobin, table, 40)
    assert Counter(owners) == {"a": 20, "b": 10, "c": 10}


@pytest.mark.parametrize("packing_num", [0, -1])
def test_fixed_packing_rejects_a_packing_num_below_one(packing_num: int) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    with pytest.raises(ConfigError, match=rf"packing_num must be an int >= 1, got {packing_num}"):
        make_chooser(
            RoutePolicy.FixedPacking,
            table,
            rng=random.Random(),
            policy_kwargs={"packing_num": packing_num},
        )


@pytest.mark.parametrize("packing_num", ["3", 2.0, True, None])
def test_fixed_packing_rejects_a_non_int_packing_num(packing_num: object) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    with pytest.raises(ConfigTypeError, match="packing_num must be an int"):
        make_chooser(
            RoutePolicy.FixedPacking,
            table,
            rng=random.Random(),
            policy_kwargs={"packing_num": packing_num},
        )


def test_bad_packing_num_is_rejected_even_for_a_single_backend() -> None:
    table = TrafficTable({"only": 1.0})
    with pytest.raises(ConfigError, match="packing_num"):
        make_chooser(
            RoutePolicy.FixedPacking, table, rng=random.Random(), policy_kwargs={"packing_num": 0}
        )


@pytest.mark.parametrize(
    ("policy", "kwargs", "accepted"),
    [
        (RoutePolicy.Random, {"packing_num": 2}, "none"),
        (RoutePolicy.PowerOfTwo, {"choices": 3}, "none"),
        (RoutePolicy.FixedPacking, {"packing_num": 2, "pack": 2}, "'packing_num'"),
    ],
)
def test_unknown_policy_kwargs_are_named(
    policy: RoutePolicy, kwargs: dict[str, object], accepted: str
) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    unknown = ", ".join(repr(key) for key in kwargs if key != "packing_num" or accepted == "none")
    with pytest.raises(ConfigError) as info:
        make_chooser(policy, table, rng=random.Random(), policy_kwargs=kwargs)
    assert str(info.value) == (
        f"Unknown policy_kwargs for route policy {policy.value!r}: {unknown}. Accepted: {accepted}."
    )


def test_policy_kwargs_must_be_a_mapping() -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    with pytest.raises(ConfigTypeError, match="policy_kwargs must be a dict"):
        pairs: object = [("packing_num", 2)]
        make_chooser(RoutePolicy.FixedPacking, table, rng=random.Random(), policy_kwargs=pairs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "name"),
    [
        (RoutePolicy.Random, "RandomChooser"),
        (RoutePolicy.RoundRobin, "RoundRobinChooser"),
        (RoutePolicy.PowerOfTwo, "PowerOfTwoChooser"),
        (RoutePolicy.FixedPacking, "FixedPackingChooser"),
    ],
)
def test_chooser_repr_names_the_policy_and_traffic(policy: RoutePolicy, name: str) -> None:
    table = TrafficTable({"a": 0.5, "b": 0.5})
    chooser = make_chooser(policy, table, rng=random.Random(), load=lambda backend: 0)
    assert repr(chooser).startswith(f"{name}(TrafficTable({{'a': 0.5, 'b': 0.5}})")


def test_public_names() -> None:
    assert sorted(policy_module.__all__) == [
        "Chooser",
        "RoutePolicy",
        "TrafficTable",
        "make_chooser",
        "validate_shadow_proportion",
        "validate_traffic",
    ]
    assert all(hasattr(policy_module, name) for name in policy_module.__all__)
