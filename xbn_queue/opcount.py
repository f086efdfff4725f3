"""Count the aten ops and host synchronisations a piece of PyTorch code dispatches.

Every aten op is about one kernel launch on a GPU. Some of them also make the host wait until the
device has caught up (a *host synchronisation*), because the host needs a value the device computes.
:class:`OpCounter` counts as host synchronisations:

* ``aten._local_scalar_dense``: the op behind ``.item()`` / ``int()`` / ``bool()`` / ``float()`` of a
  tensor (and ``if tensor:``);
* ops whose *output size* depends on the data, so the host must read a count before it can allocate:
  ``nonzero`` (``torch.where(mask)``, ``mask.nonzero()``), ``masked_select``, indexing or assigning
  with a boolean mask (``x[mask]``, ``x[mask] = v``: ``aten.index`` / ``aten.index_put_`` with a
  boolean index), ``torch.unique`` / ``unique_consecutive`` (every variant), ``repeat_interleave``
  with tensor repeats and no ``output_size``, ``bincount``;
* ops that return a Python value computed on the device: ``equal``, ``allclose``, ``is_nonzero``;
* the linear-algebra ops PyTorch's documentation says synchronise a CUDA device with the host
  (:data:`LINALG_SYNC_OPS`): ``eigh`` / ``eigvalsh`` (``aten._linalg_eigh``), ``eig`` / ``eigvals``,
  ``svd`` / ``svdvals`` / ``matrix_rank`` / ``cond`` / ``matrix_norm(ord=2)`` (``aten._linalg_svd``),
  ``pinv``, and the error check (``aten._linalg_check_errors``, reading the LAPACK ``info`` on the host)
  behind ``cholesky``, ``inv`` / ``torch.inverse``, ``solve``, ``lu_factor`` and ``ldl_factor``; their
  ``_ex`` variants only with ``check_errors=True`` (the default ``False`` is sync-free);
* device-to-host copies: ``aten._to_copy`` / ``copy_`` from a non-CPU tensor to the CPU (``.cpu()``,
  ``.to("cpu")`` of a GPU tensor), and the tensor methods that name the host, ``.tolist()``,
  ``.numpy()`` and ``.cpu()``. These methods are counted on a CPU tensor too (where they do not reach
  the dispatcher at all), so that code counted on the CPU shows what it would do on a GPU.
  ``.to(device)`` of a CPU tensor is not counted: ``device`` is then usually a variable that stands
  for the device the code runs on (``x.to(memory.device)``), not the host.

Counting works on any device, the CPU included, so a test can show that a step is sync-free without a
GPU::

    from xbn_queue.opcount import OpCounter
    with OpCounter() as c:
        queue.update(z, labels)
    assert c.syncs == 0, c.sync_ops

Not counted (not visible to a dispatch mode, or not a synchronisation by themselves): reading a
tensor's shape, dtype or device (host metadata), ``torch.cuda.synchronize()`` / event waits called
explicitly, and the implicit synchronisation of a pageable host-to-device copy.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OP", "SYNC_OPS", "LINALG_SYNC_OPS", "HOST_READ_METHODS", "OpCounter", "count_ops"]

#: The aten op behind a device-to-host read of a tensor's value.
SYNC_OP = "aten._local_scalar_dense.default"

#: Ops that synchronise whatever their arguments (their output size or a Python result needs device values).
SYNC_OPS = frozenset(
    {
        SYNC_OP,
        "aten.nonzero.default",
        "aten.nonzero.out",
        "aten.masked_select.default",
        "aten.masked_select.out",
        "aten._unique.default",
        "aten._unique2.default",
        "aten.unique_dim.default",
        "aten.unique_consecutive.default",
        "aten.unique_dim_consecutive.default",
        "aten.bincount.default",
        "aten.equal.default",
        "aten.allclose.default",
        "aten.is_nonzero.default",
    }
)

#: Linear-algebra ops that synchronise a CUDA device with the host whatever their arguments (the
#: notes in ``torch.linalg``'s documentation; ``_linalg_check_errors`` is the host read of LAPACK's
#: ``info`` that ``cholesky`` / ``inv`` / ``solve`` / ``lu_factor`` / ``ldl_factor`` dispatch).
LINALG_SYNC_OPS = frozenset(
    {
        "aten._linalg_eigh.default",
        "aten._linalg_eigh.eigenvalues",
        "aten.linalg_eig.default",
        "aten.linalg_eig.out",
        "aten._linalg_svd.default",
        "aten._linalg_svd.U",
        "aten.linalg_pinv.default",
        "aten.linalg_pinv.atol_rtol_tensor",
        "aten.linalg_pinv.atol_rtol_float",
        "aten.linalg_pinv.out",
        "aten._linalg_check_errors.default",
    }
)

#: ``_ex`` linear-algebra ops: a host synchronisation only when called with ``check_errors=True``.
_CHECKED_LINALG_OPS = (
    "aten.linalg_cholesky_ex.",
    "aten.linalg_inv_ex.",
    "aten._linalg_solve_ex.",
    "aten.linalg_solve_ex.",
    "aten.linalg_lu_factor_ex.",
    "aten.linalg_ldl_factor_ex.",
)

#: Tensor methods that hand data to the host; counted as synchronisations on any device.
HOST_READ_METHODS = ("tolist", "numpy", "cpu")

_BOOL_INDEX_OPS = ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default", "aten._index_put_impl_.default")


def _is_sync(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether the aten op ``name`` called with ``args`` / ``kwargs`` makes the host wait for the device."""
    if name in SYNC_OPS or name in LINALG_SYNC_OPS:
        return True
    if name.startswith(_CHECKED_LINALG_OPS):
        return bool(kwargs.get("check_errors", False))
    if name in _BOOL_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "aten.repeat_interleave.Tensor":
        return kwargs.get("output_size") is None
    if name == "aten._to_copy.default":
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu"
    if name == "aten.copy_.default":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name (``ops["aten.add_.Tensor"]``), and the
    host synchronisations among them (``sync_ops``; see the module docstring for what counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Dict[str, int] = collections.Counter()
        self.sync_ops: Dict[str, int] = collections.Counter()
        self._saved: List[Tuple[str, Callable[..., Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if _is_sync(name, args, kwargs):
            self.sync_ops[name] += 1
        return func(*args, **kwargs)

    def _host_read(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if method != "cpu" or tensor.device.type == "cpu":  # a GPU tensor's .cpu() dispatches a counted copy
                self.sync_ops[f"Tensor.{method}"] += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def __enter__(self) -> "OpCounter":
        for method in HOST_READ_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved.append((method, original))
            setattr(torch.Tensor, method, self._host_read(method, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            while self._saved:
                method, original = self._saved.pop()
                setattr(torch.Tensor, method, original)

    @property
    def syncs(self) -> int:
        """Host synchronisations (every kind listed in the module docstring)."""
        return sum(self.sync_ops.values())

    @property
    def total(self) -> int:
        """All aten ops, host synchronisations included (the tensor methods counted in ``sync_ops``
        that dispatch nothing are not ops)."""
        return sum(self.ops.values())


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """Run ``fn()`` under an :class:`OpCounter` and return the counter."""
    counter = OpCounter()
    with counter:
        fn()
    return counter
