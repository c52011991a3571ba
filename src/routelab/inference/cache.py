"""Expert cache simulation: replay a routing trace under a cache policy and capacity.

Shape legend: N tokens, S steps (model forwards), E experts of a layer, L MoE layers, A accesses.

The model being served keeps `capacity` experts in fast memory; every step (one forward of one MoE layer) needs the
distinct experts its tokens selected, all resident at once (they are **pinned** while the step runs), so a step that
needs more experts than the capacity cannot run and is refused. A needed expert that is not resident is a miss and
is loaded, evicting a resident expert chosen by the policy (never one the current step needs).

Policies (each one class below with `access(needed, t)`; the executor in `offload.py` runs the same classes):
- `lru`: evict the least recently used expert (ties within a step: the smaller id was used first).
- `lfu`: evict the least frequently used (counts of steps that needed the expert since the start, kept across
  evictions, "perfect LFU"); ties by LRU.
- `arc`: Adaptive Replacement Cache (Megiddo & Modha, FAST 2003): recency list T1, frequency list T2, ghost lists
  B1/B2 and the adaptive target p, as in the paper's pseudocode; when the list REPLACE picks holds only pinned
  experts, the other list gives the victim. Chosen over LFRU because ARC is specified exactly and adapts to both
  recency- and frequency-friendly routing.
- `belady`: MIN (Belady 1966): evict the expert whose next use is furthest in the future (never used again first;
  ties: the larger id). Needs the whole trace; it is the optimum for demand loading, so its hit rate bounds every
  other policy's, and its loads bound every policy's loads, prefetching ones included.
- `pregated`: LRU plus predictive prefetch (Pre-gated MoE, Hwang et al., ISCA 2024): while layer l computes, the
  experts the trace predicts for layer l+1 (`RoutingTrace.predicted`: layer l+1's router applied to layer l's
  input, or a pre-gating router's exact choice) are loaded into layer l+1's cache; wrong guesses cost bytes,
  right ones become hits.

Capacity scope: `scope="layer"` (the default) gives every MoE layer its own cache of `capacity` experts; `"global"`
pools `capacity` slots over all layers. Per layer is the default because a model visits its layers in a fixed
cycle: one global LRU pool smaller than the working set evicts exactly the layer that comes next (the classic
cyclic-scan failure), per-layer memory is what an executor can bound and place layer by layer, and it is what
mixtral-offloading and llama.cpp's `--n-cpu-moe` do. Global is there to measure what pooling buys.

Metrics (`CacheResult`): hit rate (resident when needed / needed, per layer-step and expert), experts loaded per
token (misses plus prefetches), bytes moved per token (loads × the layer's expert size from the trace), and stall
time under a stated bandwidth model: a load of b bytes takes b / `bandwidth` seconds; demand loads stall fully; a
prefetch issued at layer l overlaps layer l's compute, `compute_s` seconds per token in the step, and stalls only
by max(0, transfer − compute).

Speed: LRU runs vectorised over all capacities at once (each access's LRU stack distance, from a [S, E] table of
last uses: resident in an LRU cache of size C ⇔ fewer than C other experts were used since); other policies run a
step-by-step loop (`benchmarks/offload.py` measures both).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from routelab._checks import check_bool, check_choice, check_int, check_number
from routelab.inference.trace import RoutingTrace

POLICIES = ("lru", "lfu", "arc", "belady", "pregated")
SCOPES = ("layer", "global")
GRANULARITIES = ("step", "token")
NEVER = np.iinfo(np.int64).max


class CapacityError(ValueError):
    """A step needs more experts at once than the cache holds."""


# -- policies (one cache each; items are ints: expert ids, or layer·E + id in a global pool) ----------------------


class Cache:
    """A cache of `capacity` items. `access(needed, t)` serves one step: returns the misses, in order; the items
    of `needed` are pinned for the step. `prefetch(items, t)` loads what is not resident (pinning `items`)."""

    def __init__(self, capacity: int) -> None:
        check_int("capacity", capacity, 1)
        self.capacity = capacity
        self.resident: set[int] = set()
        self.evictions = 0

    def access(self, needed: Sequence[int], t: int) -> list[int]:
        if len(needed) > self.capacity:
            raise CapacityError(f"a step needs {len(needed)} experts at once; capacity is {self.capacity}")
        pinned = set(needed)
        misses = []
        for item in needed:
            if item in self.resident:
                self._hit(item, t)
            else:
                self._make_room(pinned, item)
                self._insert(item, t)
                misses.append(item)
        return misses

    def prefetch(self, items: Sequence[int], t: int) -> list[int]:
        items = list(items)[: self.capacity]
        pinned, loaded = set(items), []
        for item in items:
            if item not in self.resident:
                self._make_room(pinned, item)
                self._insert(item, t)
                loaded.append(item)
        return loaded

    def _make_room(self, pinned: set[int], incoming: int) -> None:
        if len(self.resident) >= self.capacity:
            victim = self._victim(pinned, incoming)
            self.resident.remove(victim)
            self.evictions += 1
            self._evicted(victim)

    def _hit(self, item: int, t: int) -> None:
        pass

    def _insert(self, item: int, t: int) -> None:
        self.resident.add(item)

    def _evicted(self, item: int) -> None:
        pass

    def _victim(self, pinned: set[int], incoming: int) -> int:  # pragma: no cover - every policy overrides it
        raise NotImplementedError


class LRUCache(Cache):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.last: dict[int, tuple[int, int]] = {}

    def _hit(self, item, t):
        self.last[item] = (t, item)

    def _insert(self, item, t):
        super()._insert(item, t)
        self.last[item] = (t, item)

    def _victim(self, pinned, incoming):
        return min((self.last[i], i) for i in self.resident if i not in pinned)[1]


class LFUCache(Cache):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.count: dict[int, int] = {}
        self.last: dict[int, tuple[int, int]] = {}

    def _hit(self, item, t):
        self.count[item] = self.count.get(item, 0) + 1
        self.last[item] = (t, item)

    def _insert(self, item, t):
        super()._insert(item, t)
        self._hit(item, t)

    def _victim(self, pinned, incoming):
        return min((self.count[i], self.last[i], i) for i in self.resident if i not in pinned)[2]


class ARCCache(Cache):
    """ARC (Megiddo & Modha 2003). T1/T2 hold the resident items (LRU first), B1/B2 the ghosts, p the target |T1|."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self.p = 0.0
        self._pinned: set[int] = set()

    def access(self, needed, t):
        self._pinned = set(needed)
        return super().access(needed, t)

    def prefetch(self, items, t):
        self._pinned = set(items)
        return super().prefetch(items, t)

    def _hit(self, item, t):
        self.t1.pop(item, None)
        self.t2.pop(item, None)
        self.t2[item] = None

    def _lru(self, lst: OrderedDict[int, None]) -> int | None:
        return next((i for i in lst if i not in self._pinned), None)

    def _insert(self, item, t):
        c = self.capacity
        if item in self.b1:
            del self.b1[item]
            super()._insert(item, t)
            self.t2[item] = None
        elif item in self.b2:
            del self.b2[item]
            super()._insert(item, t)
            self.t2[item] = None
        else:
            if len(self.t1) + len(self.b1) >= c and self.b1:
                self.b1.popitem(last=False)
            elif len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) >= 2 * c and self.b2:
                self.b2.popitem(last=False)
            super()._insert(item, t)
            self.t1[item] = None

    def _make_room(self, pinned, incoming):
        # A ghost hit adapts the target p before REPLACE picks the victim (the paper's order).
        if incoming in self.b1:
            self.p = min(self.capacity, self.p + max(len(self.b2) / len(self.b1), 1))
        elif incoming in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
        super()._make_room(pinned, incoming)

    def _victim(self, pinned, incoming):
        lru1, lru2 = self._lru(self.t1), self._lru(self.t2)
        from_t1 = lru1 is not None and (
            len(self.t1) > self.p or (incoming in self.b2 and len(self.t1) == self.p) or lru2 is None
        )
        return lru1 if from_t1 else lru2

    def _evicted(self, item):
        if item in self.t1:
            del self.t1[item]
            self.b1[item] = None
        else:
            del self.t2[item]
            self.b2[item] = None


