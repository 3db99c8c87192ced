"""Which routed experts hold a VRAM slot: admission and eviction by policy, torch-free.

The live engine maps slot numbers to VRAM tensors and copies an expert in when `admit` returns a slot;
the trace simulator (`hybrid_k2.sim`) drives the same object. Keys are (layer, expert) with
0 <= layer < n_layers (the MoE-layer index, in the engine and the simulator alike), 0 <= expert < n_experts.

Policies
  score   priority = exponentially decayed use count (x `decay` per token) + `predict_weight` x the
          predictor's pending score for this token; a newcomer is admitted only if its priority beats the
          lowest resident's by `margin` (0: any amount), so a one-off scan cannot flush a hot set and two
          nearly equal experts do not trade places over and over (every swap is a copy on the link).
          A resident whose copy is still in flight (the `landed` predicate, see set_landed) is never the
          victim: evicting it would waste the copy the link is carrying.
  lru     always admit, evict the least recently used.
  static  resident set fixed from a profile (use counts), preloaded, never evicted.
  belady  offline oracle for the simulator: knows the future trace, evicts the key used furthest in the
          future and bypasses a newcomer used later than every resident (optimal hit count).
"""
from __future__ import annotations

import numpy as np

POLICIES = ("score", "lru", "static", "belady")
_RENORM_AT = 1e150     # rescale the lazily-decayed counters before float64 overflows


class BeladyOracle:
    """Next-use positions for a routing trace `ids` [tokens, layers, top_k]. Accesses are ordered token-major,
    then by layer; `position(t, l) = t * layers + l`. Never-again is `inf`."""

    def __init__(self, ids: np.ndarray, n_experts: int):
        ids = np.asarray(ids)
        if ids.ndim != 3:
            raise ValueError(f"belady future: ids must be [tokens, layers, top_k], got shape {ids.shape}")
        T, L, K = ids.shape
        self.shape = (T, L, K)
        self.ids = ids
        keys = (np.arange(L)[None, :, None] * n_experts + ids.astype(np.int64)).ravel()
        pos = np.repeat(np.arange(T * L, dtype=np.float64), K)
        order = np.lexsort((pos, keys))          # by key, then position
        nxt = np.full(keys.size, np.inf)
        same = keys[order[1:]] == keys[order[:-1]]
        nxt[order[:-1][same]] = pos[order[1:]][same]
        self.next_after = nxt.reshape(T, L, K)   # next use of the key accessed at (t, l, k)
        self.first_use = np.full(L * n_experts, np.inf)
        firsts = order[np.r_[True, ~same]]       # first occurrence of each key
        self.first_use[keys[firsts]] = pos[firsts]


