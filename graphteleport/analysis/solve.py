"""Solve the rules' constraints: classes of neurons that share one cofactor.

The ties and relations go to the signed union-find
(:mod:`graphteleport.unionfind`).  Monomials ``Π τ^e = 1`` (products of
two activations, weights shared by several uses) are resolved in rounds: once
the pins of a round are known, the pinned terms of each monomial drop out and
pairs of terms that cancel are removed; two remaining terms become a tie or a
relation, one remaining term is pinned, and any extra terms are pinned too (a
sound, if not maximal, choice).  Rounds stop when nothing changes.

A *cofactor pair* is a class C together with its mirror C̄ (the class of the
inverses); one value ``t`` per pair gives ``τ = t`` to the neurons in C and
``τ = 1/t`` to those in C̄.  A pair is *free* when it is not pinned and some
weight depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from graphteleport.algebra import neuron_cofactors, neuron_tangent
from graphteleport.analysis.constraints import Constraints, Factor, Flag
from graphteleport.unionfind import components, signed_pairs, union_pairs

IntArray = np.ndarray
MAX_ROUNDS = 12
GROUPS = ("any", "positive", "sign", "pinned")
PINNED = GROUPS.index("pinned")
PIN, POSITIVE, SIGN = int(Flag.PIN), int(Flag.POSITIVE), int(Flag.SIGN)  # plain ints: numpy ops


@dataclass(frozen=True)
class Solution:
    """The cofactor pairs of every neuron and the group each pair ranges over.

    Per neuron: ``pair`` and ``inverse`` (τ = 1/t of its pair); per pair: ``flags``,
    ``code`` (index into :data:`GROUPS`: any, positive, sign or pinned), ``touched`` (some
    weight or inserted node depends on it), and, worked out on first use, ``group``,
    ``reason`` (why it is restricted), ``pinned`` and ``free``.
    """

    n: int
    pair: IntArray  # per neuron: index of its cofactor pair
    inverse: IntArray  # per neuron: True where τ = 1/t of its pair
    flags: IntArray  # per pair: Flag bits
    touched: IntArray  # per pair: some weight depends on it
    code: IntArray  # per pair: index into GROUPS
    records: list[tuple[IntArray, int, str]] = field(default_factory=list)  # the flags given

    @cached_property
    def group(self) -> np.ndarray:
        """Per pair: any / positive / sign / pinned (a numpy array of str)."""
        out: np.ndarray = np.array(GROUPS)[self.code]
        return out

    @property
    def num_pairs(self) -> int:
        return len(self.flags)

    @cached_property
    def reason(self) -> list[str]:
        """Per pair: why it is restricted ("" when free); worked out on first use (reports
        need it, a teleport does not)."""
        reasons = _reasons(self.pair, self.num_pairs, self.records)
        code = group_codes(self.flags)
        reasons[((code == 1) | (code == 2)) & (reasons == "")] = (
            "sign: τ = 1/τ (its cofactor is its own inverse)"
        )
        out: list[str] = reasons.tolist()
        return out

    @cached_property
    def pinned(self) -> IntArray:
        return np.asarray(self.code == PINNED, dtype=bool)

    @cached_property
    def free(self) -> IntArray:
        return np.asarray(~self.pinned & self.touched, dtype=bool)

    def cofactors(self, values: np.ndarray) -> np.ndarray:
        """Per-neuron τ from one value per pair (``values[p]`` for pair p):
        :func:`~graphteleport.algebra.neuron_cofactors`."""
        return neuron_cofactors(values, self._signed_pair)

    def tangent(self, direction: np.ndarray) -> np.ndarray:
        """Per-neuron ``dτ/dε`` at τ = 1 along ``t = 1 + ε·direction`` (one value per pair):
        :func:`~graphteleport.algebra.neuron_tangent`."""
        return neuron_tangent(direction, self._signed_pair)

    @cached_property
    def _signed_pair(self) -> IntArray:
        """Per neuron: its pair, plus the number of pairs where τ = 1/t."""
        out: IntArray = self.pair + self.num_pairs * self.inverse
        return out


def _concat(pairs: list[tuple[IntArray, IntArray]]) -> tuple[IntArray, IntArray]:
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])


class _Solver:
    def __init__(self, c: Constraints, touched_ids: IntArray) -> None:
        self.c = c
        self.n = c.n
        # Doubled-space pairs: node k is τ_k, node k + n is 1/τ_k.
        self.a, self.b = signed_pairs(_concat(c.ties), _concat(c.relations), self.n)
        self.extra_flags: list[tuple[IntArray, int, str]] = []
        self.touched_ids = touched_ids

    def roots(self) -> IntArray:
        return components(2 * self.n, self.a, self.b)

    def root_flags(self, roots: IntArray) -> IntArray:
        """Flag bits of every class: the union of its members' (and mirrors') flags."""
        flags = np.zeros(2 * self.n, dtype=np.int64)
        by_bit: dict[int, list[IntArray]] = {}
        for ids, flag, _ in [*self.c.flags, *self.extra_flags]:  # flat id arrays
            by_bit.setdefault(flag, []).append(ids)
        for bit, parts in by_bit.items():
            ids = np.concatenate(parts)
            hit = np.zeros(2 * self.n, dtype=bool)  # fancy assignment, not ufunc.at: faster
            hit[roots[ids]] = True
            hit[roots[ids + self.n]] = True
            flags[hit] |= bit
        self_inverse = roots[: self.n] == roots[self.n :]
        flags[roots[: self.n][self_inverse]] |= SIGN
        return flags

    def run(self) -> tuple[IntArray, IntArray]:
        """The root of every doubled node and the flags of every root.

        Each round reduces every monomial under the round's roots and pins, then adds
        the ties and pins found, all at once: one ``mirror`` table, one concatenation
        and one pin look-up per round, so a round costs O(n + Σ|monomial|), not
        O(n · monomials) — the analysis stays linear in the depth of a transformer,
        whose every layer brings monomials (Q·Kᵀ, attention·V, SwiGLU's products)."""
        roots = self.roots()
        for _ in range(MAX_ROUNDS):
            flags = self.root_flags(roots)
            if not self.c.monomials:
                return roots, flags
            pinned = (flags & PIN > 0) | ((flags & POSITIVE > 0) & (flags & SIGN > 0))
            found = _Found(roots, self.n)
            for mono in self.c.monomials:
                self._resolve(mono, found, pinned)
            if not found.changed:
                return roots, flags
            if found.pins:
                self._pin_terms(np.concatenate(found.pins), roots)
            roots = self._joined(roots, found)
        return roots, self.root_flags(roots)

    def _joined(self, roots: IntArray, found: _Found) -> IntArray:
        """``roots`` with the round's new ties merged in: the union-find goes on from the
        last round's classes (each labelled by its smallest node, as :func:`components`
        labels them, so the labels are those of a union over every pair) instead of
        starting over from every pair (32-layer LLaMA, 2 rounds: the second 0.105 → 0.021
        CPU-s)."""
        if not found.a:
            return roots
        parent = roots.copy()
        union_pairs(parent, np.concatenate(found.a), np.concatenate(found.b))
        return parent

    def _resolve(self, mono: list[Factor], found: _Found, pinned: IntArray) -> None:
        """Reduce one monomial under the current pins; what it adds goes to ``found``."""
        n, roots, mirror = self.n, found.roots, found.mirror
        terms = np.stack([roots[f.ids.ravel() + (0 if f.exp > 0 else n)] for f in mono])
        alive = ~pinned[terms]
        for j in range(len(mono)):
            for k in range(j + 1, len(mono)):
                cancel = alive[j] & alive[k] & (terms[j] == mirror[terms[k]])
                alive[j] &= ~cancel
                alive[k] &= ~cancel
        if not alive.any():
            return
        found.changed = True
        order = np.argsort(~alive, axis=0, kind="stable")
        ranked = np.take_along_axis(terms, order, axis=0)
        count = alive.sum(axis=0)
        two = count >= 2
        # τ(r1)·τ(r2) = 1  ⇔  r1 ~ mirror(r2) in the doubled space.
        found.a.append(ranked[0][two])
        found.b.append(mirror[ranked[1][two]])
        found.pins.append(ranked[0][count == 1])
        for j in range(2, len(mono)):
            found.pins.append(ranked[j][count > j])

    def _pin_terms(self, terms: IntArray, roots: IntArray) -> None:
        if terms.size:
            hit = np.zeros(2 * self.n, dtype=bool)
            hit[terms] = True
            members = np.flatnonzero(hit[roots[: self.n]] | hit[roots[self.n :]])
            self.extra_flags.append(
                (
                    members,
                    int(Flag.PIN),
                    "product of activations (Mul/Div/MatMul of two activations; use --mode insert)",
                )
            )


class _Found:
    """What one round of :meth:`_Solver.run` adds: ties ``a[i] ~ b[i]`` and terms to pin,
    found under the round's ``roots`` (and their ``mirror``: the root of 1/τ)."""

    def __init__(self, roots: IntArray, n: int) -> None:
        self.roots = roots
        self.mirror = np.empty(2 * n, dtype=np.int64)
        self.mirror[roots] = np.concatenate((roots[n:], roots[:n]))  # node k ↔ k ± n
        self.a: list[IntArray] = []
        self.b: list[IntArray] = []
        self.pins: list[IntArray] = []
        self.changed = False


def solve(c: Constraints, touched_ids: IntArray) -> Solution:
    """Classes, groups and reasons for every neuron the rules created."""
    s = _Solver(c, touched_ids)
    roots, flags_root = s.run()
    n = c.n
    r, rb = roots[:n], roots[n:]
    key = np.minimum(r, rb)
    uniq, pair = _dense_unique(key, 2 * n)
    flags = flags_root[uniq]
    code = group_codes(flags)
    touched = np.zeros(len(uniq), dtype=bool)
    touched[pair[touched_ids]] = True
    records = [*c.flags, *s.extra_flags]
    return Solution(
        n=n, pair=pair, inverse=r != key, flags=flags, touched=touched, code=code, records=records
    )


def _dense_unique(key: IntArray, bound: int) -> tuple[IntArray, IntArray]:
    """``np.unique(key, return_inverse=True)`` for keys in ``[0, bound)``, without a sort."""
    present = np.zeros(bound, dtype=bool)
    present[key] = True
    uniq = present.nonzero()[0]
    rank = present.cumsum() - 1
    return uniq, rank[key]


def _reasons(pair: IntArray, count: int, records: list[tuple[IntArray, int, str]]) -> IntArray:
    """The first reason recorded for each pair (an object array; "" for none), pins
    first, then group restrictions."""
    texts = [why for _, _, why in records]
    bits = (int(Flag.PIN), int(Flag.POSITIVE), int(Flag.SIGN))
    first = {bit: np.full(count, -1, dtype=np.int64) for bit in bits}
    for k, (ids, flag, _) in enumerate(records):
        pairs = pair[ids]
        for bit in bits:
            if int(flag) & bit:
                seen = first[bit]
                seen[pairs[seen[pairs] < 0]] = k
    pin, pos, sign = (first[b] for b in bits)
    table = np.array([*texts, ""], dtype=object)  # index -1 reads ""
    out: IntArray = table[np.where(pin >= 0, pin, np.maximum(pos, sign))]
    for p in np.flatnonzero((pin < 0) & (pos >= 0) & (sign >= 0)):
        out[p] = f"{texts[pos[p]]}, and {texts[sign[p]]}"
    return out


def _group_code(flags: int) -> int:
    """Index into ``GROUPS`` of the group a flag set leaves: pinned (PIN, or both
    POSITIVE and SIGN — only τ = 1 is positive and ±1), sign, positive, or any."""
    if flags & PIN or (flags & POSITIVE and flags & SIGN):
        return PINNED
    return 2 if flags & SIGN else 1 if flags & POSITIVE else 0


_GROUP_CODES = np.array([_group_code(f) for f in range((PIN | POSITIVE | SIGN) + 1)])


def group_codes(flags: IntArray) -> IntArray:
    """:func:`_group_code` of every flag set, by one lookup."""
    out: IntArray = _GROUP_CODES[flags]
    return out
