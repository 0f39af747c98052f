"""Order conditions of explicit Runge-Kutta methods, by rooted trees (Butcher 2016, Sec. 31-32).

A tableau ``(a, b)`` has order ``p`` when ``b . Phi(t) = theta**|t| / gamma(t)`` (``theta = 1`` for the
step's end) for every rooted tree ``t`` with ``|t| <= p``, where ``Phi(t)_i`` multiplies, over the children
``u`` of the root, ``(a Phi(u))_i``. Trees are tuples of their children (a leaf is ``()``), in one canonical
order so that equal trees compare equal. Used when a :class:`~neuralode.tableaus.ButcherTableau` is built,
and by the tests for the embedded and continuous (dense) orders.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def rooted_trees(order: int) -> tuple:
    """The rooted trees with ``order`` nodes (1, 1, 2, 4, 9, 20, 48, 115, 286, ... : OEIS A000081)."""
    if order == 1:
        return ((),)
    found = set()

    def forests(remaining, smallest):
        # multisets of trees whose orders sum to ``remaining``, in non-decreasing canonical order
        if remaining == 0:
            yield ()
            return
        for k in range(1, remaining + 1):
            for tree in rooted_trees(k):
                key = (k, tree)
                if smallest is not None and key < smallest:
                    continue
                for rest in forests(remaining - k, key):
                    yield (tree,) + rest

    for children in forests(order - 1, None):
        found.add(tuple(sorted(children, key=repr)))
    return tuple(sorted(found, key=repr))


def tree_order(tree) -> int:
    return 1 + sum(tree_order(child) for child in tree)


def tree_density(tree) -> int:
    """gamma(t): the tree's order times the densities of its subtrees."""
    density = tree_order(tree)
    for child in tree:
        density *= tree_density(child)
    return density


def _stage_products(a: np.ndarray, tree, cache: dict) -> np.ndarray:
    if tree not in cache:
        product = np.ones(a.shape[0])
        for child in tree:
            product = product * (a @ _stage_products(a, child, cache))
        cache[tree] = product
    return cache[tree]


def satisfied_order(a: np.ndarray, b, max_order: int, theta: float = 1.0, tol: float = 1e-10):
    """``(p, tree)``: the largest ``p <= max_order`` whose conditions all hold for weights ``b`` (at ``theta``),
    and the first tree of order ``p + 1`` that fails (``None`` if all up to ``max_order`` hold).

    ``a`` is the full ``(s, s)`` stage matrix; ``b`` has ``s`` entries.
    """
    b = np.asarray(b, dtype=np.float64)
    cache: dict = {}
    for n in range(1, max_order + 1):
        for tree in rooted_trees(n):
            lhs = float(np.dot(b, _stage_products(a, tree, cache)))
            rhs = theta ** n / tree_density(tree)
            if abs(lhs - rhs) > tol * max(1.0, abs(rhs)):
                return n - 1, tree
    return max_order, None
