"""Traffic: which backend of an endpoint serves a request.

Pure functions and small objects over backend names and weights, with an injected RNG, so that the
router stays thin and traffic tests are deterministic:

- :func:`validate_traffic` and :func:`validate_shadow_proportion` check user input;
- :class:`TrafficTable` compiles a validated traffic dict once per ``set_traffic``;
- :func:`make_chooser` builds the per-endpoint :class:`Chooser` for a :class:`RoutePolicy`.

This module imports nothing of the package but its errors.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import numbers
import random
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping
from typing import Protocol, TypeGuard

from aioserve.exceptions import BackendNotFound, ConfigError, ConfigTypeError

__all__ = [
    "Chooser",
    "RoutePolicy",
    "TrafficTable",
    "make_chooser",
    "validate_shadow_proportion",
    "validate_traffic",
]

_WEIGHT_SUM_TOLERANCE = 1e-8
_DEFAULT_PACKING_NUM = 3
_POLICY_KWARGS: dict[str, frozenset[str]] = {
    "random": frozenset(),
    "round_robin": frozenset(),
    "power_of_two": frozenset(),
    "fixed_packing": frozenset({"packing_num"}),
}


class RoutePolicy(enum.Enum):
    """How an endpoint spreads requests over the backends of its traffic (the Ray 0.8 policies)."""

    Random = "random"
    RoundRobin = "round_robin"
    PowerOfTwo = "power_of_two"
    FixedPacking = "fixed_packing"

    @classmethod
    def parse(cls, value: RoutePolicy | str) -> RoutePolicy:
        """Return the policy for a member, its value or its name (ignoring case, ``_``, ``-``)."""
        if isinstance(value, RoutePolicy):
            return value
        if not isinstance(value, str):
            raise ConfigTypeError(
                f"A route policy must be a RoutePolicy or one of its names, "
                f"got {value!r} ({type(value).__name__})."
            )
        wanted = _squash(value)
        for policy in cls:
            if wanted == _squash(policy.value):
                return policy
        choices = ", ".join(repr(policy.value) for policy in cls)
        raise ConfigError(f"Unknown route policy {value!r}. Choose one of: {choices}.")


def _squash(name: str) -> str:
    return name.strip().lower().replace("_", "").replace("-", "")


def _is_number(value: object) -> TypeGuard[numbers.Real]:
    # numbers.Real admits numpy scalars and Fraction; bool is an int but never a weight.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_traffic(traffic: object, known_backends: Collection[str]) -> dict[str, float]:
    """Check a traffic dict ``{backend: weight}`` and return a clean copy with float weights.

    Raises :class:`ConfigTypeError` for a non-mapping, a non-str key or a non-number weight,
    :class:`BackendNotFound` for an unknown backend, and :class:`ConfigError` for an empty dict,
    a negative or non-finite weight, or weights whose sum is not 1 (within 1e-8).
    Zero weights are allowed and kept.
    """
    if not isinstance(traffic, Mapping):
        raise ConfigTypeError(
            f"Traffic must be a dict mapping backend tags to weights, "
            f"got {traffic!r} ({type(traffic).__name__})."
        )
    if not traffic:
        raise ConfigError("Traffic must name at least one backend, got an empty dict.")
    clean: dict[str, float] = {}
    for backend, weight in traffic.items():
        if not isinstance(backend, str):
            raise ConfigTypeError(
                f"Traffic keys must be backend tags (str), "
                f"got {backend!r} ({type(backend).__name__})."
            )
        if backend not in known_backends:
            raise BackendNotFound(_unknown_backend_message(backend, known_backends))
        clean[backend] = _check_weight(backend, weight)
    total = math.fsum(clean.values())
    if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ConfigError(f"Traffic weights must sum to 1, got {total!r} for {traffic!r}.")
    return clean


def _unknown_backend_message(backend: str, known_backends: Collection[str]) -> str:
    if not known_backends:
        return f"No backend named {backend!r}. No backends exist yet; create one first."
    known = ", ".join(repr(name) for name in sorted(known_backends))
    return f"No backend named {backend!r}. Known backends: {known}."


def _check_weight(backend: str, weight: object) -> float:
    if not _is_number(weight):
        raise ConfigTypeError(
            f"The traffic weight of {backend!r} must be a number, "
            f"got {weight!r} ({type(weight).__name__})."
        )
    try:
        value = float(weight)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(f"The traffic weight of {backend!r} must be finite, got {weight!r}.")
    if value < 0:
        raise ConfigError(
            f"The traffic weight of {backend!r} must not be negative, got {weight!r}."
        )
    return value


def validate_shadow_proportion(proportion: object) -> float:
    """Check the share of requests copied to a shadow backend and return it as a float in [0, 1]."""
    if not _is_number(proportion):
        raise ConfigTypeError(
            f"A shadow proportion must be a number between 0 and 1, "
            f"got {proportion!r} ({type(proportion).__name__})."
        )
    value = float(proportion)
    # Written so that NaN fails too.
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"A shadow proportion must be between 0 and 1, got {proportion!r}.")
    return value


class TrafficTable:
    """The compiled form of a validated traffic dict: weighted picks and stable shard-key mapping.

    Backends with a zero weight are kept in :attr:`traffic` but are never picked.
    """

    __slots__ = ("_cum", "_lows", "_names", "_traffic", "_weights")

    def __init__(self, traffic: Mapping[str, float]) -> None:
        self._traffic = {backend: float(weight) for backend, weight in traffic.items()}
        positive = {backend: weight for backend, weight in self._traffic.items() if weight > 0}
        if not positive:
            raise ConfigError(
                f"A traffic table needs a backend with a positive weight, got {self._traffic!r}."
            )
        total = math.fsum(positive.values())
        self._names: tuple[str, ...] = tuple(positive)
        self._weights: tuple[float, ...] = tuple(weight / total for weight in positive.values())
        cum: list[float] = []
        running: list[float] = []
        for weight in positive.values():
            running.append(weight)
            cum.append(math.fsum(running) / total)
        # Exactly 1.0 at the end so that every u < 1 lands on a backend.
        cum[-1] = 1.0
        self._cum: tuple[float, ...] = tuple(cum)
        self._lows: tuple[float, ...] = (0.0, *cum[:-1])

    @property
    def traffic(self) -> dict[str, float]:
        """A copy of the traffic dict, zero weights included."""
        return dict(self._traffic)

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends with a positive weight, in insertion order."""
        return self._names

    def pick(self, u: float) -> str:
        """Return the backend that owns ``u`` (in [0, 1)) on the cumulative weight line."""
        return self._names[self._index(u)]

    def shard(self, key: str) -> str:
        """Return the backend for a shard key: the same for equal tables, in any process or run."""
        if len(self._names) == 1:
            return self._names[0]
        digest = hashlib.blake2b(
            key.encode("utf-8", "surrogatepass"), digest_size=8, person=b"aioserve.shard"
        ).digest()
        # The top 53 bits make a float in [0, 1) with every value equally likely.
        return self.pick((int.from_bytes(digest, "big") >> 11) * 2.0**-53)

    def _index(self, u: float) -> int:
        index = bisect_right(self._cum, u)
        return index if index < len(self._cum) else len(self._cum) - 1

    def _other_index(self, first: int, u: float) -> int:
        """Draw by weight among the backends other than ``first``; ``u`` in [0, 1)."""
        low = self._lows[first]
        width = self._cum[first] - low
        point = u * (1.0 - width)
        if point < low:
            return bisect_right(self._cum, point, 0, first)
        # Skip over the segment of ``first``: the draw lands strictly to its right.
        index = bisect_right(self._cum, point + width, first + 1)
        return index if index < len(self._cum) else len(self._cum) - 1

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TrafficTable({self._traffic!r})"


