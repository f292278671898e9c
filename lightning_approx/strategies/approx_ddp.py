"""ApproxDDPStrategy: Lightning's DDP with a communication hook that sends only what the
approximation makes non-zero (or an unbiased sample of it), and random streams that agree
across ranks where they must."""

from __future__ import annotations

import inspect
import logging
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_approx.callbacks.approx_backward import ApproxBackward
from lightning_approx.errors import ConfigError, check_seed
from lightning_approx.layers import EXACT_CLASS, LayerSite
from lightning_approx.methods.forward_sampling import ForwardSampling
from lightning_approx.schedules import Schedule, as_schedule, check_range
from lightning_approx.strategies.comm import (
    COMM_MODES,
    CommState,
    CommTotals,
    SlicedWeight,
    approx_allreduce_hook,
    mix_seed,
)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "approx_ddp"
RANK_SEEDING = ("auto", "per_rank", "shared")
_SHARED_STREAM = -1  # the "rank" of streams every rank draws alike
# DDPStrategy arguments that install another communication hook: DDP takes one hook only.
_FOREIGN_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
# What ``**kwargs`` may hold: DistributedDataParallel's own arguments (Lightning passes ``module``
# and ``device_ids`` itself) and the hook arguments above; anything else would only fail when fit
# builds DDP, far from the config line.
_DDP_KWARGS = (frozenset(inspect.signature(DistributedDataParallel.__init__).parameters)
               - {"self", "module", "device_ids"}) | set(_FOREIGN_HOOK_ARGS)


