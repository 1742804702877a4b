"""PSGD-QUAD: a Kronecker-factored whitening preconditioner, written the way ``mlx.optimizers`` are.

A port of ``quad.py`` from evanatyourservice/mlx-grokking (PyTorch, commit 36a93bc), from the
restatement in its spec; the quirks of that reference are kept so that trajectories match it.

The maths lives in pure functions (``initial_scale``, ``momentum_update``, ``precondition``,
``lower_bound_norm``, ``update_dense_side``, ``update_diag_side``, ``quad_iteration``,
``balance_ratio``) that work on a stack of tensors of one layout; :class:`QUAD` adds the momentum's
coefficients, the zero-gradient gating and weight decay. Which shape the preconditioner sees, and
which parameters are stacked and updated together, is decided in :mod:`optimizers.quad_groups`.
"""
import math
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten

from optimizers.quad_groups import Layout, ParameterGroups, Stack, compute_dtype, factor_layout, stream_for

# ---- maths ----------------------------------------------------------------------------------------
# Every function works on a stack of k tensors of one layout, one after the other along the batch
# axis: (k * b, m, n) (dense factors (k * b, d, d), diagonal ones (k * b, d), L (k * b, 1, 1) or
# (k * b, 1)); rank 0/1 tensors are rows of (k, numel) with L (k, 1). A "per-slice" value has one
# entry per leading index, (k * b,) or (k,).


def per_tensor(x: mx.array, ndim: int) -> mx.array:
    """Reshape a per-tensor or per-slice vector to broadcast against an array of rank ``ndim`` whose
    leading axis it indexes."""
    if x.size == 1:  # as a 0-d array, which element-wise kernels take as a scalar (not strided)
        return x.reshape(())
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def initial_scale(g: mx.array, unit_norm: bool = False) -> mx.array:
    """Per tensor ``mean(g**4) ** (-1/16)`` (k,): each of the two factors starts at this multiple
    of the identity, so ``P = s**4 I`` (and ``s**2`` for rank <= 1 tensors, spec Q2). Unless the
    gradients are already normalised (``unit_norm``), it is computed on ``g / max|g|`` so that
    tiny gradients don't underflow ``g**4`` (equal up to rounding). An all-zero gradient gives 1
    instead of the reference's inf (spec Q3)."""
    axes = tuple(range(1, g.ndim))
    if not unit_norm:
        amax = mx.max(mx.abs(g), axis=axes)
        amax = mx.where(amax > 0, amax, 1)
        g = g / per_tensor(amax, g.ndim)
    mean4 = mx.sum(g * g * g * g, axis=axes) / mx.full((), math.prod(g.shape[1:]), g.dtype)
    s = mx.where(mean4 > 0, mx.power(mx.power(mean4, -1 / 8), 1 / 2), 1)
    return s if unit_norm else s * mx.power(amax, -1 / 4)


def momentum_update(M: mx.array, G: mx.array, weight: mx.array, norm: Optional[mx.array] = None) -> mx.array:
    """The momentum ``M + weight * (G / norm - M)`` of a stack (``G`` itself without ``norm``), with
    ``weight`` and ``norm`` per slice (n,) along its leading axis."""
    if norm is not None:
        G = G / per_tensor(norm, G.ndim)
    return M + per_tensor(weight, G.ndim) * (G - M)


def precondition(Q: List[mx.array], diag: Tuple[bool, ...], G: mx.array, scale=None) -> mx.array:
    """``Pg = scale * P_l G P_r`` with ``P = Q Q^T`` (dense; ``Q`` is symmetric) or ``diag(q * q)``,
    evaluated left to right; ``Pg = scale * q * q * G`` for rank <= 1 tensors. ``scale`` (per slice,
    (n,), or None) multiplies the smallest operand: a diagonal factor if there is one, else ``P_l``."""
    if not diag:
        q2 = Q[0] * Q[0]
        return (q2 if scale is None else q2 * expand_per_slice(scale, G.shape[:-1], 1)) * G
    left, right = Q
    batch = G.shape[:-2]
    on_right = scale is not None and diag[1] and not diag[0]
    on_left = scale is not None and not on_right
    if diag[0]:
        p = left * left
        Pg = (p * expand_per_slice(scale, batch, 1) if on_left else p)[..., :, None] * G
    else:
        p = left @ left
        Pg = (p * expand_per_slice(scale, batch, 2) if on_left else p) @ G
    if diag[1]:
        p = right * right
        return Pg * (p * expand_per_slice(scale, batch, 1) if on_right else p)[..., None, :]
    return Pg @ (right @ right)


