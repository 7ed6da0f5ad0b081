"""Explicit sharding ("sharding in types", JAX's default for ``jax.make_mesh`` since 0.7).

Under ``AxisType.Explicit`` axes every array's type carries its sharding, and operations whose
output sharding is ambiguous (the gather of the target logit, the scatter of its gradient, a
select between a sharded and a replicated operand) raise ``ShardingTypeError``. jxent does not
ask users for ``out_sharding=`` arguments: it reads the shardings off the logits' type and runs
its single-device kernel once per shard inside :func:`jax.shard_map`, with the class axis (if
sharded) handled by the same ``axis_name`` collectives as user-written vocabulary parallelism.
All communication is then explicit and O(batch): a ``pmax``/``psum`` per row, never a gather of
the logits. Auxiliary inputs (labels, targets, masks, class weights) are resharded to match the
logits, which for replicated inputs is a local slice.

With ``AxisType.Auto`` meshes (GSPMD) the types carry no sharding; XLA's propagation
partitions the kernels, and none of this applies.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# How an argument of a sharded kernel is laid out relative to the class-last logits [..., C].
LOGITS = "logits"  # same shape as the logits: sharded like them
BATCH = "batch"  # the logits' shape without the class axis: sharded like their batch axes
CLASSES = "classes"  # [C]: sharded like the class axis
REPLICATED = "replicated"  # scalars and other inputs every shard sees whole


class Plan(NamedTuple):
    """How class-last logits are sharded over explicit mesh axes."""

    mesh: Any  # the AbstractMesh of the logits' type
    batch: tuple[Any, ...]  # PartitionSpec entries of the batch axes
    classes: Any  # the class axis' entry: None, a mesh axis name or a tuple of names

    @property
    def axis_name(self) -> Hashable | None:
        """The ``axis_name`` the kernels use for the class axis (None: not sharded)."""
        if self.classes is None:
            return None
        names = _names(self.classes)
        return names[0] if len(names) == 1 else names

    def spec(self, kind: str | PartitionSpec) -> PartitionSpec:
        if isinstance(kind, PartitionSpec):
            return kind
        if kind == LOGITS:
            return PartitionSpec(*self.batch, self.classes)
        if kind == BATCH:
            return PartitionSpec(*self.batch)
        if kind == CLASSES:
            return PartitionSpec(self.classes)
        return PartitionSpec()

    def mesh_axes(self) -> frozenset[Any]:
        return frozenset(n for entry in (*self.batch, self.classes) for n in _names(entry))

    def batch_axes(self) -> tuple[Any, ...]:
        """The mesh axes the batch is sharded over (psum over them sums over the batch)."""
        return tuple(n for entry in self.batch for n in _names(entry))


def _names(entry: Any) -> tuple[Any, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _explicit_entries(x: jax.Array) -> tuple[Any, tuple[Any, ...]] | None:
    """(mesh, one PartitionSpec entry per dimension) of ``x``'s type, or None when no
    explicit mesh axis shards it (unsharded, Auto axes, or inside a user's shard_map)."""
    sharding: Any = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or x.ndim == 0:
        return None
    entries = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    used = [n for entry in entries for n in _names(entry)]
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if not used or any(axis_types[n] != AxisType.Explicit for n in used):
        return None
    return mesh, entries


def plan(x: jax.Array) -> Plan | None:
    """The explicit sharding of class-last ``x``, or None when no explicit axis shards it."""
    found = _explicit_entries(x)
    if found is None:
        return None
    mesh, entries = found
    return Plan(mesh, entries[:-1], entries[-1])


def matmul_plan(x: jax.Array, w: jax.Array, vocab_axis: int = 1) -> Plan | None:
    """The explicit sharding of the logits ``x @ w`` (``x: [..., D]``, ``w: [D, V]``, or
    ``[V, D]`` with ``vocab_axis=0``): the batch axes are ``x``'s, the class axis ``w``'s.
    The contraction axis ``D`` must not be sharded (that would need a sum of partial logits
    over devices before the softmax)."""
    found_x, found_w = _explicit_entries(x), _explicit_entries(w)
    if found_x is None and found_w is None:
        return None
    mesh = (found_x or found_w)[0]  # type: ignore[index]
    x_entries = (None,) * x.ndim if found_x is None else found_x[1]
    w_entries = (None, None) if found_w is None else found_w[1]
    d_axis = 1 - vocab_axis
    layout = "P(None, vocab_axes)" if vocab_axis == 1 else "P(vocab_axes, None)"
    for name, entry in (
        ("x's last (D) axis", x_entries[-1]),
        (f"w's {('first', 'second')[d_axis]} (D) axis", w_entries[d_axis]),
    ):
        if entry is not None:
            raise ValueError(
                f"{name} is sharded over mesh axes {entry!r}; the fused loss needs the "
                f"contraction dimension D unsharded (x: P(..., None), w: {layout}). "
                f"Reshard x and w, e.g. with jax.sharding.reshard."
            )
    return Plan(mesh, x_entries[:-1], w_entries[vocab_axis])


def check_class_axes_mergeable(x: jax.Array, num_class_axes: int, axes: Any) -> None:
    """Raises when flattening the last ``num_class_axes`` of ``x`` (class axes in the order
    given) would need a gather: under explicit sharding only the major one may be sharded."""
    found = _explicit_entries(x)
    if found is None or num_class_axes < 2:
        return
    entries = found[1][x.ndim - num_class_axes :]
    if any(entry is not None for entry in entries[1:]):
        raise ValueError(
            f"the class axes {axes} are sharded as {entries} (in that order); flattening them "
            f"into one class axis keeps a sharding only when the first of them alone is "
            f"sharded. List the sharded class axis first in `axis`, or reshard the logits."
        )


def per_shard(
    kernel: Callable[..., Any],
    args: Sequence[tuple[Any, str | PartitionSpec]],
    out_kinds: Any,
    axis_name: Hashable | None,
) -> Any:
    """``kernel(*arrays, axis_name)`` on the whole arrays or, when the class-last logits
    (``args[0]``) are sharded over explicit mesh axes, once per shard (see
    :func:`map_shards`), with the class axis' mesh axes as ``axis_name``.

    The kernels' class reductions reshape long rows into blocks, which JAX refuses on a
    class axis sharded in the type; per shard the rows are local arrays, as inside a
    user's ``shard_map``, and only O(batch) collectives cross devices. ``axis_name``: the
    caller's (a user's ``shard_map``, where the logits' type is not explicitly sharded).
    """
    p = plan(args[0][0])
    if p is None:
        return kernel(*(a for a, _ in args), axis_name)
    return map_shards(lambda *a: kernel(*a, p.axis_name), p, args, out_kinds)


def map_shards(
    kernel: Callable[..., Any],
    p: Plan,
    args: Sequence[tuple[Any, str | PartitionSpec]],
    out_kinds: Any,
) -> Any:
    """Runs ``kernel(*arrays)`` once per shard of the logits; ``args`` pairs each argument
    with its kind (see the module constants; ``None`` arguments pass through), ``out_kinds``
    is a pytree of kinds matching the kernel's outputs."""
    present = [i for i, (a, _) in enumerate(args) if a is not None]

    def per_shard(*arrays: Any) -> Any:
        full: list[Any] = [None] * len(args)
        for i, a in zip(present, arrays, strict=True):
            full[i] = a
        return kernel(*full)

    in_specs = tuple(p.spec(args[i][1]) for i in present)
    out_specs = jax.tree.map(p.spec, out_kinds)
    mapped = jax.shard_map(
        per_shard,
        mesh=p.mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        axis_names=p.mesh_axes(),
    )
    arrays = (_reshard(args[i][0], p.mesh, spec) for i, spec in zip(present, in_specs, strict=True))
    return mapped(*arrays)


def _reshard(value: Any, mesh: Any, spec: PartitionSpec) -> Any:
    """``value`` with sharding ``spec``; replicated values become local slices, no copy
    crosses devices unless ``value`` was sharded some other way."""
    value = jax.numpy.asarray(value)
    current = jax.typeof(value).sharding.spec
    if _padded(current, value.ndim) == _padded(spec, value.ndim):
        return value
    return jax.sharding.reshard(value, NamedSharding(mesh, spec))


def _padded(spec: Any, ndim: int) -> tuple[Any, ...]:
    """``spec``'s entries, one per dimension (``None`` for the unnamed trailing ones)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def reshard_like(value: jax.Array, reference: jax.Array) -> jax.Array:
    """``value`` (of ``reference``'s shape) sharded like ``reference`` when that is sharded
    over explicit axes; unchanged otherwise. Elementwise kernels then see one sharding."""
    if getattr(value, "shape", None) != reference.shape or plan(reference) is None:
        return value
    sharding = jax.typeof(reference).sharding
    return _reshard(value, sharding.mesh, sharding.spec)


def sum_to_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` summed over the manual mesh axes it varies over but ``primal`` does not.

    Inside ``shard_map``, a gradient computed from per-shard data (e.g. the class weights'
    gradient from batch-sharded logits) varies over the batch axes while the weights do not;
    the custom_vjp's backward rule must add the shards' contributions, as JAX's own autodiff
    does when it transposes a broadcast to a varying value.
    """
    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal), key=str))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` resharded to ``primal``'s explicit sharding, which a custom_vjp's
    backward rule must return. A small input broadcast against sharded logits (a ``[C]``
    weight against ``[B, C]`` class-sharded ones) has a cotangent summed over the batch and
    so sharded like the classes; a replicated weight's must be replicated (an all-gather of
    ``C`` values, as JAX's own transpose of the broadcast would do)."""
    want: Any = getattr(jax.typeof(primal), "sharding", None)
    mesh = getattr(want, "mesh", None)
    if mesh is None or mesh.empty:  # no explicit mesh in the primal's type: nothing to match
        return cotangent
    return _reshard(cotangent, mesh, want.spec)


def varying_axes(x: Any) -> frozenset[Any]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``).

    Read from the type: ``aval.mat.varying`` in JAX >= 0.10, ``aval.vma`` before.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)
    varying = getattr(manual, "varying", None) or getattr(aval, "vma", None)
    return frozenset(varying or ())


def mesh_platform(*arrays: jax.Array) -> str | None:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of the devices of the meshes the
    arrays are typed on, when there is one and JAX names it; else ``None``."""
    platforms = set()
    for a in arrays:
        mesh = jax.typeof(a).sharding.mesh
        device = None if mesh.empty else getattr(mesh, "abstract_device", None)
        platforms.add(getattr(device, "platform", None))
    return platforms.pop() if len(platforms) == 1 else None
