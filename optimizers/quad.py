"""PSGD-QUAD: a Kronecker-factored whitening preconditioner, written the way ``mlx.optimizers`` are.

A port of ``quad.py`` from evanatyourservice/mlx-grokking (PyTorch, commit 36a93bc), from the
restatement in its spec; the quirks of that reference are kept so that trajectories match it
(float64: relative error <= 1e-10 of the distance travelled on the grokking shapes).

The maths lives in pure functions (``merge_dims_to_three``, ``permutation``, ``precondition``,
``update_dense_side``, ``update_diag_side``, ``lower_bound_norm``, ``balance``, ``quad_iteration``);
:class:`QUAD` only wires them to the optimizer state.
"""
import contextlib
import math
from functools import lru_cache
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

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

    A side of size ``d`` of the merged ``(b, m, n)`` gets a diagonal factor iff
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
    x = x.reshape(layout.merged)
    return x.transpose(layout.order) if layout.order else x


def from_layout(x: mx.array, layout: Layout, shape: Tuple[int, ...]) -> mx.array:
    """Inverse of :func:`to_layout`."""
    if layout.order:
        x = x.transpose([layout.order.index(axis) for axis in range(3)])
    return x.reshape(shape)


# ---- maths ---------------------------------------------------------------------------------------


def initial_scale(g: mx.array) -> mx.array:
    """``mean(g**4) ** (-1/16)``: each of the two factors starts at this multiple of the identity,
    so ``P = s**4 I`` (and ``s**2`` for rank <= 1 tensors, spec Q2). Computed on ``g / max|g|`` so
    that tiny gradients don't underflow ``g**4`` to 0 (equal up to rounding)."""
    amax = mx.max(mx.abs(g))
    amax = mx.where(amax > 0, amax, 1)
    x = g / amax
    return mx.power(mx.power(mx.mean(x * x * x * x), -1 / 8), 1 / 2) * mx.power(amax, -1 / 4)


def initial_factors(s: mx.array, layout: Layout, dtype: mx.Dtype) -> List[mx.array]:
    """``s * 1`` for diagonal factors (and rank <= 1 tensors), ``s * I`` for dense ones."""
    if not layout.diag:
        return [mx.broadcast_to(s, layout.shape).astype(dtype)]
    b = layout.shape[0]
    factors = []
    for d, diag in zip(layout.shape[1:], layout.diag):
        unit = mx.ones((b, d), dtype) if diag else mx.broadcast_to(mx.eye(d, dtype=dtype), (b, d, d))
        factors.append(s * unit)
    return factors


def lerp(a: mx.array, b: mx.array, weight: float) -> mx.array:
    """``a + weight * (b - a)``, evaluated the way ``torch.lerp`` does for bitwise-close parity."""
    if weight < 0.5:
        return a + weight * (b - a)
    return b - (b - a) * (1 - weight)


def precondition(Q: List[mx.array], diag: Tuple[bool, ...], G: mx.array) -> mx.array:
    """``Pg = P_l G P_r`` with ``P = Q Q^T`` (dense, ``Q`` symmetric) or ``diag(q * q)``,
    evaluated left to right; for rank <= 1 tensors ``Pg = q * q * G``."""
    if not diag:
        return Q[0] * Q[0] * G
    left, right = Q
    Pg = (left * left)[..., :, None] * G if diag[0] else (left @ left) @ G    # (b, m, n)
    return Pg * (right * right)[..., None, :] if diag[1] else Pg @ (right @ right)


def update_lipschitz(L: mx.array, ell: mx.array, beta: float) -> mx.array:
    """``L <- max(beta * L + (1 - beta) * ell, ell)``: an EMA that never drops below ``ell``."""
    return mx.maximum(beta * L + (1 - beta) * ell, ell)


