"""How :class:`optimizers.quad.QUAD` sees its parameters: layouts, groups and the stacked state.

Everything here works on static shapes and paths, on the host; the maths is in :mod:`optimizers.quad`.

- The layout (``merge_dims_to_three``, ``permutation``, ``factor_layout``): the shape a parameter has
  for the preconditioner and which of its factors are dense or diagonal.
- Groups (:class:`ParameterGroups`): parameters with the same layout and compute dtype are updated
  together, as one stack (:class:`Stack`), with one state whose rows are the members one after the
  other, each known by the CRC-32 of its path (``member_id``), and the groups are spread over streams.
"""
import contextlib
import math
import zlib
from functools import lru_cache
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

# ---- layout: which shape the preconditioner sees ------------------------------------------------


def merge_dims_to_three(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Merge adjacent axes of ``shape`` into at most three, as squarely as possible.

    Rank 0 and 1 stay as they are, rank 2 ``(a, c)`` becomes ``(1, a, c)`` and rank 3 is kept.
    For rank >= 4 every split into three runs of adjacent axes is scored by ``max / min`` and the
    first strictly best one wins (outer loop over the first cut, inner over the second), e.g.
    ``(4, 6, 8, 2) -> (4, 6, 16)`` and ``(2, 3, 4, 5, 6) -> (6, 20, 6)``.
    """
    shape = tuple(shape)
    if len(shape) <= 1 or len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1,) + shape
    best, best_score = None, math.inf
    for i in range(1, len(shape) - 1):
        for j in range(i + 1, len(shape)):
            candidate = (math.prod(shape[:i]), math.prod(shape[i:j]), math.prod(shape[j:]))
            score = max(candidate) / min(candidate) if min(candidate) > 0 else math.inf
            if best is None or score < best_score:
                best, best_score = candidate, score
    return best


def permutation(merged: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """The axis order that sorts a merged 3-D shape ascending (stable), or ``None`` if the first
    (batch) axis is already the smallest. Permuting puts the two largest axes last, where the
    two Kronecker factors act; e.g. ``(16, 4, 8) -> order (1, 2, 0) -> (4, 8, 16)``."""
    if len(merged) != 3:
        return None
    order = tuple(sorted(range(3), key=lambda axis: merged[axis]))
    return None if order[0] == 0 else order


class Layout(NamedTuple):
    """How a parameter is seen by the preconditioner (a function of its static shape only)."""
    merged: Tuple[int, ...]        # merge_dims_to_three(shape)
    order: Optional[Tuple[int, ...]]  # permutation applied after the merge, or None
    shape: Tuple[int, ...]         # the preconditioned shape: () / (n,) / (b, m, n)
    diag: Tuple[bool, ...]         # per factor: diagonal (True) or dense (False); () for rank <= 1


@lru_cache(maxsize=None)
def factor_layout(shape: Tuple[int, ...], max_size_dense: float, max_skew_dense: float,
                  precondition_largest_two_dims: bool) -> Layout:
    """Merge, permute and choose dense or diagonal factors for a parameter of ``shape``.

    A side of size ``d`` of the merged and permuted ``(b, m, n)`` gets a diagonal factor iff
    ``d > max_size_dense`` or ``d**2 > max_skew_dense * b * m * n``; the total size includes the
    batch axis ``b``, as in the reference (spec Q1).
    """
    merged = merge_dims_to_three(shape)
    if len(merged) <= 1:
        return Layout(merged, None, merged, ())
    order = permutation(merged) if precondition_largest_two_dims else None
    pshape = tuple(merged[axis] for axis in order) if order else merged
    numel = math.prod(pshape)
    diag = tuple(d > max_size_dense or d * d > max_skew_dense * numel for d in pshape[1:])
    return Layout(merged, order, pshape, diag)


def to_layout(x: mx.array, layout: Layout) -> mx.array:
    """Reshape (and permute) a parameter-shaped array to the preconditioned shape."""
    x = x if x.shape == layout.merged else x.reshape(layout.merged)
    return x.transpose(layout.order) if layout.order else x


def from_layout(x: mx.array, layout: Layout, shape: Tuple[int, ...]) -> mx.array:
    """Inverse of :func:`to_layout`."""
    if layout.order:
        x = x.transpose([layout.order.index(axis) for axis in range(3)])
    return x if x.shape == tuple(shape) else x.reshape(shape)


def compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """float64 parameters are handled in float64 (CPU stream), everything else in float32."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def stream_for(dtype: mx.Dtype):
    """The CPU stream for float64 (it exists there only), else the stream in use."""
    return mx.stream(mx.cpu) if dtype == mx.float64 else contextlib.nullcontext()


# ---- a group's stack ------------------------------------------------------------------------------


class Stack:
    """The ``k`` members of one group laid one after the other along the leading axis: factored
    tensors as ``(k * b, m, n)``, rank 0/1 tensors as rows ``(k, numel)``. ``params`` gives the
    members' shapes (``None`` for a member that is not updated)."""

    def __init__(self, layout: Layout, params: Sequence[Optional[mx.array]]):
        self.layout = layout
        self.k = len(params)
        self.factored = bool(layout.diag)
        self.row_shape = layout.shape if self.factored else (1, math.prod(layout.shape))
        shapes = {tuple(p.shape) for p in params if p is not None}
        self.shape = next(iter(shapes))
        # Members of one shape that the layout only reshapes (no permutation) are stacked as they
        # are, along their first axis, and the stack reshaped once: no graph node per tensor.
        self.direct = layout.order is None and len(shapes) == 1 and len(self.shape) >= 1

    def _rows(self, g: Optional[mx.array], dtype: mx.Dtype) -> mx.array:
        # A gradient in its group's layout, or in its own shape when ``direct``.
        if self.direct:
            return mx.zeros(self.shape, dtype) if g is None else g.astype(dtype)
        if g is None:
            return mx.zeros(self.row_shape, dtype)
        g = to_layout(g.astype(dtype), self.layout)
        return g if g.shape == self.row_shape else g.reshape(self.row_shape)

    def gradients(self, grads: Sequence[Optional[mx.array]], dtype: mx.Dtype, shape: Tuple[int, ...]) -> mx.array:
        """The members' gradients in ``dtype`` as one array of ``shape`` (the group's momentum's);
        zeros for a missing gradient."""
        G = self._rows(grads[0], dtype) if self.k == 1 else mx.concatenate([self._rows(g, dtype) for g in grads])
        return G if G.shape == shape else G.reshape(shape)

    def updates(self, Pg: mx.array, params: Sequence[Optional[mx.array]]) -> List[Optional[mx.array]]:
        """The stacked update ``Pg`` split into one update per member, in its parameter's shape
        (``None`` where the parameter is)."""
        k, shape = self.k, self.shape
        if self.direct:
            updates = Pg.reshape(shape) if k == 1 else Pg.reshape((k * shape[0],) + shape[1:])
            updates = [updates] if k == 1 else mx.split(updates, k)
        else:
            updates = [Pg] if k == 1 else mx.split(Pg, k)
        results = []
        for parameter, update in zip(params, updates):
            if parameter is not None and not self.direct:
                update = update if self.factored else update.reshape(self.layout.shape)
                update = from_layout(update, self.layout, parameter.shape)
            results.append(None if parameter is None else update)
        return results


# ---- groups ---------------------------------------------------------------------------------------


def group_name(layout: Layout, dtype: mx.Dtype) -> str:
    """The key of a group of parameters updated together: compute dtype, preconditioned shape and
    factor kinds, e.g. ``"float32_1x128x512_dense_diag"`` or ``"float32_128_solo"``."""
    shape = "x".join(map(str, layout.shape)) or "scalar"
    kinds = "_".join("diag" if diag else "dense" for diag in layout.diag) or "solo"
    return f"{str(dtype).split('.')[-1]}_{shape}_{kinds}"


def member_id(path: str) -> int:
    """A parameter's id in its group's state: the CRC-32 of its path (what a saved state keeps of it)."""
    return zlib.crc32(path.encode())


def group_work(shape: Tuple[int, ...], diag: Tuple[bool, ...], k: int) -> int:
    """A rough cost of one step of ``k`` tensors of preconditioned ``shape``: the dense factors'
    matmuls (``3 d^3 + 2 d^2 e`` per slice) plus a few passes over the elements."""
    numel = math.prod(shape)
    work = 10 * numel
    if diag:
        b, m, n = shape
        work += sum(b * (3 * d ** 3 + 2 * d * d * e) for d, e, is_diag in ((m, n, diag[0]), (n, m, diag[1]))
                    if not is_diag)
    return k * work


def as_list(x):
    """A list of a group's factors as it is, or as ``tree_unflatten`` of another tool may give it back:
    a dict keyed ``"0"``, ``"1"``, ..."""
    return [x[key] for key in sorted(x, key=int)] if isinstance(x, dict) else x


class ParameterGroups:
    """Which parameters are updated together, and which rows of their group's state are whose.

    A group's state (``state["groups"][name]``) holds ``step`` and ``member`` (the path ids) with one
    row per member, and ``m``, ``Q``, ``L`` with ``b`` rows per member for a batch of ``b`` slices.
    The host keeps each group's ids in row order; they are read from the arrays only when a state is
    assigned (:meth:`adopt`), never while a step is traced. ``layout_of(shape)`` gives a shape's layout.
    """

    def __init__(self, layout_of: Callable[[Tuple[int, ...]], Layout]):
        self.layout_of = layout_of
        self.members: Dict[str, List[Optional[str]]] = {}  # group name -> paths in row order; None: not seen yet
        self.layouts: Dict[str, Tuple[Layout, mx.Dtype]] = {}  # group name -> (layout, compute dtype)
        # compute dtype -> {("eye", d): the identity, ("ones", d): a (d, 1) vector of ones}, evaluated:
        # constants of the compiled graph rather than nodes made anew every step.
        self.constants: Dict[mx.Dtype, dict] = {}
        self.empty = set()  # paths of zero-size parameters, which have no state
        self._ids: Dict[str, List[int]] = {}  # group name -> member ids in row order
        self._paths: Dict[int, str] = {}  # member id -> path, for every path seen

    def group_of(self, parameter: mx.array) -> Tuple[str, Layout, mx.Dtype]:
        layout, dtype = self.layout_of(parameter.shape), compute_dtype(parameter.dtype)
        return group_name(layout, dtype), layout, dtype

    def knows(self, path: str) -> bool:
        return path in self.empty or any(path in members for members in self.members.values())

    def adopt(self, state: dict):
        """Take the rows of an assigned ``state`` from its member ids. Under ``mx.compile`` an input
        state's arrays have no values yet: the rows are then the ones already known (the state is the
        one this optimizer returned), and a group of another size is an error."""
        groups = state.get("groups", {})
        for group in groups.values():
            for key in ("Q", "L"):
                group[key] = as_list(group[key])
        ids = {}
        for name, group in groups.items():
            try:
                ids[name] = group["member"].tolist()
            except ValueError:  # mlx: "Attempting to eval an array during function transformations"
                if len(self._ids.get(name, ())) != group["member"].shape[0]:
                    raise ValueError(f"QUAD cannot read which parameters the rows of group {name!r} belong "
                                     "to inside a function transformation: assign this state outside "
                                     "mx.compile") from None
                ids[name] = self._ids[name]
        self._ids = ids
        self.members = {name: [self._paths.get(i) for i in ids] for name, ids in self._ids.items()}

    def add(self, parameters: dict, groups: dict, init_single: Callable[[mx.array, dict], dict]):
        """Give every parameter of ``parameters`` a place: rows of its group in ``groups`` if the state
        has none for it yet (``init_single``'s state, appended), else check that it still belongs there."""
        flat = tree_flatten(parameters)
        by_id = {member_id(path): path for path, _ in flat}
        if len(by_id) != len(flat):
            raise ValueError("two parameter paths share a CRC-32; rename one")
        self._paths.update(by_id)
        # Groups the host does not know row by row (a state changed in place rather than assigned) are
        # read here, which only works outside mx.compile.
        self._ids = {name: self._ids[name] if len(self._ids.get(name, ())) == group["member"].shape[0]
                     else group["member"].tolist() for name, group in groups.items()}
        self.members = {name: [self._paths.get(i) for i in ids] for name, ids in self._ids.items()}
        group_of = {path: name for name, members in self.members.items() for path in members if path}
        for path, parameter in flat:
            if parameter.size == 0:
                self.empty.add(path)
                continue
            name, layout, dtype = self.group_of(parameter)
            self.layouts[name] = (layout, dtype)
            constants = self.constants.setdefault(dtype, {})
            for d in layout.shape[1:]:
                if ("eye", d) not in constants:
                    with stream_for(dtype):
                        constants["eye", d], constants["ones", d] = mx.eye(d, dtype=dtype), mx.ones((d, 1), dtype)
                    mx.eval(constants["eye", d], constants["ones", d])
            if path in group_of:
                if group_of[path] != name:
                    raise ValueError(f"parameter {path!r} has state in group {group_of[path]!r}, but its shape "
                                     f"{tuple(parameter.shape)} and dtype {parameter.dtype} give group {name!r}")
                continue
            rows = init_single(parameter, {})
            rows["member"] = mx.array([member_id(path)], mx.uint32)
            with stream_for(dtype):
                groups[name] = rows if name not in groups else tree_map(
                    lambda old, new: mx.concatenate([old, new]), groups[name], rows)
            self._ids.setdefault(name, []).append(member_id(path))
            self.members.setdefault(name, []).append(path)
            group_of[path] = name

    def rows(self, path: str, groups: dict) -> dict:
        """One parameter's slice of its group's state (see ``QUAD.parameter_state``)."""
        if path in self.empty:
            return {}
        for name, members in self.members.items():
            if path in members:
                group, i = groups[name], members.index(path)
                break
        else:
            raise KeyError(f"no optimizer state for parameter {path!r}")
        layout = self.layouts[name][0]
        if layout.diag:
            b = layout.shape[0]

            def row(x):
                return x[i * b:(i + 1) * b]
            return {"step": group["step"][i], "m": row(group["m"]), "Q": [row(q) for q in group["Q"]],
                    "L": [row(ell) for ell in group["L"]]}
        return {"step": group["step"][i], "m": group["m"][i].reshape(layout.shape),
                "Q": [group["Q"][0][i].reshape(layout.shape)], "L": [group["L"][0][i, 0]]}

    def apply(self, gradients: dict, parameters: dict, groups: dict, streams: Optional[Sequence[mx.Stream]],
              update: Callable) -> dict:
        """Update every group that has a member in ``gradients``, as one stack:
        ``update(state, layout, dtype, grads, params)`` returns the members' new parameters, with
        ``None`` in ``grads`` and ``params`` for members not in the tree. The groups are spread over
        ``streams``, the biggest first, each to the least loaded stream. Zero-size parameters come back
        as they are. Returns the new parameters in the tree of ``gradients``."""
        paths = [path for path, _ in tree_flatten(gradients)]
        entries = []

        def collect(gradient, parameter):
            entries.append((gradient, parameter))
            return len(entries) - 1
        index = tree_map(collect, gradients, parameters)
        given = dict(zip(paths, entries))
        updated = {name: [given.get(path) for path in members] for name, members in self.members.items()}
        updated = {name: present for name, present in updated.items() if any(present)}
        work = {name: group_work(self.layouts[name][0].shape, self.layouts[name][0].diag, len(present))
                for name, present in updated.items()}
        streams = list(streams or [None])
        load = [0] * len(streams)
        results = {path: given[path][1] for path in self.empty if path in given}
        for name in sorted(updated, key=lambda name: -work[name]):
            j = load.index(min(load))
            load[j] += work[name]
            present = updated[name]
            layout, dtype = self.layouts[name]
            with mx.stream(streams[j]) if streams[j] is not None else contextlib.nullcontext(), stream_for(dtype):
                new = update(groups[name], layout, dtype, [e and e[0] for e in present], [e and e[1] for e in present])
            results.update((path, p) for path, p in zip(self.members[name], new) if p is not None)
        return tree_map(lambda i: results[paths[i]], index)
