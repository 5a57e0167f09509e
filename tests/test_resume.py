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
from runs import final_adapter, with_changes

RUN = (
    "import sys; from peft_isolate.pipeline import run_pipeline; from peft_isolate.recipe import load_recipe; "
    "run_pipeline(load_recipe(sys.argv[1]))"
)


def _kill_at_second_stage_checkpoint(recipe: Path, out: Path) -> None:
    """Start a run of `recipe` and SIGKILL it once the second stage has saved its first complete checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = out / "stages" / "1.work" / "checkpoint-2" / "complete.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached a checkpoint of the second stage"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()


def _assert_same_final(a_dir: Path, b_dir: Path) -> None:
    a, b = final_adapter(a_dir), final_adapter(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)  # resumed data order and RNG: same math
        else:
            assert torch.equal(a[key], b[key])


def test_killed_stage_resumes_to_the_same_adapter(recipe_file, tmp_path):  # noqa: F811
    whole = with_changes(recipe_file, tmp_path / "whole")
    subprocess.run([sys.executable, "-c", RUN, str(whole)], check=True, capture_output=True)
    broken = with_changes(recipe_file, tmp_path / "broken")
    _kill_at_second_stage_checkpoint(broken, tmp_path / "broken")
    subprocess.run([sys.executable, "-c", RUN, str(broken)], check=True, capture_output=True)
    _assert_same_final(tmp_path / "whole", tmp_path / "broken")


def test_killed_stage_rerun_with_another_lr_does_not_resume_the_old_checkpoint(recipe_file, tmp_path):  # noqa: F811
    """Killed mid-stage, then rerun with another stage lr: the stage's inputs changed, so the checkpoint the
    killed run left (old weights, old optimizer lr) must not be resumed; the result is a fresh run's."""
    data = yaml.safe_load(recipe_file.read_text())
    lr = {**data["stages"], "lr": data["stages"]["lr"] / 2}
    whole = with_changes(recipe_file, tmp_path / "whole", stages=lr)
    subprocess.run([sys.executable, "-c", RUN, str(whole)], check=True, capture_output=True)
    _kill_at_second_stage_checkpoint(with_changes(recipe_file, tmp_path / "broken"), tmp_path / "broken")
    changed = with_changes(recipe_file, tmp_path / "broken", stages=lr)
    subprocess.run([sys.executable, "-c", RUN, str(changed)], check=True, capture_output=True)
    _assert_same_final(tmp_path / "whole", tmp_path / "broken")