def row_energies(x: mx.array, ones: Optional[mx.array] = None) -> mx.array:
    """``sum(x**2, axis=-1, keepdims=True)`` as a matrix-vector product, which BLAS runs faster than
    MLX's CPU reduction along the contiguous last axis. ``ones``: the (d, 1) vector of ones, if one
    is at hand."""
    return (x * x) @ (mx.ones((x.shape[-1], 1), x.dtype) if ones is None else ones)


def update_lipschitz(L: mx.array, ell: mx.array, beta: float) -> mx.array:
    """``L <- max(beta * L + (1 - beta) * ell, ell)``: an EMA that never drops below ``ell``."""
    return mx.maximum(beta * L + (1 - beta) * ell, ell)


def lower_bound_norm(T: mx.array, ones: Optional[mx.array] = None) -> mx.array:
    """A lower bound on the spectral norm of each symmetric PSD matrix ``T`` (..., d, d): one
    power-iteration step from the row of largest norm (the first one on ties), ``||T v||`` with
    ``v = T[i*] / ||T[i*]||``. Returns (..., 1, 1); 0 for an all-zero ``T`` (the reference
    divides 0 by 0 there, spec Q3)."""
    r = row_energies(T, ones)                                                # (..., d, 1)
    i = mx.argmax(r, axis=-2, keepdims=True)                                 # (..., 1, 1)
    r_max = mx.take_along_axis(r, i, axis=-2)
    v = mx.take_along_axis(T, i, axis=-2) / mx.sqrt(mx.where(r_max > 0, r_max, 1))  # (..., 1, d)
    return mx.sqrt(mx.sum(mx.square(v @ T), axis=-1, keepdims=True))


def lipschitz_step(L: mx.array, ell: mx.array, precond_lr: float, precond_beta: float, gate=True):
    """On per-slice vectors (n,): the Lipschitz estimate updated by :func:`update_lipschitz` and
    the step size ``a = (precond_lr / 2) / L``; where ``gate`` is False, ``L`` as it was and
    ``a = 0``."""
    L = mx.where(gate, update_lipschitz(L, ell, precond_beta), L)
    return L, mx.where(gate, (precond_lr / 2) / L, 0)


def expand_per_slice(x, batch: Tuple[int, ...], trailing: int):
    """A per-slice vector (n,) reshaped to ``batch + (1,) * trailing`` (a Python scalar as it is).
    The reshape also keeps MLX from fusing the scalar maths that made ``x`` (a division, a select)
    into the element-wise kernel that uses it, where it would be redone for every element."""
    return x.reshape(batch + (1,) * trailing) if isinstance(x, mx.array) else x


def update_diag_side(q: mx.array, L: mx.array, t: mx.array, target: float, precond_lr: float,
                     precond_beta: float, scale=1.0, gate=True) -> Tuple[mx.array, mx.array]:
    """One step of a diagonal factor ``scale * q`` (..., d) towards ``E[t] = target``, where ``t`` are
    the row (left) or column (right) energies of ``Pg``: ``q <- scale * q * gamma**2``,
    ``gamma = 1 - (precond_lr / 2) / L * (t - target)``, with ``L`` (..., 1) from ``max(t) + target``.
    ``scale`` and ``gate`` are per slice (n,) or scalars; where ``gate`` is False (and ``scale``
    1) ``q`` and ``L`` come back exactly as they were."""
    batch = t.shape[:-1]
    ell = mx.max(t, axis=-1).reshape(-1) + target
    L_new, a = lipschitz_step(L.reshape(-1), ell, precond_lr, precond_beta, gate)
    gamma = 1 - expand_per_slice(a, batch, 1) * (t - target)
    return q * (expand_per_slice(scale, batch, 1) * (gamma * gamma)), L_new.reshape(L.shape)


