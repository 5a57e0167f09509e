"""A pipeline run killed with SIGKILL in the middle of a stage resumes and ends where an unbroken run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from test_pipeline import recipe_file  # noqa: F401 (fixture)

RUN = (
    "import sys; from peft_isolate.pipeline import run_pipeline; from peft_isolate.recipe import load_recipe; "
    "run_pipeline(load_recipe(sys.argv[1]))"
)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


def _with(recipe_path: Path, out: Path, **changes) -> Path:
    data = yaml.safe_load(recipe_path.read_text())
    data.update(output_dir=str(out), baselines=[], **changes)
    data["stages"] = {**data["stages"], "steps": 6}
    data["training"] = {**data["training"], "save_steps": 2}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_stage_resumes_to_the_same_adapter(recipe_file, tmp_path):  # noqa: F811
    whole = _with(recipe_file, tmp_path / "whole")
    subprocess.run([sys.executable, "-c", RUN, str(whole)], check=True, capture_output=True)
    broken = _with(recipe_file, tmp_path / "broken")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(broken)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = tmp_path / "broken" / "stages" / "1.work" / "checkpoint-2" / "complete.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached a checkpoint of the second stage"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "broken" / "final").exists()
    subprocess.run([sys.executable, "-c", RUN, str(broken)], check=True, capture_output=True)
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "broken")
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)  # resumed data order and RNG: same math
        else:
            assert torch.equal(a[key], b[key])
