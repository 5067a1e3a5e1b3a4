"""lce_torch.distributed: the linear cross-entropy of an LM head sharded by vocabulary rows.

Each rank of a ``torch.distributed`` process group holds rows [vocab_start, vocab_end) of the
head's weight [V, D] (Megatron-LM's vocabulary-parallel ``ColumnParallelLinear`` LM head,
TorchTitan's ``Shard(0)`` output layer) and the same hidden states and targets::

    import lce_torch.distributed as lced
    loss = lced.vocab_parallel_linear_cross_entropy(hidden, head_shard, labels, group=tp_group)
    loss.backward()   # hidden.grad: all-reduced over the group; head_shard.grad: this rank's rows

The loss, and every per-token output, equal ``lce_torch.linear_cross_entropy`` on the full
weight (up to fp32 reassociation) and are identical on every rank; no rank ever holds more
than a chunk of its own shard's logits. The work runs in lce::nccl (docs/vocab_parallel.md) on
an NCCL communicator that this module makes for the group (rank 0 of the group calls
ncclGetUniqueId, the group broadcasts it, every rank calls ncclCommInitRank; one communicator
per (group, device), cached until destroy_communicators()), on PyTorch's current stream.

Every rank of the group must make the same calls in the same order, with the same shapes,
options and requested outputs, and run the backward (so that the collectives match).
``torch.distributed`` is imported on first use only.
"""

from __future__ import annotations

import atexit
import threading
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from . import (
    _C,
    _NONE,
    _ROW_CHUNKED,
    _STORED,
    _WANT_LSE,
    LinearCrossEntropyOutput,
    _fake_forward_outputs,
    _fused_gradients,
    _outputs_mask,
    _pack_outputs,
    _parse_reduction,
    _parse_strategy,
)
from . import _inputs
from ._targets import _check_targets, _parse_check_targets

__all__ = [
    "VocabParallelLinearCrossEntropy",
    "VocabParallelLinearCrossEntropyFunction",
    "communicator",
    "destroy_communicators",
    "is_available",
    "vocab_parallel_linear_cross_entropy",
    "vocab_range",
]


def is_available() -> bool:
    """Whether the extension was built with NCCL (the vocabulary-parallel operators)."""
    return bool(getattr(_C, "with_nccl", False))


def _require_nccl() -> None:
    if not is_available():
        raise RuntimeError(
            "lce_torch.distributed: the extension was built without NCCL, so the "
            "vocabulary-parallel operators are missing. Rebuild it where nccl.h and libnccl are "
            "found (the nvidia-nccl package PyTorch depends on, NCCL_HOME or CUDA_HOME; "
            "LCE_TORCH_NCCL=1 makes the build fail instead of leaving them out)"
        )


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("lce_torch.distributed: this PyTorch has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            "lce_torch.distributed: torch.distributed is not initialized "
            "(torch.distributed.init_process_group)"
        )
    return dist


def _resolve_group(group):
    dist = _dist()
    return dist.group.WORLD if group is None else group


# ------------------------------------------------------------------------------------------
# Communicators


class Communicator(NamedTuple):
    """An NCCL communicator made for a torch.distributed group on one device."""

    handle: int  #: the ncclComm_t, as the operators take it
    ranks: int  #: the group's size
    rank: int  #: this process's rank in the group
    device: int  #: the CUDA device it lives on


_communicators: dict = {}  # (group, device index) -> Communicator
_lock = threading.Lock()


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"lce_torch.distributed: the device must be a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def communicator(group=None, device=None) -> Communicator:
    """The NCCL communicator of ``group`` (None: the default group) on ``device`` (None: the
    current CUDA device), made on first use and cached.

    Making it is collective: every rank of the group must call this (or a function of this
    module that calls it) for the first time together. Rank 0 of the group calls
    ncclGetUniqueId, the id is broadcast over the group (torch.distributed.broadcast_object_list,
    any backend), and every rank calls ncclCommInitRank on the device.
    """
    _require_nccl()
    dist = _dist()
    group = _resolve_group(group)
    index = _device_index(device)
    key = (group, index)
    with _lock:
        comm = _communicators.get(key)
        if comm is not None:
            return comm
        ranks = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("lce_torch.distributed: this process is not a member of the group")
        unique_id = [_C.nccl_unique_id() if rank == 0 else None]
        with torch.cuda.device(index):
            dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0),
                                       group=group)
        comm = Communicator(_C.nccl_comm_init(unique_id[0], ranks, rank, index), ranks, rank,
                            index)
        _communicators[key] = comm
        return comm


