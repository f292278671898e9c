"""Schedules: values at key points, units, exact ranges, validation, and the two config routes
(omegaconf ``{"type": ...}`` mappings and jsonargparse ``class_path`` / ``init_args``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from lightning_approx.errors import ConfigError
from lightning_approx.schedules import (
    SCHEDULES,
    Constant,
    Cosine,
    Cubic,
    Linear,
    Piecewise,
    Progress,
    Schedule,
    Step,
    as_schedule,
    check_range,
)


def at_epoch(schedule: Schedule, epoch: float) -> float:
    return schedule(Progress(epoch=epoch, step=0))


# One of each type, both units; used by the range, round-trip and repr tests.
EXAMPLES = [
    Constant(0.5),
    Linear(start=1.0, end=0.25, begin=2, until=10),
    Cosine(start=1.0, end=0.25, begin=0, until=10, unit="step"),
    Cubic(start=0.0, end=0.9, begin=1, until=11),
    Step(values=[1.0, 0.5, 0.25], milestones=[3, 6]),
    Step(values=[0.7], milestones=[], unit="step"),
    Piecewise(points=[(0, 0.2), (5, 0.9), (10, 0.4)]),
    Piecewise(points=[[3, 0.6]], unit="step"),
]


# --- values ---------------------------------------------------------------------------------
def test_progress_is_frozen():
    p = Progress(epoch=2.5, step=250)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.epoch = 3.0  # type: ignore[misc]


def test_constant():
    s = Constant(0.5)
    assert [at_epoch(s, t) for t in (-1, 0, 3.7, 1e6)] == [0.5] * 4
    assert s.unit == "epoch"


def test_linear_key_points_and_midpoint():
    s = Linear(start=1.0, end=0.5, begin=2, until=6)
    assert at_epoch(s, 0) == 1.0
    assert at_epoch(s, 2) == 1.0
    assert at_epoch(s, 3) == pytest.approx(0.875)
    assert at_epoch(s, 4) == pytest.approx(0.75)
    assert at_epoch(s, 6) == 0.5
    assert at_epoch(s, 100) == 0.5


def test_linear_default_begin_is_zero():
    assert Linear(start=1.0, end=0.0, until=4).begin == 0.0
    assert at_epoch(Linear(start=1.0, end=0.0, until=4), 1) == pytest.approx(0.75)


def test_cosine_midpoint_is_mean_and_quarter_point():
    s = Cosine(start=1.0, end=0.25, begin=2, until=12)
    assert at_epoch(s, 2) == 1.0
    assert at_epoch(s, 7) == pytest.approx((1.0 + 0.25) / 2)
    # a quarter of the way: end + (start - end) * (1 + cos(pi/4)) / 2, i.e. above the line
    quarter = 0.25 + 0.75 * (1 + math.cos(math.pi / 4)) / 2
    assert at_epoch(s, 4.5) == pytest.approx(quarter)
    assert at_epoch(s, 4.5) > at_epoch(Linear(start=1.0, end=0.25, begin=2, until=12), 4.5)
    assert at_epoch(s, 12) == 0.25
    assert at_epoch(s, 50) == 0.25


def test_cubic_gradual_pruning():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3
    s = Cubic(start=0.0, end=0.8, begin=0, until=10)
    assert at_epoch(s, -1) == 0.0
    assert at_epoch(s, 0) == 0.0
    assert at_epoch(s, 5) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert at_epoch(s, 2) == pytest.approx(0.8 - 0.8 * 0.8**3)
    assert at_epoch(s, 10) == 0.8
    assert at_epoch(s, 20) == 0.8
    # most of the change happens early
    assert at_epoch(s, 5) - at_epoch(s, 0) > at_epoch(s, 10) - at_epoch(s, 5)


def test_step_intervals_are_closed_on_the_left():
    s = Step(values=[1.0, 0.5, 0.25], milestones=[3, 6])
    assert at_epoch(s, 0) == 1.0
    assert at_epoch(s, 2.999) == 1.0
    assert at_epoch(s, 3) == 0.5
    assert at_epoch(s, 5.9) == 0.5
    assert at_epoch(s, 6) == 0.25
    assert at_epoch(s, 1e9) == 0.25
    assert at_epoch(Step(values=[0.7], milestones=[]), 5) == 0.7


def test_piecewise_interpolates_and_is_constant_outside():
    s = Piecewise(points=[(0, 1.0), (10, 0.5), (20, 0.5), (30, 0.8)])
    assert at_epoch(s, -5) == 1.0
    assert at_epoch(s, 0) == 1.0
    assert at_epoch(s, 5) == pytest.approx(0.75)
    assert at_epoch(s, 10) == pytest.approx(0.5)
    assert at_epoch(s, 15) == pytest.approx(0.5)
    assert at_epoch(s, 25) == pytest.approx(0.65)
    assert at_epoch(s, 30) == pytest.approx(0.8)
    assert at_epoch(s, 99) == 0.8
    single = Piecewise(points=[[4, 0.3]])
    assert at_epoch(single, 0) == at_epoch(single, 4) == at_epoch(single, 8) == 0.3


@pytest.mark.parametrize(
    "make",
    [
        lambda unit: Linear(start=1.0, end=0.0, begin=0, until=100, unit=unit),
        lambda unit: Cosine(start=1.0, end=0.0, begin=0, until=100, unit=unit),
        lambda unit: Cubic(start=1.0, end=0.0, begin=0, until=100, unit=unit),
        lambda unit: Step(values=[1.0, 0.0], milestones=[50], unit=unit),
        lambda unit: Piecewise(points=[(0, 1.0), (100, 0.0)], unit=unit),
    ],
    ids=["linear", "cosine", "cubic", "step", "piecewise"],
)
def test_unit_step_reads_the_global_step(make):
    by_step, by_epoch = make("step"), make("epoch")
    # the two counters disagree on purpose: each schedule must read only its own
    early, late = Progress(epoch=90.0, step=10), Progress(epoch=10.0, step=90)
    assert by_step(early) == by_epoch.at(10) and by_step(late) == by_epoch.at(90)
    assert by_epoch(early) == by_epoch.at(90) and by_epoch(late) == by_epoch.at(10)
    assert by_step(early) > by_step(late)


# --- exact ranges ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Constant(0.3), (0.3, 0.3)),
        (Linear(start=1.0, end=0.25, until=10), (0.25, 1.0)),
        (Linear(start=0.1, end=0.9, until=10), (0.1, 0.9)),
        (Cosine(start=0.25, end=1.0, until=10), (0.25, 1.0)),
        (Cubic(start=0.0, end=0.9, until=10), (0.0, 0.9)),
        (Step(values=[0.5, 1.0, 0.1], milestones=[1, 2]), (0.1, 1.0)),
        # the maximum is at an interior point, not at either end
        (Piecewise(points=[(0, 0.2), (5, 0.9), (10, 0.4)]), (0.2, 0.9)),
    ],
)
def test_value_range_is_exact(schedule, expected):
    assert schedule.value_range() == expected


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_value_range_bounds_a_dense_sweep_and_is_attained(schedule):
    lo, hi = schedule.value_range()
    times = [i / 4 for i in range(-8, 4 * 15)]  # hits every key point of EXAMPLES
    values = [schedule.at(t) for t in times]
    assert min(values) == pytest.approx(lo) and max(values) == pytest.approx(hi)
    assert all(lo <= v <= hi for v in values)


# --- validation -----------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("build", "field", "words"),
    [
        (lambda: Linear(start=1.0, end=0.5, begin=5, until=5), "until", "ends before it starts"),
        (lambda: Cosine(start=1.0, end=0.5, begin=5, until=2), "until", "ends before it starts"),
        (lambda: Cubic(start=0.0, end=0.9, begin=3, until=-1), "until", "ends before it starts"),
        (lambda: Linear(start=NAN, end=0.5, until=5), "start", "finite"),
        (lambda: Cosine(start=1.0, end=INF, until=5), "end", "finite"),
        (lambda: Cubic(start=0.0, end=0.9, begin=-INF, until=5), "begin", "finite"),
        (lambda: Linear(start=1.0, end=0.5, until="10"), "until", "number"),
        (lambda: Constant(True), "value", "number"),
        (lambda: Constant(NAN), "value", "finite"),
        (lambda: Cosine(start=1.0, end=0.5, until=5, unit="epochs"), "unit", "unknown unit"),
        (lambda: Constant(0.5, unit="batch"), "unit", "unknown unit"),
        (lambda: Step(values=[1.0, 0.5], milestones=[1, 2]), "values", "one more entry"),
        (lambda: Step(values=[1.0, 0.5, 0.2], milestones=[1]), "values", "one more entry"),
        (lambda: Step(values=[1.0, 0.5, 0.2], milestones=[3, 3]), "milestones[1]", "strictly increase"),
        (lambda: Step(values=[1.0, 0.5, 0.2], milestones=[3, 1]), "milestones[1]", "strictly increase"),
        (lambda: Step(values=[1.0, 0.5], milestones=[INF]), "milestones[0]", "finite"),
        (lambda: Step(values=[1.0, NAN], milestones=[2]), "values[1]", "finite"),
        (lambda: Step(values=0.5, milestones=[]), "values", "list"),
        (lambda: Step(values=[0.5], milestones="3"), "milestones", "list"),
        (lambda: Piecewise(points=[]), "points", "at least one point"),
        (lambda: Piecewise(points=[(0, 1.0), (5, 0.5), (5, 0.2)]), "points[2]", "strictly increase"),
        (lambda: Piecewise(points=[(0, 1.0), (5, 0.5), (4, 0.2)]), "points[2]", "strictly increase"),
        (lambda: Piecewise(points=[(0, 1.0, 2.0)]), "points[0]", "pair"),
        (lambda: Piecewise(points=[(0, 1.0), 5]), "points[1]", "list"),
        (lambda: Piecewise(points=[(0, 1.0), (1, NAN)]), "points[1]", "finite"),
        (lambda: Piecewise(points=[(0, 1.0)], unit="epochs"), "unit", "unknown unit"),
    ],
)
def test_construction_errors_name_the_field_and_the_fix(build, field, words):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}=")
    assert words in message
    assert "Fix:" in message and info.value.fix


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="until"):
        Linear(start=1.0, end=0.5, begin=1, until=0)


# --- as_schedule ----------------------------------------------------------------------------
def test_as_schedule_numbers_and_instances():
    assert as_schedule(0.5, field="x") == Constant(0.5)
    assert as_schedule(1, field="x") == Constant(1.0)
    s = Cosine(start=1.0, end=0.25, until=10)
    assert as_schedule(s, field="x") is s


def test_as_schedule_type_mappings_plain_and_omegaconf():
    cfg = {"type": "cosine", "start": 1.0, "end": 0.25, "begin": 0, "until": 10}
    expected = Cosine(start=1.0, end=0.25, begin=0, until=10)
    assert as_schedule(cfg, field="x") == expected
    assert as_schedule(OmegaConf.create(cfg), field="x") == expected
    assert as_schedule({**cfg, "type": "Cosine"}, field="x") == expected  # type is case-insensitive
    step = OmegaConf.create({"type": "step", "values": [1.0, 0.5], "milestones": [3], "unit": "step"})
    assert as_schedule(step, field="x") == Step(values=[1.0, 0.5], milestones=[3], unit="step")


@pytest.mark.parametrize("class_path", ["lightning_approx.schedules.Piecewise", "Piecewise"])
def test_as_schedule_class_path_mappings(class_path):
    cfg = {"class_path": class_path, "init_args": {"points": [[0, 1.0], [10, 0.5]], "unit": "step"}}
    expected = Piecewise(points=[(0, 1.0), (10, 0.5)], unit="step")
    assert as_schedule(cfg, field="x") == expected
    assert as_schedule(OmegaConf.create(cfg), field="x") == expected


def test_as_schedule_class_path_without_init_args():
    assert as_schedule({"class_path": "Constant", "init_args": {"value": 0.4}}, field="x") == Constant(0.4)
    with pytest.raises(ConfigError, match=r"x\.value=None: Constant needs it"):
        as_schedule({"class_path": "Constant"}, field="x")


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        (True, "ratio", "number or a schedule"),
        ("0.5", "ratio", "number or a schedule"),
        ([0.5], "ratio", "number or a schedule"),
        (None, "ratio", "number or a schedule"),
        ({"start": 1.0}, "ratio.type", "unknown schedule type"),
        ({"type": "exponential", "start": 1.0}, "ratio.type", "unknown schedule type"),
        ({"type": ["linear"], "start": 1.0}, "ratio.type", "unknown schedule type"),
        ({"type": "linear", "end": 0.5, "until": 3}, "ratio.start", "needs it"),
        ({"type": "linear", "start": 1, "end": 0.5, "until": 3, "gamma": 2}, "ratio.gamma",
         "no such argument"),
        ({"type": "linear", "start": "high", "end": 0.5, "until": 3}, "ratio.start", "finite number"),
        ({"type": "linear", "start": 1, "end": 0.5, "begin": 4, "until": 3}, "ratio.until", "ends before"),
        ({"type": "step", "values": [1, 0.5], "milestones": [2, 1]}, "ratio.values", "one more entry"),
        ({"type": "piecewise", "points": [[0, 1], [0, 2]]}, "ratio.points[1]", "strictly increase"),
        ({"type": "constant", "value": 0.5, "unit": "hour"}, "ratio.unit", "unknown unit"),
        ({"class_path": "collections.OrderedDict"}, "ratio.class_path", "not a schedule class"),
        ({"class_path": "lightning_approx.schedules.Schedule"}, "ratio.class_path", "not a schedule class"),
        ({"class_path": "no.such.module.Cosine"}, "ratio.class_path", "not a schedule class"),
        ({"class_path": "Exponential"}, "ratio.class_path", "not a schedule class"),
        ({"class_path": 3}, "ratio.class_path", "not a schedule class"),
        ({"class_path": "Constant", "init_args": [0.5]}, "ratio.init_args", "must be a mapping"),
        ({"class_path": "Constant", "value": 0.5}, "ratio", "next to class_path"),
        ({"class_path": "Cosine", "init_args": {"start": 1, "end": 0, "until": 1, "beta": 1}}, "ratio.beta",
         "no such argument"),
    ],
)
def test_as_schedule_errors(value, field, words):
    with pytest.raises(ConfigError) as info:
        as_schedule(value, field=field.split(".")[0])
    assert info.value.field == field
    assert words in str(info.value) and "Fix:" in str(info.value)


def test_from_config():
    cfg = {"type": "cubic", "start": 0.0, "end": 0.9, "begin": 1, "until": 11}
    assert Schedule.from_config(cfg) == Cubic(start=0.0, end=0.9, begin=1, until=11)
    assert Schedule.from_config(0.25) == Constant(0.25)
    # on a concrete class the type may be left out
    untyped = OmegaConf.create({"end": 0.9, "start": 0.0, "until": 4})
    assert Cubic.from_config(untyped) == Cubic(0.0, 0.9, 0, 4)
    with pytest.raises(ConfigError, match="not a Cubic"):
        Cubic.from_config({"type": "linear", "start": 1.0, "end": 0.5, "until": 4})
    with pytest.raises(ConfigError, match=r"sparsity\.until"):
        Schedule.from_config({"type": "linear", "start": 1.0, "end": 0.5, "until": 0}, field="sparsity")


# --- check_range ----------------------------------------------------------------------------
def test_check_range_accepts_schedules_inside():
    inside = [Constant(1.0), Cosine(start=1.0, end=0.25, until=10), Step(values=[1.0, 0.1], milestones=[2])]
    for schedule in inside:
        check_range(schedule, field="sample_ratio", low=0.0, high=1.0, low_open=True, high_open=False,
                    fix="f")
    check_range(Constant(0.0), field="sparsity", low=0.0, high=1.0, low_open=False, high_open=True, fix="f")


@pytest.mark.parametrize(
    ("schedule", "low_open", "high_open"),
    [
        (Cosine(start=1.0, end=0.0, until=10), True, False),  # reaches the open end 0
        (Constant(0.0), True, False),
        (Constant(1.0), False, True),  # sparsity 1 prunes everything
        (Linear(start=0.5, end=1.2, until=3), False, False),
        (Piecewise(points=[(0, 0.5), (3, -0.1), (6, 0.5)]), False, False),  # dips below in the middle
    ],
)
def test_check_range_rejects_schedules_leaving_the_interval(schedule, low_open, high_open):
    with pytest.raises(ConfigError) as info:
        check_range(schedule, field="crs.sample_ratio", low=0.0, high=1.0, low_open=low_open,
                    high_open=high_open, fix="keep it in range")
    message = str(info.value)
    assert info.value.field == "crs.sample_ratio" and message.startswith("crs.sample_ratio=")
    assert "must stay in" in message and "Fix: keep it in range" in message


def test_check_range_shows_a_constant_as_the_number_given():
    with pytest.raises(ConfigError) as info:
        check_range(as_schedule(1.5, field="r"), field="r", low=0.0, high=1.0, low_open=True, high_open=False,
                    fix="f")
    assert info.value.value == 1.5


# --- equality, repr, round trips ------------------------------------------------------------
def test_equality_and_hash():
    a = Linear(start=1, end=0.5, begin=0, until=10)
    b = Linear(start=1.0, end=0.5, begin=0.0, until=10.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Linear(start=1.0, end=0.5, begin=0.0, until=10.0, unit="step")
    assert a != Cosine(start=1.0, end=0.5, begin=0.0, until=10.0)  # same arguments, other curve
    assert a != a.to_config()


def test_to_config_layout():
    assert Linear(start=1.0, end=0.5, begin=0, until=10).to_config() == {
        "type": "linear", "start": 1.0, "end": 0.5, "begin": 0.0, "until": 10.0, "unit": "epoch"}
    assert Piecewise(points=[(0, 1.0)], unit="step").to_config() == {
        "type": "piecewise", "points": [[0.0, 1.0]], "unit": "step"}


def test_registry_covers_every_type():
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "step", "cubic", "piecewise"}
    assert all(name == cls.type_name == cls.__name__.lower() for name, cls in SCHEDULES.items())


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_yaml_round_trip(schedule):
    yaml = OmegaConf.to_yaml(OmegaConf.create({"sample_ratio": schedule.to_config()}))
    loaded = OmegaConf.create(yaml).sample_ratio
    again = as_schedule(loaded, field="sample_ratio")
    assert again == schedule and type(again) is type(schedule)
    assert again.to_config() == schedule.to_config()
    assert Schedule.from_config(loaded) == schedule
    for t in (-1.0, 0.0, 2.5, 4.0, 7.25, 100.0):
        p = Progress(epoch=t, step=int(t * 3))
        assert again(p) == schedule(p)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_repr_evaluates_to_an_equal_schedule(schedule):
    namespace = {cls.__name__: cls for cls in SCHEDULES.values()}
    assert eval(repr(schedule), namespace) == schedule


def test_schedule_base_is_abstract():
    with pytest.raises(TypeError):
        Schedule()  # type: ignore[abstract]


# --- jsonargparse (LightningCLI) ------------------------------------------------------------
def _instantiate(parser, cfg):
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    return instantiate(cfg)


@pytest.fixture
def parser():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--sample_ratio", type=float | Schedule)
    return parser


def test_jsonargparse_float(parser):
    value = _instantiate(parser, parser.parse_args(["--sample_ratio=0.5"])).sample_ratio
    assert value == 0.5 and isinstance(value, float)


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("""
         sample_ratio:
           class_path: lightning_approx.schedules.Cosine
           init_args: {start: 1.0, end: 0.25, begin: 0, until: 10}
         """, Cosine(start=1.0, end=0.25, begin=0, until=10)),
        ("""
         sample_ratio:
           class_path: Step
           init_args: {values: [1.0, 0.5], milestones: [3], unit: step}
         """, Step(values=[1.0, 0.5], milestones=[3], unit="step")),
        ("""
         sample_ratio:
           class_path: lightning_approx.schedules.Piecewise
           init_args:
             points: [[0, 1.0], [5, 0.5]]
         """, Piecewise(points=[(0, 1.0), (5, 0.5)])),
        ("""
         sample_ratio: 0.75
         """, 0.75),
    ],
)
def test_jsonargparse_class_path(parser, yaml, expected):
    value = _instantiate(parser, parser.parse_string(yaml)).sample_ratio
    assert value == expected and type(value) is type(expected)


def test_jsonargparse_dict_on_the_command_line(parser):
    arg = ('--sample_ratio={"class_path": "lightning_approx.schedules.Cubic",'
           ' "init_args": {"start": 0, "end": 0.9}}')
    value = _instantiate(parser, parser.parse_args([arg])).sample_ratio
    assert value == Cubic(start=0.0, end=0.9)


def test_jsonargparse_bad_schedule_reports_the_config_error(parser):
    cfg = parser.parse_string("""
    sample_ratio:
      class_path: lightning_approx.schedules.Linear
      init_args: {start: 1.0, end: 0.5, begin: 5, until: 5}
    """)
    # jsonargparse wraps the ConfigError (a ValueError) in its own union error; the message survives
    with pytest.raises(ValueError, match=r"until=5\.0: a schedule that ends before it starts.*Fix:"):
        _instantiate(parser, cfg)