class ExpertCache:
    def __init__(self, n_slots: int, n_layers: int, n_experts: int, policy: str = "score", *,
                 decay: float = 0.98, predict_weight: float = 1.0, margin: float = 0.0, expert_bytes: int = 0,
                 profile: np.ndarray | None = None, future: np.ndarray | None = None):
        for name, v in (("n_slots", n_slots), ("n_layers", n_layers), ("n_experts", n_experts)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if name == "n_slots" else 1):
                raise ValueError(f"ExpertCache: {name} must be a {'non-negative' if name == 'n_slots' else 'positive'} "
                                 f"integer, got {v!r}")
        if policy not in POLICIES:
            raise ValueError(f"ExpertCache: policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"ExpertCache: decay must be in (0, 1], got {decay!r}")
        self.n_slots, self.n_layers, self.n_experts = int(n_slots), int(n_layers), int(n_experts)
        if not margin >= 0:
            raise ValueError(f"ExpertCache: margin must be >= 0, got {margin!r}")
        self.policy, self.decay, self.predict_weight = policy, float(decay), float(predict_weight)
        self.margin = float(margin)
        self.expert_bytes = int(expert_bytes)
        n_keys = self.n_layers * self.n_experts
        self.slot_key = np.full(self.n_slots, -1, dtype=np.int64)   # key in each slot, -1 = free
        self.where = np.full(n_keys, -1, dtype=np.int64)            # slot of each key, -1 = not resident
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._freq = np.zeros(n_keys)         # decayed counts, scaled by 1/_inc (lazy decay)
        self._inc = 1.0
        self._last_use = np.zeros(n_keys, dtype=np.int64)
        self._tick = 0                         # access-call counter for LRU
        self._pred = np.zeros(n_keys)          # pending predicted uses for the current token
        self._pred_token = np.full(n_keys, -1, dtype=np.int64)
        self.token = 0
        self.hits = self.misses = self.admissions = self.evictions = self.rejected = 0
        self._landed = None                    # keys -> bool mask: copy complete (set_landed); None: all are
        self._oracle: BeladyOracle | None = None
        self._next_use: np.ndarray | None = None
        if policy == "belady":
            if future is None:
                raise ValueError("ExpertCache: policy 'belady' needs the future trace (future=ids[tokens, layers, k])")
            self._oracle = BeladyOracle(future, self.n_experts)
            if self._oracle.shape[1] != self.n_layers:
                raise ValueError(f"ExpertCache: belady future has {self._oracle.shape[1]} layers, cache has "
                                 f"{self.n_layers}")
            self._next_use = self._oracle.first_use.copy()
        if policy == "static":
            if profile is None:
                raise ValueError("ExpertCache: policy 'static' needs a profile (use counts [n_layers, n_experts])")
            self.set_profile(profile)

    # ---- keys ------------------------------------------------------------------------------------
    def _keys(self, layer: int, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"ExpertCache: layer {layer} out of range 0..{self.n_layers - 1}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_experts):
            raise ValueError(f"ExpertCache: expert ids must be in 0..{self.n_experts - 1}, "
                             f"got {ids.min()}..{ids.max()}")
        return layer * self.n_experts + ids

    def _key(self, layer: int, expert: int) -> int:
        """One key, without numpy overhead (the per-expert calls of the prefetcher are hot)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"ExpertCache: layer {layer} out of range 0..{self.n_layers - 1}")
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"ExpertCache: expert ids must be in 0..{self.n_experts - 1}, got {expert}")
        return int(layer) * self.n_experts + int(expert)

    def key_of(self, key: int) -> tuple[int, int]:
        return divmod(int(key), self.n_experts)

    # ---- queries ---------------------------------------------------------------------------------
    def lookup(self, layer: int, ids) -> np.ndarray:
        """Hit mask for `ids` (any shape, flattened); no statistics change."""
        return self.where[self._keys(layer, ids)] >= 0

    def slot_of(self, layer: int, ids) -> np.ndarray:
        """VRAM slot per id (-1 where not resident)."""
        return self.where[self._keys(layer, ids)]

    def resident(self, layer: int, expert: int) -> int | None:
        s = int(self.where[self._key(layer, expert)])
        return None if s < 0 else s

    def residents(self) -> list[tuple[int, int]]:
        return [self.key_of(k) for k in self.slot_key if k >= 0]

    def set_landed(self, landed) -> None:
        """`landed(keys int64 array) -> bool array`: whether each resident key's latest copy is complete (the
        engine: the fill's event; the simulator: the modelled link). The score policy never evicts a key whose
        copy is in flight. None: every resident counts as landed."""
        if landed is not None and not callable(landed):
            raise TypeError(f"ExpertCache.set_landed: expected a callable or None, got {type(landed).__name__}")
        self._landed = landed

    def landed(self, layer: int, ids) -> np.ndarray:
        """Resident with the copy complete, per id (the hit rule of the simulator and the engine)."""
        keys = self._keys(layer, ids)
        res = self.where[keys] >= 0
        if self._landed is None or not res.any():
            return res
        out = np.zeros(keys.shape, dtype=bool)
        out[res] = np.asarray(self._landed(keys[res]), dtype=bool)
        return out

    def expected_uses(self, layer: int, expert: int) -> float:
        """Decayed use count: with per-token decay g it estimates uses in the next ~1/(1-g) tokens."""
        return float(self._freq[self._key(layer, expert)] / self._inc)

    def priority(self, layer: int, expert: int) -> float:
        return float(self._priority(np.array([self._key(layer, expert)]))[0])

    def _priority(self, keys: np.ndarray) -> np.ndarray:
        pending = np.where(self._pred_token[keys] == self.token, self._pred[keys], 0.0)
        return self._freq[keys] / self._inc + self.predict_weight * pending

    # ---- updates ---------------------------------------------------------------------------------
    def access(self, layer: int, ids) -> np.ndarray:
        """Record that the current token uses `ids` at `layer`; returns the hit mask."""
        keys = self._keys(layer, ids)
        hit = self.where[keys] >= 0
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += keys.size - n_hit
        self._tick += 1
        self._last_use[keys] = self._tick
        np.add.at(self._freq, keys, self._inc)
        self._pred[keys] = 0.0                  # the prediction is used up
        if self._oracle is not None:
            self._advance_oracle(layer, keys)
        return hit

    def _advance_oracle(self, layer: int, keys: np.ndarray) -> None:
        T, L, K = self._oracle.shape
        if self.token >= T:
            raise ValueError(f"ExpertCache(belady): access at token {self.token} is past the {T}-token future trace")
        expected = self._oracle.ids[self.token, layer].astype(np.int64) + layer * self.n_experts
        if keys.shape != expected.shape or np.any(np.sort(keys) != np.sort(expected)):
            raise ValueError(f"ExpertCache(belady): access (token {self.token}, layer {layer}) differs from the "
                             f"future trace; replay the trace it was built from")
        self._next_use[expected] = self._oracle.next_after[self.token, layer]

    def note_prediction(self, layer: int, ids, score=1.0) -> None:
        """The predictor expects `ids` to be used at `layer` later in this token (score policy)."""
        keys = self._keys(layer, ids)
        fresh = self._pred_token[keys] != self.token
        self._pred[keys[fresh]] = 0.0
        self._pred_token[keys] = self.token
        np.add.at(self._pred, keys, np.broadcast_to(np.asarray(score, dtype=np.float64), keys.shape))

    def next_token(self, n: int = 1) -> None:
        """Advance the per-token clock by `n` tokens (a prefill step counts its prompt length): decays
        frequencies by decay**n, drops stale predictions."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"ExpertCache.next_token: n must be a positive integer, got {n!r}")
        self.token += int(n)
        g = self.decay ** int(n)          # may underflow to 0 for a long prefill: history forgotten
        if g > 0 and self._inc / g <= _RENORM_AT:
            self._inc /= g
            return
        self._freq /= self._inc           # renormalise, then apply the remaining decay to the counts
        self._inc = 1.0
        if g > 0 and 1.0 / g <= _RENORM_AT:
            self._inc = 1.0 / g
        else:
            self._freq *= g

    def admit(self, layer: int, expert: int, predicted_score: float = 0.0) -> int | None:
        """Give (layer, expert) a slot if the policy wants it; returns the slot (the caller copies the
        expert there, replacing any evicted one) or None when declined. Already resident: its slot."""
        key = self._key(layer, expert)
        if self.where[key] >= 0:
            return int(self.where[key])
        if predicted_score:
            self.note_prediction(layer, [expert], predicted_score)
        if self.n_slots == 0:
            self.rejected += 1
            return None
        if self.policy == "static":
            if not self._static_member[key] or not self._free:
                self.rejected += 1
                return None
            return self._place(key, self._free.pop())
        if self._free:
            if self.policy == "belady" and not np.isfinite(self._next_use[key]):
                self.rejected += 1
                return None
            return self._place(key, self._free.pop())
        residents = self.slot_key
        if self.policy == "lru":
            victim = int(np.argmin(self._last_use[residents]))
        elif self.policy == "score":
            prio = self._priority(residents)
            if self._landed is not None:     # a copy in flight is not a victim
                prio = np.where(np.asarray(self._landed(residents), dtype=bool), prio, np.inf)
            victim = int(np.argmin(prio))
            if self._priority(np.array([key]))[0] <= prio[victim] + self.margin:   # inf: all in flight
                self.rejected += 1
                return None
        else:  # belady
            nxt = self._next_use[residents]
            victim = int(np.argmax(nxt))
            if self._next_use[key] >= nxt[victim]:
                self.rejected += 1
                return None
        self.where[residents[victim]] = -1
        self.evictions += 1
        return self._place(key, victim)

    def _place(self, key: int, slot: int) -> int:
        self.slot_key[slot] = key
        self.where[key] = slot
        self._tick += 1                  # LRU: a newcomer (a prefetch, too) counts as just used, not as the next victim
        self._last_use[key] = self._tick
        self.admissions += 1
        return slot

    # ---- static / belady set-up -------------------------------------------------------------------
    def set_profile(self, counts) -> None:
        """Static policy: the n_slots most used keys of `counts` [n_layers, n_experts] become resident."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.n_layers, self.n_experts):
            raise ValueError(f"ExpertCache: profile must have shape ({self.n_layers}, {self.n_experts}), "
                             f"got {counts.shape}")
        flat = counts.ravel()
        order = np.argsort(-flat, kind="stable")[:self.n_slots]
        order = order[flat[order] > 0]
        self._static_member = np.zeros(flat.size, dtype=bool)
        self._static_member[order] = True
        for key in order:
            if self.where[key] < 0 and self._free:
                self._place(int(key), self._free.pop())

    def warm_start(self) -> list[tuple[int, int]]:
        """Belady: fill free slots with the keys used soonest (the optimal free preload)."""
        if self._next_use is None:
            raise ValueError("ExpertCache: warm_start needs policy 'belady'")
        cand = np.argsort(self._next_use, kind="stable")
        placed = []
        for key in cand:
            if not self._free or not np.isfinite(self._next_use[key]):
                break
            if self.where[key] < 0:
                self._place(int(key), self._free.pop())
                placed.append(self.key_of(key))
        return placed

    # ---- counters --------------------------------------------------------------------------------
    @property
    def bytes_copied(self) -> int:
        return self.admissions * self.expert_bytes

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def reset_stats(self) -> None:
        self.hits = self.misses = self.admissions = self.evictions = self.rejected = 0

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, hit_rate=self.hit_rate, admissions=self.admissions,
                    evictions=self.evictions, rejected=self.rejected, bytes_copied=self.bytes_copied,
                    resident=int((self.slot_key >= 0).sum()), slots=self.n_slots)