class BeladyCache(Cache):
    """MIN: `next_use(item, t)` gives the next step after t that needs the item (NEVER if none)."""

    def __init__(self, capacity: int, next_use) -> None:
        super().__init__(capacity)
        self.next_use = next_use
        self.t = 0

    def access(self, needed, t):
        self.t = t
        return super().access(needed, t)

    def _victim(self, pinned, incoming):
        return max((self.next_use(i, self.t), i) for i in self.resident if i not in pinned)[1]


def make_cache(policy: str, capacity: int, *, next_use=None) -> Cache:
    """The cache of one policy ("pregated" evicts by LRU); "belady" needs `next_use(item, t)`."""
    check_choice("policy", policy, POLICIES)
    if policy == "belady":
        if next_use is None:
            raise ValueError("policy 'belady' needs the future: pass the run's trace (next_use)")
        return BeladyCache(capacity, next_use)
    return {"lru": LRUCache, "lfu": LFUCache, "arc": ARCCache, "pregated": LRUCache}[policy](capacity)


# -- the trace as demand ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """What a trace asks of a cache: used[l] bool [S, E_l] (layer l needs expert e in step s), predicted[l] likewise
    or None, tokens per step, and bytes per expert of each layer."""

    used: list[np.ndarray]
    predicted: list[np.ndarray | None]
    tokens_S: np.ndarray
    expert_bytes: list[int]

    @property
    def num_steps(self) -> int:
        return len(self.tokens_S)


def demand(trace: RoutingTrace, granularity: str = "step") -> Demand:
    """The per-step expert sets of a trace; granularity "token" makes every token its own step."""
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "token":
        trace = trace.per_token()
    step_N = trace.step_of_token()
    S = trace.num_steps

    def table(ids_NK: np.ndarray | None, E: int) -> np.ndarray | None:
        if ids_NK is None:
            return None
        used_SE = np.zeros((S, E), dtype=bool)
        rows, slots = np.nonzero(ids_NK >= 0)
        used_SE[step_N[rows], ids_NK[rows, slots]] = True
        return used_SE

    return Demand(
        used=[table(ids, E) for ids, E in zip(trace.experts, trace.num_experts)],
        predicted=[table(p, E) for p, E in zip(trace.predicted, trace.num_experts)],
        tokens_S=np.diff(trace.step_offsets),
        expert_bytes=list(trace.expert_bytes),
    )


def check_capacity(d: Demand, capacity: int, scope: str) -> None:
    """Refuse a capacity below the experts some step needs at once (that step could not run)."""
    check_int("capacity", capacity, 1)
    for layer, used_SE in enumerate(d.used):
        if not used_SE.size:
            continue
        per_step = used_SE.sum(1)
        worst = int(per_step.argmax())
        if per_step[worst] > capacity:
            where = "a MoE layer" if scope == "layer" else "one MoE layer (global pool)"
            raise CapacityError(
                f"capacity={capacity} is below the {int(per_step[worst])} experts that step {worst} of MoE layer "
                f"{layer} needs at once ({where}): that step cannot run; use capacity >= {int(per_step[worst])}, or "
                "run smaller steps (granularity token, or a shorter prefill chunk)"
            )


# -- results ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheResult:
    """One policy at one capacity on one trace (see the module docstring for the definitions)."""

    policy: str
    capacity: int
    scope: str
    requests: int  # expert demands: Σ over layer-steps of the distinct experts needed
    hits: int
    misses: int  # demand loads
    prefetch_loads: int
    num_tokens: int
    layer_steps: int
    bytes_moved: int
    stall_s: float
    prediction_recall: float | None = None  # pregated: predicted ∩ needed / needed (layers ≥ 1)
    prediction_precision: float | None = None  # pregated: predicted ∩ needed / predicted

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 1.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetch_loads

    @property
    def loads_per_token(self) -> float:
        return self.loads / max(self.num_tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / max(self.num_tokens, 1)

    @property
    def stall_s_per_token(self) -> float:
        return self.stall_s / max(self.num_tokens, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("hit_rate", "loads", "loads_per_token", "bytes_per_token", "stall_s_per_token"):
            out[name] = getattr(self, name)
        return out


# -- the simulator ---------------------------------------------------------------------------------------------------


def simulate_cache(
    trace: RoutingTrace | Demand,
    capacity: int,
    policy: str = "lru",
    *,
    scope: str = "layer",
    granularity: str = "step",
    bandwidth: float = 16e9,
    compute_s: float = 50e-6,
    engine: str = "auto",
    prefetch: bool = False,
) -> CacheResult:
    """Replay `trace` through a cache of `capacity` experts (per MoE layer, or in total with scope="global").

    prefetch=True adds the pre-gated prefetch to the policy's demand loading ("pregated" is "lru" with prefetch;
    `offload_experts(prefetch=True)` does the same with any policy but "belady").

    bandwidth: bytes/s of expert loads (default 16e9, a PCIe 4.0 x16 host→GPU link); compute_s: seconds of compute
    per token and MoE layer, which a prefetch overlaps. engine: "auto" (vectorised for LRU, else the loop),
    "vector" (LRU only) or "loop" (the step-by-step policy classes, as the executor runs them).
    """
    check_choice("policy", policy, POLICIES)
    check_choice("scope", scope, SCOPES)
    check_choice("engine", engine, ("auto", "vector", "loop"))
    check_bool("prefetch", prefetch)
    if prefetch and policy == "belady":
        raise ValueError("prefetch=True does not combine with policy 'belady' (the optimum for demand loading)")
    if policy == "pregated":
        policy, prefetch = "lru", True
    check_number("bandwidth", bandwidth, low=0, open_low=True)
    check_number("compute_s", compute_s, low=0)
    d = trace if isinstance(trace, Demand) else demand(trace, granularity)
    check_capacity(d, capacity, scope)
    if prefetch and all(p is None for p in d.predicted[1:]):
        raise ValueError("prefetching (policy 'pregated') needs predictions in the trace (record it with predict=True)")
    if engine == "vector" and (policy != "lru" or prefetch):
        raise ValueError(f"engine='vector' runs policy 'lru' without prefetch only, got policy={policy!r}")
    if policy == "lru" and not prefetch and engine != "loop":
        return lru_sweep(d, [capacity], scope=scope, bandwidth=bandwidth)[0]
    result = _simulate_loop(d, capacity, policy, scope, bandwidth, compute_s, prefetch)
    return dataclasses.replace(result, policy="pregated") if prefetch and policy == "lru" else result


def _next_use_tables(used: list[np.ndarray]) -> list[np.ndarray]:
    """next[l] int64 [S, E]: the first step > s that needs e (NEVER if none)."""
    out = []
    for used_SE in used:
        S, E = used_SE.shape
        idx = np.where(used_SE, np.arange(S)[:, None], NEVER)
        nxt_incl = np.minimum.accumulate(idx[::-1], axis=0)[::-1]
        nxt = np.full((S, E), NEVER, dtype=np.int64)
        nxt[:-1] = nxt_incl[1:]
        out.append(nxt)
    return out


def _simulate_loop(
    d: Demand, capacity: int, policy: str, scope: str, bandwidth: float, compute_s: float, prefetch: bool
) -> CacheResult:
    L, S = len(d.used), d.num_steps
    E_max = max((u.shape[1] for u in d.used), default=1)
    needed = [[np.flatnonzero(row).tolist() for row in used_SE] for used_SE in d.used]
    predicted = [None if p is None else [np.flatnonzero(row).tolist() for row in p] for p in d.predicted]
    nxt = _next_use_tables(d.used) if policy == "belady" else None

    if scope == "layer":
        caches = []
        for layer in range(L):
            nu = (lambda e, t, tab=nxt[layer]: int(tab[t, e])) if nxt is not None else None
            caches.append(make_cache(policy, capacity, next_use=nu))
        key = lambda layer, e: e  # noqa: E731
    else:
        # Global time runs layer by layer within a step: the next use of (l, e) after (t, l) is at (next step, l).
        nu = None
        if nxt is not None:
            def nu(item, g):
                layer, e = divmod(item, E_max)
                t, now = divmod(g, L)
                n = int(nxt[layer][t, e]) if layer <= now else (t if d.used[layer][t, e] else int(nxt[layer][t, e]))
                return NEVER if n == NEVER else n * L + layer
        pool = make_cache(policy, capacity, next_use=nu)
        caches = [pool] * L
        key = lambda layer, e: layer * E_max + e  # noqa: E731

    requests = hits = misses = prefetch_loads = nbytes = 0
    stall = 0.0
    for t in range(S):
        overlap = compute_s * float(d.tokens_S[t])
        prefetched_bytes = 0
        for layer in range(L):
            want = needed[layer][t]
            g = t if scope == "layer" else t * L + layer
            missed = caches[layer].access([key(layer, e) for e in want], g)
            requests += len(want)
            misses += len(missed)
            hits += len(want) - len(missed)
            b = len(missed) * d.expert_bytes[layer]
            nbytes += b
            # The prefetch issued during the previous layer overlapped its compute; what it did not hide stalls.
            stall += b / bandwidth + max(0.0, prefetched_bytes / bandwidth - overlap)
            prefetched_bytes = 0
            if prefetch and layer + 1 < L and predicted[layer + 1] is not None:
                nl = layer + 1
                loaded = caches[nl].prefetch([key(nl, e) for e in predicted[nl][t]], g)
                prefetch_loads += len(loaded)
                prefetched_bytes = len(loaded) * d.expert_bytes[nl]
                nbytes += prefetched_bytes
    recall, precision = prediction_accuracy(d) if prefetch else (None, None)
    return CacheResult(
        policy=policy + (" + prefetch" if prefetch else ""), capacity=capacity, scope=scope, requests=requests, hits=hits, misses=misses,
        prefetch_loads=prefetch_loads, num_tokens=int(d.tokens_S.sum()), layer_steps=S * L, bytes_moved=nbytes,
        stall_s=stall, prediction_recall=recall, prediction_precision=precision,
    )  # fmt: skip


def prediction_accuracy(d: Demand) -> tuple[float | None, float | None]:
    """(recall, precision) of the predicted expert sets over layers that have predictions, per step."""
    inter = need = pred = 0
    for used_SE, pred_SE in zip(d.used, d.predicted):
        if pred_SE is None:
            continue
        inter += int((used_SE & pred_SE).sum())
        need += int(used_SE.sum())
        pred += int(pred_SE.sum())
    if not need and not pred:
        return None, None
    return (inter / need if need else 1.0), (inter / pred if pred else 1.0)


# -- vectorised LRU --------------------------------------------------------------------------------------------------


def lru_ranks(d: Demand, scope: str = "layer") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer: the LRU stack rank of every access (0 = most recent; NEVER for a first use) and its step.

    An LRU cache of C ≥ (experts of any step) slots holds, before step s, the C experts ranked highest by
    (last step used, id) — by induction: a step's misses evict the lowest-ranked unpinned residents, and the step's
    experts then rank above all others. So an access hits iff fewer than C other experts outrank its previous use.
    In a global pool, items are (layer, expert) and time runs layer by layer within a step.
    """
    check_choice("scope", scope, SCOPES)
    if scope == "layer":
        pairs = [_layer_ranks(used_SE) for used_SE in d.used]
        return [r for r, _ in pairs], [s for _, s in pairs]
    return _global_ranks(d)