class ApproxDDPStrategy(DDPStrategy):
    """DDP whose gradient all-reduce carries the approximation's savings across GPUs and nodes.

    A subclass of Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` (launchers,
    cluster environments, checkpointing and every DDP argument work as there) that registers
    its own communication hook, on every device and backend (gloo on CPU, NCCL on GPU;
    Lightning registers hooks on CUDA only). What the hook all-reduces (``comm``):

    - ``"dense"``: every gradient element, averaged over ranks: what plain DDP sends.
    - ``"selected"``: a ``forward_sampling`` layer's weight only in the input channels its
      forward ran on (the others have exactly zero gradient), after the ranks agree on the
      union of their channels (one byte per channel); other parameters whole. Exact: the
      same result as ``"dense"``, bit for bit. With ``rank_by="weight"`` every rank picks the
      same channels, so the union is no larger than one rank's selection.
    - ``"sampled"``: ``"selected"``, then of every parameter the same random ``comm_ratio``
      of its blocks of ``block_size`` elements on every rank (a seed shared per step),
      scaled by 1/(fraction kept): an unbiased estimate of the mean gradient, for methods that
      leave gradients dense (``crs``, ``grad_prune``, ...).
    - ``"auto"``: ``"selected"`` when a ``forward_sampling`` layer is patched, else ``"dense"``.

    Skipped elements arrive as zeros, so every parameter always receives a dense gradient.

    Random streams: each patched layer's streams (on its device and on the host, where uniform
    windows are drawn) are re-seeded at every training batch from
    ``(callback seed, stream, batch counter, layer index)``, so sampling is a pure function of
    progress (a resumed fit draws what the uninterrupted one would). ``stream`` is the global
    rank (``"per_rank"``: every rank samples its own batch independently, which is what makes
    the average over ranks of unbiased estimators such as ``crs`` lower in variance) or shared
    (``"shared"``: the same draws on every rank). ``"auto"`` shares the streams of
    ``forward_sampling`` layers ranked by weight (identical scores, so ``selection="crs"``
    picks identical channels too) and keeps every other layer per rank.

    On the Trainer's logging steps (every ``log_every_n_steps``) the synchronizing backward
    logs ``comm/bytes`` (bytes this rank all-reduced, channel masks included),
    ``comm/bytes_dense`` (what plain DDP would have sent) and ``comm/fraction``; running
    totals are in :attr:`comm_totals` and in checkpoints.

    Args:
        comm: ``"auto"``, ``"dense"``, ``"selected"`` or ``"sampled"`` (see above).
        comm_ratio: ``"sampled"`` only: fraction of each parameter's blocks sent, in (0, 1],
            a float or a :class:`~lightning_approx.schedules.Schedule`. Default 0.5.
        block_size: ``"sampled"`` only: elements per block (the unit that is sent or not).
        seed: Seed of the shared block draws.
        rank_seeding: ``"auto"``, ``"per_rank"`` or ``"shared"``: how the patched layers'
            random streams relate across ranks (see above).
        log_comm: Log the bytes of the synchronizations on the Trainer's logging steps.
        find_unused_parameters: As in :class:`~torch.nn.parallel.DistributedDataParallel`
            (the DDP arguments are named here so that YAML configs can set them).
        static_graph: As in ``DistributedDataParallel``.
        gradient_as_bucket_view: As in ``DistributedDataParallel``.
        bucket_cap_mb: As in ``DistributedDataParallel`` (``None``: its default, 25).
        broadcast_buffers: As in ``DistributedDataParallel``.
        accelerator: As in :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: As in ``DDPStrategy``.
        cluster_environment: As in ``DDPStrategy``.
        checkpoint_io: As in ``DDPStrategy``.
        precision_plugin: As in ``DDPStrategy``.
        process_group_backend: As in ``DDPStrategy`` (default: ``"nccl"`` on CUDA, ``"gloo"`` on CPU).
        timeout: As in ``DDPStrategy``.
        start_method: As in ``DDPStrategy``: ``"popen"`` (``Trainer(strategy="approx_ddp")``),
            ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        **kwargs: Further arguments of ``DistributedDataParallel``.

    Raises:
        ConfigError: An unknown mode, a ``comm_ratio`` outside (0, 1] or given without
            ``comm="sampled"``, a bad ``block_size``, ``rank_seeding`` or ``seed``, a DDP
            argument that installs another communication hook, or a keyword argument that is
            not one of ``DistributedDataParallel``'s.

    Example::

        trainer = Trainer(accelerator="gpu", devices=8, num_nodes=4,
                          strategy=ApproxDDPStrategy(comm="selected"),
                          callbacks=[ApproxBackward({"name": "forward_sampling", "sample_ratio": 0.5,
                                                     "rank_by": "weight"})])
    """

    def __init__(
        self,
        comm: str = "auto",
        comm_ratio: float | Schedule | None = None,
        block_size: int = 1024,
        seed: int = 0,
        rank_seeding: str = "auto",
        log_comm: bool = True,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        bucket_cap_mb: float | None = None,
        broadcast_buffers: bool = True,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        for name in _FOREIGN_HOOK_ARGS:
            if kwargs.get(name) is not None:
                raise ConfigError(name, kwargs[name], "ApproxDDPStrategy installs its own communication hook and "
                                  "DDP takes only one", "drop it, or use lightning's DDPStrategy for your own hook")
        for name, value in kwargs.items():
            if name not in _DDP_KWARGS:
                raise ConfigError(name, value, "is not an argument of ApproxDDPStrategy or DistributedDataParallel",
                                  f"drop it, or use one of {sorted(_DDP_KWARGS - set(_FOREIGN_HOOK_ARGS))}")
        ddp = {"find_unused_parameters": find_unused_parameters, "static_graph": static_graph,
               "gradient_as_bucket_view": gradient_as_bucket_view, "broadcast_buffers": broadcast_buffers}
        if bucket_cap_mb is not None:
            ddp["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method, **ddp, **kwargs)
        if comm not in COMM_MODES:
            raise ConfigError("comm", comm, "unknown communication mode", f"use one of {list(COMM_MODES)}")
        if comm_ratio is not None and comm != "sampled":
            raise ConfigError("comm_ratio", comm_ratio, f"only applies to comm='sampled' (comm is {comm!r})",
                              "set comm='sampled', or drop comm_ratio")
        self.comm = comm
        self.comm_ratio: Schedule | None = None
        if comm == "sampled":
            self.comm_ratio = as_schedule(0.5 if comm_ratio is None else comm_ratio, field="comm_ratio")
            check_range(self.comm_ratio, field="comm_ratio", low=0.0, high=1.0, low_open=True, high_open=False,
                        fix="give the fraction of gradient blocks sent per step, e.g. 0.5")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError("block_size", block_size, "must be a positive whole number",
                              "give e.g. 1024 (elements per block)")
        if rank_seeding not in RANK_SEEDING:
            raise ConfigError("rank_seeding", rank_seeding, "unknown choice", f"use one of {list(RANK_SEEDING)}")
        self.block_size = block_size
        self.seed = check_seed("seed", seed)
        self.rank_seeding = rank_seeding
        self.log_comm = log_comm
        self._totals = CommTotals()
        self._mode = comm  # resolved when fit sets up DDP
        self._comm_state: CommState | None = None
        self._sites: list[LayerSite] = []
        self._tracked: list[ForwardSampling] = []

    # --- registry ----------------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = (("approx_ddp", "popen"), ("approx_ddp_spawn", "spawn"), ("approx_ddp_fork", "fork"),
                   ("approx_ddp_notebook", "fork"))
        for name, start_method in entries:
            if name not in strategy_registry:  # importing twice (a reload) must not raise
                strategy_registry.register(name, cls, description=f"ApproxDDPStrategy with start_method "
                                           f"'{start_method}'", start_method=start_method)

    # --- what is communicated ------------------------------------------------------------------
    @property
    def comm_mode(self) -> str:
        """The mode in use: ``comm`` with ``"auto"`` resolved (``"auto"`` until fit sets up DDP)."""
        return self._mode

    @property
    def comm_totals(self) -> CommTotals:
        """Bytes all-reduced by this rank so far (over resumes), and what plain DDP would have sent."""
        return CommTotals(self._totals.sent, self._totals.dense, self._totals.syncs)

    def use_dense(self) -> None:
        """Switches to ``comm="dense"`` (what plain DDP sends), e.g. for the exact baseline of a
        comparison; call before ``fit``."""
        self.comm, self.comm_ratio, self._mode = "dense", None, "dense"

    @override
    def configure_ddp(self) -> None:
        self._comm_state = self._build_comm_state()
        super().configure_ddp()

    @override
    def _register_ddp_hooks(self) -> None:
        # Lightning registers communication hooks on CUDA only (DDP hooks once needed NCCL);
        # DDP accepts them with every backend, so ours goes on for gloo on CPU as well.
        assert isinstance(self.model, DistributedDataParallel)
        assert self._comm_state is not None
        self.model.register_comm_hook(self._comm_state, approx_allreduce_hook)

    def _build_comm_state(self) -> CommState:
        module = self.lightning_module
        assert module is not None
        layers = [m for m in module.modules() if type(m) in EXACT_CLASS]
        self._sites = [m.approx_site for m in layers]
        sliced = []
        for layer in layers:
            method = layer.approx_site.pipeline.forward_method
            if isinstance(method, ForwardSampling) and layer.weight.requires_grad:
                groups = layer.approx_site.geometry.groups if layer.approx_site.geometry is not None else 1
                sliced.append(SlicedWeight(layer.approx_site, method, layer.weight, groups))
        mode = self.comm
        if mode == "auto":
            mode = "selected" if sliced else "dense"
        elif mode == "selected" and not sliced:
            rank_zero_warn("ApproxDDPStrategy(comm='selected'): no forward_sampling layer is patched, so every "
                           "gradient is all-reduced whole (as with comm='dense')")
        self._mode = mode
        state = CommState(mode, list(module.parameters()), sliced, self.block_size, self.seed, self._totals)
        self._tracked = list({id(sw.method): sw.method for sw in state.sliced}.values())
        for method in self._tracked:
            method.track_selections(True)
        log.debug(f"ApproxDDPStrategy: comm={mode}, {len(self._sites)} patched layers, {len(state.sliced)} sliced")
        return state

    # --- per batch: random streams, schedules -----------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Runs after the callbacks' hook, so ApproxBackward has moved the schedules already.
        super().on_train_batch_start(batch, batch_idx)
        state = self._comm_state
        if state is None:
            return
        trainer = self.lightning_module.trainer
        self._seed_layer_streams(trainer.fit_loop.total_batch_idx)
        state.set_step(trainer.global_step)
        if self.comm_ratio is not None:
            state.ratio = self.comm_ratio(ApproxBackward.progress(trainer, batch_idx))
        # At ratio 1.0 a layer runs its plain forward and records no channels; if that happens
        # inside an accumulation window, the window's record is incomplete: send it whole.
        if any(sw.site.pipeline.is_exact for sw in state.sliced):
            state.dense_window = True

    def _shared_stream(self, site: LayerSite) -> bool:
        if self.rank_seeding != "auto":
            return self.rank_seeding == "shared"
        method = site.pipeline.forward_method
        return isinstance(method, ForwardSampling) and method.rank_by == "weight"

    def _seed_layer_streams(self, batch: int) -> None:
        # The host stream too: uniform windows are drawn on the host whatever the device.
        devices = {self.root_device, torch.device("cpu")}
        for site in self._sites:
            stream = _SHARED_STREAM if self._shared_stream(site) else self.global_rank
            seed = mix_seed(site.seed, stream, batch, site.index)
            for device in devices:
                site.generator(device).manual_seed(seed)

    # --- around the backward: agree on channels, report bytes ---------------------------------------
    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        # Only a backward that synchronizes (not a no_sync accumulation step) reduces: the
        # channel records keep accumulating until then.
        if self._comm_state is not None and isinstance(self.model, DistributedDataParallel) \
                and self.model.require_backward_grad_sync:
            self._comm_state.agree_selections()

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._comm_state is None:
            return
        report = self._comm_state.end_sync()
        # Logged on the Trainer's logging steps only, as ApproxBackward's metrics (the byte totals
        # count every step).
        trainer = self.lightning_module.trainer
        if report is not None and self.log_comm and trainer._logger_connector.should_update_logs:
            self.lightning_module.log_dict(
                {"comm/bytes": float(report.sent), "comm/bytes_dense": float(report.dense),
                 "comm/fraction": report.fraction}, on_step=True, on_epoch=False, batch_size=1)

    # --- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The communication state saved in checkpoints: settings and byte totals. (The
        random streams are functions of progress: nothing to save.)"""
        return {"comm": self.comm, "comm_mode": self.comm_mode,
                "comm_ratio": None if self.comm_ratio is None else self.comm_ratio.to_config(),
                "block_size": self.block_size, "seed": self.seed, "totals": self._totals.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the byte totals; warns when the saved run communicated differently."""
        saved = {k: state.get(k) for k in ("comm", "comm_ratio", "block_size", "seed")}
        mine = {k: v for k, v in self.state_dict().items() if k in saved}
        if saved != mine:
            rank_zero_warn(f"ApproxDDPStrategy: resuming with {mine} from a checkpoint saved with {saved}")
        loaded = CommTotals.from_dict(state.get("totals", {}))
        self._totals.sent, self._totals.dense, self._totals.syncs = loaded.sent, loaded.dense, loaded.syncs

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # Every rank holds the same totals (each sends the same bytes), so rank 0's suffice.
        checkpoint[CHECKPOINT_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if CHECKPOINT_KEY in checkpoint:
            self.load_state_dict(checkpoint[CHECKPOINT_KEY])
        return checkpoint

    @override
    def teardown(self) -> None:
        for method in self._tracked:
            method.track_selections(False)
        self._tracked = []
        self._comm_state = None
        self._sites = []
        super().teardown()
