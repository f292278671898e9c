"""KernelRescaling: train at low resolution with smaller kernels first, then rescale the kernels
to full size and finish at full resolution (de Gusmão et al. 2016)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_approx.errors import ConfigError
from lightning_approx.ops.conv import ConvGeometry
from lightning_approx.ops.rescale import RESIZE_MODES, AxisGrid, ConvAxis, resample_kernel, resize_images, scaled_size
from lightning_approx.schedules import Progress, Schedule, Step, as_schedule

OPTIMIZER_STATE = ("resample", "reset")
DEFAULT_FRACTION = 0.5


@dataclass(eq=False)
class RescaledLayer:
    """A conv whose kernel is rescaled, with its full-resolution geometry.

    Attributes:
        name: Qualified name in the LightningModule (``"net.conv1"``).
        conv: The layer (the same object throughout; its ``weight`` Parameter too).
        axes: Full-resolution (height, width) geometry.
        padding: The layer's own ``padding`` attribute at full resolution (int tuple or string).
        scale: The scale its kernel is at now.
    """

    name: str
    conv: nn.Conv2d
    axes: tuple[ConvAxis, ConvAxis]
    padding: tuple[int, int] | str
    scale: float = 1.0
    _stash: tuple[Tensor, Tensor | None] | None = None  # exact small weight and grad while shown at full size

    def grids(self, scale: float) -> tuple[AxisGrid, AxisGrid]:
        return self.axes[0].at(scale)[2], self.axes[1].at(scale)[2]

    def kernel_size(self, scale: float) -> tuple[int, int]:
        return self.axes[0].at(scale)[0], self.axes[1].at(scale)[0]

    @property
    def full_size(self) -> tuple[int, int]:
        return self.axes[0].kernel, self.axes[1].kernel

    def set_geometry(self, scale: float) -> None:
        """Sets ``kernel_size`` and ``padding`` of the conv for ``scale`` (the stride is kept)."""
        conv = self.conv
        (kh, ph, _), (kw, pw, _) = self.axes[0].at(scale), self.axes[1].at(scale)
        conv.kernel_size = (kh, kw)
        conv.padding = self.padding if scale >= 1.0 else (ph, pw)
        if isinstance(conv.padding, str):  # "same" / "valid", as nn.Conv2d.__init__ computes it
            pads = [0, 0, 0, 0]
            if conv.padding == "same":
                for i, (d, k) in enumerate(zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True)):
                    total = d * (k - 1)
                    pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
            conv._reversed_padding_repeated_twice = pads  # a list, as torch builds it for string paddings
        else:
            conv._reversed_padding_repeated_twice = tuple(p for p in reversed(conv.padding) for _ in range(2))
        site = getattr(conv, "approx_site", None)  # patched by ApproxBackward: its forward reads the site's copy
        if site is not None and site.geometry is not None:
            site.geometry = ConvGeometry.of(conv)

    def shown_weight(self) -> Tensor:
        """The weight as training sees it at ``scale`` (the stash while shown at full size)."""
        return self._stash[0] if self._stash is not None else self.conv.weight.data


class KernelRescaling(Callback):
    """Trains at low resolution first (images resized on the fly, large kernels rescaled to
    match), then rescales the kernels to full size and trains on at full resolution.

    A conv whose kernel has a side of at least ``min_kernel_size`` (the 7x7 stem of an
    ImageNet ResNet, 11x11 of AlexNet) is rescaled at every change of scale: its weight is
    resampled to the new grid keeping its total weight (see :mod:`lightning_approx.ops.rescale`),
    so that ``conv(resize(x, s), rescaled k) ≈ resize(conv(x, k), s)``; its stride is kept and
    its padding recomputed. Smaller kernels (3x3, 1x1) are kept as they are and just see
    smaller feature maps: halving a 3x3 kernel leaves one tap, which is no longer the same
    operation.

    During training batches, a forward pre-hook on the LightningModule (or on
    ``input_module``) resizes the first positional argument of ``forward``, the image batch.
    The data module is not touched. Validation and test always run at full resolution: in the
    low-resolution phase the kernels are shown at full size for the validation loop (the
    exact small kernels are put back after it).

    Parameters stay the same objects: their ``.data`` is resized in place, so the optimizer
    keeps them; with ``optimizer_state="resample"`` (default) their state tensors (SGD
    momentum, Adam moments; Adam's second moments through their square root) are resampled
    with the same map as the weight, with ``"reset"`` they are dropped (the optimizer starts
    them afresh, Adam's step count included). The learning-rate scheduler is not touched.

    Checkpoints: the model's ``state_dict`` always holds full-size kernels (rescaled on the
    fly in the low-resolution phase) and the checkpoint's optimizer state is resampled to full
    size with them, so any checkpoint loads into a freshly built model, and resumes a fit,
    with or without this callback; the callback's own state holds the scale and the exact
    small kernels and optimizer state, and a fit resumed with it continues in the right phase
    with them.

    The layers to rescale are chosen at ``setup``, before ``LightningModule.setup`` and
    ``configure_model``: a model that builds a conv to rescale there is refused with a
    :class:`~lightning_approx.errors.ConfigError` at ``on_fit_start`` (build it in
    ``__init__``). On an exception during fit every layer is put back at full size, best
    effort: a layer that cannot be (out of memory) is named in a warning and the training
    error goes on.

    The first batch of each low-resolution phase runs the model once more on the batch, in
    eval mode and without gradients, at both resolutions, and raises a
    :class:`~lightning_approx.errors.ConfigError` if the model fails on the small input or
    its output shape depends on the input size (a flatten before the classifier instead of
    global pooling).

    Logs ``kernel_rescaling/scale`` on the Trainer's logging steps (every ``log_every_n_steps``).

    Args:
        scale: The low resolution as a fraction of full size, in (0, 1), used until the
            switch; or a :class:`~lightning_approx.schedules.Step` schedule (or its config)
            of several phases, ``values`` in (0, 1] ending with 1.0, e.g.
            ``Step(values=[0.5, 0.75, 1.0], milestones=[10, 20])``.
        epochs: With a float ``scale``: length of the low-resolution phase in (fractional)
            epochs.
        fraction: With a float ``scale``: length of the low-resolution phase as a fraction of
            ``Trainer(max_epochs)``, in (0, 1). Default when neither ``epochs`` nor
            ``fraction`` is given: 0.5.
        min_kernel_size: Convs with a kernel side at least this large are rescaled (dilated
            convs never are).
        resize_mode: How images are resized: ``"bilinear"`` or ``"bicubic"`` (antialiased)
            or ``"area"``.
        optimizer_state: ``"resample"`` or ``"reset"`` the optimizer state of the rescaled
            weights at each switch.
        input_module: Qualified name of the submodule whose forward receives the images
            (``"net"``); default: the LightningModule itself.

    Example::

        trainer = Trainer(max_epochs=90, callbacks=[KernelRescaling(scale=0.5, epochs=30)])
    """

    def __init__(
        self,
        scale: float | Schedule = 0.5,
        epochs: float | None = None,
        fraction: float | None = None,
        min_kernel_size: int = 5,
        resize_mode: str = "bilinear",
        optimizer_state: str = "resample",
        input_module: str | None = None,
    ) -> None:
        super().__init__()
        self.schedule: Step | None = None  # None until ``fraction`` is resolved at setup
        self.fraction: float | None = None
        self.scale_value: float | None = None
        if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
            self.scale_value = _low_scale(scale)
            if epochs is not None and fraction is not None:
                raise ConfigError("fraction", fraction, f"given together with epochs={epochs}",
                                  "give the length of the low-resolution phase once: epochs or fraction")
            if epochs is not None:
                self.schedule = Step(values=[self.scale_value, 1.0], milestones=[_positive("epochs", epochs)])
            else:
                self.fraction = _fraction(DEFAULT_FRACTION if fraction is None else fraction)
        else:
            if epochs is not None or fraction is not None:
                field, value = ("epochs", epochs) if epochs is not None else ("fraction", fraction)
                raise ConfigError(field, value, "given next to a scale schedule, which has its own milestones",
                                  "drop it, or give a float scale")
            self.schedule = _step_schedule(scale)
        if isinstance(min_kernel_size, bool) or not isinstance(min_kernel_size, int) or min_kernel_size < 2:
            raise ConfigError("min_kernel_size", min_kernel_size, "must be an integer >= 2",
                              "give e.g. 5 (rescales 5x5 and larger, keeps 3x3 and 1x1)")
        if resize_mode not in RESIZE_MODES:
            raise ConfigError("resize_mode", resize_mode, "unknown resize mode", f"use one of {list(RESIZE_MODES)}")
        if optimizer_state not in OPTIMIZER_STATE:
            raise ConfigError("optimizer_state", optimizer_state, "unknown choice",
                              f"use one of {list(OPTIMIZER_STATE)}")
        if input_module is not None and not isinstance(input_module, str):
            raise ConfigError("input_module", input_module, "must be a submodule name", "give e.g. 'net', or None")
        self.min_kernel_size = min_kernel_size
        self.resize_mode = resize_mode
        self.optimizer_state = optimizer_state
        self.input_module = input_module
        self.layers: list[RescaledLayer] = []
        self.scale = 1.0  # the scale the model is at now
        self._model: pl.LightningModule | None = None
        self._trainer: pl.Trainer | None = None
        self._handles: list[Any] = []
        self._pending: dict[str, Any] | None = None
        self._in_batch = False
        self._resized_in_batch = False
        self._checking = False
        self._checked: set[float] = set()

    # --- set up and tear down ------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        self._resolve_schedule(trainer)
        self._model, self._trainer = pl_module, trainer
        self.layers = self._select_layers(pl_module)
        self.scale = 1.0
        self._checked.clear()
        if self.layers and trainer.world_size > 1:
            raise ConfigError("min_kernel_size", self.min_kernel_size,
                              f"KernelRescaling resizes the weights of {[layer.name for layer in self.layers]}, "
                              "and DistributedDataParallel's gradient buckets cannot follow a parameter whose "
                              "shape changes",
                              "train on one device, or raise min_kernel_size above every kernel so that only the "
                              "input resolution changes")
        if self.input_module is None:
            target: nn.Module = pl_module
        else:
            try:
                target = pl_module.get_submodule(self.input_module)
            except AttributeError:
                names = [n for n, _ in pl_module.named_children()]
                raise ConfigError("input_module", self.input_module, "is not a submodule of the LightningModule",
                                  f"use the name of the module that receives the images, e.g. one of {names}") from None
        self._handles.append(target.register_forward_pre_hook(self._resize_input, with_kwargs=True))
        for layer in self.layers:  # torch marks hooks with an attribute, which bound methods do not take
            self._handles.append(layer.conv.register_state_dict_post_hook(partial(_call, self._full_size_state_dict)))
            self._handles.append(layer.conv.register_load_state_dict_pre_hook(partial(_call, self._load_any_size)))
        unit, starts = self.schedule.unit, [0.0, *self.schedule.milestones]
        phases = ", ".join(f"{v:g} from {unit} {t:g}" for v, t in zip(self.schedule.values, starts, strict=True))
        plan = ", ".join(f"{layer.name} {layer.full_size} -> {layer.kernel_size(self.schedule.values[0])}"
                         for layer in self.layers) or "none (only the input resolution changes)"
        rank_zero_info(f"KernelRescaling: scale {phases}; rescaled kernels at the first scale: {plan}")
        if self._pending is not None:
            self._apply_saved(self._pending)

    def _resolve_schedule(self, trainer: pl.Trainer) -> None:
        if self.fraction is not None:
            if not trainer.max_epochs or trainer.max_epochs < 1:
                raise ConfigError("fraction", self.fraction, "needs Trainer(max_epochs=...) to know where the "
                                  f"low-resolution phase ends (max_epochs={trainer.max_epochs})",
                                  "set max_epochs, or give epochs=... or a Step schedule")
            assert self.scale_value is not None
            self.schedule = Step(values=[self.scale_value, 1.0], milestones=[self.fraction * trainer.max_epochs])
        assert self.schedule is not None
        last = self.schedule.milestones[-1]
        if self.scale_value is None:
            field = f"scale.milestones[{len(self.schedule.milestones) - 1}]"
        else:
            field = "fraction" if self.fraction is not None else "epochs"
        if self.schedule.unit == "epoch" and trainer.max_epochs is not None and 0 < trainer.max_epochs <= last:
            raise ConfigError(field, last, f"switches to full resolution at epoch {last:g}, but training ends at "
                              f"max_epochs={trainer.max_epochs}", "switch earlier, e.g. fraction=0.5, or train longer")
        if self.schedule.unit == "step" and trainer.max_steps is not None and 0 < trainer.max_steps <= last:
            raise ConfigError(field, last, f"switches to full resolution at step {last:g}, but training ends at "
                              f"max_steps={trainer.max_steps}", "switch earlier, or train longer")

    def _select_layers(self, pl_module: pl.LightningModule) -> list[RescaledLayer]:
        layers = []
        for name, module in pl_module.named_modules():
            if not isinstance(module, nn.Conv2d) or max(module.kernel_size) < self.min_kernel_size:
                continue
            if tuple(module.dilation) != (1, 1):
                continue  # a dilated kernel has gaps: resampling it as a dense footprint would be wrong
            padding = module.padding
            if isinstance(padding, str):
                numeric = (0, 0) if padding == "valid" else tuple((k - 1) // 2 for k in module.kernel_size)
            else:
                numeric = tuple(padding)
            axes = tuple(ConvAxis(int(k), int(s), int(p))
                         for k, s, p in zip(module.kernel_size, module.stride, numeric, strict=True))
            layers.append(RescaledLayer(name, module, axes, padding))  # type: ignore[arg-type]
        return layers

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(1.0)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_no_late_layers(pl_module)

    def _check_no_late_layers(self, pl_module: pl.LightningModule) -> None:
        """Refuses convs to rescale that were not in the model when ``setup`` selected the layers."""
        known = {(layer.name, id(layer.conv)) for layer in self.layers}
        late = [layer.name for layer in self._select_layers(pl_module) if (layer.name, id(layer.conv)) not in known]
        if late:
            raise ConfigError("model", type(pl_module).__name__,
                              f"has convs to rescale that were not there at KernelRescaling's setup: {late}. Layers "
                              "built in LightningModule.setup() or configure_model() come after the callbacks' setup, "
                              "so their kernels would keep their full size on the low-resolution images",
                              "build the layers in the LightningModule's __init__")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Puts every layer back at full size, best effort: it never raises, since Lightning would
        then skip the later callbacks' ``on_exception`` and the training error would be replaced.
        Each layer is restored on its own; the layers it could not restore are named in a warning."""
        self._in_batch = False
        optimizers = self._optimizers()
        failed = []
        for layer in self.layers:
            try:
                self._hide_layer(layer)
                self._move_layer(layer, 1.0, optimizers)
            except Exception as err:  # reported below; the training error goes on
                failed.append(f"{layer.name} ({type(err).__name__}: {err})")
        if not failed:
            self.scale = 1.0
        try:
            self._remove_hooks()
        except Exception as err:
            failed.append(f"its hooks ({type(err).__name__}: {err})")
        if failed:
            rank_zero_warn(f"KernelRescaling: after {type(exception).__name__} it could not put back at full size: "
                           f"{'; '.join(failed)}. Those layers may keep rescaled kernels, hooks or optimizer state; "
                           "rebuild the model (or load a checkpoint) before using it again.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._switch(1.0)
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- the schedule ----------------------------------------------------------------------
    def scale_at(self, progress: Progress) -> float:
        """The scheduled scale at ``progress``."""
        if self.schedule is None:
            raise RuntimeError("KernelRescaling: the schedule is resolved at setup (fraction needs max_epochs)")
        return float(self.schedule(progress))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        within = batch_idx / batches if isinstance(batches, int) and batches > 0 else 0.0
        target = self.scale_at(Progress(epoch=trainer.current_epoch + within, step=trainer.global_step))
        if target != self.scale:
            self._switch(target)
        self._in_batch = True
        self._resized_in_batch = False

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_batch = False
        if self.scale < 1.0 and not self._resized_in_batch:
            where = self.input_module or type(pl_module).__name__
            raise ConfigError("input_module", self.input_module,
                              f"the training step never called the forward of {where}, so its images were not resized "
                              f"to scale {self.scale:g}", "name the submodule that receives the images, e.g. "
                              "input_module='net'")
        if trainer._logger_connector.should_update_logs:  # the steps Lightning writes, as ApproxBackward
            pl_module.log("kernel_rescaling/scale", self.scale, on_step=True, on_epoch=False, batch_size=1)

    # --- resizing the input --------------------------------------------------------------
    def _resize_input(self, module: nn.Module, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._checking or not self._in_batch or not module.training or self.scale >= 1.0:
            return None
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            shown = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError("input_module", self.input_module,
                              f"its forward's first argument must be a float image batch (N, C, H, W), got {shown}",
                              "name the submodule whose forward takes the images as first argument, e.g. 'net'")
        if self.scale not in self._checked:
            self._check_size_agnostic(module, x, args[1:], kwargs)
            self._checked.add(self.scale)
        self._resized_in_batch = True
        return (resize_images(x, self.scale, self.resize_mode), *args[1:]), kwargs

    def _check_size_agnostic(self, module: nn.Module, x: Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Runs ``module`` once at each resolution (eval mode, no grad) and compares output shapes."""
        small = scaled_size(x.shape[-2], x.shape[-1], self.scale)
        fix = ("make the network independent of the input size (global pooling, e.g. nn.AdaptiveAvgPool2d(1), "
               "before the classifier), or use a larger scale")
        self._checking = True
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                try:
                    low = module(resize_images(x, self.scale, self.resize_mode), *rest, **kwargs)
                except RuntimeError as err:
                    raise ConfigError("scale", self.scale, f"the model fails on {small[0]}x{small[1]} inputs (full "
                                      f"size {x.shape[-2]}x{x.shape[-1]}): {err}", fix) from err
                with self.full_size():
                    full = module(x, *rest, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
            self._checking = False
        low_shapes, full_shapes = _shapes(low), _shapes(full)
        if low_shapes != full_shapes:
            raise ConfigError("scale", self.scale, f"the model's output shapes depend on the input size: {low_shapes} "
                              f"at {small[0]}x{small[1]}, {full_shapes} at {x.shape[-2]}x{x.shape[-1]}", fix)

    # --- switching ---------------------------------------------------------------------------
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._trainer.optimizers) if self._trainer is not None else []

    def _switch(self, scale: float) -> None:
        """Moves every rescaled layer (weight, grad, optimizer state, geometry) to ``scale``.

        Decided per layer (each knows its own scale): after a switch that failed part-way, the
        next ``_switch`` moves exactly the layers that are not at ``scale`` yet. ``self.scale``
        (the input's scale) changes only once every layer is there.
        """
        optimizers = self._optimizers()
        moved = [layer for layer in self.layers if layer.scale != scale]
        for layer in moved:
            self._move_layer(layer, scale, optimizers)
        if moved:
            rank_zero_info(f"KernelRescaling: scale {self.scale:g} -> {scale:g}; kernels "
                           + ", ".join(f"{layer.name} {tuple(layer.conv.weight.shape[-2:])}" for layer in self.layers))
        self.scale = scale

    def _move_layer(self, layer: RescaledLayer, scale: float, optimizers: list[torch.optim.Optimizer]) -> None:
        if layer.scale == scale:
            return
        src, dst = layer.grids(layer.scale), layer.grids(scale)
        weight = layer.conv.weight
        old_shape = weight.shape
        # Everything is resampled before anything is assigned: a failure (out of memory) leaves
        # the layer whole at its old scale, so that restoring it is just this move again.
        holders = [optimizer for optimizer in optimizers if optimizer.state.get(weight)]
        updates = [{key: _resample_state(key, value, src, dst) for key, value in optimizer.state[weight].items()
                    if isinstance(value, Tensor) and value.shape == old_shape} for optimizer in holders]
        grad = None if weight.grad is None else resample_kernel(weight.grad, src, dst)
        data = resample_kernel(weight.data, src, dst)
        for optimizer, update in zip(holders, updates, strict=True):
            if self.optimizer_state == "reset":
                del optimizer.state[weight]
            else:
                optimizer.state[weight].update(update)
        weight.grad = None  # a grad must match the data's shape when it is assigned
        weight.data = data
        weight.grad = grad
        layer.set_geometry(scale)
        layer.scale = scale

    @contextmanager
    def full_size(self) -> Iterator[None]:
        """Shows the kernels at full size (resampled from the current ones) inside the block, and
        puts the exact current kernels back after it. A no-op at full resolution."""
        self._show_full_size()
        try:
            yield
        finally:
            self._hide_full_size()

    def _show_full_size(self) -> None:
        for layer in self.layers:
            if layer.scale >= 1.0 or layer._stash is not None:
                continue
            weight = layer.conv.weight
            full = resample_kernel(weight.data, layer.grids(layer.scale), layer.grids(1.0))  # before any change
            layer._stash = (weight.data, weight.grad)
            weight.grad = None
            weight.data = full
            layer.set_geometry(1.0)

    def _hide_full_size(self) -> None:
        for layer in self.layers:
            self._hide_layer(layer)

    def _hide_layer(self, layer: RescaledLayer) -> None:
        if layer._stash is None:
            return
        weight = layer.conv.weight
        weight.data, grad = layer._stash
        weight.grad = grad
        layer._stash = None
        layer.set_geometry(layer.scale)

    # Validation and test run at full resolution whatever the phase.
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_full_size()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hide_full_size()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_full_size()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hide_full_size()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_full_size()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hide_full_size()

    # --- state dicts and checkpoints ----------------------------------------------------------
    def _layer_of(self, conv: nn.Module) -> RescaledLayer | None:
        return next((layer for layer in self.layers if layer.conv is conv), None)

    def _full_size_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                              local_metadata: Any) -> None:
        """The model's state dict always holds full-size kernels."""
        layer = self._layer_of(module)
        key = prefix + "weight"
        if layer is None or layer.scale >= 1.0 or layer._stash is not None or key not in state_dict:
            return
        state_dict[key] = resample_kernel(layer.conv.weight.data, layer.grids(layer.scale), layer.grids(1.0))

    def _load_any_size(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                       strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                       error_msgs: list[str]) -> None:
        """A full-size kernel loaded during the low-resolution phase is rescaled to the current size."""
        layer = self._layer_of(module)
        key = prefix + "weight"
        value = state_dict.get(key)
        if layer is None or layer._stash is not None or layer.scale >= 1.0 or not isinstance(value, Tensor):
            return
        if tuple(value.shape[-2:]) == layer.full_size and value.shape != layer.conv.weight.shape:
            state_dict[key] = resample_kernel(value, layer.grids(1.0), layer.grids(layer.scale))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Puts the optimizer state of the rescaled weights in the checkpoint at full size, like the
        weights in its ``state_dict``, so that it resumes without this callback too; the exact
        small tensors go into this callback's state, and :meth:`on_load_checkpoint` puts them back."""
        small = [layer for layer in self.layers if layer.scale < 1.0]
        if not small or "optimizer_states" not in checkpoint:
            return
        exact = []
        for i, (optimizer, packed) in enumerate(zip(trainer.optimizers, checkpoint["optimizer_states"], strict=True)):
            index: dict[int, int] = {}  # the packed state is keyed by the parameters' places in the groups
            for group, packed_group in zip(optimizer.param_groups, packed["param_groups"], strict=True):
                index.update({id(p): j for p, j in zip(group["params"], packed_group["params"], strict=True)})
            states = packed["state"]
            for layer in small:
                j = index.get(id(layer.conv.weight))
                if j not in states:
                    continue
                shape, src, dst = layer.shown_weight().shape, layer.grids(layer.scale), layer.grids(1.0)
                state = dict(states[j])  # a copy: the packed state holds the optimizer's own dict
                saved = {key: value.detach().clone() for key, value in state.items()
                         if isinstance(value, Tensor) and value.shape == shape}
                # The map of the switch to full size (_move_layer): the state dict holds the weight
                # w as M·w, and momentum, linear in the gradients, as M·v keeps the SGD update
                # M(w - lr·v) = Mw - lr·Mv, so a resume without the callback continues from exactly
                # the state the switch would produce (Adam's second moments through their root).
                state.update({key: _resample_state(key, value, src, dst) for key, value in saved.items()})
                states[j] = state
                exact.append({"layer": layer.name, "optimizer": i, "param": j, "state": saved})
        checkpoint["callbacks"][self.state_key]["optimizer_state"] = exact

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Puts the exact small optimizer state saved by :meth:`on_save_checkpoint` back into the
        checkpoint, before Lightning loads it into the optimizers."""
        own = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        packed_states = checkpoint.get("optimizer_states") or []
        for entry in own.get("optimizer_state", []):
            i, j = entry["optimizer"], entry["param"]
            if i >= len(packed_states) or j not in packed_states[i]["state"]:
                raise ConfigError("min_kernel_size", self.min_kernel_size, f"the checkpoint's optimizer state has no "
                                  f"entry for {entry['layer']} (optimizer {i}, parameter {j})",
                                  "resume from an unmodified checkpoint of the saved run")
            packed_states[i]["state"][j] = {**packed_states[i]["state"][j], **entry["state"]}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "weights": {layer.name: layer.shown_weight().detach().clone() for layer in self.layers
                        if layer.scale < 1.0},
            "full_sizes": {layer.name: list(layer.full_size) for layer in self.layers},
            "schedule": self.schedule.to_config() if self.schedule is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        if self._model is not None:
            self._apply_saved(self._pending)

    def _apply_saved(self, state: Mapping[str, Any]) -> None:
        """Puts the model in the saved phase with the exact saved kernels (its state dict, just
        loaded, holds them at full size)."""
        self._pending = None
        if self._model is not None:
            self._check_no_late_layers(self._model)  # resuming comes before on_fit_start
        scale = float(state.get("scale", 1.0))
        weights: Mapping[str, Tensor] = state.get("weights", {})
        by_name = {layer.name: layer for layer in self.layers}
        saved = dict(state.get("full_sizes", {}))
        if sorted(saved) != sorted(by_name) and (saved or weights):
            raise ConfigError("min_kernel_size", self.min_kernel_size, f"the checkpoint rescaled layers "
                              f"{sorted(saved)}, this run selects {sorted(by_name)}",
                              "resume with the settings of the saved run")
        if scale >= 1.0:
            self._switch(1.0)
            return
        for name, layer in by_name.items():
            value = weights.get(name)
            if value is None or tuple(value.shape[-2:]) != layer.kernel_size(scale):
                shape = None if value is None else tuple(value.shape)
                raise ConfigError("min_kernel_size", self.min_kernel_size, f"the checkpoint holds {name} at scale "
                                  f"{scale:g} with shape {shape}, expected kernels {layer.kernel_size(scale)}",
                                  "resume with the model and settings of the saved run")
            weight = layer.conv.weight
            weight.data = value.to(device=weight.device, dtype=weight.dtype)
            weight.grad = None
            layer.set_geometry(scale)
            layer.scale = scale
        self.scale = scale


def _call(method: Any, *args: Any) -> None:
    method(*args)


def _shapes(output: Any) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    apply_to_collection(output, Tensor, lambda t: shapes.append(tuple(t.shape)))
    return shapes


def _resample_state(key: str, value: Tensor, src: tuple[AxisGrid, AxisGrid], dst: tuple[AxisGrid, AxisGrid]) -> Tensor:
    """An optimizer state tensor moved with its weight: second moments (``exp_avg_sq``,
    ``max_exp_avg_sq``, ``square_avg``, ...) through their square root, so they stay
    non-negative and on the scale of the first moments; everything else like the weight."""
    if "sq" in key or "square" in key:
        return resample_kernel(value.clamp_min(0).sqrt(), src, dst).square()
    return resample_kernel(value, src, dst)


def _low_scale(value: Any, field: str = "scale") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0.0 < value < 1.0:
        raise ConfigError(field, value, "must lie in (0, 1): the resolution of the first phase relative to full size",
                          "give e.g. 0.5 (half the height and width); 1.0 would train at full resolution throughout")
    return float(value)


def _positive(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(field, value, "must be a positive number of epochs", "give e.g. 10")
    return float(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError("fraction", value, "must be a number", "give e.g. 0.5")
    if not 0.0 < value < 1.0:
        raise ConfigError("fraction", value, "must lie in (0, 1): the switch to full resolution would come "
                          + ("after the end of training" if value >= 1.0 else "before the start"),
                          "give e.g. 0.5 (the first half of max_epochs at low resolution)")
    return float(value)


def _step_schedule(value: Any) -> Step:
    schedule = as_schedule(value, field="scale")
    if not isinstance(schedule, Step):
        raise ConfigError("scale", schedule, f"is a {type(schedule).__name__} schedule; kernels change size only "
                          "at discrete switches", "give a float or a Step schedule, e.g. Step(values=[0.5, 1.0], "
                          "milestones=[10])")
    for i, v in enumerate(schedule.values):
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"scale.values[{i}]", v, "must lie in (0, 1]", "give scales such as [0.5, 0.75, 1.0]")
    if schedule.values[-1] != 1.0:
        raise ConfigError(f"scale.values[{len(schedule.values) - 1}]", schedule.values[-1],
                          "training would never switch to full resolution (the switch would come after the end)",
                          "end the schedule with 1.0, e.g. values=[0.5, 1.0]")
    if min(schedule.values) >= 1.0:
        raise ConfigError("scale.values", schedule.values, "has no low-resolution phase", "start with e.g. 0.5")
    if schedule.milestones and schedule.milestones[0] <= 0:
        raise ConfigError("scale.milestones[0]", schedule.milestones[0], "the first phase would never run",
                          "give positive milestones")
    return schedule