def _layer_ranks(used_SE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    S, E = used_SE.shape
    kdt = np.int32 if (S + 1) * E < np.iinfo(np.int32).max else np.int64
    # key of the last use up to and including step s: step·E + id (orders by (step, id)); -1 for never.
    use_SE = np.where(used_SE, np.arange(S, dtype=kdt)[:, None] * kdt(E) + np.arange(E, dtype=kdt), kdt(-1))
    keys_SE = np.maximum.accumulate(use_SE, axis=0) if S else use_SE
    s_A, e_A = np.nonzero(used_SE)
    rank_A = np.full(len(s_A), NEVER, dtype=np.int64)
    chunk = 1 << 16
    for a0 in range(0, len(s_A), chunk):
        s, e = s_A[a0 : a0 + chunk], e_A[a0 : a0 + chunk]
        warm = s > 0
        s, e = s[warm], e[warm]
        before_AE = keys_SE[s - 1]  # last uses before the step
        prev_A = before_AE[np.arange(len(s)), e]
        r = np.count_nonzero(before_AE > prev_A[:, None], axis=1)
        out = rank_A[a0 : a0 + chunk]
        out[warm] = np.where(prev_A < 0, NEVER, r)
    return rank_A, s_A


def _global_ranks(d: Demand) -> tuple[list[np.ndarray], list[np.ndarray]]:
    L = len(d.used)
    last_before, last_incl = [], []
    for used_SE in d.used:
        S, E = used_SE.shape
        idx = np.where(used_SE, np.arange(S)[:, None], -1)
        incl = np.maximum.accumulate(idx, axis=0) if S else idx
        before = np.full((S, E), -1, dtype=np.int64)
        before[1:] = incl[:-1]
        last_before.append(before)
        last_incl.append(incl)
    ranks, steps = [], []
    chunk = 1 << 16
    for layer, used_SE in enumerate(d.used):
        s_A, e_A = np.nonzero(used_SE)
        rank_A = np.empty(len(s_A), dtype=np.int64)
        for a0 in range(0, len(s_A), chunk):
            s, e = s_A[a0 : a0 + chunk], e_A[a0 : a0 + chunk]
            # global times: g = step·L + layer; for layer' < layer this step counts, for layer' ≥ layer it does not.
            prev = last_before[layer][s, e]
            prev_g = prev * L + layer
            r = np.zeros(len(s), dtype=np.int64)
            for other in range(L):
                table = last_incl[other] if other < layer else last_before[other]
                tg = table[s]
                tg = np.where(tg >= 0, tg * L + other, -1)
                cols = np.arange(tg.shape[1])
                newer = tg > prev_g[:, None]
                if other == layer:
                    newer |= (tg == prev_g[:, None]) & (cols > e[:, None])
                r += newer.sum(1)
            rank_A[a0 : a0 + chunk] = np.where(prev < 0, NEVER, r)
        ranks.append(rank_A)
        steps.append(s_A)
    return ranks, steps


def lru_sweep(
    trace: RoutingTrace | Demand,
    capacities: Iterable[int],
    *,
    scope: str = "layer",
    granularity: str = "step",
    bandwidth: float = 16e9,
) -> list[CacheResult]:
    """LRU at every capacity from one vectorised pass (`lru_ranks`)."""
    d = trace if isinstance(trace, Demand) else demand(trace, granularity)
    capacities = list(capacities)
    for c in capacities:
        check_capacity(d, c, scope)
    ranks, steps = lru_ranks(d, scope)
    S, L = d.num_steps, len(d.used)
    results = []
    for c in capacities:
        requests = hits = nbytes = 0
        stall = 0.0
        for layer, (rank_A, step_A) in enumerate(zip(ranks, steps)):
            hit_A = rank_A < c
            requests += len(rank_A)
            hits += int(hit_A.sum())
            b = int((~hit_A).sum()) * d.expert_bytes[layer]
            nbytes += b
            stall += b / bandwidth
        results.append(CacheResult(
            policy="lru", capacity=c, scope=scope, requests=requests, hits=hits, misses=requests - hits,
            prefetch_loads=0, num_tokens=int(d.tokens_S.sum()), layer_steps=S * L, bytes_moved=nbytes, stall_s=stall,
        ))  # fmt: skip
    return results


def sweep_cache(
    trace: RoutingTrace,
    capacities: Iterable[int],
    policies: Iterable[str] = ("lru", "lfu", "arc", "belady"),
    **options,
) -> list[CacheResult]:
    """Every policy at every capacity (LRU in one vectorised pass); errors before any simulation."""
    granularity = options.pop("granularity", "step")
    scope = options.get("scope", "layer")
    policies, capacities = list(policies), sorted(set(capacities))
    for p in policies:
        check_choice("policy", p, POLICIES)
    d = demand(trace, granularity)
    for c in capacities:
        check_capacity(d, c, scope)
    out = []
    for p in policies:
        if p == "lru":
            out += lru_sweep(d, capacities, scope=scope, bandwidth=options.get("bandwidth", 16e9))
        else:
            out += [simulate_cache(d, c, p, **options) for c in capacities]
    return out


def plot_hit_rates(results: Sequence[CacheResult], path: str | Path, *, title: str = "") -> Path:
    """A PNG of hit rate against capacity, one line per policy, Belady drawn as the bound (dashed, shaded above)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from routelab._atomic import atomic_write_bytes

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_policy: dict[str, list[CacheResult]] = {}
    for r in results:
        by_policy.setdefault(r.policy, []).append(r)
    markers = iter("sv^Dx+<>ph" * 3)
    for policy, rs in by_policy.items():
        rs = sorted(rs, key=lambda r: r.capacity)
        x, y = [r.capacity for r in rs], [r.hit_rate for r in rs]
        if policy == "belady":
            ax.plot(x, y, "k--", marker="o", label="belady (optimal demand loading)")
            ax.fill_between(x, y, 1.0, color="0.9", label="unreachable without prefetch")
        else:  # distinct markers, so policies that coincide stay visible
            ax.plot(x, y, marker=next(markers), markerfacecolor="none", label=policy)
    scope = results[0].scope if results else "layer"
    ax.set_xlabel("capacity (experts " + ("per MoE layer" if scope == "layer" else "in one pool") + ")")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "expert cache hit rate vs capacity")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def local_consistency(trace: RoutingTrace, capacities: Iterable[int], *, m: int = 16) -> list[dict]:
    """Per MoE layer: SRP(m) and SCH(m, c) for each capacity c (`inference/consistency.py`, Liang et al. 2025), over
    the trace's sequences. SCH is an oracle's hit rate for a cache refreshed from the next m tokens, a yardstick
    beside the simulated policies (tokens, not steps; a first use misses)."""
    import torch

    from routelab.inference.consistency import sch, srp, usage_from_indices

    check_int("m", m, 1)
    capacities = sorted(set(capacities))
    order = np.argsort(trace.sequence_ids, kind="stable")  # each sequence's tokens, in decode order
    bounds = np.flatnonzero(np.diff(trace.sequence_ids[order])) + 1
    rows = [torch.as_tensor(r) for r in np.split(order, bounds)] if len(order) else []
    out = []
    for layer, ids_NK in enumerate(trace.experts):
        ids = torch.as_tensor(ids_NK.astype(np.int64))
        seqs = [usage_from_indices(ids[r], trace.num_experts[layer]) for r in rows]
        out.append({"layer": layer, "m": m, "srp": srp(seqs, m),
                    "sch": {int(c): sch(seqs, m, int(c)) for c in capacities}})
    return out
