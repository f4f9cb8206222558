"""DTensor logits (tensor parallelism): ``memft_loss`` on the logits of a tensor-parallel lm_head.

With torchtitan-style tensor parallelism the lm_head is a ``ColwiseParallel`` layer with
``use_local_output=False``: its output, the logits, is a ``torch.distributed.tensor.DTensor`` whose
class dimension (the last) is sharded over the TP mesh, ``Shard(-1)``. ``memft_loss`` (and
``MemFTLoss``) hand such logits here (``route``), which unwraps them and runs

* ``vocab_parallel_memft_loss`` on ``logits.to_local()`` over the process group of the one mesh
  dimension that shards the classes (``mesh.get_group(dim)``), with the slice's ``vocab_start``
  from DTensor's sharding rule (``torch.chunk``: uneven splits included); or
* plain ``memft_loss`` on ``logits.to_local()`` when every mesh dimension replicates the logits
  (or the class-sharding mesh dimension has one rank).

Unwrapping with ``to_local()`` is differentiable: the gradient comes back to the logits as a DTensor
with their placements (each rank its slice of the full gradient). The loss is returned as torch's
``loss_parallel()`` returns ``F.cross_entropy``'s: a DTensor on the logits' mesh, ``Replicate()`` on
every mesh dimension (its local value is the full loss, identical on every rank); the statistics
(``return_stats=True``) are plain tensors, identical on every rank (with rows sharded, below, the
per-row fields are DTensors).

Row dimensions sharded (``Shard(d)``, ``d`` < the class dimension, on any number of mesh
dimensions: data / context parallelism, alone or with ``Shard(-1)`` on a TP dimension) go to
``_route_rows``: the row-sharding mesh dimensions act as one data-parallel group (their groups
reduced one after the other: ``dp_group`` is their tuple). Each rank computes its rows with
``memft_loss``'s ``dp_group`` (vocab-parallel with it when the classes are sharded too); "sum" adds
the ranks' shares; "mean" with normalize "active"/"valid" and no denominator divides by the global
weight sum / valid count and decides the fallback on the global sums. The loss is a ``Replicate()`` DTensor whose local value is the global loss (bit-identical on
every rank); its gradient on each rank's local logits is the global loss's for those rows
(``_GlobalTotal``: no collective in the backward). ``reduction="none"`` gives a DTensor sharded like
the rows; the statistics' per-row fields are such DTensors, the 0-d ones global (summed over the row
ranks). A plain ``target`` / ``token_weight`` holds this rank's rows, a DTensor one must be sharded
like the logits' rows. Local input errors and differing options are exchanged in one small
all-reduce per sharding mesh dimension first, so they raise on every rank instead of hanging one.
A ``weight_fn`` failing on some ranks only (they hold different rows) is carried by the loss's
gather and raises on every rank too (``_CaughtWeightFn``).

Anything else (``Partial``, ``_StridedShard``, the classes sharded by two mesh dimensions, a DTensor
``target`` / ``token_weight`` laid out otherwise than the logits' rows, a DTensor ``denominator``
that is not replicated) raises a ValueError at the call, on every rank alike (placements are global
metadata: no rank reaches a collective that another skips). ``Partial`` logits are refused rather
than reduced here: reducing them is a collective over the whole N x V logits, which the caller must
choose explicitly (the message names the ``redistribute`` to pass). ``torch.distributed`` may be
unavailable on some builds: nothing here imports it until a DTensor is seen (a DTensor exists only
once ``torch.distributed.tensor`` is imported). ``torch.compile``: a call that communicates (any
sharded or Partial DTensor, a one-rank class / vocabulary shard excepted) runs eagerly
(``torch.compiler.disable``: one graph break, the eager result); under ``fullgraph=True`` the error
is ``DTENSOR_EAGER``, which names the alternatives. Replicated DTensors trace as plain tensors do.

``memft_linear_loss`` hands a DTensor lm_head weight here (``route_linear``): ``Shard(0)`` on one
mesh dimension (``ColwiseParallel``) runs ``vocab_parallel_memft_linear_loss`` over that dimension's
group on the local rows; a replicated weight, plain ``memft_linear_loss`` on every rank. A DTensor
``hidden`` with row-sharded placements (``_route_linear_rows``) is gathered on the weight's
vocabulary-sharding mesh dimension (sequence parallelism) and is data parallel on the others, as
row-sharded logits are (``_rows_result``, shared with ``_route_rows``). A ``Partial()`` hidden (a
RowwiseParallel output) or one sharded on its features (``Shard(-1)``: a ColwiseParallel output) is
first redistributed to ``Replicate()`` on those mesh dimensions only (``_hidden_values``: an
all-reduce / all-gather of [N, D], small next to the N x V logits), then takes the routes above.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Tuple

import torch

from .spec import LossOptions


def _dtensor_module():
    """``torch.distributed.tensor`` if something imported it already, else None (then no DTensor
    can exist, and nothing is imported here)."""
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor; never imports torch.distributed (cheap for plain tensors)."""
    if type(x) is torch.Tensor or not isinstance(x, torch.Tensor):
        return False
    mod = _dtensor_module()
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(x, cls)


def _describe(t) -> str:
    return f"placements {tuple(t.placements)} on a mesh of shape {tuple(t.device_mesh.shape)}"


def _replicated_local(name: str, t, where: str):
    """A DTensor argument besides the logits must be replicated: its local tensor is then the whole
    tensor. Plain tensors (and None, numbers) pass unchanged."""
    if not is_dtensor(t):
        return t
    mod = _dtensor_module()
    if all(isinstance(p, mod.Replicate) for p in t.placements):
        return t.to_local()
    raise ValueError(
        f"{where}: {name} is a DTensor with {_describe(t)}; it must be the whole tensor on every rank: "
        f"a DTensor with Replicate() on every mesh dimension, or a plain tensor. Pass {name}.full_tensor() "
        f"or {name}.redistribute({name}.device_mesh, [Replicate()] * {t.device_mesh.ndim})"
    )


def _is_plain_shard(p, mod) -> bool:
    return isinstance(p, mod.Shard) and type(p).__name__ != "_StridedShard"


