"""A quiet first run: `laser run` shows progress bars, the step lines and the results table; the libraries'
warnings and log records go to the command's log file, and to the terminal too with `laser --verbose`."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

#: what the libraries printed on a tiny run before (transformers, bitsandbytes, torch.onnx, onnxscript, ZenML, GX)
LIBRARY_LINES = (
    "LOAD REPORT",
    "torchvision",
    "kernels",
    "onstant folding",
    "[transformers]",
    "active stack to default",
    "ephemeral docs site",
)
STEPS = ("load_dataset", "validate_dataset", "pretrain_sr", "bi_tune_stage1", "evaluate_laser", "export_scorer")


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env["ZENML_CONFIG_PATH"] = str(tmp_path / "zenml")  # a new store, as a newcomer's first run
    env["LASER_LOG_DIR"] = str(tmp_path / "logs")
    env.pop("CI", None)  # transformers' logger propagates to the root logger on CI: the run must be quiet there too
    return env


def _log_text(tmp_path) -> str:
    logs = sorted((tmp_path / "logs").glob("laser-*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text(encoding="utf8")


def test_laser_run_is_quiet_and_the_library_lines_are_in_the_log_file(tmp_path):
    cmd = [sys.executable, "-m", "laser_cli.main", "run", "--config", str(REPO / "configs" / "tiny.yaml"), "--no-cache"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    for line in LIBRARY_LINES:
        assert line not in console, f"{line!r} on the terminal:\n{console}"
    # the project's own output: the step lines, the results table, the promotion line and the progress bars
    assert "Pipeline run laser_training-" in proc.stdout and ": completed" in proc.stdout
    for step in STEPS:
        assert f"  {step} " in proc.stdout and "completed" in proc.stdout
    assert "Test (24 users, full ranking" in proc.stdout
    assert "  popularity " in proc.stdout and "Model laser-tiny version 1:" in proc.stdout
    assert "stage 1 epoch 0" in proc.stderr
    log = _log_text(tmp_path)
    for line in ("torchvision is not installed", "Skipping constant folding", "Setting the global active stack"):
        assert line in log, log


# Each library's records by its own logger (and one Python warning raised in library code, one in this project's
# code), after the CLI's set-up: what a pipeline step's libraries do, without running one.
EMIT = """
import logging, sys, warnings
from laser_cli.main import cli
try:
    cli([*sys.argv[1:], "models", "--help"], standalone_mode=False)
except SystemExit:
    pass
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("LlamaForCausalLM LOAD REPORT from: x")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward: kernels")
logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed. Skipping x")
logging.getLogger("onnxscript.optimizer._constant_folding").warning("Skipping constant folding for op Split")
warnings.warn_explicit("a library FutureWarning", FutureWarning, "/site-packages/somelib/mod.py", 3)
warnings.warn_explicit("the project's own warning", UserWarning, OWN_FILE, 1)
logging.getLogger("bitsandbytes.backends.cpu.ops").error("a library error stays visible")
"""
EMITTED = (
    "LOAD REPORT",
    "kernels",
    "torchvision is not installed",
    "Skipping constant folding",
    "a library FutureWarning",
)


def _emit(tmp_path, *flags: str) -> str:
    tmp_path.mkdir()
    script = tmp_path / "emit.py"
    script.write_text(EMIT.replace("OWN_FILE", repr(str(REPO / "laser_core" / "somewhere.py"))))
    cmd = [sys.executable, str(script), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_library_records_go_to_the_log_file_and_to_the_terminal_only_with_verbose(tmp_path):
    quiet = _emit(tmp_path / "quiet")
    for line in EMITTED:
        assert line not in quiet, quiet
    assert "the project's own warning" in quiet and "a library error stays visible" in quiet
    log = _log_text(tmp_path / "quiet")
    for line in EMITTED:
        assert line in log, log

    verbose = _emit(tmp_path / "verbose", "--verbose")
    for line in (*EMITTED, "the project's own warning", "a library error stays visible"):
        assert line in verbose, verbose
    log = _log_text(tmp_path / "verbose")
    for line in EMITTED:
        assert line in log, log