class Chooser(Protocol):
    """Chooses the backend for each request of one endpoint; rebuilt on every traffic change."""

    def choose(self, shard_key: str | None) -> str:
        """Return the backend for the next request; a shard key maps to a stable backend."""
        ...


def make_chooser(
    policy: RoutePolicy | str,
    table: TrafficTable,
    *,
    rng: random.Random,
    load: Callable[[str], int] | None = None,
    policy_kwargs: Mapping[str, object] | None = None,
) -> Chooser:
    """Build the chooser of ``policy`` over ``table``.

    ``rng`` drives the random policies; ``load(backend)`` (queued plus running requests) lets
    PowerOfTwo prefer the less loaded backend. ``policy_kwargs`` are checked here: FixedPacking
    accepts ``packing_num`` (int >= 1, default 3); unknown keys raise :class:`ConfigError`.
    """
    policy = RoutePolicy.parse(policy)
    kwargs = _check_policy_kwargs(policy, policy_kwargs)
    packing_num = _packing_num(kwargs)
    if len(table) == 1:
        return _SingleChooser(table.backends[0])
    if policy is RoutePolicy.RoundRobin:
        return _RoundRobinChooser(table)
    if policy is RoutePolicy.FixedPacking:
        return _FixedPackingChooser(table, packing_num)
    if policy is RoutePolicy.PowerOfTwo and load is not None:
        return _PowerOfTwoChooser(table, rng, load)
    return _RandomChooser(table, rng)


def _check_policy_kwargs(
    policy: RoutePolicy, policy_kwargs: Mapping[str, object] | None
) -> Mapping[str, object]:
    if policy_kwargs is None:
        return {}
    if not isinstance(policy_kwargs, Mapping):
        raise ConfigTypeError(
            f"policy_kwargs must be a dict, got {policy_kwargs!r} ({type(policy_kwargs).__name__})."
        )
    accepted = _POLICY_KWARGS[policy.value]
    unknown = [key for key in policy_kwargs if key not in accepted]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        allowed = ", ".join(repr(key) for key in sorted(accepted)) or "none"
        raise ConfigError(
            f"Unknown policy_kwargs for route policy {policy.value!r}: {names}. "
            f"Accepted: {allowed}."
        )
    return policy_kwargs