def logits_sharding(logits, where: str = "memft_loss") -> Tuple[Optional[int], Tuple[int, ...]]:
    """How DTensor ``logits`` are laid out: (the mesh dimension whose placement shards the class
    dimension, the last, or None; the mesh dimensions whose placement shards a row dimension, in
    mesh order). ValueError for any other layout, naming the placements and what to pass instead."""
    mod = _dtensor_module()
    class_dim = logits.ndim - 1
    placements = tuple(logits.placements)
    fix = (
        f"Pass Shard({class_dim}) on at most one mesh dimension, Shard(d) on row dimensions d < {class_dim} "
        f"and Replicate() elsewhere (logits.redistribute(logits.device_mesh, placements)), or the whole logits "
        f"(logits.full_tensor())"
    )
    shard_dims, row_dims = [], []
    for i, p in enumerate(placements):
        if isinstance(p, mod.Replicate):
            continue
        if _is_plain_shard(p, mod):
            (shard_dims if p.dim % max(logits.ndim, 1) == class_dim else row_dims).append(i)
            continue
        if isinstance(p, mod.Partial):
            raise ValueError(_partial_logits_message(logits, i, p, class_dim, where))
        else:
            why = (f"mesh dimension {i} has placement {p}, which is neither Replicate() nor a plain Shard(d) "
                   f"(the classes d = {class_dim}, or a row dimension)")
        raise ValueError(f"{where}: DTensor logits of shape {tuple(logits.shape)} with {_describe(logits)} are "
                         f"not supported: {why}. {fix}")
    if len(shard_dims) > 1:
        raise ValueError(
            f"{where}: DTensor logits of shape {tuple(logits.shape)} with {_describe(logits)} shard the class "
            f"dimension over {len(shard_dims)} mesh dimensions {shard_dims}; at most one may. {fix}"
        )
    return (shard_dims[0] if shard_dims else None), tuple(row_dims)


def _partial_logits_message(logits, mesh_dim: int, p, class_dim: int, where: str) -> str:
    """Why ``Partial`` logits are refused, and the explicit redistribution to pass instead (the
    classes sharded on ``mesh_dim``, or replicated there when another mesh dimension shards them)."""
    mod = _dtensor_module()
    taken = any(_is_plain_shard(q, mod) and q.dim % logits.ndim == class_dim
                for j, q in enumerate(logits.placements) if j != mesh_dim)
    want = [(("Replicate()" if taken else f"Shard({class_dim})") if j == mesh_dim else
             "Replicate()" if isinstance(q, mod.Partial) else repr(q)) for j, q in enumerate(logits.placements)]
    return (f"{where}: DTensor logits of shape {tuple(logits.shape)} with {_describe(logits)} are not supported: "
            f"mesh dimension {mesh_dim} is {p}, a pending reduction (e.g. a RowwiseParallel lm_head's output with "
            f"use_local_output=False), not values. {where} does not reduce them itself: that is a collective over "
            f"the whole N x V logits (a reduce-scatter, or an all-reduce), the traffic a vocab-parallel loss exists "
            f"to avoid. Produce class-sharded logits instead (a ColwiseParallel lm_head with use_local_output=False: "
            f"Shard(-1), no reduction), or reduce them explicitly if that cost is acceptable: "
            f"logits.redistribute(logits.device_mesh, [{', '.join(want)}])"
            + (" (a reduce-scatter of N x V)" if not taken else " (an all-reduce of N x V)"))