def destroy_communicators(group=None) -> None:
    """Destroys the cached NCCL communicators (ncclCommDestroy): those of ``group`` (every
    device), or all of them when ``group`` is None. Call it on every rank, after the last use
    and before torch.distributed.destroy_process_group; at interpreter exit the remaining
    ones are aborted (ncclCommAbort, after the device finished their work)."""
    with _lock:
        if group is None:
            keys = list(_communicators)
        else:
            keys = [k for k in _communicators if k[0] is group]
        for key in keys:
            comm = _communicators.pop(key)
            with torch.cuda.device(comm.device):
                torch.cuda.current_stream().synchronize()
            _C.nccl_comm_destroy(comm.handle, False)


@atexit.register
def _abort_communicators() -> None:
    with _lock:
        while _communicators:
            _, comm = _communicators.popitem()
            try:
                torch.cuda.synchronize(comm.device)
                _C.nccl_comm_destroy(comm.handle, True)
            except Exception:  # noqa: BLE001 - the process is exiting; nothing left to report to
                pass


# ------------------------------------------------------------------------------------------
# The shard's rows


def vocab_range(weight_shard: Tensor, group=None) -> tuple:
    """(vocab_start, vocab_end, vocab_size) of this rank's rows: the shards are taken in rank
    order, rank r's starting after the rows of ranks 0..r-1 (Megatron's layout and
    torch.chunk's, even or not). Collective: an all-gather of the row counts over the group's
    NCCL communicator and a host synchronization; compute it once and pass vocab_start and
    vocab_size, or use VocabParallelLinearCrossEntropy, which does."""
    comm = communicator(group, weight_shard.device if weight_shard.is_cuda else None)
    rows = torch.tensor([int(weight_shard.shape[0])], dtype=torch.int64,
                        device=torch.device("cuda", comm.device))
    sizes = torch.ops.lce_torch.nccl_all_gather(rows, comm.handle, comm.ranks).tolist()
    return _range_of(sizes, comm.rank)


def _range_of(sizes, rank: int) -> tuple:
    """(start, end, total) of shard `rank` when the shards have `sizes`, in rank order."""
    if any(s <= 0 for s in sizes):
        empty = [r for r, s in enumerate(sizes) if s <= 0]
        raise ValueError(
            f"lce_torch.distributed: every rank needs at least one vocabulary row (lce::nccl "
            f"does not support empty shards); ranks {empty} have none (row counts {sizes})"
        )
    start = sum(sizes[:rank])
    return start, start + sizes[rank], sum(sizes)


def _check_range(vocab_start, vocab_size, rows: int) -> tuple:
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(
            "lce_torch.distributed: pass vocab_start and vocab_size together (this rank's "
            "first row and the global V), or neither (then they are derived from the shards' "
            "row counts with an all-gather)"
        )
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    if not (0 <= vocab_start and vocab_start + rows <= vocab_size):
        raise ValueError(
            f"lce_torch.distributed: this rank's rows [{vocab_start}, {vocab_start + rows}) are "
            f"not inside the vocabulary [0, {vocab_size})"
        )
    if rows == 0:
        raise ValueError("lce_torch.distributed: weight_shard has no rows (lce::nccl does not "
                         "support empty shards)")
    return vocab_start, vocab_size


# ------------------------------------------------------------------------------------------
# Fake (meta) implementations, for torch.compile and FakeTensor tracing; they mirror
# csrc/nccl_ops.cpp (the forward's outputs are the single-GPU operators').


