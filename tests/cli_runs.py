"""Helpers of the command-line tests: run the tiny config, compare a user's files, read metrics."""

import json
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ERRORS = ("error_pretrained", "error_retrained", "error_compressed", "error_finetuned")
CLI = [sys.executable, "-m", "gmm_quant.train", "--config", "tiny", "--no-progress", "--retrain-epochs", "8"]


def snapshot(directory: pathlib.Path) -> dict:
    """Every file under ``directory`` with its bytes: compared before and after an attack."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def default_sigint():
    """In the child: Ctrl-C raises KeyboardInterrupt even when the suite itself was started in the
    background, where the shell sets SIGINT to ignored and children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(workdir, *extra, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [*CLI, "--workdir", str(workdir), *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, preexec_fn=default_sigint, **kw)


def run_cli(workdir, *extra):
    proc = popen(workdir, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def metrics_of(workdir):
    m = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
    return {k: m[k] for k in (*ERRORS, "nonzero_fraction", "compression_ratio")}