def _vocab_start(logits, mesh_dim: int, dim: int = -1, what: str = "logits", where: str = "memft_loss") -> int:
    """Where this rank's slice of tensor dimension ``dim`` (the classes) starts: DTensor's Shard rule
    is torch.chunk's (chunks of ceil(V / n), the last ones shorter or empty). Checked against the
    local width."""
    mesh = logits.device_mesh
    v = logits.shape[dim]
    n = mesh.size(mesh_dim)
    r = mesh.get_local_rank(mesh_dim)
    chunk = -(-v // n)
    start = min(r * chunk, v)
    empty = [i for i in range(n) if min(chunk, v - min(i * chunk, v)) <= 0]
    if empty:  # the same on every rank: V, n and the rule are global
        raise ValueError(
            f"{where}: DTensor {what} with V={v} classes sharded over {n} ranks ({_describe(logits)}) leave "
            f"positions {empty} of that mesh dimension without a class (torch.chunk's rule); every rank must hold "
            f"at least one: pass {what}.full_tensor() or a Replicate() layout"
        )
    local = logits.to_local().shape[dim]
    if local != min(chunk, v - start):
        raise ValueError(
            f"{where}: DTensor {what} with {_describe(logits)}: this rank holds {local} classes, but "
            f"torch.chunk's rule gives {min(chunk, v - start)} at position {r} of {n}; pass {what}.full_tensor()"
        )
    return start


# torch.compile: a DTensor call that communicates runs eagerly, at one graph break (the eager result);
# under fullgraph=True that is an error, and this reason is its message.
DTENSOR_EAGER = ("memft_loss / MemFTLoss / memft_linear_loss with sharded (or Partial) DTensor inputs run eagerly: "
                 "their layout and input checks are exchanged between the mesh's ranks and read on the host each "
                 "call, which torch.compile(fullgraph=True) cannot trace. Compile without fullgraph=True (the DTensor "
                 "call then runs eagerly at one graph break, with the same result; the rest of the function is "
                 "compiled), or call the loss outside the fullgraph-compiled function")


def _local_only(t, free_dim: Optional[int] = None) -> bool:
    """Whether ``t`` (a DTensor, a plain tensor, a number or None) is used without any collective:
    not a DTensor, or Replicate() on every mesh dimension, or Shard(free_dim) on a mesh dimension of
    one rank (the local tensor is then the whole)."""
    if not is_dtensor(t):
        return True
    mod = _dtensor_module()
    for i, p in enumerate(t.placements):
        if isinstance(p, mod.Replicate):
            continue
        if (free_dim is not None and _is_plain_shard(p, mod) and p.dim % t.ndim == free_dim % t.ndim
                and t.device_mesh.size(i) == 1):
            continue
        return False
    return True


def route(logits, target, token_weight, options: LossOptions):
    """``_route``; eagerly (``_route_eager``: one graph break under torch.compile, an error naming the
    alternatives under fullgraph=True) when the call communicates. Replicated DTensors and class
    shards on a one-rank mesh dimension stay traceable (plain ``memft_loss`` on the local tensor)."""
    if _local_only(logits, -1) and all(_local_only(t) for t in (target, token_weight, options.denominator)):
        return _route(logits, target, token_weight, options)
    return _route_eager(logits, target, token_weight, options)


def _route(logits, target, token_weight, options: LossOptions):
    """``memft_loss`` of DTensor ``logits`` (see the module docstring): checks the layout, unwraps,
    computes on the local tensor (vocab-parallel over the class-sharding mesh dimension's group
    when there is one; with row-sharding mesh dimensions, ``_route_rows``), and returns the loss as
    a Replicate DTensor (statistics as plain tensors)."""
    from .loss import memft_loss_with

    where = "memft_loss"
    mesh_dim, row_dims = logits_sharding(logits, where)
    if row_dims:
        return _route_rows(logits, target, token_weight, options, mesh_dim, row_dims, where)
    target = _replicated_local("target", target, where)
    token_weight = _replicated_local("token_weight", token_weight, where)
    denominator = _replicated_local("denominator", options.denominator, where)
    if denominator is not options.denominator:
        options = dataclasses.replace(options, denominator=denominator)
    mesh = logits.device_mesh
    local = logits.to_local()  # differentiable: the gradient returns as a DTensor with the logits' placements
    if mesh_dim is None or mesh.size(mesh_dim) == 1:
        out = memft_loss_with(local, target, token_weight, options)
    else:
        from .distributed import vocab_parallel_memft_loss

        out = vocab_parallel_memft_loss(local, target, group=mesh.get_group(mesh_dim),
                                        vocab_start=_vocab_start(logits, mesh_dim), token_weight=token_weight,
                                        **_option_kwargs(options))
    loss, stats = out if options.return_stats else (out, None)
    from torch.distributed.tensor import DTensor, Replicate

    loss = DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return (loss, stats) if options.return_stats else loss


def _option_kwargs(options: LossOptions, **override) -> dict:
    """``options`` as keyword arguments (no deep copies), with ``override`` replacing fields."""
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    kwargs.update(override)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Row-sharded logits (data / context parallel mesh dimensions)
# ---------------------------------------------------------------------------------------------


def _row_placements(logits, row_dims) -> tuple:
    """The placements of per-row tensors next to ``logits``: the logits' Shard(d) on the row-sharding
    mesh dimensions, Replicate() on every other (the class-sharding one included)."""
    from torch.distributed.tensor import Replicate, Shard

    return tuple(Shard(p.dim % logits.ndim) if i in row_dims else Replicate() for i, p in enumerate(logits.placements))


def _row_local(name: str, t, logits, row_placements: tuple, where: str):
    """``target`` / ``token_weight`` next to row-sharded logits: a DTensor must have the logits' mesh,
    their leading shape and the row placements (``_row_placements``); its local tensor is returned.
    A plain tensor is taken as this rank's rows (its shape is checked with the local checks)."""
    if not is_dtensor(t):
        return t
    mod = _dtensor_module()
    lead = tuple(logits.shape[:-1])

    def same(a, b):
        if isinstance(a, mod.Replicate) or isinstance(b, mod.Replicate):
            return isinstance(a, mod.Replicate) and isinstance(b, mod.Replicate)
        return _is_plain_shard(a, mod) and _is_plain_shard(b, mod) and a.dim % max(len(lead), 1) == b.dim
    ok = (t.device_mesh == logits.device_mesh and tuple(t.shape) == lead and len(t.placements) == len(row_placements)
          and all(same(a, b) for a, b in zip(t.placements, row_placements)))
    if not ok:
        raise ValueError(
            f"{where}: the logits are sharded on their rows ({_describe(logits)}), so {name} must be sharded the same "
            f"way: a DTensor of shape {lead} on the logits' mesh with placements {row_placements}, or a plain tensor "
            f"holding this rank's rows (shape logits.to_local().shape[:-1]); got a DTensor of shape "
            f"{tuple(t.shape)} with {_describe(t)}. Pass "
            f"{name}.redistribute(logits.device_mesh, {list(row_placements)})"
        )
    return t.to_local()


def _local_checks(local, target, token_weight, options: LossOptions, num_classes: int, where: str) -> None:
    """This rank's input checks (memft_loss's, the target range against the global V): run before
    the check exchange, which carries a failure to every rank."""
    lead = tuple(local.shape[:-1])
    _check_plain_rows(lead, target, token_weight, lambda name, got: (
        f"{where}: with row-sharded DTensor logits a plain {name} holds this rank's rows: its shape must be "
        f"logits.to_local().shape[:-1] = {lead} on this rank, got {got} (the whole tensor? pass "
        f"this rank's rows, or a DTensor sharded like the logits' rows)"))
    _check_tensors_and_range(local, target, token_weight, options, num_classes)


def _check_plain_rows(lead, target, token_weight, message) -> None:
    """A plain (non-DTensor) target or token_weight must hold this rank's rows, shape ``lead``;
    ``message(name, got_shape)`` says what was expected."""
    for name, t in (("target", target), ("token_weight", token_weight)):
        if isinstance(t, torch.Tensor) and tuple(t.shape) != lead:
            raise ValueError(message(name, tuple(t.shape)))


def _check_tensors_and_range(logits_like, target, token_weight, options: LossOptions, num_classes: int) -> None:
    """memft_loss's checks of the options and tensors, and (with ``validate``) the target range
    against the global ``num_classes``."""
    from .spec import check_target_range, validate_tensors

    checked = options.checked()
    validate_tensors(logits_like, target, token_weight, check_values=options.validate)
    if options.validate:
        check_target_range(target, num_classes, checked.kernel.ignore_index)


def _options_record(options: LossOptions, has_weight: bool, device) -> torch.Tensor:
    """int64 [5]: 0 (the error flag), a checksum of the options and minus it, the bits of a tensor
    denominator's value and minus them. After a MAX all-reduce, the options agree on every rank iff
    record[1] == -record[2] and record[3] == -record[4]."""
    from .distributed import _crc

    def plain(v):
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__

    crc = _crc(tuple((f.name, plain(getattr(options, f.name))) for f in dataclasses.fields(options)) + (has_weight,))
    record = torch.tensor([0, crc, -crc, 0, 0], dtype=torch.int64)
    d = options.denominator
    if isinstance(d, torch.Tensor):
        bits = d.detach().to(torch.float64).reshape(()).view(torch.int64).cpu()
        record[3], record[4] = bits, -bits
    return record.to(device)


def _rows_record(options: LossOptions, target, token_weight, same_rows_group, device) -> torch.Tensor:
    """int64 [7]: ``_options_record``'s five, then (when ``same_rows_group`` is given: ranks that
    compute the same rows, e.g. the class- or vocabulary-sharding mesh dimension) a checksum of this
    rank's target / token_weight and minus it; zeros otherwise."""
    record = torch.cat([_options_record(options, token_weight is not None, device),
                        torch.zeros(2, dtype=torch.int64, device=device)])
    if same_rows_group is not None:
        from .distributed import _PRIME, _checksum

        crc = _checksum(target)
        if token_weight is not None:
            crc = (crc * 31 + _checksum(token_weight.detach().to(torch.float32).contiguous().view(torch.int32)))
        record[5] = crc % _PRIME
        record[6] = -record[5]
    return record


def _rows_check_exchange(row_groups, same_rows_group, record: torch.Tensor, own_error, where: str, whose: str) -> None:
    """The check exchange of the row-sharded routes (``_route_rows``, ``_route_linear_rows``):
    ``record`` from ``_rows_record`` (or ``[1, 0, ...]`` on a rank whose local checks failed). A MAX
    all-reduce over ``same_rows_group`` first, whose ranks compute the same rows: there the target
    checksums must agree (a rank of one such group whose target differs would otherwise raise inside
    the vocab-parallel loss while its data-parallel peers wait); then over each row group (where the
    rows differ: the checksum is cleared first). Every rank reads the same result and raises alike
    (a failed rank its own error). ``whose``: the sharded tensor, for the messages."""
    import torch.distributed as dist

    from .distributed import _comm_device

    device = record.device
    record = record.to(_comm_device((row_groups + [same_rows_group])[0] if row_groups else same_rows_group, device))
    if same_rows_group is not None:
        dist.all_reduce(record, op=dist.ReduceOp.MAX, group=same_rows_group)
        differs = ((record[0] == 0) & (record[5] != -record[6])).to(torch.int64) * 2  # a failed rank has none
        record[0] = torch.maximum(record[0], differs)
        record[5:] = 0
    for g in row_groups:
        dist.all_reduce(record, op=dist.ReduceOp.MAX, group=g)
    err, crc_max, crc_neg, den_max, den_neg = record[:5].tolist()
    if err and own_error is not None:
        raise own_error
    if err == 1:
        raise ValueError(f"{where}: another rank of {whose} mesh failed its input checks (it raises its own "
                         f"error); no rank computed the loss")
    if err:
        raise ValueError(f"{where}: target (or token_weight) differs between ranks of the mesh dimension that shards "
                         f"the classes (on this rank's group or another's); those ranks compute the same rows, so "
                         f"each must pass the same values")
    if crc_max != -crc_neg or den_max != -den_neg:
        raise ValueError(f"{where}: the options (or a tensor denominator's value) differ between the ranks of "
                         f"{whose} mesh; every rank must pass the same options")


class _GlobalTotal(torch.autograd.Function):
    """Forward: ``total``, the sum of every row rank's share (the same bits on every rank). Backward:
    the upstream gradient to this rank's own ``share``, the one term of the total that depends on
    this rank's logits (the other shares' gradients reach their own ranks), so the local gradient is
    exactly the global loss's, with no collective in the backward."""

    @staticmethod
    def forward(ctx, share, total):
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over(groups, values: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` summed over the product of ``groups``: an all_gather over each group in
    turn, added in group-rank order (the same bits on every rank, whatever the backend)."""
    import torch.distributed as dist

    from .distributed import _comm_device

    device = values.device
    values = values.to(_comm_device(groups[0], device))
    for g in groups:
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size(g))]
        dist.all_gather(gathered, values, group=g)
        total = gathered[0].clone()
        for part in gathered[1:]:
            total = total + part
        values = total
    return values.to(device)


class _CaughtWeightFn:
    """A ``weight_fn`` next to row-sharded logits. The ranks hold different rows, so the function (or
    the check of its result) may fail on some ranks only, between the loss's collectives: the error
    is kept and a neutral factor (ones) returned, so that every rank reaches the remaining
    collectives; ``_route_rows`` then raises it on every rank after its gather."""

    def __init__(self, weight_fn, validate: bool):
        self.weight_fn, self.validate, self.error = weight_fn, validate, None
        self.__qualname__ = getattr(weight_fn, "__qualname__", None) or type(weight_fn).__qualname__

    def __call__(self, target, stats):
        from .policy import weight_fn_factor

        try:
            return weight_fn_factor(self.weight_fn, target, stats, check_values=self.validate).reshape(target.shape)
        except Exception as exc:  # noqa: BLE001 - raised on every rank after the gather
            self.error = exc
            return torch.ones(target.shape, dtype=stats.prob.dtype, device=target.device)


def _route_rows(logits, target, token_weight, options: LossOptions, class_dim: Optional[int], row_dims, where: str):
    """``memft_loss`` of DTensor logits whose rows are sharded over the mesh dimensions ``row_dims``
    (data / context parallelism), and whose classes are sharded over ``class_dim`` or replicated.

    The row-sharding mesh dimensions act as one data-parallel group (their process groups, reduced
    one after the other). Each rank computes its own rows (vocab-parallel over the class group when
    the classes are sharded); "mean" with normalize "active"/"valid" and no denominator divides by
    the global weight sum / valid count and decides the fallback on the global sums (dp_group);
    "sum" and "mean" add the ranks' shares. The loss is a Replicate() DTensor whose local value is
    the global loss on every rank; its gradient reaches each rank's local logits as the global
    loss's gradient for those rows (``_GlobalTotal``). "none": the per-row losses, a DTensor sharded
    like the logits' rows. Statistics: per-row fields are DTensors sharded like the rows, the 0-d
    ones global (counts summed over the row ranks)."""
    from .loss import memft_loss_with

    mesh = logits.device_mesh
    row_placements = _row_placements(logits, row_dims)
    if options.dp_group is not None:
        raise ValueError(f"{where}: the logits' rows are sharded ({_describe(logits)}): their data-parallel group is "
                         f"the row-sharding mesh dimensions' (mesh dimensions {list(row_dims)}); pass dp_group=None")
    # Global metadata first (the same on every rank: they raise alike, before any collective).
    target = _row_local("target", target, logits, row_placements, where)
    token_weight = _row_local("token_weight", token_weight, logits, row_placements, where)
    denominator = _replicated_local("denominator", options.denominator, where)
    if denominator is not options.denominator:
        options = dataclasses.replace(options, denominator=denominator)
    vocab_start = _vocab_start(logits, class_dim) if class_dim is not None else 0
    class_group = mesh.get_group(class_dim) if class_dim is not None and mesh.size(class_dim) > 1 else None
    row_groups = [mesh.get_group(i) for i in row_dims]
    local = logits.to_local()  # differentiable: the gradient returns as a DTensor with the logits' placements
    device = local.device

    # Local checks, then one exchange over every group this call uses: a bad input on any rank
    # raises on all of them before a collective whose peers could be missing.
    own_error = None
    try:
        _local_checks(local, target, token_weight, options, logits.shape[-1], where)
        record = _rows_record(options, target, token_weight, class_group, device)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks
        own_error = exc
        record = torch.tensor([1, 0, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)
    _rows_check_exchange(row_groups, class_group, record, own_error, where, "the logits'")

    dp_group = tuple(row_groups) if len(row_groups) > 1 else row_groups[0]
    caught = None
    if options.weight_fn is not None:  # its failure on some ranks only is raised on all (below)
        caught = _CaughtWeightFn(options.weight_fn, options.validate)
        options = dataclasses.replace(options, weight_fn=caught)
    if class_group is not None:
        from .distributed import vocab_parallel_memft_loss

        out = vocab_parallel_memft_loss(local, target, group=class_group, vocab_start=vocab_start,
                                        token_weight=token_weight, **_option_kwargs(options, dp_group=dp_group))
    else:  # memft_loss's dp_group (used by "mean" with normalize "active"/"valid" and no denominator only)
        out = memft_loss_with(local, target, token_weight, dataclasses.replace(options, dp_group=dp_group))
    loss, stats = out if options.return_stats else (out, None)

    return _rows_result(loss, stats, target, options, caught, mesh, row_placements, tuple(logits.shape[:-1]),
                        row_groups, device, where, "the logits'")


def _rows_result(loss, stats, target, options: LossOptions, caught, mesh, row_placements: tuple, lead: tuple,
                 row_groups, device, where: str, whose: str):
    """The end of a row-sharded call (``_route_rows``, ``_route_linear_rows``): this rank's ``loss``
    (its share of the global loss, or per-row values for "none") and ``stats`` over its own rows
    (``target``: those rows' targets) become the global result. One gather over ``row_groups`` of
    the share, the 0-d counts and whether ``caught`` (a ``_CaughtWeightFn`` or None) failed; the
    loss a Replicate() DTensor whose local gradient is exact (``_GlobalTotal``), "none" a DTensor
    with ``row_placements`` of global shape ``lead``; statistics: per-row DTensors like the rows,
    0-d fields global. ``whose`` names the sharded tensor in the weight_fn message."""
    from torch.distributed.tensor import DTensor, Replicate

    stride = tuple(torch.empty(lead, device="meta").stride())

    def rows(t):  # this rank's per-row tensor -> a DTensor sharded like the rows
        return DTensor.from_local(t, mesh, row_placements, run_check=False, shape=lead, stride=stride)

    # One gather of the loss share and the summary counts over the row groups (none for "none"
    # without statistics). Every rank's share is of the global loss: their sum is it.
    valid = target != options.ignore_index
    parts = [loss.detach().reshape(()) if options.reduction != "none" else torch.zeros((), device=device)]
    if options.return_stats:
        parts += [stats.n_valid, stats.n_active, stats.weight_sum, ((stats.prob > 0.5) & valid).sum(),
                  ((stats.pred == target.long()) & valid).sum()]
    if caught is not None:  # the last entry: how many ranks' weight_fn failed
        parts.append(torch.tensor(float(caught.error is not None), device=device))
    totals = None
    if len(parts) > 1 or options.reduction != "none":
        totals = _sum_over(row_groups, torch.stack([p.to(torch.float64) for p in parts]))
    if caught is not None and float(totals[-1]) > 0:
        if caught.error is not None:
            raise caught.error
        raise ValueError(f"{where}: weight_fn failed on another rank of {whose} row-sharding mesh dimensions "
                         f"(that rank raises its error); no rank returns the loss")
    if options.reduction == "none":
        out = rows(loss)
    else:
        out = _GlobalTotal.apply(loss, totals[0].to(loss.dtype))
        out = DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)
    if not options.return_stats:
        return out
    n_valid = totals[1].to(stats.n_valid.dtype)
    denom = n_valid.clamp_min(1).to(stats.prob.dtype)
    stats = dataclasses.replace(
        stats, ce=rows(stats.ce), prob=rows(stats.prob), lse=rows(stats.lse), weight=rows(stats.weight),
        pred=rows(stats.pred), n_valid=n_valid, n_active=totals[2].to(stats.n_active.dtype),
        weight_sum=totals[3].to(stats.weight_sum.dtype),
        recalled_frac=totals[4].to(torch.int64).to(stats.prob.dtype) / denom,
        token_accuracy=totals[5].to(torch.int64).to(stats.prob.dtype) / denom,
    )
    return out, stats


def _hidden_values(hidden):
    """DTensor ``hidden`` [..., D] with ``Partial()`` (a pending reduction: a RowwiseParallel output) or its
    features sharded (``Shard(hidden.ndim - 1)``: a ColwiseParallel output) on some mesh dimensions:
    redistributed to ``Replicate()`` on exactly those, every other placement kept (DTensor's own
    redistribute, differentiable: an all-reduce / all-gather of this rank's [N, D] rows, small next to
    the N x V logits; in the backward hidden's gradient comes back Replicate() where hidden was Partial,
    this rank's feature slice where it was Shard(-1)). Returned unchanged when there is none."""
    mod = _dtensor_module()
    feat = hidden.ndim - 1
    placements = [mod.Replicate() if isinstance(p, mod.Partial) or (_is_plain_shard(p, mod) and p.dim % hidden.ndim == feat)
                  else p for p in hidden.placements]
    if placements == list(hidden.placements):
        return hidden
    return hidden.redistribute(hidden.device_mesh, placements)


def route_linear(hidden, weight, target, bias, token_weight, options: LossOptions, chunking: dict):
    """``_route_linear``; eagerly (``_route_linear_eager``, as ``route``) when the call communicates."""
    if (_local_only(weight, 0) and _local_only(bias, 0)
            and all(_local_only(t) for t in (hidden, target, token_weight, options.denominator))):
        return _route_linear(hidden, weight, target, bias, token_weight, options, chunking)
    return _route_linear_eager(hidden, weight, target, bias, token_weight, options, chunking)


def _route_linear(hidden, weight, target, bias, token_weight, options: LossOptions, chunking: dict):
    """``memft_linear_loss`` when any of its tensors is a DTensor. The lm_head of tensor parallelism
    (``ColwiseParallel``): ``weight`` ``[V, D]`` a DTensor sharded ``Shard(0)`` on one mesh dimension
    (the TP dimension) and replicated on the others (``bias``, if any, the same), or replicated
    everywhere. Runs ``vocab_parallel_memft_linear_loss`` over the TP dimension's group (plain
    ``memft_linear_loss`` on the local tensors when the weight is replicated, or the TP dimension
    has one rank). The loss comes back as a ``Replicate()`` DTensor on the weight's mesh; gradients
    reach DTensor inputs as DTensors.

    ``hidden``: a plain tensor or a replicated DTensor (the whole rows on every rank; ``target``,
    ``token_weight``, ``denominator`` then replicated DTensors or plain tensors, statistics plain
    tensors), or a DTensor on the weight's mesh whose rows (a dimension before the last) are
    sharded, ``_route_linear_rows``: on the TP dimension (sequence parallelism) the rows are
    gathered first, on any other mesh dimension (data / context parallelism) they act as
    ``dp_group`` and the loss is the global one with an exact local gradient. ``Partial()`` or
    ``Shard(hidden.ndim - 1)`` (the features) on a mesh dimension: redistributed to ``Replicate()``
    there first (``_hidden_values``; costs an all-reduce / all-gather of hidden's [N, D] local rows
    over that dimension's group in the forward). Any other layout raises a ValueError on every rank
    (placements are global metadata)."""
    where = "memft_linear_loss"
    if not is_dtensor(weight):
        raise ValueError(
            f"{where}: a DTensor argument needs a DTensor weight (the tensor-parallel lm_head's, Shard(0) or "
            f"Replicate()); got a plain weight. Pass plain tensors ((hidden|bias|target).full_tensor()) instead"
        )
    mod = _dtensor_module()
    mesh = weight.device_mesh
    fix = ("Pass the ColwiseParallel layout (weight Shard(0) on one mesh dimension, Replicate() on the others), "
           "or plain tensors (weight.full_tensor())")
    if weight.ndim != 2:
        raise ValueError(f"{where}: weight must be [V, D] (2-D), got shape {tuple(weight.shape)}")
    shard_dims = []
    for i, p in enumerate(weight.placements):
        if isinstance(p, mod.Replicate):
            continue
        strided = type(p).__name__ == "_StridedShard"
        if isinstance(p, mod.Shard) and not strided and p.dim % 2 == 0:
            shard_dims.append(i)
            continue
        raise ValueError(f"{where}: a DTensor weight with {_describe(weight)} is not supported: mesh dimension {i} "
                         f"has {p}; only the vocabulary (rows, Shard(0)) may be sharded. {fix}")
    if len(shard_dims) > 1:
        raise ValueError(f"{where}: a DTensor weight with {_describe(weight)} shards the vocabulary over "
                         f"{len(shard_dims)} mesh dimensions {shard_dims}; at most one may. {fix}")
    mesh_dim = shard_dims[0] if shard_dims else None
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != tuple(weight.placements):
            got = _describe(bias) if is_dtensor(bias) else "a plain tensor"
            raise ValueError(f"{where}: with a DTensor weight ({_describe(weight)}), bias must be a DTensor with the "
                             f"same mesh and placements (nn.Linear's under ColwiseParallel); got {got}")
    if is_dtensor(hidden):  # Partial / feature-sharded mesh dimensions -> Replicate() (a collective of [N, D])
        hidden = _hidden_values(hidden)
    if is_dtensor(hidden) and not all(isinstance(p, mod.Replicate) for p in hidden.placements):
        return _route_linear_rows(hidden, weight, target, bias, token_weight, options, chunking, mesh_dim, where)
    hidden = _replicated_local("hidden", hidden, where)
    target = _replicated_local("target", target, where)
    token_weight = _replicated_local("token_weight", token_weight, where)
    denominator = _replicated_local("denominator", options.denominator, where)
    if denominator is not options.denominator:
        options = dataclasses.replace(options, denominator=denominator)
    kwargs = _option_kwargs(options)
    del kwargs["inplace_backward"]
    local_w = weight.to_local()  # differentiable: the gradient returns as a DTensor with the weight's placements
    local_b = None if bias is None else bias.to_local()
    if mesh_dim is None or mesh.size(mesh_dim) == 1:
        from .linear_loss import memft_linear_loss

        out = memft_linear_loss(hidden, local_w, target, local_b, token_weight=token_weight, **chunking, **kwargs)
    else:
        from .vocab_parallel_linear import vocab_parallel_memft_linear_loss

        start = _vocab_start(weight, mesh_dim, dim=0, what="weight", where=where)
        out = vocab_parallel_memft_linear_loss(hidden, local_w, target, local_b, group=mesh.get_group(mesh_dim),
                                               vocab_start=start, token_weight=token_weight, **chunking, **kwargs)
    loss, stats = out if options.return_stats else (out, None)
    from torch.distributed.tensor import DTensor, Replicate

    loss = DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return (loss, stats) if options.return_stats else loss


# ---------------------------------------------------------------------------------------------
# Row-sharded hidden states (sequence / data / context parallelism) for memft_linear_loss
# ---------------------------------------------------------------------------------------------


def _hidden_row_dims(hidden, mesh, where: str) -> Tuple[int, ...]:
    """The mesh dimensions whose placement shards a row dimension of DTensor ``hidden`` ``[..., D]``
    (Shard(d), d < hidden.ndim - 1). ValueError (global metadata: on every rank alike) for another
    mesh than the weight's or any other placement."""
    mod = _dtensor_module()
    fix = ("Pass hidden with Shard(d) on row dimensions d < hidden.ndim - 1 and Replicate() elsewhere (Partial() and "
           "Shard(hidden.ndim - 1) are redistributed to Replicate()), on the weight's mesh, or the whole hidden "
           "(hidden.full_tensor())")
    if hidden.device_mesh != mesh:
        raise ValueError(f"{where}: DTensor hidden lives on a mesh of shape {tuple(hidden.device_mesh.shape)}, the "
                         f"weight on another ({tuple(mesh.shape)}); both must be on the same DeviceMesh. {fix}")
    rows = []
    for i, p in enumerate(hidden.placements):
        if isinstance(p, mod.Replicate):
            continue
        if _is_plain_shard(p, mod) and hidden.ndim >= 2 and p.dim % hidden.ndim < hidden.ndim - 1:
            rows.append(i)
            continue
        what = "neither Replicate(), Partial() nor a plain Shard(d)"  # (Partial / features: _hidden_values)
        raise ValueError(f"{where}: DTensor hidden of shape {tuple(hidden.shape)} with {_describe(hidden)} is not "
                         f"supported: mesh dimension {i} has {p}, {what}. {fix}")
    return tuple(rows)


def _check_hidden_rows_arg(name: str, t, hidden, where: str) -> None:
    """A DTensor ``target`` / ``token_weight`` next to row-sharded ``hidden`` must have its leading
    shape, its mesh and its placements (global metadata: raises on every rank alike)."""
    if not is_dtensor(t):
        return
    mod = _dtensor_module()
    lead = tuple(hidden.shape[:-1])

    def same(a, b):
        if isinstance(a, mod.Replicate) or isinstance(b, mod.Replicate):
            return isinstance(a, mod.Replicate) and isinstance(b, mod.Replicate)
        return (_is_plain_shard(a, mod) and _is_plain_shard(b, mod)
                and a.dim % max(len(lead), 1) == b.dim % hidden.ndim)
    want = tuple(hidden.placements)
    if not (t.device_mesh == hidden.device_mesh and tuple(t.shape) == lead and len(t.placements) == len(want)
            and all(same(a, b) for a, b in zip(t.placements, want))):
        raise ValueError(
            f"{where}: hidden is sharded on its rows ({_describe(hidden)}), so a DTensor {name} must be laid out like "
            f"it: shape {lead} on hidden's mesh with hidden's placements {want}; got shape {tuple(t.shape)} with "
            f"{_describe(t)}. Pass {name}.redistribute(hidden.device_mesh, {list(want)}), or a plain tensor holding "
            f"the rows this rank computes (see memft_linear_loss's DTensor documentation)"
        )


def _linear_local_checks(local_h, local_w, local_b, target, token_weight, options: LossOptions, vocab: int,
                         where: str) -> None:
    """This rank's input checks (memft_linear_loss's, the target range against the global V), run
    before the check exchange, which carries a failure to every rank."""
    from .linear_loss import _check_linear_inputs

    lead = tuple(local_h.shape[:-1])
    _check_plain_rows(lead, target, token_weight, lambda name, got: (
        f"{where}: with row-sharded DTensor hidden a plain {name} holds the rows this rank computes: those "
        f"of hidden after the sequence-parallel gather (the whole rows of the tensor-parallel mesh "
        f"dimension, this rank's rows of the others), shape {lead} on this rank; got {got}. Pass "
        f"those rows, or a DTensor laid out like hidden"))
    _check_linear_inputs(local_h, local_w, local_b)
    _check_tensors_and_range(local_h.new_empty(()).expand(*lead, vocab), target, token_weight, options, vocab)


def _scatter_dim(hidden, sp: int, tp_group) -> Optional[int]:
    """The tensor dimension of ``hidden`` that mesh dimension ``sp`` shards when the sequence-parallel
    gather there can pair with a reduce-scatter backward (``_SequenceRows``), else None: the TP group
    has more than one rank and no later mesh dimension shards the same tensor dimension (DTensor
    shards in mesh order, so this rank's rows are then chunk ``get_local_rank(sp)``, by torch.chunk's
    rule, of its rows after the gather; a later one would re-split them: the redistribute's own
    backward is kept)."""
    if tp_group is None:
        return None
    mod = _dtensor_module()
    dim = hidden.placements[sp].dim % hidden.ndim
    if any(_is_plain_shard(p, mod) and p.dim % hidden.ndim == dim for p in hidden.placements[sp + 1:]):
        return None
    return dim


class _SequenceRows(torch.autograd.Function):
    """The sequence-parallel gather paired with a reduce-scatter: ``forward(local_rows, whole,
    own_rows)`` returns ``whole`` (this rank's ``local_rows`` gathered over the TP group, computed
    by the caller without autograd); ``backward`` keeps ``own_rows``'s chunk (this rank's rows) of
    ``whole``'s gradient as ``local_rows``'s. The vocab-parallel loss, called with ``_own_rows``,
    has already summed exactly those rows over the TP group (one reduce-scatter; its other rows are
    zero), so the pair is ``ColwiseParallel``'s input redistribution: all-gather forward,
    reduce-scatter backward."""

    @staticmethod
    def forward(ctx, local_rows, whole, own_rows):
        ctx.own_rows = own_rows
        return whole.view_as(whole)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.own_rows.span()
        return grad.narrow(ctx.own_rows.dim, a, b - a).contiguous(), None, None


def _route_linear_rows(hidden, weight, target, bias, token_weight, options: LossOptions, chunking: dict,
                       tp_dim: Optional[int], where: str):
    """``memft_linear_loss`` with DTensor ``hidden`` whose rows are sharded (``route_linear`` checked
    the weight: vocabulary-sharded on ``tp_dim`` or replicated, and the bias).

    * Rows sharded on ``tp_dim`` (sequence parallelism, torchtitan's ``Shard(1)`` norm output): gathered
      with ``hidden.redistribute`` (Replicate() there), then the vocab-parallel loss over the TP group.
      Backward: one reduce-scatter of hidden's gradient over the TP group (``_SequenceRows`` and the
      loss's ``_own_rows``: each rank receives the sum for its own rows only); where a later mesh
      dimension re-splits those rows (``_scatter_dim`` None), the differentiable redistribute keeps
      this rank's rows of the gradient the loss's backward all-reduced.
    * Rows sharded on other mesh dimensions (data / context parallelism): each rank computes its
      rows with their groups as ``dp_group`` (a tuple: summed over their product); the global loss
      and statistics come from ``_rows_result`` (the loss a Replicate() DTensor whose local gradient
      is exact). The weight's (and bias's) gradient is ``Partial()`` on those mesh dimensions (this
      rank's rows' part; ``.full_tensor()`` sums it), as DTensor's own matmul gives it.

    ``target`` / ``token_weight``: a plain tensor holds the rows this rank computes (hidden's rows
    after the gather: the whole rows over ``tp_dim``, this rank's over the others), a DTensor has
    hidden's shape[:-1], mesh and placements (it is gathered like hidden). Global metadata is checked
    first (raises on every rank alike), then the local inputs, whose failure is carried to every rank
    by one small all-reduce per group (``_rows_check_exchange``, which also compares the targets
    over the TP group)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = weight.device_mesh
    rows = _hidden_row_dims(hidden, mesh, where)
    sp = tp_dim if tp_dim in rows else None
    row_dims = tuple(i for i in rows if i != sp)
    if options.dp_group is not None and row_dims:  # (with sequence parallelism alone it is passed on)
        raise ValueError(f"{where}: hidden's rows are sharded on mesh dimensions {list(row_dims)} where the weight is "
                         f"replicated ({_describe(hidden)}): the data-parallel group is given by the mesh (those "
                         f"dimensions); pass dp_group=None")
    for name, t in (("target", target), ("token_weight", token_weight)):
        _check_hidden_rows_arg(name, t, hidden, where)
    denominator = _replicated_local("denominator", options.denominator, where)
    if denominator is not options.denominator:
        options = dataclasses.replace(options, denominator=denominator)
    vocab = weight.shape[0]
    tp_group = mesh.get_group(tp_dim) if tp_dim is not None and mesh.size(tp_dim) > 1 else None
    vocab_start = _vocab_start(weight, tp_dim, dim=0, what="weight", where=where) if tp_group is not None else 0

    # The sequence-parallel gather (a collective every rank reaches: the placements are global).
    gathered = tuple(Replicate() if i == sp else p for i, p in enumerate(hidden.placements))
    own_rows = None
    if sp is not None:
        target, token_weight = (t.redistribute(mesh, gathered) if is_dtensor(t) else t for t in (target, token_weight))
        dim = _scatter_dim(hidden, sp, tp_group)
        if dim is not None:  # backward: one reduce-scatter over the TP group (_SequenceRows)
            from .vocab_parallel_linear import OwnRows

            whole = hidden.detach().redistribute(mesh, gathered).to_local()
            own_rows = OwnRows(tuple(whole.shape[:-1]), dim, mesh.size(sp), mesh.get_local_rank(sp))
            local_h = _SequenceRows.apply(hidden.to_local(), whole, own_rows)
        else:  # backward: the vocab-parallel all-reduce, then the redistribute keeps this rank's rows
            local_h = hidden.redistribute(mesh, gathered).to_local()
    else:
        local_h = hidden.to_local()  # its gradient returns as a DTensor with hidden's placements
    target, token_weight = (t.to_local() if is_dtensor(t) else t for t in (target, token_weight))
    # This rank's rows contribute a part of the weight's gradient: Partial() on the row-sharding dims.
    grad_placements = [Partial() if i in row_dims else p for i, p in enumerate(weight.placements)]
    local_w = weight.to_local(grad_placements=grad_placements)
    local_b = None if bias is None else bias.to_local(grad_placements=grad_placements)
    row_groups = [mesh.get_group(i) for i in row_dims]
    device = local_h.device

    own_error = None
    try:
        _linear_local_checks(local_h, local_w, local_b, target, token_weight, options, vocab, where)
        record = _rows_record(options, target, token_weight, tp_group, device)  # targets compared over the TP group
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks
        own_error = exc
        record = torch.tensor([1, 0, 0, 0, 0, 0, 0], dtype=torch.int64, device=device)
    try:
        if row_groups or tp_group is not None:
            _rows_check_exchange(row_groups, tp_group, record, own_error, where, "hidden's")
        elif own_error is not None:  # every rank holds the same rows: each raises alike
            raise own_error
    except Exception as exc:  # noqa: BLE001 - a dp_group of one's own (no row_groups): carried by its all_reduce
        from .distributed import raise_over_dp

        raise_over_dp(exc, options.dp_group, options, where, device)

    dp_group = options.dp_group if not row_groups else tuple(row_groups) if len(row_groups) > 1 else row_groups[0]
    caught = None
    if options.weight_fn is not None and row_groups:  # its failure on some ranks only is raised on all
        caught = _CaughtWeightFn(options.weight_fn, options.validate)
        options = dataclasses.replace(options, weight_fn=caught)
    kwargs = _option_kwargs(options, dp_group=dp_group)
    del kwargs["inplace_backward"]
    if tp_group is not None:
        from .vocab_parallel_linear import vocab_parallel_memft_linear_loss

        out = vocab_parallel_memft_linear_loss(local_h, local_w, target, local_b, group=tp_group,
                                               vocab_start=vocab_start, token_weight=token_weight, **chunking,
                                               _own_rows=own_rows, **kwargs)
    else:
        from .linear_loss import memft_linear_loss

        out = memft_linear_loss(local_h, local_w, target, local_b, token_weight=token_weight, **chunking, **kwargs)
    loss, stats = out if options.return_stats else (out, None)
    if not row_groups:  # the whole rows on every rank, as with a replicated hidden
        loss = DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return (loss, stats) if options.return_stats else loss
    return _rows_result(loss, stats, target, options, caught, mesh, gathered, tuple(hidden.shape[:-1]), row_groups,
                        device, where, "hidden's")


_route_eager = torch.compiler.disable(_route, reason=DTENSOR_EAGER)
_route_linear_eager = torch.compiler.disable(_route_linear, reason=DTENSOR_EAGER)


def refuse(where: str, alternative: str, **tensors) -> None:
    """ValueError when any of ``tensors`` is a DTensor, for entry points that take plain tensors only."""
    for name, t in tensors.items():
        if is_dtensor(t):
            raise ValueError(f"{where}: {name} is a DTensor ({_describe(t)}); {where} takes plain tensors only. "
                             f"{alternative}")