def _fake_gradients(x, weight, ranks, scatter_dx, need_dx, need_dw, need_db, fp32_weight_grad):
    grad_dtype = torch.float32 if fp32_weight_grad or x.dtype == torch.float32 else x.dtype
    n, d = x.shape
    rows = weight.shape[0]
    dx_rows = n // ranks if scatter_dx else n
    return (
        x.new_empty((dx_rows, d) if need_dx else (0,)),
        x.new_empty((rows, d) if need_dw else (0,), dtype=grad_dtype if need_dw else x.dtype),
        x.new_empty((rows,) if need_db else (0,), dtype=grad_dtype if need_db else x.dtype),
    )


if is_available():

    @torch.library.register_fake("lce_torch::nccl_forward")
    def _(x, weight, bias, target, class_weight, comm, ranks, v_begin, vocab_size,
          ignore_index, reduction, label_smoothing, z_loss, softcap, temperature, shift_seq_len,
          filter_eps, outputs):
        return _fake_forward_outputs(x, reduction, outputs)

    @torch.library.register_fake("lce_torch::nccl_backward")
    def _(x, weight, bias, target, lse, grad, class_weight, comm, ranks, v_begin, vocab_size,
          scatter_dx, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature,
          shift_seq_len, filter_eps, strategy, memory_budget, need_dx, need_dw, need_db,
          fp32_weight_grad):
        return _fake_gradients(x, weight, ranks, scatter_dx, need_dx, need_dw, need_db,
                               fp32_weight_grad)

    @torch.library.register_fake("lce_torch::nccl_forward_backward")
    def _(x, weight, bias, target, class_weight, comm, ranks, v_begin, vocab_size, scatter_dx,
          ignore_index, reduction, label_smoothing, z_loss, softcap, temperature, shift_seq_len,
          filter_eps, outputs, strategy, memory_budget, need_dx, need_dw, need_db,
          fp32_weight_grad):
        return _fake_forward_outputs(x, reduction, outputs) + _fake_gradients(
            x, weight, ranks, scatter_dx, need_dx, need_dw, need_db, fp32_weight_grad
        )

    @torch.library.register_fake("lce_torch::nccl_all_gather")
    def _(x, comm, ranks):
        return x.new_empty((x.shape[0] * ranks,) + tuple(x.shape[1:]))


# ------------------------------------------------------------------------------------------
# The autograd function


