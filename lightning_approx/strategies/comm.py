"""What each rank all-reduces: the DDP communication hook of
:class:`~lightning_approx.strategies.ApproxDDPStrategy` and the state it reads.

DDP hands the hook one bucket at a time: a flat buffer holding the local gradients of a few
parameters. Plain DDP divides it by the world size and all-reduces all of it. This hook sends
a smaller payload in two cases, and always hands DDP back a full, dense buffer (zeros where
nothing was sent), so every parameter gets a gradient on every rank and DDP never waits:

- ``"selected"``: the weight of a ``forward_sampling`` layer gets gradients only in the input
  channels its forward ran on (the rest are exactly zero on the rank). Before a synchronizing
  backward the ranks agree on the union of their channels (one all-reduce of a bool per
  channel); then only those slices are all-reduced. Exact: the result equals a dense
  all-reduce bit for bit. With ``rank_by="weight"`` every rank picks the same channels, so the
  union is each rank's own selection.
- ``"sampled"``: additionally, every parameter's gradient is cut into blocks of
  ``block_size`` elements (in its logical, row-major order) and each rank sends the same
  random ``ceil(ratio * blocks)`` of them, drawn from a seed shared by all ranks for this
  step and parameter, scaled by ``blocks / sent_blocks``: an unbiased estimate of the mean
  gradient. Parameters of one block (biases, norms) always go whole.

The randomness is keyed by ``(seed, global step, reduction within the step, parameter
index)``, not by DDP's bucket layout (which DDP rebuilds after the first step and again in a
resumed run), so a resumed fit draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_approx.ops.sampling import sample_count

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite
    from lightning_approx.methods.forward_sampling import ForwardSampling

COMM_MODES = ("auto", "dense", "selected", "sampled")
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 folded over them).

    Streams keyed by ``(seed, rank, batch, layer)`` this way are a pure function of the key:
    nothing to save, and a resumed fit continues the same streams.
    """
    h = _GOLDEN
    for part in parts:
        h = ((h ^ (part & _MASK64)) + _GOLDEN) & _MASK64  # negative parts: two's complement
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@dataclass
class CommTotals:
    """Bytes all-reduced by one rank (every rank sends the same amount).

    Attributes:
        sent: Bytes this rank passed to all-reduce: gradient payloads and channel masks.
        dense: Bytes plain DDP would have all-reduced for the same synchronizations.
        syncs: Gradient synchronizations (backward passes that all-reduced).
    """

    sent: int = 0
    dense: int = 0
    syncs: int = 0

    @property
    def fraction(self) -> float:
        """``sent / dense`` (1.0 before anything was sent)."""
        return self.sent / self.dense if self.dense else 1.0

    def add(self, other: CommTotals) -> None:
        self.sent += other.sent
        self.dense += other.dense
        self.syncs += other.syncs

    def to_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "dense": self.dense, "syncs": self.syncs}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CommTotals:
        return cls(int(state.get("sent", 0)), int(state.get("dense", 0)), int(state.get("syncs", 0)))


