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


def stiff_stage_limit(a: np.ndarray) -> np.ndarray:
    """``Y = lim (I - z a)^{-1} 1`` as ``z -> -infinity``: the stage values on ``y' = lambda y``, ``y0 = 1``, in
    the limit ``h lambda -> -infinity``. Zero when ``a`` is invertible; with an explicit first stage (ESDIRK) the
    first entry is 1 and each implicit stage ``i`` solves ``sum_{j <= i} a_ij Y_j = 0`` (forward substitution).
    ``None`` for a singular ``a`` of any other shape."""
    s = a.shape[0]
    if abs(np.linalg.det(a)) > 1e-12:
        return np.zeros(s)
    if not np.allclose(np.triu(a, 1), 0.0):
        return None
    limit = np.zeros(s)
    for i in range(s):
        if a[i, i] != 0:
            limit[i] = -(a[i, :i] @ limit[:i]) / a[i, i]
        elif not np.any(a[i, :i]):
            limit[i] = 1.0          # an explicit stage at y0
        else:
            return None
    return limit


def continuous_extension(a: np.ndarray, b, order: int, end_derivative: int | None = None,
                         tol: float = 1e-10) -> np.ndarray | None:
    """Weights ``b(theta) = sum_{m=1}^{order} B[:, m-1] theta**m`` of a dense output ``y(t0 + theta h) = y0 + h
    sum_i b_i(theta) k_i`` built from the stages alone, or ``None`` where none exists. Shape ``(s, order)``.

    Conditions (linear in ``B``): every rooted tree ``t`` with ``|t| <= order`` holds at every ``theta``
    (``b(theta) . Phi(t) = theta**|t| / gamma(t)``, one equation per power of theta: Hairer, Norsett and Wanner
    I, Sec. II.6, continuous Runge-Kutta methods); ``b(1) = b``; ``b'(1)`` is the unit vector of stage
    ``end_derivative`` when that stage is ``f(t0 + h, y1)`` (a stiffly accurate method's last), so that the output's
    derivative at the step's end is ``f(t1, y1)`` (its derivative at the start is not imposed: kvaerno5's slope
    jumps by about 5e-5 relative across a step boundary, its values are continuous); and ``b(theta) . Y = 0`` for
    the stiff stage limit ``Y`` (:func:`stiff_stage_limit`), so that on ``y' = lambda y`` the output stays bounded as ``h lambda -> -infinity``
    (a cubic Hermite through ``h f(t0, y0)`` grows like ``h lambda`` there). Of the solutions the one of least
    norm (``numpy.linalg.lstsq``); ``None`` if the least-squares residual exceeds ``tol``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    s = len(b)
    rows, values = [], []

    def condition(weights_by_power: np.ndarray, value: float):
        rows.append(weights_by_power.ravel())
        values.append(value)

    cache: dict = {}
    for n in range(1, order + 1):
        for tree in rooted_trees(n):
            products = _stage_products(a, tree, cache)
            for m in range(1, order + 1):
                w = np.zeros((s, order))
                w[:, m - 1] = products
                condition(w, 1.0 / tree_density(tree) if m == n else 0.0)
    for i in range(s):
        w = np.zeros((s, order))
        w[i, :] = 1.0
        condition(w, b[i])
        if end_derivative is not None:
            w = np.zeros((s, order))
            w[i, :] = np.arange(1, order + 1)
            condition(w, float(i == end_derivative))
    limit = stiff_stage_limit(a)
    if limit is None:
        return None
    if np.any(limit):
        for m in range(order):
            w = np.zeros((s, order))
            w[:, m] = limit
            condition(w, 0.0)
    matrix, rhs = np.array(rows), np.array(values)
    solution = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    if np.abs(matrix @ solution - rhs).max() > tol:
        return None
    return solution.reshape(s, order)


def _colourings(tree, colours: int) -> list:
    """Every colouring of ``tree``'s nodes with ``colours`` colours, as ``(colour, (coloured children...))``."""
    children_options = [()]
    for child in tree:
        children_options = [done + (coloured,) for done in children_options for coloured in _colourings(child,
                                                                                                         colours)]
    return [(colour, children) for colour in range(colours) for children in children_options]


def _coloured_products(matrices, coloured, cache: dict) -> np.ndarray:
    if coloured not in cache:
        product = np.ones(matrices[0].shape[0])
        for child in coloured[1]:
            product = product * (matrices[child[0]] @ _coloured_products(matrices, child, cache))
        cache[coloured] = product
    return cache[coloured]


def additive_satisfied_order(matrices, weights, max_order: int, tol: float = 1e-10):
    """``(p, tree)`` as :func:`satisfied_order`, for an additive Runge-Kutta method ``y' = f_1(y) + ... + f_m(y)``
    whose term ``k`` has stage matrix ``matrices[k]`` and weights ``weights[k]`` (Kennedy and Carpenter, Appl. Numer.
    Math. 44 (2003) 139, Sec. 2.1: the conditions over rooted trees whose nodes are coloured by term).

    A coloured tree's condition: ``b^(root's colour) . Phi = 1 / gamma(t)``, where ``Phi`` multiplies over the root's
    children ``u`` the vectors ``a^(u's colour) Phi(u)``. With one colour these are the ordinary conditions; the
    coupling conditions are those that mix colours. ``tree`` is the first failing coloured tree, or ``None``.
    """
    matrices = [np.asarray(m, dtype=np.float64) for m in matrices]
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    cache: dict = {}
    for n in range(1, max_order + 1):
        for tree in rooted_trees(n):
            rhs = 1.0 / tree_density(tree)
            for coloured in _colourings(tree, len(matrices)):
                lhs = float(np.dot(weights[coloured[0]], _coloured_products(matrices, coloured, cache)))
                if abs(lhs - rhs) > tol * max(1.0, abs(rhs)):
                    return n - 1, coloured
    return max_order, None
