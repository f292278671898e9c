"""The benchmarks check their flags and input files before the first measurement and report a
bad one as one line, ``<script>: error: <flag>=<value>: <problem>. Fix: ...``, with exit status 2
(through :func:`lightning_approx.script_args.script_main`, which every benchmark's ``__main__`` runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lightning_approx.errors import ConfigError
from lightning_approx.script_args import script_main
from tests.conftest import REPO, load_script

CONFIGS = REPO / "examples" / "configs"


def refuse(*args, **kwargs):
    raise AssertionError("a measurement started before the error was found")


def fails(capsys, module, argv: list[str]) -> str:
    """Runs ``module.main(argv)`` as its ``__main__`` does; returns the one error line."""
    with pytest.raises(SystemExit) as exit_:
        script_main(module.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.fixture(scope="module")
def step_time():
    return load_script("benchmarks", "step_time")


@pytest.fixture(scope="module")
def tta():
    return load_script("benchmarks", "time_to_accuracy")


@pytest.fixture(scope="module")
def kernel_rescaling():
    return load_script("benchmarks", "kernel_rescaling")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "text.json").write_text("not json")
    return tmp_path


def test_script_main_turns_a_config_error_into_one_line(capsys):
    def main(argv):
        raise ConfigError("--flag", argv[0], "is wrong", "give another")

    with pytest.raises(SystemExit) as exit_:
        script_main(main, ["x"], script="demo.py")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "demo.py: error: --flag='x': is wrong. Fix: give another\n"
    assert script_main(lambda argv: argv, ["ok"]) == ["ok"]  # a good run returns main's result


# --- item 8: step_time.py ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--compare", "{missing}"], "--compare='{missing}': no such file"),
    (["--compare", "{text}"], "--compare='{text}': is not JSON"),
    (["--compare", "{empty}"], "--compare='{empty}': has no ['medians']"),
    (["--compare", "{lst}"], "--compare='{lst}': holds a JSON list, not an object"),
    (["--variants", "crs:sample_ratio=2"], "--variants='crs:sample_ratio=2': crs.sample_ratio=2.0: must stay in"),
])
def test_step_time_checks_files_and_variants_first(step_time, files, monkeypatch, capsys, args, message):
    monkeypatch.setattr(step_time, "run", refuse)
    paths = {"missing": files / "missing.json", "text": files / "text.json", "empty": files / "empty.json",
             "lst": files / "list.json"}
    args = [a.format(**paths) for a in args]
    line = fails(capsys, step_time, args)
    assert line.startswith(f"step_time.py: error: {message.format(**paths)}") and "Fix:" in line


def test_step_time_compare_needs_step_medians(step_time, files, monkeypatch, capsys):
    monkeypatch.setattr(step_time, "run", refuse)
    (files / "old.json").write_text(json.dumps({"medians": {"exact": {"forward": 1.0}}}))
    line = fails(capsys, step_time, ["--compare", str(files / "old.json")])
    assert "has no step time per variant (medians.<variant>.step)" in line


@pytest.mark.parametrize(("args", "message"), [
    (["--layers-of", "crs:sample_ratio=0.9"], "argument --layers-of: ['crs:sample_ratio=0.9'] are not among"),
    (["--steps", "0"], "argument --steps: 0 is not a positive whole number"),
    (["--threads", "0"], "argument --threads: 0 is not a positive whole number"),
    (["--warmup", "-1"], "argument --warmup: -1 is negative"),
    (["--model", "nosuch"], "argument --model: invalid choice: 'nosuch'"),
])
def test_step_time_flags_are_checked(step_time, monkeypatch, capsys, args, message):
    monkeypatch.setattr(step_time, "run", refuse)
    assert message in fails(capsys, step_time, args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_step_time_cuda_without_cuda(step_time, monkeypatch, capsys):
    monkeypatch.setattr(step_time, "run", refuse)
    line = fails(capsys, step_time, ["--device", "cuda"])
    assert line.startswith("step_time.py: error: --device='cuda': needs CUDA")


def test_step_time_writes_json_before_printing(step_time, tmp_path, monkeypatch):
    """A failure while printing the tables loses no measurement: the JSON is already written."""
    out = tmp_path / "st.json"
    monkeypatch.setattr(step_time, "table", lambda *a: (_ for _ in ()).throw(RuntimeError("print failed")))
    with pytest.raises(RuntimeError, match="print failed"):
        step_time.main(["--variants", "crs:sample_ratio=0.5", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                        "--layer-steps", "0", "--threads", str(torch.get_num_threads()), "--json", str(out)])
    assert "crs:sample_ratio=0.5" in json.loads(out.read_text())["medians"]


# --- items 7, 9, 13: time_to_accuracy.py -------------------------------------------------------


def test_tta_checks_every_method_before_the_exact_run(tta, monkeypatch, capsys):
    monkeypatch.setattr(tta.cifar10, "main", refuse)
    line = fails(capsys, tta, ["--seeds", "0", "--methods", "crs:sample_ratio=0.5", "crs:sample_ratio=3"])
    assert line.startswith("time_to_accuracy.py: error: --methods='crs:sample_ratio=3': crs.sample_ratio=3.0")


def test_tta_checks_the_set_flags_before_the_exact_run(tta, monkeypatch, capsys):
    monkeypatch.setattr(tta.cifar10, "main", refuse)
    line = fails(capsys, tta, ["--seeds", "0", "--methods", "crs", "--set", "--limit-eval-batches", "0"])
    assert line.startswith("time_to_accuracy.py: error: --set='--limit-eval-batches 0': ")
    with pytest.raises(SystemExit) as exit_:  # the example's own parser refuses its flags
        tta.main(["--seeds", "0", "--methods", "crs", "--set", "--limit-train-batches", "0"])
    assert exit_.value.code == 2
    assert "argument --limit-train-batches: 0 would train on no batches" in capsys.readouterr().err


def test_tta_checks_every_configs_approximations_first(tta, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tta, "run_configs", refuse)
    mine = tmp_path / "cifar10_resnet20_mine.yaml"
    mine.write_text((CONFIGS / "cifar10_resnet20_crs.yaml").read_text().replace("end: 0.5", "end: 3.0"))
    line = fails(capsys, tta, ["--seeds", "0", "--configs", str(CONFIGS / "cifar10_resnet20_crs.yaml"), str(mine)])
    assert line.startswith(f"time_to_accuracy.py: error: --configs='{mine}': trainer.callbacks[0] (ApproxBackward): ")


@pytest.mark.parametrize(("flag", "name", "message"), [
    ("--configs", "missing.yaml", "no such file"),
    ("--configs", "bad.yaml", "is not valid YAML"),
    ("--merge", "missing.json", "no such file"),
    ("--merge", "empty.json", "has no ['header', 'runs']"),
    ("--merge", "text.json", "is not JSON"),
])
def test_tta_input_files_are_checked(tta, files, monkeypatch, capsys, flag, name, message):
    monkeypatch.setattr(tta, "run_configs", refuse)
    (files / "bad.yaml").write_text("trainer: [unclosed\n")
    line = fails(capsys, tta, ["--seeds", "0", flag, str(files / name)])
    assert line.startswith(f"time_to_accuracy.py: error: {flag}='{files / name}': {message}")


def test_tta_seeds_are_checked(tta, capsys):
    assert "argument --seeds: -1 is outside [0, 4294967295]" in fails(capsys, tta, ["--seeds", "-1"])


# --- items 7, 9, 12, 13: kernel_rescaling.py ---------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--scale", "1.5"], "kernel_rescaling.py: error: --scale=1.5: must lie in (0, 1)"),
    (["--fraction", "1.0"], "kernel_rescaling.py: error: --fraction=1.0: must lie in (0, 1)"),
    (["--specs", "resnet20:32:1", "resnet20"], "argument --specs: 'resnet20' has 1 part(s), not 3"),
    (["--specs", "resnet20:32:0"], "argument --specs: 'resnet20:32:0': the input size and epochs must be positive"),
    (["--specs", "nosuch:32:1"], "argument --specs: 'nosuch:32:1': unknown model 'nosuch'"),
    (["--limit-train-batches", "1.5"], "argument --limit-train-batches: 1.5 is a fraction above 1"),
    (["--seeds", "-1"], "argument --seeds: -1 is outside"),
])
def test_kernel_rescaling_checks_every_run_first(kernel_rescaling, monkeypatch, capsys, args, message):
    monkeypatch.setattr(kernel_rescaling, "train", refuse)
    assert message in fails(capsys, kernel_rescaling, args)


def test_kernel_rescaling_limit_is_a_count_or_a_fraction(kernel_rescaling, monkeypatch):
    """``--limit-train-batches 1`` is one batch, as in the examples; ``1.0`` is all of them."""
    seen = []
    monkeypatch.setattr(kernel_rescaling, "train", lambda *a: seen.append(a[-1].limit_train_batches) or refuse())
    for value, expected in (("1", 1), ("1.0", 1.0), ("0.25", 0.25)):
        with pytest.raises(AssertionError):
            kernel_rescaling.main(["--specs", "resnet20:32:1", "--seeds", "0", "--limit-train-batches", value])
        assert seen[-1] == expected and type(seen[-1]) is type(expected)


@pytest.mark.parametrize(("name", "message"), [("missing.json", "no such file"),
                                               ("empty.json", "has no ['command', 'header', 'runs']")])
def test_kernel_rescaling_merge_files_are_checked(kernel_rescaling, files, capsys, name, message):
    line = fails(capsys, kernel_rescaling, ["--merge", str(files / name)])
    assert line.startswith(f"kernel_rescaling.py: error: --merge='{files / name}': {message}")


# --- item 13: the other benchmarks -------------------------------------------------------------


def test_gradient_noise_checks_variants_before_the_warm_up(monkeypatch, capsys):
    gradient_noise = load_script("benchmarks", "gradient_noise")
    monkeypatch.setattr(gradient_noise, "run", refuse)
    line = fails(capsys, gradient_noise, ["--variants", "crs", "crs:sample_ratio=0"])
    assert line.startswith("gradient_noise.py: error: --variants='crs:sample_ratio=0': crs.sample_ratio=0.0")


def test_prediction_agreement_checks_every_checkpoint_first(tmp_path, capsys):
    agreement = load_script("benchmarks", "prediction_agreement")
    (tmp_path / "a.ckpt").write_bytes(b"")
    line = fails(capsys, agreement, ["--checkpoints", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")])
    assert line.startswith(f"prediction_agreement.py: error: --checkpoints='{tmp_path / 'b.ckpt'}': no such file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_conv_channels_cuda_without_cuda(capsys):
    conv_channels = load_script("benchmarks", "conv_channels")
    line = fails(capsys, conv_channels, ["--device", "cuda"])
    assert line.startswith("conv_channels.py: error: --device='cuda': needs CUDA")


@pytest.mark.parametrize("script", ["backward_breakdown", "forward_breakdown", "ddp_comm", "gradient_noise",
                                    "conv_channels"])
def test_counts_are_checked(script, capsys):
    module = load_script("benchmarks", script)
    flag = {"gradient_noise": "--batch-size", "conv_channels": "--reps"}.get(script, "--steps")
    argv = (["time"] if script == "ddp_comm" else []) + [flag, "0"]
    assert f"argument {flag}: 0 is not a positive whole number" in fails(capsys, module, argv)


def test_a_script_prints_no_traceback_above_the_error(tmp_path):
    """Run as a program: stderr is the one line, nothing above it."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--compare",
                           str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr == (f"step_time.py: error: --compare='{tmp_path / 'missing.json'}': no such file. "
                           "Fix: give a file this script wrote with --json\n")
