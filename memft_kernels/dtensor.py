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
(``return_stats=True``) are plain tensors, identical on every rank.

Anything else (a row dimension sharded, ``Partial``, the classes sharded by two mesh dimensions, a
DTensor ``target`` / ``token_weight`` / ``denominator`` that is not replicated) raises a ValueError
at the call, on every rank alike (placements are global metadata: no rank reaches a collective that
another skips). ``torch.distributed`` may be unavailable on some builds: nothing here imports it
until a DTensor is seen (a DTensor exists only once ``torch.distributed.tensor`` is imported).
``torch.compile`` of a call with DTensor logits is not tested and not promised.

``memft_linear_loss`` hands a DTensor lm_head weight here (``route_linear``): ``Shard(0)`` on one
mesh dimension (``ColwiseParallel``) runs ``vocab_parallel_memft_linear_loss`` over that dimension's
group on the local rows; a replicated weight, plain ``memft_linear_loss`` on every rank.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

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


def class_shard_dim(logits, where: str = "memft_loss") -> Optional[int]:
    """The mesh dimension whose placement shards the class dimension (the last) of DTensor
    ``logits``, or None when every mesh dimension replicates them. ValueError for any other
    layout, naming the placements and what to pass instead."""
    mod = _dtensor_module()
    from torch.distributed.tensor import placement_types

    strided = getattr(placement_types, "_StridedShard", None)
    class_dim = logits.ndim - 1
    placements = tuple(logits.placements)
    fix = (
        f"Pass the class-sharded layout (logits.redistribute(logits.device_mesh, placements) with Shard({class_dim}) "
        f"on one mesh dimension and Replicate() on the others), or the whole logits (logits.full_tensor())"
    )
    shard_dims = []
    for i, p in enumerate(placements):
        if isinstance(p, mod.Replicate):
            continue
        is_plain_shard = isinstance(p, mod.Shard) and not (strided is not None and isinstance(p, strided))
        if is_plain_shard and p.dim % max(logits.ndim, 1) == class_dim:
            shard_dims.append(i)
            continue
        if isinstance(p, mod.Partial):
            why = (f"mesh dimension {i} is {p}: the logits are a pending reduction (e.g. a RowwiseParallel output "
                   f"with use_local_output=False), not values")
        elif is_plain_shard:
            why = (f"mesh dimension {i} shards tensor dimension {p.dim % max(logits.ndim, 1)}, a row dimension "
                   f"(only the class dimension {class_dim}, the last, may be sharded); for data parallelism "
                   f"give the lm_head the tensor-parallel sub-mesh only, or call vocab_parallel_memft_loss "
                   f"with dp_group on the local logits")
        else:
            why = f"mesh dimension {i} has placement {p}, which is neither Replicate() nor Shard({class_dim})"
        raise ValueError(f"{where}: DTensor logits of shape {tuple(logits.shape)} with {_describe(logits)} are "
                         f"not supported: {why}. {fix}")
    if len(shard_dims) > 1:
        raise ValueError(
            f"{where}: DTensor logits of shape {tuple(logits.shape)} with {_describe(logits)} shard the class "
            f"dimension over {len(shard_dims)} mesh dimensions {shard_dims}; at most one may. {fix}"
        )
    return shard_dims[0] if shard_dims else None


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


def route(logits, target, token_weight, options: LossOptions):
    """``memft_loss`` of DTensor ``logits`` (see the module docstring): checks the layout, unwraps,
    computes on the local tensor (vocab-parallel over the class-sharding mesh dimension's group
    when there is one), and returns the loss as a Replicate DTensor (statistics as plain tensors)."""
    from .loss import memft_loss_with

    where = "memft_loss"
    mesh_dim = class_shard_dim(logits, where)
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

        kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}  # no deep copies
        out = vocab_parallel_memft_loss(local, target, group=mesh.get_group(mesh_dim),
                                        vocab_start=_vocab_start(logits, mesh_dim), token_weight=token_weight,
                                        **kwargs)
    loss, stats = out if options.return_stats else (out, None)
    from torch.distributed.tensor import DTensor, Replicate

    loss = DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return (loss, stats) if options.return_stats else loss


def route_linear(hidden, weight, target, bias, token_weight, options: LossOptions, chunking: dict):
    """``memft_linear_loss`` when any of its tensors is a DTensor. The lm_head of tensor parallelism
    (``ColwiseParallel``): ``weight`` ``[V, D]`` a DTensor sharded ``Shard(0)`` on one mesh dimension
    and replicated on the others (``bias``, if any, the same), or replicated everywhere; ``hidden``,
    ``target``, ``token_weight``, ``denominator`` replicated DTensors or plain tensors. Runs
    ``vocab_parallel_memft_linear_loss`` over that mesh dimension's group (plain
    ``memft_linear_loss`` on the local tensors when the weight is replicated, or the mesh dimension
    has one rank). The loss comes back as a ``Replicate()`` DTensor on the weight's mesh, the
    statistics as plain tensors; gradients reach DTensor inputs as DTensors with their placements.
    Any other layout raises a ValueError on every rank (placements are global metadata)."""
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
    hidden = _replicated_local("hidden", hidden, where)
    target = _replicated_local("target", target, where)
    token_weight = _replicated_local("token_weight", token_weight, where)
    denominator = _replicated_local("denominator", options.denominator, where)
    if denominator is not options.denominator:
        options = dataclasses.replace(options, denominator=denominator)
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "inplace_backward"}
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


def refuse(where: str, alternative: str, **tensors) -> None:
    """ValueError when any of ``tensors`` is a DTensor, for entry points that take plain tensors only."""
    for name, t in tensors.items():
        if is_dtensor(t):
            raise ValueError(f"{where}: {name} is a DTensor ({_describe(t)}); {where} takes plain tensors only. "
                             f"{alternative}")