def _packing_num(kwargs: Mapping[str, object]) -> int:
    value = kwargs.get("packing_num", _DEFAULT_PACKING_NUM)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigTypeError(
            f"packing_num must be an int >= 1, got {value!r} ({type(value).__name__})."
        )
    if value < 1:
        raise ConfigError(f"packing_num must be an int >= 1, got {value!r}.")
    return value


class _SingleChooser:
    """The only backend, whatever the policy or shard key: no RNG, no hashing."""

    __slots__ = ("_backend",)

    def __init__(self, backend: str) -> None:
        self._backend = backend

    def choose(self, shard_key: str | None) -> str:
        return self._backend

    def __repr__(self) -> str:
        return f"SingleChooser({self._backend!r})"


class _RandomChooser:
    """Weighted random choice."""

    __slots__ = ("_pick", "_random", "_shard", "_table")

    def __init__(self, table: TrafficTable, rng: random.Random) -> None:
        self._table = table
        self._shard = table.shard
        self._pick = table.pick
        self._random = rng.random

    def choose(self, shard_key: str | None) -> str:
        if shard_key is not None:
            return self._shard(shard_key)
        return self._pick(self._random())

    def __repr__(self) -> str:
        return f"RandomChooser({self._table!r})"


class _PowerOfTwoChooser:
    """Two distinct backends drawn by weight; the less loaded one wins, the first drawn on a tie."""

    __slots__ = ("_index", "_load", "_names", "_other_index", "_random", "_shard", "_table")

    def __init__(self, table: TrafficTable, rng: random.Random, load: Callable[[str], int]) -> None:
        self._table = table
        self._shard = table.shard
        self._names = table.backends
        self._index = table._index
        self._other_index = table._other_index
        self._random = rng.random
        self._load = load

    def choose(self, shard_key: str | None) -> str:
        if shard_key is not None:
            return self._shard(shard_key)
        first = self._index(self._random())
        one = self._names[first]
        other = self._names[self._other_index(first, self._random())]
        return one if self._load(one) <= self._load(other) else other

    def __repr__(self) -> str:
        return f"PowerOfTwoChooser({self._table!r})"


class _RoundRobinChooser:
    """Smooth weighted round robin, deterministic and O(log n) per choice.

    The k-th turn (from 0) of a backend of weight w is due at (k + 1/2) / w and turns are served in
    due order (stride scheduling with Sainte-Laguë offsets): over any N choices where every N * w is
    an integer each backend gets exactly N * w, and its turns are spread evenly, as in nginx.
    """

    __slots__ = ("_counts", "_heap", "_names", "_shard", "_table", "_weights")

    def __init__(self, table: TrafficTable) -> None:
        self._table = table
        self._shard = table.shard
        self._names = table.backends
        self._weights = table._weights
        self._counts = [0] * len(self._names)
        # Entries are [due, index]; the index breaks ties in insertion order.
        self._heap: list[list[float]] = [
            [0.5 / weight, index] for index, weight in enumerate(self._weights)
        ]
        heapq.heapify(self._heap)

    def choose(self, shard_key: str | None) -> str:
        if shard_key is not None:
            return self._shard(shard_key)
        return self._names[self._next_index()]

    def _next_index(self) -> int:
        top = self._heap[0]
        index = int(top[1])
        count = self._counts[index] + 1
        self._counts[index] = count
        # Recomputed from the count rather than accumulated, so rounding never drifts.
        top[0] = (count + 0.5) / self._weights[index]
        heapq.heapreplace(self._heap, top)
        return index

    def __repr__(self) -> str:
        return f"RoundRobinChooser({self._table!r})"


class _FixedPackingChooser:
    """``packing_num`` consecutive requests to one backend, then the next in round-robin order."""

    __slots__ = ("_current", "_left", "_packing_num", "_round_robin", "_shard", "_table")

    def __init__(self, table: TrafficTable, packing_num: int) -> None:
        self._table = table
        self._shard = table.shard
        self._packing_num = packing_num
        self._round_robin = _RoundRobinChooser(table)
        self._current = table.backends[0]
        self._left = 0

    def choose(self, shard_key: str | None) -> str:
        if shard_key is not None:
            return self._shard(shard_key)
        if self._left == 0:
            self._current = self._round_robin.choose(None)
            self._left = self._packing_num
        self._left -= 1
        return self._current

    def __repr__(self) -> str:
        return f"FixedPackingChooser({self._table!r}, packing_num={self._packing_num})"
