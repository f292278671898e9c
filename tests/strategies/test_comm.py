"""The communication hook's arithmetic in one process, on hand-made buckets: the sampled
reduction is unbiased and draws the same blocks on every rank, masks land on the right
elements whatever the bucket layout, and the payload has the expected size."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_approx.strategies.comm import CommState, CommTotals, pack, unpack
from tests.statistics import assert_unbiased


class Bucket:
    """What the hook reads from ``dist.GradBucket``: a flat buffer, the parameters, and their
    gradients as views into the buffer (here with any strides, as DDP may lay them out)."""

    def __init__(self, params: list[nn.Parameter], strides: list[tuple[int, ...] | None] | None = None) -> None:
        self._params = params
        self._buffer = torch.zeros(sum(p.numel() for p in params))
        self._grads, offset = [], 0
        for p, stride in zip(params, strides or [None] * len(params), strict=True):
            stride = stride or torch.empty(p.shape).stride()
            self._grads.append(self._buffer.as_strided(p.shape, stride, offset))
            offset += p.numel()

    def fill(self, grads: list[Tensor]) -> None:
        for view, g in zip(self._grads, grads, strict=True):
            view.copy_(g)

    def buffer(self) -> Tensor:
        return self._buffer

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def gradients(self) -> list[Tensor]:
        return self._grads

    def grads(self) -> list[Tensor]:
        return [g.clone() for g in self._grads]


def reduce(state: CommState, bucket: Bucket, world: int = 1) -> tuple[list[Tensor], int]:
    """The hook on one rank of a world where every rank holds this bucket: returns the
    gradients DDP would get and the number of elements sent."""
    pieces = state.plan(bucket)
    buffer = bucket.buffer()
    if pieces is None:
        buffer.div_(world).mul_(world)  # the all-reduce sum over ``world`` identical ranks
        return bucket.grads(), buffer.numel()
    payload = pack(pieces, world)
    unpack(buffer, pieces, payload * world)
    return bucket.grads(), payload.numel()


def params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(6, 4, 3, 3)), nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(5, 7))]


def test_sampled_reduction_is_unbiased_and_sends_the_expected_fraction():
    ps = params()
    bucket = Bucket(ps)
    torch.manual_seed(0)
    exact = [torch.randn(p.shape) for p in ps]
    state = CommState("sampled", ps, [], block_size=8, seed=1, totals=CommTotals())
    state.ratio = 0.25
    step = iter(range(10**6))
    sizes = []

    def draw() -> Tensor:
        state.set_step(next(step))
        bucket.fill(exact)
        grads, sent = reduce(state, bucket, world=2)
        sizes.append(sent)
        return torch.cat([g.flatten() for g in grads])

    assert_unbiased(draw, torch.cat([g.flatten() for g in exact]), samples=1500)
    # 216 elements: 7 of 27 blocks; the bias (one block) whole; 35 elements: 2 of 5 blocks (the last holds 3)
    blocks = [math.ceil(0.25 * 27) * 8, 6]
    assert all(s - sum(blocks) in (2 * 8, 8 + 3) for s in sizes)


def test_ranks_draw_the_same_blocks_and_steps_draw_new_ones():
    ps = params()
    ranks = [CommState("sampled", ps, [], block_size=4, seed=5, totals=CommTotals()) for _ in range(2)]
    masks = []
    for step in (3, 3, 4):
        keeps = []
        for state in ranks:
            state.ratio = 0.5
            state.set_step(step)
            state._calls.clear()  # the same reduction of the same step on both ranks
            bucket = Bucket(ps)
            bucket.fill([torch.randn(p.shape) for p in ps])  # each rank its own gradients
            keeps.append(sent_elements(state, bucket))
        assert torch.equal(keeps[0], keeps[1])
        masks.append(keeps[0])
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_a_second_reduction_within_a_step_draws_new_blocks():
    ps = params()
    state = CommState("sampled", ps, [], block_size=4, seed=5, totals=CommTotals())
    state.ratio = 0.5
    first, second = (sent_elements(state, Bucket(ps)) for _ in range(2))
    assert not torch.equal(first, second)


def sent_elements(state: CommState, bucket: Bucket) -> Tensor:
    """Which gradient elements the hook sends (as a flat bool over the parameters)."""
    ps = bucket.parameters()
    bucket.fill([torch.arange(1, p.numel() + 1, dtype=torch.float).view(p.shape) for p in ps])
    grads, _ = reduce(state, bucket)
    return torch.cat([g.flatten() != 0 for g in grads])


def test_channel_masks_land_on_their_elements_in_any_layout():
    ps = params()
    conv = ps[0]
    # the conv gradient laid out channels-last inside the bucket, as DDP may do
    channels_last = torch.empty(conv.shape).contiguous(memory_format=torch.channels_last).stride()
    bucket = Bucket(ps, [channels_last, None, None])
    torch.manual_seed(0)
    exact = [torch.randn(p.shape) for p in ps]
    keep = torch.zeros(conv.shape, dtype=torch.bool)
    keep[:, [0, 2]] = True
    exact[0] = exact[0] * keep  # the forward ran on channels 0 and 2 only: zero elsewhere
    state = CommState("selected", ps, [], block_size=8, seed=0, totals=CommTotals())
    state.channels[id(conv)] = [torch.tensor([0, 2])]
    bucket.fill(exact)
    grads, sent = reduce(state, bucket, world=2)
    assert sent == int(keep.sum()) + 6 + 35
    for g, e in zip(grads, exact, strict=True):
        assert torch.equal(g, e)  # the mean over two equal ranks, bit for bit


def test_dense_sends_everything_and_averages():
    ps = params()
    bucket = Bucket(ps)
    exact = [torch.randn(p.shape) for p in ps]
    bucket.fill(exact)
    state = CommState("dense", ps, [], block_size=8, seed=0, totals=CommTotals())
    grads, sent = reduce(state, bucket, world=4)
    assert sent == sum(p.numel() for p in ps)
    assert all(torch.allclose(g, e) for g, e in zip(grads, exact, strict=True))


def test_grouped_channels_differ_per_group_and_combine_with_unbiased_blocks():
    grouped = nn.Parameter(torch.zeros(6, 4, 3, 3))  # groups=2: rows 0-2 read channels of group 0
    other = nn.Parameter(torch.zeros(5))
    ps = [grouped, other]
    channels_last = torch.empty(grouped.shape).contiguous(memory_format=torch.channels_last).stride()
    bucket = Bucket(ps, [channels_last, None])
    torch.manual_seed(0)
    keep = torch.zeros(grouped.shape, dtype=torch.bool)
    keep[:3, [1]] = True  # group 0 kept channel 1, group 1 channels 0 and 3
    keep[3:, [0, 3]] = True
    exact = [torch.randn(grouped.shape) * keep, torch.randn(5)]
    chosen = [torch.tensor([1]), torch.tensor([0, 3])]

    selected = CommState("selected", ps, [], block_size=4, seed=0, totals=CommTotals())
    selected.channels[id(grouped)] = chosen
    bucket.fill(exact)
    grads, sent = reduce(selected, bucket, world=2)
    assert sent == int(keep.sum()) + 5
    assert all(torch.equal(g, e) for g, e in zip(grads, exact, strict=True))

    sampled = CommState("sampled", ps, [], block_size=4, seed=0, totals=CommTotals())
    sampled.ratio = 0.5
    step = iter(range(10**6))

    def draw() -> Tensor:
        sampled.set_step(next(step))
        sampled.channels[id(grouped)] = chosen
        bucket.fill(exact)
        grads, sent = reduce(sampled, bucket, world=2)
        # 81 sliced values (3*1*9 + 3*2*9): 11 of 21 blocks, the last holding 1 value (44 or 41
        # values); the bias: 1 of 2 blocks (4 or 1 values)
        assert sent in (44 + 4, 44 + 1, 41 + 4, 41 + 1)
        return torch.cat([g.flatten() for g in grads])

    assert_unbiased(draw, torch.cat([g.flatten() for g in exact]), samples=1500)