class _Spec(NamedTuple):
    """The non-tensor arguments of one call (passed to the autograd function as one value)."""

    comm: Communicator
    vocab_start: int
    vocab_size: int
    sequence_parallel: bool
    loss_options: tuple  # ignore_index, reduction, smoothing, z_loss, softcap, temperature,
    #                      shift_seq_len, filter_eps: the order of the operators' schema
    outputs: int
    strategy: int
    memory_budget: int
    fp32_weight_grad: bool
    grad_in_forward: bool


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over the lce::nccl operators, on 2-D inputs.

    forward(x, weight_shard, bias_shard | None, target, class_weight | None, spec) returns the
    nine tensors of LinearCrossEntropyFunction (the loss first, the only differentiable one).
    x is [n, d], the same on every rank; with spec.sequence_parallel it is this rank's
    [n / k, d] rows instead, all-gathered (in rank order) before the loss, and its gradient
    comes back reduce-scattered to the same rows. target is [n] (global ids), or this rank's
    [n / k] with sequence parallelism (then all-gathered too).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, spec: _Spec):
        comm = spec.comm
        if spec.sequence_parallel and comm.ranks > 1:
            local_targets = target.shape[0] == x.shape[0]
            x = torch.ops.lce_torch.nccl_all_gather(x, comm.handle, comm.ranks)
            if local_targets:
                target = torch.ops.lce_torch.nccl_all_gather(target, comm.handle, comm.ranks)
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        ctx.need = (need_dx, need_dw, need_db)
        reduction = spec.loss_options[1]
        shard = (comm.handle, comm.ranks, spec.vocab_start, spec.vocab_size)
        wants_grad = need_dx or need_dw or need_db
        ctx.fused = bool(spec.grad_in_forward and reduction != _NONE and wants_grad)
        if ctx.fused:
            result = torch.ops.lce_torch.nccl_forward_backward(
                x, weight, bias, target, class_weight, *shard, spec.sequence_parallel,
                *spec.loss_options, spec.outputs, spec.strategy, spec.memory_budget, need_dx,
                need_dw, need_db, spec.fp32_weight_grad,
            )
            forward_outputs = result[:9]
            ctx.save_for_backward(*result[9:])
        else:
            forward_outputs = torch.ops.lce_torch.nccl_forward(
                x, weight, bias, target, class_weight, *shard, *spec.loss_options,
                spec.outputs | (_WANT_LSE if wants_grad else 0),
            )
            if wants_grad:
                ctx.save_for_backward(x, weight, bias, target, class_weight, forward_outputs[2])
        ctx.spec = spec
        loss, token_loss = forward_outputs[0], forward_outputs[1]
        if reduction == _NONE:  # the per-token losses are the loss
            loss, token_loss = token_loss, x.new_empty((0,), dtype=torch.float32)
        rest = (token_loss,) + tuple(forward_outputs[2:])
        ctx.mark_non_differentiable(*rest)
        return (loss,) + rest

    @staticmethod
    def backward(ctx, grad_loss, *unused_grads):
        need_dx, need_dw, need_db = ctx.need
        if not (need_dx or need_dw or need_db):
            return (None,) * 6
        if ctx.fused:
            dx, dw, db = _fused_gradients(ctx, grad_loss, (need_dx, need_dw, need_db))
        else:
            spec = ctx.spec
            comm = spec.comm
            x, weight, bias, target, class_weight, lse = ctx.saved_tensors
            dx, dw, db = torch.ops.lce_torch.nccl_backward(
                x, weight, bias, target, lse, grad_loss, class_weight, comm.handle, comm.ranks,
                spec.vocab_start, spec.vocab_size, spec.sequence_parallel, *spec.loss_options,
                spec.strategy, spec.memory_budget, need_dx, need_dw, need_db,
                spec.fp32_weight_grad,
            )
        return ((dx if need_dx else None), (dw if need_dw else None),
                (db if need_db else None), None, None, None)


# ------------------------------------------------------------------------------------------
# The public function and module