def lower_bound_norm(T: mx.array) -> mx.array:
    """A lower bound on the spectral norm of each symmetric PSD slice of ``T`` (b, d, d): one
    power-iteration step from the row of largest norm (first one on ties), ``||T v||`` with
    ``v = T[i*] / ||T[i*]||``. Returns (b, 1, 1); 0 for an all-zero slice (the reference gives
    0/0 = NaN there, spec Q3)."""
    r = mx.sum(T * T, axis=-1, keepdims=True)                                # (b, d, 1)
    i = mx.argmax(r, axis=-2, keepdims=True)                                 # (b, 1, 1)
    r_max = mx.take_along_axis(r, i, axis=-2)                                # (b, 1, 1)
    row = mx.take_along_axis(T, i, axis=-2)                                  # (b, 1, d)
    v = row / mx.sqrt(mx.where(r_max > 0, r_max, 1))
    return mx.sqrt(mx.sum(mx.square(v @ T), axis=-1, keepdims=True))         # (b, 1, 1)


def update_diag_side(q: mx.array, L: mx.array, t: mx.array, target: float,
                     precond_lr: float, precond_beta: float) -> Tuple[mx.array, mx.array]:
    """One step of a diagonal factor ``q`` (b, d) towards ``E[t] = target``, where ``t`` (b, d)
    are the row (left) or column (right) energies of ``Pg``: ``q <- q * gamma**2`` with
    ``gamma = 1 - (precond_lr / 2) / L * (t - target)`` and ``L`` (b, 1) from ``max(t) + target``."""
    L = update_lipschitz(L, mx.max(t, axis=-1, keepdims=True) + target, precond_beta)
    gamma = 1 - ((precond_lr / 2) / L) * (t - target)
    return q * (gamma * gamma), L


def update_dense_side(Q: mx.array, L: mx.array, T: mx.array, target: float,
                      precond_lr: float, precond_beta: float) -> Tuple[mx.array, mx.array]:
    """One step of a dense symmetric factor ``Q`` (b, d, d) towards ``E[T] = target * I``, with
    ``T = Pg Pg^T`` (left) or ``Pg^T Pg`` (right): the two-sided ("quadratic") update
    ``Q <- E Q E``, ``E = I - a (T - target I)``, ``a = (precond_lr / 2) / L``, evaluated as
    ``p = Q - a (T Q - target Q)``, ``p <- p - a (p T - target p)``, ``Q <- (p + p^T) / 2``."""
    L = update_lipschitz(L, lower_bound_norm(T) + target, precond_beta)
    a = (precond_lr / 2) / L                                                 # (b, 1, 1)
    p = Q - a * (T @ Q - target * Q)
    p = p - a * (p @ T - target * p)
    return (p + p.swapaxes(-1, -2)) / 2, L


def quad_iteration(Q: List[mx.array], L: List[mx.array], G: mx.array, diag: Tuple[bool, ...],
                   precond_lr: float, precond_beta: float):
    """Precondition ``G`` with the current factors, then update every factor from that same
    ``Pg`` (Jacobi style, spec Q6). Returns ``(Pg, Q, L)``."""
    Pg = precondition(Q, diag, G)
    if not diag:  # rank 0 / 1: one diagonal factor, target numel / numel = 1
        q, ell = update_diag_side(Q[0].reshape(1, -1), L[0].reshape(1, 1),
                                  mx.square(Pg).reshape(1, -1), 1.0, precond_lr, precond_beta)
        return Pg, [q.reshape(Q[0].shape)], [ell.reshape(L[0].shape)]
    numel = math.prod(G.shape)
    new_Q, new_L = [], []
    for side, (q, ell, is_diag) in enumerate(zip(Q, L, diag)):
        target = numel / G.shape[side + 1]
        if is_diag:
            t = mx.sum(Pg * Pg, axis=-1 if side == 0 else -2)                # (b, d)
            q, ell = update_diag_side(q, ell, t, target, precond_lr, precond_beta)
        else:
            PgT = Pg.swapaxes(-1, -2)
            T = Pg @ PgT if side == 0 else PgT @ Pg                          # (b, d, d)
            q, ell = update_dense_side(q, ell, T, target, precond_lr, precond_beta)
        new_Q.append(q)
        new_L.append(ell)
    return Pg, new_Q, new_L


