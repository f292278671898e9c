"""ApproxBackward: train with an approximate backward pass by adding one callback."""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_approx.batch_norm import batch_norms, recalibrate_batch_norm
from lightning_approx.errors import ConfigError, check_seed
from lightning_approx.layers import LayerSite
from lightning_approx.methods import Method
from lightning_approx.ops.accounting import WorkCounter
from lightning_approx.schedules import Progress, Schedule
from lightning_approx.surgery import (
    AUTO,
    approximate,
    check_exclude,
    make_pipeline,
    patched_sites,
    restore,
    select_layers,
)


class ApproxBackward(Callback):
    """Patches the model's Conv2d / Linear layers at fit start and puts the exact ones back
    at fit end (and when fit raises).

    The layers keep their parameters, so the optimizer, DDP and checkpoints need no change.
    They must exist at the callback's setup, so build them in the LightningModule's
    ``__init__``; and one ApproxBackward per Trainer: combine methods in a list.
    Each training step moves the method's schedules to the current progress (fractional
    epoch and global step, which Lightning restores on resume) and counts the work done. On
    the steps the Trainer writes its logs (every ``log_every_n_steps``, as Lightning's own
    monitors do) it logs that step's:

    - ``approx/<method>.<setting>``: the current value of each scheduled setting;
    - ``approx/backward_work``: backward multiply-accumulates computed over exact, all layers;
    - ``approx/work/<layer>``: the same per layer (when ``log_per_layer``);
    - ``approx/zero_work``: the part of the exact backward MACs known to multiply zeros
      (``relu_mask``, ``grad_prune``), whether or not it was skipped;
    - ``approx/<method>.<metric>``: what a method measured, e.g. realized sparsity;
    - ``approx/step_time``: seconds from batch start to batch end;
    - ``approx/active``: 1.0 inside ``active_epochs``, 0.0 outside (only when it is set);
    - every ``fidelity_every_n_steps`` steps, ``approx/fidelity/<input|weight>.<cos|rel_err>``:
      cosine similarity and relative error of each layer's approximate gradients against the
      exact ones for the same incoming gradient, averaged over layers (per layer under
      ``approx/fidelity/<layer>/...`` when ``log_per_layer``). Costs one exact backward of
      every patched layer on those steps; layers whose forward is replaced
      (``forward_sampling``) are not probed.

    Args:
        method: A method name (``"crs"``), a :class:`~lightning_approx.methods.Method`, a list
            of methods that compose, or a mapping from YAML (``{name: crs, sample_ratio: 0.25}``
            or ``class_path`` / ``init_args``). The example scripts' short form
            ``"relu_mask+crs"`` is refused with the list to write instead.
        sample_ratio: With a sampling method given by name: the fraction computed, a float in
            (0, 1] or a :class:`~lightning_approx.schedules.Schedule`. Default: the method's.
        exclude: Layers kept exact: ``"auto"`` (stem conv and final classifier), ``None``, or
            name patterns (``"layer3.*"``), ``"auto"`` allowed among them.
        seed: Seed of the layers' random streams: a whole number in ``[-2**63, 2**63)``.
        log_per_layer: Also log each layer's backward work.
        sync_cuda: Synchronize CUDA before reading the step time (otherwise it measures
            launch time only).
        fidelity_every_n_steps: Measure gradient fidelity every N steps (0: never).
        recalibrate_bn: With a method that replaces the training forward
            (``forward_sampling``): before every validation of the fit and at the end of
            training, recompute batch norm's running statistics from this many training
            batches run through the exact layers (no gradients), because training updated them
            on the sampled forward while evaluation runs the exact one. Batch norms in eval mode
            during the training steps (frozen) keep their statistics. 0: never. Each batch
            goes through the Trainer's batch-transfer hooks, and its first element (or the
            batch itself, when it is a tensor) is passed to the LightningModule.
        active_epochs: ``[begin, end)``: the (fractional) epochs in which the methods run;
            outside them every layer runs its plain op, as at an exact setting. ``end`` may be
            ``None`` (to the end of training). ``None``: every epoch. For methods without a rate
            to schedule (``patch_grad``), e.g. ``[4, None]`` approximates only from epoch 4 on.

    Example::

        trainer = Trainer(callbacks=[ApproxBackward("crs", sample_ratio=0.5)])
    """

    def __init__(
        self,
        method: str | Method | dict[str, Any] | list[str | Method | dict[str, Any]] = "crs",
        sample_ratio: float | Schedule | dict[str, Any] | None = None,
        exclude: str | list[str] | None = AUTO,
        seed: int = 0,
        log_per_layer: bool = True,
        sync_cuda: bool = True,
        fidelity_every_n_steps: int = 0,
        recalibrate_bn: int = 0,
        active_epochs: list[float | None] | tuple[float, float | None] | None = None,
    ) -> None:
        super().__init__()
        hyperparameters = {} if sample_ratio is None else {"sample_ratio": sample_ratio}
        self.pipeline = make_pipeline(method, **hyperparameters)  # validates now, not at fit
        self.exclude = check_exclude(exclude)  # its layer names are checked at setup, with the model
        self.seed = check_seed("seed", seed)
        self.log_per_layer = log_per_layer
        self.sync_cuda = sync_cuda
        if isinstance(fidelity_every_n_steps, bool) or not isinstance(fidelity_every_n_steps, int) \
                or fidelity_every_n_steps < 0:
            raise ConfigError("fidelity_every_n_steps", fidelity_every_n_steps, "must be a whole number >= 0",
                              "give 0 to turn it off, or e.g. 50")
        self.fidelity_every_n_steps = fidelity_every_n_steps
        if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ConfigError("recalibrate_bn", recalibrate_bn, "must be a whole number of batches >= 0",
                              "give 0 to keep the running statistics training leaves, or e.g. 5")
        if recalibrate_bn and self.pipeline.forward_method is None:
            raise ConfigError("recalibrate_bn", recalibrate_bn,
                              f"{[m.name for m in self.pipeline.methods]} leave the training forward exact, so batch "
                              "norm's running statistics already describe the evaluated network",
                              "give 0, or use a method that samples the forward (forward_sampling)")
        self.recalibrate_bn = recalibrate_bn
        self.active_epochs = check_active_epochs(active_epochs)
        self._recalibrated_at: int | None = None  # global step of the last recalibration
        self._frozen_bn: list[torch.nn.Module] | None = None  # batch norms in eval mode during training
        self.layer_names: list[str] = []
        self.totals = WorkCounter()  # whole fit, for summaries
        self._pending_rng: dict[str, Any] | None = None
        self._t0 = 0.0
        self._progress = Progress(epoch=0.0, step=0)
        self._model: torch.nn.Module | None = None
        self._sites: list[LayerSite] = []  # the patched layers' sites, found once at setup

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=[m.name for m in self.pipeline.methods])

    # --- patch and restore -----------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in pl_module.modules()):
            # Otherwise select_layers would blame ``exclude`` for leaving nothing to approximate.
            raise ConfigError("model", type(pl_module).__name__, "has no Conv2d/Linear layer at ApproxBackward's "
                              "setup: layers built in LightningModule.setup() or configure_model() are created after "
                              "the callbacks' setup, so none of them would be approximated",
                              "build the layers in the LightningModule's __init__")
        if patched_sites(pl_module):
            # A second patch would silently replace the first callback's method while it keeps logging.
            raise ConfigError("method", [m.name for m in self.pipeline.methods],
                              "the model's layers are already patched (another ApproxBackward on this Trainer, or "
                              "approximate() called before fit)", "use one ApproxBackward with a list of methods that "
                              "compose, e.g. method=['relu_mask', 'crs'], and call restore(model) before fit if you "
                              "patched it yourself")
        self.layer_names = approximate(pl_module, self.pipeline, exclude=self.exclude, seed=self.seed)
        self._model = pl_module
        self._sites = patched_sites(pl_module)
        self.totals.reset()
        if self._pending_rng is not None:
            self._apply_rng(self._pending_rng)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_no_late_layers(pl_module)
        self._recalibrated_at = None
        self._frozen_bn = None
        if self.recalibrate_bn == 0 and self.pipeline.forward_method is not None and batch_norms(pl_module):
            rank_zero_warn(f"ApproxBackward: {self.pipeline.forward_method.name!r} trains batch norm's running "
                           "statistics on the sampled forward, while evaluation runs the exact layers; set "
                           "recalibrate_bn (e.g. 5) to recompute them before each validation and at the end")

    def _check_no_late_layers(self, pl_module: pl.LightningModule) -> None:
        """Refuses layers this callback would approximate that were not in the model at ``setup``."""
        with warnings.catch_warnings():  # setup already warned about layers it cannot patch
            warnings.simplefilter("ignore")
            selected = select_layers(pl_module, self.exclude)
        late = [name for name, module in selected if "approx_site" not in module.__dict__]
        if late:
            raise ConfigError("model", type(pl_module).__name__,
                              f"has Conv2d/Linear layers that were not there at ApproxBackward's setup: {late}. "
                              "Layers built in LightningModule.setup() or configure_model() come after the callbacks' "
                              "setup, so they would train exactly",
                              "build the layers in the LightningModule's __init__")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for method in self.pipeline.methods:  # the methods may outlive this fit (another Trainer)
            method.suspended = False
        if self._model is not None:
            restore(self._model)
            self._model = None
            self._sites = []

    # --- batch-norm recalibration (forward methods) -------------------------------------
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._recalibrate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recalibrate(trainer, pl_module)

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recomputes the running statistics, unless no training step ran since the last time."""
        if not self.recalibrate_bn or self._model is None or self._recalibrated_at == trainer.global_step:
            return
        inputs = training_inputs(trainer, pl_module, self.recalibrate_bn)
        recalibrate_batch_norm(pl_module, inputs, frozen=self._frozen_bn)
        self._recalibrated_at = trainer.global_step

    # --- schedules, accounting, logging ---------------------------------------------------
    @staticmethod
    def progress(trainer: pl.Trainer, batch_idx: int) -> Progress:
        """Fractional epoch and global step of the batch about to run."""
        batches = trainer.num_training_batches
        within = batch_idx / batches if isinstance(batches, int) and batches > 0 else 0.0
        return Progress(epoch=trainer.current_epoch + within, step=trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._progress = self.progress(trainer, batch_idx)
        self.pipeline.update(self._progress)
        if self.active_epochs is not None:
            begin, end = self.active_epochs
            suspended = not (begin <= self._progress.epoch and (end is None or self._progress.epoch < end))
            for method in self.pipeline.methods:
                method.suspended = suspended
        if self.recalibrate_bn:
            # Validation puts every module in eval mode, so which batch norms the user froze is read here.
            self._frozen_bn = [m for m in batch_norms(pl_module) if not m.training]
        probe = self.fidelity_every_n_steps > 0 and trainer.global_step % self.fidelity_every_n_steps == 0
        for site in self._sites:
            site.work.reset()
            site.probe = probe
            site.fidelity = {}
        for method in self.pipeline.methods:
            method.reset_metrics()
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        step_time = time.perf_counter() - self._t0
        step = WorkCounter()
        for site in self._sites:
            step.add(site.work.exact, site.work.computed, site.work.zero)
        self.totals.add(step.exact, step.computed, step.zero)
        self._log_fidelity(trainer)
        # Lightning writes step metrics only on these steps (its own monitors check the same);
        # ~22 values through log_dict on every step cost 3-4 % of a ResNet-20 fit on a 2-core
        # CPU (benchmarks/fit_overhead.py).
        if not trainer._logger_connector.should_update_logs:
            return
        metrics: dict[str, float] = {}
        if self.log_per_layer:
            metrics.update({f"approx/work/{site.name}": site.work.fraction for site in self._sites})
        metrics["approx/backward_work"] = step.fraction
        metrics["approx/zero_work"] = step.zero / step.exact if step.exact else 0.0
        metrics["approx/step_time"] = step_time
        metrics.update({f"approx/{k}": v for k, v in self.pipeline.values().items()})
        if self.active_epochs is not None:
            metrics["approx/active"] = float(not self.pipeline.methods[0].suspended)
        for method in self.pipeline.methods:
            metrics.update({f"approx/{method.name}.{k}": v for k, v in method.metrics().items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def _log_fidelity(self, trainer: pl.Trainer) -> None:
        fidelity = self._fidelity_metrics(self._sites)
        if fidelity:
            # Straight to the loggers: through log_dict a metric logged on some steps only would
            # be repeated with its stale value on the others.
            for logger in trainer.loggers:
                logger.log_metrics(fidelity, step=trainer.global_step - 1)

    def _fidelity_metrics(self, sites: list) -> dict[str, float]:
        probed = [site for site in sites if site.fidelity]
        metrics: dict[str, float] = {}
        for key in sorted({k for site in probed for k in site.fidelity}):
            values = [site.fidelity[key] for site in probed if key in site.fidelity]
            metrics[f"approx/fidelity/{key}"] = sum(values) / len(values)
            if self.log_per_layer:
                metrics.update({f"approx/fidelity/{s.name}/{key}": s.fidelity[key]
                                for s in probed if key in s.fidelity})
        for site in sites:
            site.probe = False
        return metrics

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    # --- checkpoints -------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        sites = patched_sites(self._model) if self._model is not None else []
        return {
            "pipeline": self.pipeline.to_config(),
            "progress": {"epoch": self._progress.epoch, "step": self._progress.step},
            "totals": {"exact": self.totals.exact, "computed": self.totals.computed, "zero": self.totals.zero},
            "rng": {site.name: site.rng_state() for site in sites},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("pipeline")
        if saved is not None and saved != self.pipeline.to_config():
            rank_zero_warn(f"ApproxBackward: resuming with method {self.pipeline.to_config()} from a checkpoint "
                           f"saved with {saved}; the schedules follow the new settings")
        totals = state_dict.get("totals", {})
        self.totals = WorkCounter(totals.get("exact", 0), totals.get("computed", 0), totals.get("zero", 0))
        progress = state_dict.get("progress")
        if progress:
            self._progress = Progress(epoch=float(progress["epoch"]), step=int(progress["step"]))
        self._pending_rng = state_dict.get("rng")
        if self._model is not None and self._pending_rng is not None:
            self._apply_rng(self._pending_rng)

    def _apply_rng(self, states: Mapping[str, Any]) -> None:
        sites = {site.name: site for site in patched_sites(self._model)}
        unknown = sorted(set(states) - set(sites))
        if unknown:
            raise ConfigError("exclude", self.exclude, f"the checkpoint has random streams for layers {unknown} that "
                              "this run does not approximate", "resume with the exclude setting of the saved run")
        for name, state in states.items():
            sites[name].set_rng_state(state)
        self._pending_rng = None


def training_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, limit: int) -> Iterator[Any]:
    """Model inputs of the first ``limit`` batches of a fresh pass over the training data, each
    through the batch-transfer hooks the Trainer applies to training batches."""
    loader = trainer.train_dataloader
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        raise ConfigError("recalibrate_bn", limit, f"needs one training DataLoader, and the Trainer has "
                          f"{type(loader).__name__}", "give 0, or train from a single DataLoader")
    for batch in itertools.islice(loader, limit):
        # The calls Lightning's own loops make (they pick the datamodule's or the module's hooks).
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = pl_module._apply_batch_transfer_handler(batch, dataloader_idx=0)
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            yield batch[0]
        elif isinstance(batch, torch.Tensor):
            yield batch
        else:
            raise ConfigError("recalibrate_bn", limit, f"cannot find the model input in a training batch of type "
                              f"{type(batch).__name__}", "make the batch a tensor or a (input, ...) tuple, or give 0 "
                              "and call lightning_approx.batch_norm.recalibrate_batch_norm yourself")


def check_active_epochs(value: Any) -> tuple[float, float | None] | None:
    """``active_epochs`` as ``(begin, end)``, or ``None``; refuses anything else by name."""
    if value is None:
        return None
    fix = "give [begin, end) in epochs, e.g. [4, null] for epoch 4 to the end, or leave it unset for every epoch"

    def number(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError("active_epochs", value, "must be a pair [begin, end)", fix)
    begin, end = value
    if not number(begin) or begin < 0:
        raise ConfigError("active_epochs", value, f"begin must be a finite number >= 0, got {begin!r}", fix)
    if end is not None and (not number(end) or end <= begin):
        raise ConfigError("active_epochs", value, f"end must be None or a finite number > begin ({begin}), got {end!r}",
                          fix)
    return float(begin), None if end is None else float(end)