@dataclass(eq=False)
class SlicedWeight:
    """The weight of a ``forward_sampling`` layer, whose gradient is non-zero only in the
    input channels (Linear: input features) its training forwards ran on.

    Attributes:
        site: The layer's site (its name keys the method's selection record).
        method: The layer's :class:`~lightning_approx.methods.ForwardSampling`.
        param: The weight, ``(C_out, C_in / groups, ...)``.
        groups: Conv groups (1 for Linear).
    """

    site: LayerSite
    method: ForwardSampling
    param: nn.Parameter
    groups: int

    @property
    def channels(self) -> int:
        """Input channels per group."""
        return self.param.shape[1]

    def expand(self, channels: Tensor) -> Tensor:
        """A ``(groups, C_in / groups)`` channel mask as a mask of the weight's shape."""
        w = self.param
        trailing = w.shape[2:]
        m = channels.view(self.groups, 1, self.channels, *([1] * len(trailing)))
        return m.expand(self.groups, w.shape[0] // self.groups, self.channels, *trailing).reshape(w.shape)


@dataclass(eq=False)
class Piece:
    """One parameter's part of a bucket's payload: the gradient slices of its kept input
    channels (all of them when ``channels`` is ``None``), then its kept blocks of
    ``block_size`` elements in the slices' row-major order (all when ``blocks`` is ``None``).

    Gathers and scatters run on whole rows and blocks (``index_select`` / ``index_copy_``),
    never through element masks of the parameter's size.
    """

    grad: Tensor  # the gradient's view into the bucket buffer, in DDP's layout
    channels: list[Tensor] | None  # per group: kept input channels (sorted, on the device)
    blocks: Tensor | None  # kept blocks wholly inside the sliced values (sorted, on the device)
    tail: bool  # whether the last, partial block is kept too
    block_size: int
    numel: int  # elements of the sliced values (before blocks)
    size: int  # elements sent
    boost: float  # 1 / (fraction of blocks kept): what keeps a sampled sum unbiased

    def gather(self) -> Tensor:
        values = self._sliced()
        if self.blocks is None:
            return values
        b = self.block_size
        full = self.numel // b
        parts = [values[: full * b].view(full, b).index_select(0, self.blocks).reshape(-1)]
        if self.tail:
            parts.append(values[full * b:])
        return torch.cat(parts)

    def scatter(self, sent: Tensor) -> None:
        """Writes the reduced ``sent`` values back into the gradient, zeros where nothing was sent."""
        if self.blocks is None:
            values = sent
        else:
            b = self.block_size
            full = self.numel // b
            values = sent.new_zeros(self.numel)
            body = self.blocks.numel() * b
            values[: full * b].view(full, b).index_copy_(0, self.blocks, sent[:body].view(-1, b))
            if self.tail:
                values[full * b:] = sent[body:]
        g = self.grad
        if self.channels is None:
            g.copy_(values.view(g.shape))  # copy_ follows the view's strides, whatever DDP's layout
            return
        g.zero_()
        rows = g.shape[0] // len(self.channels)
        offset = 0
        for i, idx in enumerate(self.channels):
            block = g[i * rows:(i + 1) * rows]
            n = rows * idx.numel() * math.prod(g.shape[2:])
            block.index_copy_(1, idx, values[offset:offset + n].view(rows, idx.numel(), *g.shape[2:]))
            offset += n

    def _sliced(self) -> Tensor:
        g = self.grad
        if self.channels is None:
            return g.reshape(-1)
        rows = g.shape[0] // len(self.channels)
        parts = [g[i * rows:(i + 1) * rows].index_select(1, idx).reshape(-1) for i, idx in enumerate(self.channels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class CommState:
    """What :func:`approx_allreduce_hook` reads; owned and driven by the strategy.

    Args:
        mode: ``"dense"``, ``"selected"`` or ``"sampled"`` (``"auto"`` resolved by the strategy).
        params: The module's parameters in ``module.parameters()`` order (the same on every
            rank); a parameter's position keys its random blocks.
        sliced: The weights of the ``forward_sampling`` layers.
        block_size: Elements per block in ``"sampled"`` mode.
        seed: Seed of the shared block draws.
        totals: Running totals (the strategy's, so they outlive the hook and reach checkpoints).
        group: Process group (``None``: the world).
    """

    def __init__(self, mode: str, params: list[nn.Parameter], sliced: list[SlicedWeight], block_size: int,
                 seed: int, totals: CommTotals, group: Any = None) -> None:
        self.mode = mode
        self.sliced = sliced if mode in ("selected", "sampled") else []
        self.block_size = block_size
        self.seed = seed
        self.totals = totals
        self.group = group
        self.ratio = 1.0  # "sampled": fraction of blocks sent, set every batch from the schedule
        self.step = 0
        self.dense_window = False  # a sliced layer ran its plain forward (no record) since the last sync
        # id(param) -> per group, the input channels kept at the coming sync (absent: all)
        self.channels: dict[int, list[Tensor]] = {}
        self._index = {id(p): i for i, p in enumerate(params)}
        self._calls: dict[int, int] = {}  # parameter index -> reductions so far within ``step``
        self._pending = CommTotals()

    # --- driven by the strategy -----------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Moves to optimizer step ``step`` (restarts the per-step reduction counters)."""
        if step != self.step:
            self.step = step
            self._calls.clear()

    def agree_selections(self) -> None:
        """Before a synchronizing backward: takes every sliced layer's channel record, makes
        it the union over ranks (one all-reduce of a byte per channel) and keeps it as the
        channels to send. A layer without a record, or any layer after a plain forward in
        this accumulation window, is sent whole: dense is always safe."""
        self.channels.clear()
        if not self.sliced:
            return
        parts = []
        for sw in self.sliced:
            taken = sw.method.take_selection(sw.site.name)
            if taken is None or self.dense_window or taken.shape != (sw.groups, sw.channels):
                taken = torch.ones(sw.groups, sw.channels, dtype=torch.bool, device=sw.param.device)
            parts.append(taken.reshape(-1).to(torch.uint8))
        flat = torch.cat(parts)
        # Every rank takes part with a mask of the same size, whatever it recorded, so the
        # collective always matches.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)
        self._pending.sent += flat.numel() * flat.element_size()
        union = flat.cpu().bool()  # one small copy (a byte per channel): the sizes must be known on the host
        offset = 0
        for sw in self.sliced:
            chunk = union[offset:offset + sw.groups * sw.channels].view(sw.groups, sw.channels)
            offset += sw.groups * sw.channels
            if not bool(chunk.all()):
                self.channels[id(sw.param)] = [row.nonzero().flatten().to(sw.param.device) for row in chunk]
        self.dense_window = False

    def end_sync(self) -> CommTotals | None:
        """After a backward: what it all-reduced (``None`` if it did not synchronize), added
        to the totals."""
        pending, self._pending = self._pending, CommTotals()
        self.channels.clear()
        if pending.dense == 0:
            return None
        pending.syncs = 1
        self.totals.add(pending)
        return pending

    # --- read by the hook -------------------------------------------------------------------
    def plan(self, bucket: dist.GradBucket) -> list[Piece] | None:
        """What to send of each parameter of the bucket, or ``None`` when it is all of every
        parameter (then the bucket buffer itself goes, as plain DDP sends it)."""
        sampled = self.mode == "sampled" and self.ratio < 1.0
        params = bucket.parameters()
        if not sampled and not any(id(p) in self.channels for p in params):
            return None
        pieces = []
        for p, g in zip(params, bucket.gradients(), strict=True):
            channels = self.channels.get(id(p))
            numel = g.numel() if channels is None else \
                g.numel() // (len(channels) * g.shape[1]) * sum(idx.numel() for idx in channels)
            blocks, tail, size, kept = None, False, numel, 1.0
            if sampled:
                blocks, tail, size, kept = self._blocks(p, numel, g.device)
            pieces.append(Piece(g, channels, blocks, tail, self.block_size, numel, size, 1.0 / kept))
        return pieces

    def count(self, buffer: Tensor, sent: int) -> None:
        self._pending.dense += buffer.numel() * buffer.element_size()
        self._pending.sent += sent * buffer.element_size()

    def _blocks(self, param: Tensor, numel: int, device: torch.device) -> tuple[Tensor | None, bool, int, float]:
        """The shared random blocks of ``param``'s sliced values sent at this reduction: the
        kept whole blocks (``None``: all blocks), whether the partial last block is kept, the
        elements sent, and the fraction of blocks kept."""
        b = self.block_size
        total = math.ceil(numel / b)
        kept = sample_count(self.ratio, total)
        if kept >= total:
            return None, False, numel, 1.0
        index = self._index[id(param)]
        call = self._calls.get(index, 0)
        self._calls[index] = call + 1
        # A CPU generator: the same draw on every rank whatever the device type.
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.step, call, index))
        chosen = torch.randperm(total, generator=gen)[:kept].sort().values
        full = numel // b
        tail = bool(chosen[-1] == full)  # the partial block (numel % b elements), if there is one
        body = chosen[:-1] if tail else chosen
        size = body.numel() * b + (numel - full * b if tail else 0)
        return body.to(device), tail, size, kept / total


def approx_allreduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: all-reduces the part of the bucket ``state`` selects and
    returns the whole bucket, averaged over ranks, zero where nothing was sent.

    Register with ``ddp_model.register_comm_hook(state, approx_allreduce_hook)``; works with
    gloo (CPU) and NCCL (GPU).
    """
    buffer = bucket.buffer()
    world = dist.get_world_size(state.group)
    pieces = state.plan(bucket)
    if pieces is None:  # everything goes: the buffer itself, as plain DDP sends it
        buffer.div_(world)
        state.count(buffer, buffer.numel())
        fut = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    payload = pack(pieces, world)
    state.count(buffer, payload.numel())
    fut = dist.all_reduce(payload, group=state.group, async_op=True).get_future()
    return fut.then(lambda f: unpack(buffer, pieces, f.value()[0]))


def pack(pieces: list[Piece], world: int) -> Tensor:
    """The payload: every piece's values over ``world`` (the mean, divided exactly as plain
    DDP divides, so unsampled values reduce to the same bits), sampled ones times their boost."""
    payload = torch.cat([piece.gather() for piece in pieces]).div_(world)
    offset = 0
    for piece in pieces:
        if piece.boost != 1.0:
            payload[offset:offset + piece.size].mul_(piece.boost)
        offset += piece.size
    return payload


def unpack(buffer: Tensor, pieces: list[Piece], reduced: Tensor) -> Tensor:
    """Writes the reduced payload back into the bucket, zeros where nothing was sent (the
    same on every rank), so DDP gets a dense gradient for every parameter."""
    offset = 0
    for piece in pieces:
        piece.scatter(reduced[offset:offset + piece.size])
        offset += piece.size
    return buffer


# DDP checks the hook's annotations as objects; postponed (string) annotations would fail it.
approx_allreduce_hook.__annotations__.update(bucket=dist.GradBucket, state=CommState,
                                             **{"return": torch.futures.Future[torch.Tensor]})