def update_dense_side(Q: mx.array, L: mx.array, T: mx.array, target: float, precond_lr: float,
                      precond_beta: float, scale=1.0, gate=True, eye: Optional[mx.array] = None,
                      ones: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """One step of a dense symmetric factor ``scale * Q`` (..., d, d) towards ``E[T] = target * I``,
    with ``T = Pg Pg^T`` (left) or ``Pg^T Pg`` (right): the two-sided ("quadratic") update
    ``Q <- E Q E``, ``E = I - a (T - target I)``, ``a = (precond_lr / 2) / L``, evaluated as
    ``E = (1 + a target) I - a T``, ``p = (E Q) E``, ``Q <- (p + p^T) / 2`` (the reference's
    ``p = Q - a (T Q - target Q)``, ``p <- p - a (p T - target p)`` up to rounding, with one
    element-wise pass over ``T`` instead of two). A congruence, so ``Q`` stays symmetric positive
    semi-definite for any step size. ``eye`` / ``ones``: the identity (d, d) and the vector of ones
    (d, 1), if they are at hand. ``scale``
    and ``gate`` are per slice (n,) or scalars; where ``gate`` is False (and ``scale`` 1) ``Q``
    and ``L`` come back exactly as they were (``E = I``)."""
    batch = T.shape[:-2]
    L_new, a = lipschitz_step(L.reshape(-1), lower_bound_norm(T, ones).reshape(-1) + target, precond_lr,
                              precond_beta, gate)
    eye = mx.eye(T.shape[-1], dtype=T.dtype) if eye is None else eye
    E = expand_per_slice(1 + a * target, batch, 2) * eye - expand_per_slice(a, batch, 2) * T  # one pass
    p = (E @ Q) @ E
    return (p + p.swapaxes(-1, -2)) * expand_per_slice(scale / 2, batch, 2), L_new.reshape(L.shape)


def quad_iteration(Q: List[mx.array], L: List[mx.array], G: mx.array, diag: Tuple[bool, ...],
                   precond_lr: float, precond_beta: float, scales=(1.0, 1.0), gate=True,
                   numel: int = 1, constants: Optional[dict] = None, scale_pg=None):
    """Precondition ``G`` with the current factors, then update every factor from that same
    ``Pg`` (Jacobi style, spec Q6). Returns ``(Pg, Q, L)``. The targets are ``N / d`` with ``N``
    the size ``numel`` of one whole tensor (batch axis included, spec Q1); 1 for rank <= 1
    tensors.

    The factors stand for ``scales[side] * Q[side]`` (the first update's initial scale and the
    balancing, applied without a pass over ``Q``): ``scale_pg``, the per-slice product of the
    squared scales, must then be given (it multiplies ``Pg``, see :func:`precondition`). Where
    ``gate`` is False (and the scales are 1) the factors and ``L`` are left exactly as they are.
    ``constants``: identities ``("eye", d)`` and vectors of ones ``("ones", d)`` made ahead (else
    made in the graph)."""
    constants = constants or {}
    Pg = precondition(Q, diag, G, scale_pg)
    if not diag:
        q, ell = update_diag_side(Q[0], L[0], Pg * Pg, mx.full((), 1.0, G.dtype), precond_lr, precond_beta,
                                  scales[0], gate)
        return Pg, [q], [ell]
    new_Q, new_L = [], []
    for side, (q, ell, is_diag, scale) in enumerate(zip(Q, L, diag, scales)):
        # As a 0-d array made by an op, not a Python float: MLX inlines scalar literals into its
        # compiled kernels, so every layout would need its own (JIT-compiled) kernels.
        target = mx.full((), numel / G.shape[side - 2], G.dtype)
        if is_diag:
            t = row_energies(Pg, constants.get(("ones", Pg.shape[-1])))[..., 0] if side == 0 \
                else mx.sum(Pg * Pg, axis=-2)                                 # (..., d)
            q, ell = update_diag_side(q, ell, t, target, precond_lr, precond_beta, scale, gate)
        else:
            PgT = Pg.swapaxes(-1, -2)
            T = Pg @ PgT if side == 0 else PgT @ Pg                          # (..., d, d)
            q, ell = update_dense_side(q, ell, T, target, precond_lr, precond_beta, scale, gate,
                                       constants.get(("eye", T.shape[-1])), constants.get(("ones", T.shape[-1])))
        new_Q.append(q)
        new_L.append(ell)
    return Pg, new_Q, new_L


def diagonal(q: mx.array) -> mx.array:
    """The diagonals (..., d) of matrices (..., d, d), as a strided view of the flattened matrices."""
    d = q.shape[-1]
    return q.reshape(q.shape[:-2] + (d * d,))[..., ::d + 1]


def balance_ratio(left: mx.array, right: mx.array, diag: Tuple[bool, bool]) -> mx.array:
    """``rho`` (per slice, the factors' leading shape) such that ``left / rho`` and ``right * rho``
    have equal max-abs entries in each slice (spec Q8, Q19); the Kronecker product, and so the
    preconditioner, is unchanged.
    A dense factor is symmetric positive semi-definite (``s I``, then congruences ``E Q E``), so
    its largest entry lies on the diagonal: only those ``d`` entries are read."""
    def max_abs(q, is_diag):
        return mx.max(mx.abs(q if is_diag else diagonal(q)), axis=-1)
    return mx.sqrt(max_abs(left, diag[0]) / max_abs(right, diag[1]))


# ---- the optimizer -------------------------------------------------------------------------------


class QUAD(Optimizer):
    r"""The PSGD-QUAD optimizer [1, 2].

    Preconditioned SGD with a Kronecker-factored whitening preconditioner fitted by the two-sided
    ("quadratic") update. Each parameter's momentum is merged to :math:`(b, m, n)` and whitened by a
    left factor :math:`Q_l` and a right factor :math:`Q_r`, each dense or diagonal (rank 0/1 tensors
    get one diagonal factor). With :math:`N = bmn`, :math:`\eta` the preconditioner learning rate and
    :math:`\beta_L` the EMA factor of the Lipschitz estimates :math:`L`:

    [1]: Li, X.-L., 2015. Preconditioned stochastic gradient descent. arXiv:1512.04202.

    [2]: ``quad.py`` of `evanatyourservice/mlx-grokking <https://github.com/evanatyourservice/mlx-grokking>`_.

    .. math::

        \hat g_t &= g_t / (\|g_t\|_2 + \epsilon) \text{ if normalize\_grads, else } g_t \\
        m_t &= \beta m_{t-1} + (1 - \beta) \hat g_t, \quad m_1 = \hat g_1 \\
        P_g &= (Q_l Q_l^\top)\, m_t\, (Q_r Q_r^\top) \\
        Q_l &\leftarrow E_l Q_l E_l, \quad
            E_l = I - \frac{\eta}{2 L_l} \left(P_g P_g^\top - \tfrac{N}{m} I\right), \quad
            L_l \leftarrow \max(\beta_L L_l + (1 - \beta_L) \ell_l, \ell_l),
            \ \ell_l \approx \|P_g P_g^\top\|_2 + \tfrac{N}{m} \\
        Q_r &\leftarrow E_r Q_r E_r \text{ likewise with } P_g^\top P_g \text{ and } \tfrac{N}{n} \\
        w_{t+1} &= (1 - \lambda_t w_d)\, w_t - \lambda_t s\, P_g

    A diagonal factor :math:`q` uses the row (column) energies :math:`t` of :math:`P_g`:
    :math:`q \leftarrow q \odot \gamma^2`, :math:`\gamma = 1 - \frac{\eta}{2L}(t - \frac{N}{d})`.
    :math:`P_g` uses the factors from before this step's update. On a tensor's first update the
    factors start at :math:`\operatorname{mean}(\hat g^4)^{-1/16} I` and are fitted
    ``startup_iterations`` times (the output uses the factors after all but the last fit); every
    ``balance_every`` updates the two factors are rescaled to equal max-abs entries.

    Notes:
        * Under ``mx.compile`` the step traces twice: the state holds a ``"startup"`` entry until
          the first update (MLX has no conditional execution, so one graph would run the startup
          fits on every step); balancing is an ``mx.where`` on the step count.
        * A tensor whose gradient is all zero (what MLX gives unused parameters), or that is
          missing from the gradient tree, is left untouched that step: no initialisation,
          momentum, weight decay, update or step count. Initialised by a later first gradient, it
          starts at the scale :math:`\operatorname{mean}(\hat g^2)^{-1/8}` without the startup
          fits. A zero-size parameter has no state and comes back as it is.
        * The state is arrays only: ``state["groups"][name]`` holds the stacked state of the
          parameters of one layout and compute dtype, with their path ids
          (:class:`optimizers.quad_groups.ParameterGroups`); an assigned state is matched to the
          parameters by path. :meth:`parameter_state` gives one parameter's slice.
        * Maths runs in float32, or in float64 (CPU stream) for float64 parameters (then give
          ``learning_rate`` as a float64 array); the result has the parameter's dtype.

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
        update_scale (float, optional): The update is ``learning_rate * update_scale * Pg``
            (:math:`s`); the reference's ``lr / 3``. Default: ``1/3``.
        eps (float, optional): The gradient normalisation's epsilon. Default: ``1e-6``.
        streams (list of streams, optional): Spread the parameter groups over these streams,
            balanced by their estimated work, so that they run concurrently: on a multi-core CPU
            give it one stream per core *and* one BLAS thread per stream (as ``main.Trainer``
            runs), else the streams compete for the BLAS threads. Also settable later as the
            ``streams`` attribute, before the step is traced. Default: ``None`` (the default
            stream).
        quad_iteration (callable, optional): The preconditioner fit, :func:`quad_iteration` or a
            function with its arguments and results (the speed layer's native one). Also settable
            later as the ``quad_iteration`` attribute, before the step is traced. Default:
            :func:`quad_iteration`.
        momentum_update (callable, optional): The momentum step, :func:`momentum_update` or a
            function with its arguments and results; settable like ``quad_iteration``. Default:
            :func:`momentum_update`.
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
        streams: Optional[Sequence[mx.Stream]] = None,
        quad_iteration: Callable = quad_iteration,
        momentum_update: Callable = momentum_update,
    ):
        # Compared as a Python float: a float64 array would be compared on the default device, which
        # may be a GPU (no float64 there).
        if not callable(learning_rate) and not float(learning_rate) >= 0:
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
        self.streams = streams
        self.quad_iteration = quad_iteration
        self.momentum_update = momentum_update
        # Present until the first update; its presence (not its value) selects the traced graph.
        self.state["startup"] = mx.array(True)
        self._groups = ParameterGroups(self._layout)

    @property
    def state(self) -> dict:
        """The optimizer's state dictionary. Assigning one (a checkpoint) matches its rows to the
        parameters by path, as the next update (or :meth:`init`) sees them."""
        return self._state

    @state.setter
    def state(self, state: dict):
        self._groups.adopt(state)
        self._initialized = False
        self._state = state

    def _layout(self, shape) -> Layout:
        return factor_layout(tuple(shape), self.max_size_dense, self.max_skew_dense,
                             self.precondition_largest_two_dims)

    def init_single(self, parameter: mx.array, state: dict):
        """The state of one parameter, a group of one: zero momentum (in the preconditioned layout)
        and step count, unit placeholder factors (``I`` or ``1``) that the first non-zero gradient
        scales, and zero Lipschitz estimates. A zero-size parameter has none."""
        if parameter.size == 0:
            return state
        layout = self._layout(parameter.shape)
        dtype = compute_dtype(parameter.dtype)
        with stream_for(dtype):
            state["step"] = mx.zeros((1,), mx.int32)
            if not layout.diag:
                state["m"] = mx.zeros((1, math.prod(layout.shape)), dtype)
                state["Q"] = [mx.ones((1, math.prod(layout.shape)), dtype)]
                state["L"] = [mx.zeros((1, 1), dtype)]
                return state
            b = layout.shape[0]
            state["m"] = mx.zeros(layout.shape, dtype)
            state["Q"] = [mx.ones((b, d), dtype) if diag else mx.eye(d, dtype=dtype)[None] * mx.ones((b, 1, 1), dtype)
                          for d, diag in zip(layout.shape[1:], layout.diag)]
            state["L"] = [mx.zeros((b, 1) if diag else (b, 1, 1), dtype) for diag in layout.diag]
        return state

    def init(self, parameters: dict):
        """Group the parameters by preconditioned layout and compute dtype, and give every group
        its stacked state under ``state["groups"][name]``: the ``init_single`` states of its
        members, one after the other. Parameters new to a later call are appended to their groups;
        those with rows in an assigned state keep them."""
        self._groups.add(parameters, self.state.setdefault("groups", {}), self.init_single)
        self._initialized = True

    def parameter_state(self, path: str) -> dict:
        """One parameter's slice of its group's state (``path`` as ``tree_flatten`` names it, e.g.
        ``"blocks.0.attn.wq.weight"``): ``step`` (0-d), ``m`` (in the preconditioned layout, (b, m, n)
        or the parameter's shape for rank <= 1), and the lists ``Q`` and ``L`` in the reference's
        layout: (b, d, d) dense, (b, d) diagonal and (b, 1, 1) / (b, 1) for factored tensors; the
        parameter's shape and () otherwise."""
        return self._groups.rows(path, self.state.get("groups", {}))

    def apply_gradients(self, gradients: dict, parameters: dict):
        """Apply the gradients like :meth:`Optimizer.apply_gradients`, but update each group of
        parameters of one layout and compute dtype together, on the group's stacked state. A group
        member without a gradient in ``gradients`` is handled as a zero gradient (untouched)."""
        if not self._initialized or not all(self._groups.knows(path) for path, _ in tree_flatten(gradients)):
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        self.state["step"] = self.step + 1
        # The first update is traced with the startup iterations, later ones without.
        startup = self.state.pop("startup", None) is not None
        return self._groups.apply(gradients, parameters, self.state["groups"], self.streams,
                                  partial(self._update, startup=startup))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """The QUAD update of one parameter whose state is a group of its own (``init_single``).
        The optimizer's step count and startup flag are left to the caller: under mlx's own
        ``Optimizer.apply_gradients``, which never clears the flag, every update is traced with the
        startup fits (which only run on a tensor's first update), and a tensor first updated after
        the optimizer's first step gets the startup fits and scale there, unlike in
        :meth:`apply_gradients`."""
        if parameter.size == 0:
            return parameter
        layout, dtype = self._layout(parameter.shape), compute_dtype(parameter.dtype)
        with stream_for(dtype):
            return self._update(state, layout, dtype, [gradient], [parameter], "startup" in self.state)[0]

    def _update(self, state: dict, layout: Layout, dtype: mx.Dtype, grads: List[Optional[mx.array]],
                params: List[Optional[mx.array]], startup: bool) -> List[Optional[mx.array]]:
        # The update of a stack of k parameters of one group (None: not updated, a zero gradient).
        stack = Stack(layout, params)
        k = len(params)
        G = stack.gradients(grads, dtype, state["m"].shape)
        Pg, active = self._advance(state, G, k, layout, dtype, startup)
        lr = self.learning_rate.astype(dtype)
        on = active.astype(dtype)
        # Per-tensor 0-d scalars, which the element-wise kernel reads as scalars (contiguous).
        decays = [x.reshape(()) for x in mx.split(1 - lr * self.weight_decay * on, k)]  # 1 when inactive
        step_sizes = [x.reshape(()) for x in mx.split(lr * self.update_scale * on, k)]  # 0 when inactive
        results = []
        for parameter, update, decay, step_size in zip(params, stack.updates(Pg, params), decays, step_sizes):
            if parameter is None:
                results.append(None)
                continue
            new = parameter.astype(dtype) * decay - step_size * update
            results.append(new.astype(parameter.dtype))
        return results

    def _advance(self, state: dict, G: mx.array, k: int, layout: Layout, dtype: mx.Dtype,
                 startup: bool) -> Tuple[mx.array, mx.array]:
        # One step of a stack's state (momentum, factors, Lipschitz estimates, step counts; updated in
        # place) from its gradients G: returns the preconditioned momentum Pg and which tensors were
        # active (non-zero gradient), (k,). Per-tensor scalars are (k,) vectors, repeated to one entry
        # per slice.
        factored = bool(layout.diag)
        b = layout.shape[0] if factored else 1
        numel = math.prod(layout.shape)

        def repeat_to_slices(v):  # per tensor (k,) -> per slice (k * b,)
            return v if b == 1 else mx.repeat(v, b)

        M_old, Q_prev, L_prev, steps = state["m"], state["Q"], state["L"], state["step"]
        # ||g||^2 per tensor as a batched BLAS dot; the other per-tensor values from it, on (k,).
        flat = G.reshape(k, 1, numel)
        sq = (flat @ flat.swapaxes(-1, -2)).reshape(k)
        active = sq != 0  # a zero (all-zero) gradient leaves its tensor as it is; NaN propagates
        first = steps == 0
        count = steps + active.astype(steps.dtype)
        norm = mx.sqrt(sq) + self.eps if self.normalize_grads else None
        # The first update starts the momentum at g (its state is still zero then); 0 when inactive.
        weight = mx.where(first, mx.array(1.0, dtype), mx.array(1 - self.momentum, dtype)) * active
        M = self.momentum_update(M_old, G, repeat_to_slices(weight), None if norm is None else repeat_to_slices(norm))

        if startup:
            s = initial_scale(M.reshape(k, numel), self.normalize_grads)      # M = g here
        else:
            # Only tensors whose first non-zero gradient comes after the first update are
            # initialised here: from mean(g**2) ** (-1/8), which needs no extra pass over g.
            mean_sq = (sq if norm is None else sq / (norm * norm)) / mx.full((), numel, dtype)
            s = mx.where(mean_sq > 0, mx.power(mean_sq, -1 / 8), 1)
        # The factors' pending scales: the initial scale s on a tensor's first update (the stored
        # factors are unit placeholders until then) and the balancing, which divides the left factor
        # by rho and multiplies the right one by it.
        scale = repeat_to_slices(mx.where(first & active, s, 1))
        if len(Q_prev) == 2:
            now = repeat_to_slices(active & (count % self.balance_every == 0))
            rho = mx.where(now, balance_ratio(*Q_prev, layout.diag), 1)            # (k * b,)
            scales = [scale / rho, scale * rho]
        else:
            scales = [scale]
        gate = repeat_to_slices(active)

        fit = dict(diag=layout.diag, precond_lr=self.preconditioner_lr, precond_beta=self.precond_beta,
                   numel=numel, constants=self._groups.constants.get(dtype))
        if startup:  # once: apply the scales, then the extra fits of the tensors starting now
            Q = [q * per_tensor(sigma, q.ndim) for q, sigma in zip(Q_prev, scales)]
            L = L_prev
            for _ in range(self.startup_iterations - 1):
                _, Q, L = self.quad_iteration(Q, L, M, gate=repeat_to_slices(first & active), **fit)
            Pg, Q, L = self.quad_iteration(Q, L, M, gate=gate, **fit)
        else:  # each later step: the scales ride on Pg and on the factor updates, not on a pass over Q
            squares = mx.square(scales[0] * scales[1] if len(scales) == 2 else scales[0])
            Pg, Q, L = self.quad_iteration(Q_prev, L_prev, M, scales=scales, gate=gate, scale_pg=squares, **fit)
        state.update(step=count, m=M, Q=Q, L=L)
        return Pg, active