def balance(left: mx.array, right: mx.array) -> Tuple[mx.array, mx.array]:
    """Rescale the two factors of each batch slice to equal max-abs entries; their Kronecker
    product (and so the preconditioner) is unchanged, only the factors stay in range."""
    def max_abs(x):
        return mx.max(mx.abs(x).reshape(x.shape[0], -1), axis=-1)            # (b,)
    rho = mx.sqrt(max_abs(left) / max_abs(right))
    return (left / rho.reshape((-1,) + (1,) * (left.ndim - 1)),
            right * rho.reshape((-1,) + (1,) * (right.ndim - 1)))


def compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """float64 parameters are handled in float64 (CPU stream), everything else in float32."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def _stream_for(dtype: mx.Dtype):
    # float64 exists on the CPU stream only.
    return mx.stream(mx.cpu) if dtype == mx.float64 else contextlib.nullcontext()


# ---- the optimizer -------------------------------------------------------------------------------


class QUAD(Optimizer):
    r"""The PSGD-QUAD optimizer.

    Preconditioned SGD (`Xi-Lin Li, Preconditioned Stochastic Gradient Descent
    <https://arxiv.org/abs/1512.04202>`_) with a Kronecker-factored whitening preconditioner
    fitted by the "QUAD" two-sided update, as in ``quad.py`` of
    `evanatyourservice/mlx-grokking <https://github.com/evanatyourservice/mlx-grokking>`_.
    Each parameter's momentum is reshaped to :math:`(b, m, n)` (rank 0/1 tensors get one
    diagonal factor) and whitened by a left factor :math:`Q_l` and a right factor :math:`Q_r`,
    each dense or diagonal; :math:`N = bmn`, :math:`\eta` the preconditioner lr,
    :math:`\beta_L` the Lipschitz EMA:

    .. math::

        m_t &= \beta m_{t-1} + (1 - \beta) \hat g_t, \quad m_1 = \hat g_1,
            \quad \hat g = g / (\|g\|_2 + \epsilon) \text{ if normalize\_grads} \\
        P_g &= (Q_l Q_l^\top)\, m_t\, (Q_r Q_r^\top) \\
        Q_l &\leftarrow E_l Q_l E_l, \quad
            E_l = I - \frac{\eta}{2 L_l} \left(P_g P_g^\top - \tfrac{N}{m} I\right), \quad
            L_l \leftarrow \max(\beta_L L_l + (1 - \beta_L) \ell_l, \ell_l),
            \ \ell_l \approx \|P_g P_g^\top\|_2 + \tfrac{N}{m} \\
        Q_r &\leftarrow E_r Q_r E_r \text{ likewise with } P_g^\top P_g, \tfrac{N}{n} \\
        w_{t+1} &= (1 - \lambda_t w_d)\, w_t - \lambda_t s\, P_g

    A diagonal factor :math:`q` uses the row (column) energies :math:`t` of :math:`P_g`:
    :math:`q \leftarrow q \odot \gamma^2`, :math:`\gamma = 1 - \frac{\eta}{2L}(t - \frac{N}{d})`.
    :math:`P_g` uses the factors from before this step's update. On a tensor's first update
    the factors start at :math:`\operatorname{mean}(\hat g^4)^{-1/16} I` and are fitted
    ``startup_iterations`` times (the output uses the factors after all but the last fit);
    every ``balance_every`` updates the two factors are rescaled to equal max-abs entries.

    Notes:
        * Compilation: the startup iterations run only in the optimizer's first update. The
          state holds a ``"startup"`` entry until then, so a step compiled with
          ``mx.compile(step, inputs=state, outputs=state)`` traces twice in total: once for
          the first step (with the startup iterations) and once for every later step (one
          fit per step). MLX has no conditional execution (``mx.where`` evaluates both
          sides), so a single graph would pay for the startup iterations on every step.
          Balancing is an ``mx.where`` on the per-tensor step count, so it never retraces.
        * Zero gradients: MLX hands unused parameters all-zero gradients where PyTorch gives
          ``None``. A tensor whose gradient is exactly zero is left untouched that step: no
          initialisation, momentum, weight decay, update or step count. A tensor whose first
          non-zero gradient comes after the optimizer's first update is initialised then but
          without the startup iterations.
        * Math runs in float32 for float32/float16/bfloat16 parameters and in float64 (on
          the CPU stream) for float64 ones; the result has the parameter's dtype. For float64
          parity pass ``learning_rate`` as a float64 array (a Python float becomes float32).

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`. Default: ``1e-3``.
        momentum (float, optional): The momentum :math:`\beta`. Default: ``0.95``.
        weight_decay (float, optional): Decoupled weight decay :math:`w_d`, applied to every
            parameter. Default: ``0.1``.
        preconditioner_lr (float, optional): The preconditioner step :math:`\eta`; ``0``
            freezes the factors at their initial scale. Default: ``0.8``.
        max_size_dense (float, optional): Sides longer than this get diagonal factors.
            Default: ``8192``.
        max_skew_dense (float, optional): A side :math:`d` with :math:`d^2 >`
            ``max_skew_dense`` :math:`\cdot N` gets a diagonal factor. Default: ``1.0``.
        precondition_largest_two_dims (bool, optional): Permute the merged 3-D shape so the
            two largest axes are preconditioned. Default: ``True``.
        normalize_grads (bool, optional): Divide each gradient by its L2 norm plus ``eps``.
            Default: ``False``.
        precond_beta (float, optional): EMA factor :math:`\beta_L` of the Lipschitz estimates.
            Default: ``0.95``.
        startup_iterations (int, optional): Preconditioner fits on a tensor's first update.
            Default: ``10``.
        balance_every (int, optional): Balance the two factors every this many updates.
            Default: ``250``.
        update_scale (float, optional): The update is ``learning_rate * update_scale * Pg``;
            the reference's ``lr / 3`` (to match Adam's update norm). Default: ``1/3``.
        eps (float, optional): The gradient normalisation's epsilon. Default: ``1e-6``.
    """

    def __init__(
        self,
        learning_rate: Union[float, Callable[[mx.array], mx.array]] = 1e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        preconditioner_lr: float = 0.8,
        max_size_dense: float = 8192,
        max_skew_dense: float = 1.0,
        precondition_largest_two_dims: bool = True,
        normalize_grads: bool = False,
        precond_beta: float = 0.95,
        startup_iterations: int = 10,
        balance_every: int = 250,
        update_scale: float = 1 / 3,
        eps: float = 1e-6,
    ):
        if not callable(learning_rate) and not learning_rate >= 0:
            raise ValueError(f"learning_rate={learning_rate} must be >= 0")
        for name, value in (("momentum", momentum), ("precond_beta", precond_beta)):
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        for name, value in (("weight_decay", weight_decay), ("preconditioner_lr", preconditioner_lr),
                            ("max_size_dense", max_size_dense), ("max_skew_dense", max_skew_dense),
                            ("update_scale", update_scale), ("eps", eps)):
            if not value >= 0:
                raise ValueError(f"{name}={value} must be >= 0")
        for name, value in (("startup_iterations", startup_iterations), ("balance_every", balance_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value} must be an integer >= 1")
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.preconditioner_lr = preconditioner_lr
        self.max_size_dense = max_size_dense
        self.max_skew_dense = max_skew_dense
        self.precondition_largest_two_dims = precondition_largest_two_dims
        self.normalize_grads = normalize_grads
        self.precond_beta = precond_beta
        self.startup_iterations = startup_iterations
        self.balance_every = balance_every
        self.update_scale = update_scale
        self.eps = eps
        # Present until the first update; its presence (not its value) selects the traced graph.
        self.state["startup"] = mx.array(True)
        self._startup_graph = False

    def _layout(self, shape) -> Layout:
        return factor_layout(tuple(shape), self.max_size_dense, self.max_skew_dense,
                             self.precondition_largest_two_dims)

    def init_single(self, parameter: mx.array, state: dict):
        """Zero momentum and placeholder factors; the first non-zero gradient initialises them."""
        layout = self._layout(parameter.shape)
        dtype = compute_dtype(parameter.dtype)
        with _stream_for(dtype):
            state["step"] = mx.array(0, mx.int32)
            state["m"] = mx.zeros(parameter.shape, dtype)
            if not layout.diag:
                state["Q"] = [mx.zeros(layout.shape, dtype)]
                state["L"] = [mx.zeros((), dtype)]
            else:
                b = layout.shape[0]
                state["Q"] = [mx.zeros((b, d) if diag else (b, d, d), dtype)
                              for d, diag in zip(layout.shape[1:], layout.diag)]
                state["L"] = [mx.zeros((b, 1) if diag else (b, 1, 1), dtype) for diag in layout.diag]

    def apply_gradients(self, gradients: dict, parameters: dict):
        # The first update is traced with the startup iterations, later ones without.
        self._startup_graph = "startup" in self.state
        result = super().apply_gradients(gradients, parameters)
        self.state.pop("startup", None)
        self._startup_graph = False
        return result

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """Performs the QUAD parameter and state update."""
        dtype = compute_dtype(parameter.dtype)
        with _stream_for(dtype):
            return self._update(gradient, parameter, state, self._layout(parameter.shape), dtype)

    def _update(self, gradient, parameter, state, layout, dtype):
        g = gradient.astype(dtype)
        active = mx.any(g != 0)  # all-zero gradient: leave this tensor untouched
        if self.normalize_grads:
            g = g / (mx.sqrt(mx.sum(g * g)) + self.eps)
        count = state["step"]
        first = count == 0
        count = count + active.astype(count.dtype)

        m_prev, Q_prev, L_prev = state["m"], state["Q"], state["L"]
        m = lerp(mx.where(first, g, m_prev), g, 1 - self.momentum)
        G = to_layout(m, layout)
        Q = [mx.where(first, q0, q) for q0, q in zip(initial_factors(initial_scale(g), layout, dtype), Q_prev)]
        L = [mx.where(first, mx.zeros_like(ell), ell) for ell in L_prev]
        if len(Q) == 2:
            balanced = balance(*Q)
            now = active & (count % self.balance_every == 0)
            Q = [mx.where(now, qb, q) for qb, q in zip(balanced, Q)]

        fit = (layout.diag, self.preconditioner_lr, self.precond_beta)
        if self._startup_graph:
            startup = first & active
            for _ in range(self.startup_iterations - 1):
                _, Q_next, L_next = quad_iteration(Q, L, G, *fit)
                Q = [mx.where(startup, new, old) for new, old in zip(Q_next, Q)]
                L = [mx.where(startup, new, old) for new, old in zip(L_next, L)]
        Pg, Q, L = quad_iteration(Q, L, G, *fit)

        lr = self.learning_rate.astype(dtype)
        new = parameter.astype(dtype)
        if self.weight_decay != 0:
            new = new * (1 - lr * self.weight_decay)
        new = new - (lr * self.update_scale) * from_layout(Pg, layout, parameter.shape)

        state["step"] = count
        state["m"] = mx.where(active, m, m_prev)
        state["Q"] = [mx.where(active, new_q, q) for new_q, q in zip(Q, Q_prev)]
        state["L"] = [mx.where(active, new_l, ell) for new_l, ell in zip(L, L_prev)]
        return mx.where(active, new.astype(parameter.dtype), parameter)
