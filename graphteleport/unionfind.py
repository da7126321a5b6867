"""The one union-find: vectorised, in numpy, with a ±1 exponent per member when asked.

The analysis solves its ties and relations with it (:func:`signed_pairs`,
:func:`union_pairs`), the quiver merges neuron blocks and the torch frontend splits a
module's nodes into its calls with it (:func:`components`).

Every neuron ``n`` (``0 <= n < N``) stands for its cofactor τ_n.  A constraint is
either a *tie* ``τ_a = τ_b`` or a *relation* ``τ_a = 1/τ_b``.  Both become plain
unions on a doubled set of ``2N`` nodes, where node ``n + N`` stands for ``1/τ_n``:

* tie(a, b):     union(a, b)  and union(a + N, b + N)
* relate(a, b):  union(a, b + N) and union(a + N, b)

A class that contains both ``n`` and ``n + N`` satisfies ``τ = 1/τ``, so τ = ±1:
its group is at most the sign group.  Classes come in mirror pairs (C, C̄); one
free cofactor ``t`` per pair gives ``t`` to C and ``1/t`` to C̄.

Unions are done in bulk: each round points every root at the smallest root it
is paired with (``np.minimum.at``) and compresses paths by pointer jumping, until
every pair shares a root.  The work is linear in the number of pairs times a
small number of rounds, all in numpy.
"""

from __future__ import annotations

import numpy as np

IntArray = np.ndarray


def compress(parent: IntArray) -> IntArray:
    """Point every node straight at its root (pointer jumping), in place."""
    while True:
        grand = parent[parent]
        if (grand == parent).all():
            return parent
        parent[:] = grand


def union_pairs(parent: IntArray, a: IntArray, b: IntArray) -> None:
    """Merge the classes of ``a[i]`` and ``b[i]`` for every i, in place; ``parent`` must
    point every node at its root on entry (``np.arange``: all singletons) and does on exit.

    The smaller root always wins, so roots only ever decrease and the loop ends.
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        compress(parent)


def signed_pairs(
    ties: tuple[IntArray, IntArray], relations: tuple[IntArray, IntArray], n: int
) -> tuple[IntArray, IntArray]:
    """The unions on the doubled set of ``2n`` nodes that state ``ties`` (``τ_a = τ_b``
    for each ``a[i], b[i]``) and ``relations`` (``τ_a = 1/τ_b``): see the module docstring."""
    ta, tb = ties
    ra, rb = relations
    a = np.concatenate([ta, ta + n, ra, ra + n])
    b = np.concatenate([tb, tb + n, rb + n, rb])
    return a, b


def components(count: int, a: IntArray, b: IntArray) -> IntArray:
    """Per element ``0 .. count-1``: the smallest element of its class, once ``a[i]`` and
    ``b[i]`` are merged for every i (so classes, sorted by label, come in order of their
    first member)."""
    parent = np.arange(count, dtype=np.int64)
    union_pairs(parent, a, b)
    return parent
