"""bench_ann/compile_report: the E-step kernels compiled for sm_90a on a machine without a GPU (triton's ptxas)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# not imported here: triton must first be imported after test_kernels sets TRITON_INTERPRET=1 (this module is
# collected before it)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_compile_report_gives_registers_and_shared_memory_per_config(tmp_path):
    # a subprocess: the report must compile for the GPU, so TRITON_INTERPRET must not be set (the kernel tests
    # set it in this process)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "bench_ann.compile_report", "--cov", "diag", "--pass", "1",
                          "--k", "100", "--d", "24", "--json", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["split_a"] is True and rep["rows"], rep          # diag "tf32": A in two terms
    for row in rep["rows"]:
        assert "error" not in row, row
        assert 0 < row["registers"] <= 255 and row["shared"] > 0 and row["spill_stores"] >= 0, row
    # every row is one config that the kernel's own pruning kept, with its tile sizes
    assert {(r["BLOCK_M"], r["BLOCK_K"]) for r in rep["rows"]} <= {(64, 64), (128, 64), (128, 128), (64, 128),
                                                                   (256, 64)}