def _local_head(weight_shard, bias_shard, group):
    """weight_shard as a local tensor and its group: a DTensor sharded by rows (TorchTitan's
    Shard(0) head) gives its local rows and its mesh dimension's group."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # an older PyTorch: no public DTensor
        return weight_shard, bias_shard, group
    if not isinstance(weight_shard, DTensor):
        return weight_shard, bias_shard, group
    sharded = [i for i, p in enumerate(weight_shard.placements)
               if isinstance(p, Shard) and p.dim == 0]
    others = [p for i, p in enumerate(weight_shard.placements)
              if i not in sharded and not p.is_replicate()]
    if len(sharded) != 1 or others:
        raise ValueError(
            "lce_torch.distributed: a DTensor weight must be sharded by rows (Shard(0)) on one "
            f"mesh dimension and replicated on the others, got {weight_shard.placements}"
        )
    mesh_group = weight_shard.device_mesh.get_group(sharded[0])
    if group is not None and group is not mesh_group:
        raise ValueError("lce_torch.distributed: group differs from the DTensor weight's "
                         "sharded mesh dimension")
    if isinstance(bias_shard, DTensor):
        bias_shard = bias_shard.to_local()
    return weight_shard.to_local(), bias_shard, mesh_group


def vocab_parallel_linear_cross_entropy(
    x: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Optional[Tensor] = None,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    class_weight: Optional[Tensor] = None,
    shift: Union[bool, int] = False,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    fp32_weight_grad: bool = False,
    grad_in_forward: bool = False,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_loss: bool = False,
    return_argmax: bool = False,
    return_accuracy: bool = False,
    return_entropy: bool = False,
    return_target_logprob: bool = False,
    filter_eps: float = 0.0,
    check_targets: Union[str, bool] = "device",
) -> Union[Tensor, LinearCrossEntropyOutput]:
    """lce_torch.linear_cross_entropy of the full head, with its weight sharded by vocabulary
    rows across the ranks of ``group`` (lce::nccl; docs/vocab_parallel.md).

    Equal, up to fp32 reassociation, to ``linear_cross_entropy(x, W, target, b, ...)`` where
    W [V, D] and b [V] are the ranks' shards concatenated in rank order; the loss and every
    per-token output are the global ones and identical on every rank. Collective: every rank
    of the group makes the same call (same shapes, options, requested outputs) and runs the
    backward.

    Args:
        x: [..., D] hidden states, the same on every rank; with ``sequence_parallel`` this
            rank's part of them instead (all-gathered along dim 0 in rank order, as Megatron's
            sequence parallelism splits the head's input).
        weight_shard: [rows, D], this rank's rows [vocab_start, vocab_start + rows) of the head,
            x's dtype. A DTensor sharded Shard(0) (TorchTitan) is taken as its local rows and
            its mesh dimension's group.
        target: x's leading shape (global ids in [0, V) or ignore_index), the same on every
            rank; with ``sequence_parallel`` either the targets of the gathered rows or this
            rank's (then all-gathered too).
        bias_shard: optional [rows], this rank's rows of the bias.
        group: the process group sharing the vocabulary (None: the default group). lce makes
            an NCCL communicator for it on first use (collective) and caches it.
        vocab_start, vocab_size: this rank's first row and the global V, both or neither. When
            omitted they are derived from the shards' row counts in rank order (vocab_range:
            an all-gather and a host synchronization on every call; pass them, or use
            VocabParallelLinearCrossEntropy, to avoid it). The shards must partition [0, V)
            (uneven sizes allowed, none empty); lce cannot check this without communicating.
        sequence_parallel: x (and optionally target) are this rank's rows of the gathered
            batch; the gradient of x is reduce-scattered back to them (lce::nccl's
            dx_reduction::reduce_scatter) instead of all-reduced. The gathered rows must be a
            multiple of the group size (they are, as k equal parts). Per-token outputs are
            those of all gathered rows.
        shift: the causal shift as in linear_cross_entropy; True groups the (gathered) rows by
            x.shape[-2], so with sequence parallelism gather whole sequences ([B/k, T, D] per
            rank) or pass the number of rows per sequence.
        class_weight: optional global [V] class weights (the same on every rank).
        filter_eps: opt-in approximate gradient filter, as in linear_cross_entropy (the
            probabilities are the global ones).
        check_targets: as in linear_cross_entropy, against the global V ('device', the
            default: a device-side assertion without host synchronization).
        Other arguments: as linear_cross_entropy. strategy 'stored': each rank keeps
        e^(z - m) of its shard's logits in 16 bits (n·V_shard·2 bytes) from the forward and
        forms dZ from them instead of recomputing; it computes the gradients in the forward
        (lce::nccl::forward_backward), so 'mean' or 'sum' only, and holds all n rows at once
        (no row chunks on this layer). grad_in_forward alone computes the gradients in the
        forward and saves no work with the recomputing strategies.

    Returns:
        The loss (or LinearCrossEntropyOutput with a ``return_*`` flag), as linear_cross_entropy.
        In the backward: x's gradient (the full dX, already summed over the ranks — do not
        all-reduce it again — or, with sequence_parallel, this rank's rows), weight_shard's
        and bias_shard's (this rank's rows, for the data-parallel reduction that follows).
    """
    _require_nccl()
    red = _parse_reduction(reduction)
    strat = _parse_strategy(strategy)
    if strat == _STORED:
        if red == _NONE:
            raise ValueError(
                "lce_torch.distributed: strategy='stored' computes the gradients in the "
                "forward, which needs reduction 'mean' or 'sum'"
            )
        grad_in_forward = True
    weight_shard, bias_shard, group = _local_head(weight_shard, bias_shard, group)
    x2, w2, bias_shard, target2, class_weight, lead, seq_len = _prepare_shard(
        x, weight_shard, bias_shard, target, class_weight, shift
    )
    comm = communicator(group, x2.device)
    if vocab_start is None and vocab_size is None:
        vocab_start, _, vocab_size = vocab_range(w2, group)
    else:
        vocab_start, vocab_size = _check_range(vocab_start, vocab_size, w2.shape[0])
    if class_weight is not None and class_weight.shape != (vocab_size,):
        raise ValueError(
            f"lce_torch.distributed: class_weight must be the global [{vocab_size}], got "
            f"{tuple(class_weight.shape)}"
        )
    sequence_parallel = bool(sequence_parallel)
    n_rows = x2.shape[0] * (comm.ranks if sequence_parallel else 1)
    if sequence_parallel:
        if target2.shape[0] not in (x2.shape[0], n_rows):
            raise ValueError(
                f"lce_torch.distributed: with sequence_parallel, target must have this rank's "
                f"{x2.shape[0]} rows or the {n_rows} gathered ones, got {target2.shape[0]}"
            )
        lead = (lead[0] * comm.ranks,) + tuple(lead[1:]) if lead else (n_rows,)
        if shift is True and x.dim() == 2:
            seq_len = n_rows
    elif target2.shape[0] != n_rows:
        raise ValueError(
            f"lce_torch.distributed: target must have one id per row of x ({n_rows}), got "
            f"{tuple(target.shape)}"
        )
    if seq_len and n_rows % seq_len != 0:
        raise ValueError(
            f"lce_torch.distributed: shift={shift} must divide the {n_rows} rows of x"
        )
    # This rank's targets (the gathered ones, or its own whole sequences) checked against V.
    whole_sequences = not seq_len or target2.shape[0] % seq_len == 0
    _check_targets(_parse_check_targets(check_targets), target2, vocab_size, int(ignore_index),
                   seq_len if whole_sequences else 0)
    outputs = _outputs_mask(red, return_token_loss, return_lse, return_z_loss, return_argmax,
                            return_accuracy, return_entropy, return_target_logprob)
    spec = _Spec(
        comm=comm,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        sequence_parallel=sequence_parallel,
        loss_options=(int(ignore_index), red, float(label_smoothing), float(z_loss),
                      float(softcap) if softcap is not None else 0.0, float(temperature),
                      seq_len, float(filter_eps)),
        outputs=outputs,
        strategy=strat,
        memory_budget=-1 if memory_budget is None else int(memory_budget),
        fp32_weight_grad=bool(fp32_weight_grad or strat == _ROW_CHUNKED),
        grad_in_forward=bool(grad_in_forward),
    )
    results = VocabParallelLinearCrossEntropyFunction.apply(x2, w2, bias_shard, target2,
                                                           class_weight, spec)
    valid_rows = None
    if return_accuracy:
        valid_rows = _valid_rows(target2, ignore_index, seq_len, comm, sequence_parallel, n_rows)
    return _pack_outputs(results, red, lead, outputs, valid_rows, return_lse, return_z_loss,
                         return_token_loss, return_argmax, return_accuracy, return_entropy,
                         return_target_logprob)


def _valid_rows(target2, ignore_index, seq_len, comm, sequence_parallel, n_rows) -> Tensor:
    """The number of scored rows (at least 1), for the accuracy: of the gathered targets."""
    if sequence_parallel and target2.shape[0] != n_rows:
        target2 = torch.ops.lce_torch.nccl_all_gather(target2, comm.handle, comm.ranks)
    valid = target2 != ignore_index
    if seq_len:
        valid = valid.reshape(-1, seq_len)[:, 1:]
    return valid.sum().clamp(min=1).float()


def _prepare_shard(x, weight, bias, target, class_weight, shift):
    """Checks the inputs (class_weight is global, [V]) and brings them to what the operators
    take: x [n, D] rows, the shard's rows, int64 targets, fp32 class weights
    (_inputs.prepare; the caller checks what depends on the gathered rows and V)."""
    return _inputs.prepare(x, weight, bias, target, class_weight, shift,
                           who="lce_torch.distributed", shard=True)


class VocabParallelLinearCrossEntropy(nn.Module):
    """Module form of vocab_parallel_linear_cross_entropy: holds the group, the options
    (class_weight as a buffer) and the shard's range.

    ``forward(x, weight_shard, target, bias_shard=None, **returns)``. When vocab_start and
    vocab_size are not given, they are derived once, on the first call, from the shards' row
    counts (one all-gather; again only if this rank's row count changes, which every rank must
    then see in the same call). The weight is an argument, not a parameter, so that the model
    keeps its tensor-parallel head where it is.
    """

    def __init__(
        self,
        group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
        sequence_parallel: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        temperature: float = 1.0,
        class_weight: Optional[Tensor] = None,
        shift: Union[bool, int] = False,
        strategy: str = "auto",
        memory_budget: Optional[int] = None,
        fp32_weight_grad: bool = False,
        grad_in_forward: bool = False,
        filter_eps: float = 0.0,
        check_targets: Union[str, bool] = "device",
    ):
        super().__init__()
        _parse_reduction(reduction)
        _parse_check_targets(check_targets)
        if _parse_strategy(strategy) == _STORED and _parse_reduction(reduction) == _NONE:
            raise ValueError(
                "lce_torch.distributed: strategy='stored' computes the gradients in the "
                "forward, which needs reduction 'mean' or 'sum'"
            )
        if (vocab_start is None) != (vocab_size is None):
            raise ValueError("lce_torch.distributed: pass vocab_start and vocab_size together, "
                             "or neither")
        self.group = group
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature
        self.shift = shift
        self.strategy = strategy
        self.memory_budget = memory_budget
        self.fp32_weight_grad = fp32_weight_grad
        self.grad_in_forward = grad_in_forward
        self.filter_eps = filter_eps
        self.check_targets = check_targets
        self._derived = None  # (rows, vocab_start, vocab_size) from vocab_range
        self.register_buffer("class_weight", class_weight, persistent=False)

    def shard_range(self, weight_shard: Tensor) -> tuple:
        """(vocab_start, vocab_size) of this rank: as given, or derived once (collective)."""
        if self.vocab_start is not None:
            return self.vocab_start, self.vocab_size
        weight_local, _, group = _local_head(weight_shard, None, self.group)
        rows = int(weight_local.shape[0])
        if self._derived is None or self._derived[0] != rows:
            start, _, size = vocab_range(weight_local, group)
            self._derived = (rows, start, size)
        return self._derived[1], self._derived[2]

    def forward(self, x: Tensor, weight_shard: Tensor, target: Tensor,
                bias_shard: Optional[Tensor] = None,
                **returns) -> Union[Tensor, LinearCrossEntropyOutput]:
        vocab_start, vocab_size = self.shard_range(weight_shard)
        return vocab_parallel_linear_cross_entropy(
            x, weight_shard, target, bias_shard, group=self.group, vocab_start=vocab_start,
            vocab_size=vocab_size, sequence_parallel=self.sequence_parallel,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            temperature=self.temperature, class_weight=self.class_weight, shift=self.shift,
            strategy=self.strategy, memory_budget=self.memory_budget,
            fp32_weight_grad=self.fp32_weight_grad, grad_in_forward=self.grad_in_forward,
            filter_eps=self.filter_eps, check_targets=self.check_targets, **returns,
        )

    def extra_repr(self) -> str:
        return (f"vocab_start={self.vocab_start}, vocab_size={self.vocab_size}, "
                f"sequence_parallel={self.sequence_parallel}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, "
                f"temperature={self.temperature}, shift={self.shift}, "
                f"strategy={self.strategy!r}"
                + (f", filter_eps={self.filter_eps}" if self.filter_eps else ""))
