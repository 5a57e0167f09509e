"""Reliability: a pipeline run that is killed, runs out of disk or finds a damaged artifact either
recovers to exactly what an unbroken run gives or stops with an error that names the file.

Every scenario starts from the recipe of tests/test_pipeline.py (tiny Llama, two tiny JSONL tasks) as
tests/test_resume.py shapes it (no baselines, 6 stage steps, a checkpoint every 2 steps), and is compared with
one uninterrupted reference run: the final adapter within atol 1e-6 (resuming from a Trainer checkpoint is exact
up to float reduction order) and results.json's scores exactly. Runs that are killed or must fail happen in
fresh processes (forked from a server that has only imported the pipeline, so each saves ~5 s of imports);
the others run in this process. Every run uses one torch thread (see _one_thread).

Set PEFT_ISOLATE_FAULT_SEEDS=N to kill at N random points instead of 6 (a soak run).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from runs import final_adapter, with_changes
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from peft_isolate import pipeline, training
from peft_isolate.files import save_pretrained_atomic
from peft_isolate.pipeline import run_pipeline
from peft_isolate.recipe import load_recipe
from peft_isolate.training import COMPLETE

ATOL = 1e-6
_PROCESSES = multiprocessing.get_context("forkserver")
_CACHE: dict[str, object] = {}  # expensive runs shared by the tests of this module (one process, run once)


class Crash(BaseException):
    """A simulated kill at an exact point (what SIGKILL would do there, deterministically)."""


def _pipeline_process(recipe: str, until: str, limit: int, log: str) -> None:
    """run_pipeline with its output in `log`; under a file-size limit if `limit` (a full disk: with SIGXFSZ
    ignored, a write past the limit fails with OSError EFBIG instead of killing the process)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    torch.set_num_threads(1)  # as in the test process (see _one_thread)
    loaded = load_recipe(recipe)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    run_pipeline(loaded, until)


def _start(recipe: Path, log: Path, until: str = "evaluate", limit: int = 0):
    """The pipeline in a fresh process: forked from a server that has imported the pipeline and this module only
    (set before its first use, which starts it)."""
    _PROCESSES.set_forkserver_preload(["peft_isolate.pipeline", __name__])
    proc = _PROCESSES.Process(target=_pipeline_process, args=(str(recipe), until, limit, str(log)), daemon=True)
    proc.start()
    return proc


def _run(recipe: Path, log: Path, until: str = "evaluate", limit: int = 0, check: bool = True) -> tuple[int, str]:
    """Run the pipeline in a fresh process; (exit code, its output)."""
    proc = _start(recipe, log, until, limit)
    proc.join(600)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"pipeline run did not end in 600 s:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    if check and proc.exitcode:
        pytest.fail(f"pipeline run failed (exit {proc.exitcode}):\n{output[-4000:]}")
    return proc.exitcode, output


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here and in the pipeline processes: every run does the same float arithmetic, and a busy
    machine cannot slow two spinning OpenMP threads to a crawl (a run takes ~3 s instead of ~25 s then)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture
def reference(recipe_file, tmp_path_factory):  # noqa: F811
    """(recipe, output dir) of one uninterrupted run, made once; every test derives its recipe from this one
    (same task files, so the same step keys)."""
    if "reference" not in _CACHE:
        out = tmp_path_factory.mktemp("reference") / "whole"
        recipe = with_changes(recipe_file, out)
        run_pipeline(load_recipe(recipe))  # in this process: one interpreter start less
        _CACHE["reference"] = (recipe, out)
    return _CACHE["reference"]


# --- what a run directory may trust ---------------------------------------------------------------------------


def _artifact(out: Path, step: str) -> Path:
    """The artifact a state.json entry vouches for: `eval:<method>` is eval/<method, ':' as '-'>.json; any other
    `a:b` is the folder or file a/b (plan: plan.json, cores:<t>: cores/<t>.safetensors, stages:<k>: stages/<k>)."""
    kind, _, arg = step.partition(":")
    if kind == "eval":
        return out / "eval" / f"{arg.replace(':', '-')}.json"
    base = out / step.replace(":", "/")
    candidates = [base, base.with_name(f"{base.name}.json"), base.with_name(f"{base.name}.safetensors")]
    found = [p for p in candidates if p.exists()]
    assert found, f"state.json vouches for step {step!r}, but none of {[str(p) for p in candidates]} exists"
    return found[0]


def _load_error(path: Path) -> str | None:
    """Why `path` (a file, or every file of a folder) does not load back; None if it does."""
    if not path.exists():
        return f"{path} does not exist"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir() and not any(f.suffix == ".safetensors" for f in files):
        return f"{path} holds no safetensors file"
    for f in files:
        try:
            if f.suffix == ".safetensors":
                load_file(f)
            elif f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix in (".pt", ".pth", ".bin"):
                torch.load(f, weights_only=False)
        except Exception as e:  # noqa: BLE001 (any failure to read back is the finding)
            return f"{f}: {type(e).__name__}: {e}"
    return None


def _assert_trusted_files_load(out: Path) -> None:
    """Everything the run directory vouches for reads back: state.json, each artifact state.json records as
    complete, each Trainer checkpoint that has its completion marker, and results.json."""
    problems = []
    state_path = out / "state.json"
    state = {}
    if state_path.exists():
        problems.append(_load_error(state_path))
        state = json.loads(state_path.read_text()) if problems[-1] is None else {}
    problems += [_load_error(_artifact(out, step)) for step in state]
    problems += [_load_error(marker.parent) for marker in out.glob(f"**/checkpoint-*/{COMPLETE}")]
    if (out / "results.json").exists():
        problems.append(_load_error(out / "results.json"))
    problems = [p for p in problems if p]
    assert not problems, "half-written files are trusted:\n" + "\n".join(problems)


def _assert_same_result(out: Path, ref: Path) -> None:
    """The final adapter within ATOL of the reference's and results.json's scores equal."""
    a, b = final_adapter(ref), final_adapter(out)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key
    got, want = _results(out), _results(ref)
    assert got["methods"] == want["methods"]
    assert got["majority"] == want["majority"]


def _temp_files(out: Path) -> list[str]:
    """Leftovers of interrupted atomic writes: `.<name>.<random>.tmp` files and folders, `.<name>.old` folders
    (every dot-file but the run directory's lock)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p != out / ".lock")


def _safetensors_content(data: bytes) -> tuple[dict[str, list], dict[str, str]]:
    """A safetensors file's tensors (as lists) and header metadata, independent of the header's key order."""
    n = int.from_bytes(data[:8], "little")
    return {k: v.tolist() for k, v in safetensors_load(data).items()}, json.loads(data[8 : 8 + n]).get("__metadata__")


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock (which names the process holding it)."""
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


# --- 1. SIGKILL anywhere ------------------------------------------------------------------------------------

# Where a kill lands: after this path appears under the run directory, plus a random delay (0-0.2 s; one step of
# the tiny run takes 0.05-0.5 s). Seed k draws from group k % 3, so three seeds cover the probes, then
# regions/plan/fusion/the first stage, then the second stage/final copy/evaluation.
KILL_POINTS = [
    [
        "probes/count.work/checkpoint-2/complete.json",
        "probes/count",
        "probes/upper.work/checkpoint-2/complete.json",
        "probes/upper",
    ],
    [
        "cores/count.safetensors",
        "plan.json",
        "fused/delta.safetensors",
        "stages/0.work/checkpoint-2/complete.json",
        "stages/0.work/checkpoint-4/complete.json",
    ],
    [
        "stages/0",
        "stages/1.work/checkpoint-2/complete.json",
        "stages/1.work/checkpoint-4/complete.json",
        "stages/1",
        "final",
    ],
]
SEEDS = range(int(os.environ.get("PEFT_ISOLATE_FAULT_SEEDS", "6")))


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_point_then_rerun_matches_an_unbroken_run(seed, reference, tmp_path):
    ref_recipe, ref_out = reference
    rng = random.Random(seed)
    point, delay = rng.choice(KILL_POINTS[seed % len(KILL_POINTS)]), rng.uniform(0.0, 0.2)
    out = tmp_path / "broken"
    recipe = with_changes(ref_recipe, out)
    log = tmp_path / "killed.log"
    proc = _start(recipe, log)
    try:
        deadline = time.time() + 300
        while not (out / point).exists() and proc.is_alive() and time.time() < deadline:
            time.sleep(0.005)
        assert (out / point).exists(), f"the run never reached {point}:\n{log.read_text()[-3000:]}"
        end = time.time() + delay
        while time.time() < end and proc.is_alive() and not (out / "results.json").exists():
            time.sleep(0.005)  # results.json is the run's last write but one: kill then at the latest
        assert proc.is_alive(), f"the run ended within {delay:.2f}s of {point}: no kill happened"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    started = [line for line in log.read_text().splitlines() if line.startswith("[peft-isolate] ")]
    print(f"seed {seed}: killed {delay:.2f}s after {point}, in step {started[-1][15:] if started else '-'}")
    _assert_trusted_files_load(out)
    _run(recipe, tmp_path / "rerun.log")
    _assert_trusted_files_load(out)
    _assert_same_result(out, ref_out)


def test_kill_while_finished_checkpoints_are_deleted_does_not_wedge_the_step(reference, tmp_path, monkeypatch):
    """train() deletes its checkpoints once the step's training is done. A kill in the middle of that rmtree
    can leave a `checkpoint-N/` whose files are gone but whose completion marker is still there (rmtree deletes
    in directory order); the rerun must not resume from it (it should train afresh to the same adapter)."""
    ref_recipe, ref_out = reference
    out = tmp_path / "run"
    recipe = load_recipe(with_changes(ref_recipe, out))

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if any(p != path for p in path.parent.glob("checkpoint-*")):
            return shutil.rmtree(path, *args, **kwargs)  # not the last one: it went completely
        for f in path.iterdir():  # the last one: killed with only the marker left
            if f.name != COMPLETE:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        raise Crash(f"killed while deleting {path}")

    fake = SimpleNamespace(**{k: getattr(shutil, k) for k in dir(shutil) if not k.startswith("__")})
    fake.rmtree = rmtree
    monkeypatch.setattr(training, "shutil", fake)
    with pytest.raises(Crash):
        run_pipeline(recipe, "probe")
    monkeypatch.undo()
    run_pipeline(recipe, "probe")
    _assert_trusted_files_load(out)
    for task in ("count", "upper"):
        a = load_file(ref_out / "probes" / task / "adapter_model.safetensors")
        b = load_file(out / "probes" / task / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=ATOL)


def test_artifact_redone_for_another_recipe_is_not_trusted_for_the_old_one(reference, tmp_path, monkeypatch):
    """Recipe A completes; recipe B (another stage lr) redoes stage 0 and is killed after the new stages/0 is in
    place but before state.json records it. state.json still says stage 0 is done under A's key, so a rerun of
    A must not take B's stages/0 for its own."""
    ref_recipe, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    recipe_a = with_changes(ref_recipe, out)
    data = yaml.safe_load(recipe_a.read_text())
    data["stages"]["lr"] = data["stages"]["lr"] / 2
    recipe_b = tmp_path / "b.yaml"
    recipe_b.write_text(yaml.safe_dump(data))
    key_a = json.loads((out / "state.json").read_text())["stages:0"]
    real = pipeline.save_json

    def save_json(obj, path):
        if Path(path).name == "state.json" and obj.get("stages:0") not in (None, key_a):
            raise Crash("killed before state.json recorded stage 0 of recipe B")
        return real(obj, path)

    monkeypatch.setattr(pipeline, "save_json", save_json)
    with pytest.raises(Crash):
        run_pipeline(load_recipe(recipe_b))
    monkeypatch.undo()
    run_pipeline(load_recipe(recipe_a))
    a = load_file(ref_out / "stages" / "0" / "adapter_model.safetensors")
    b = load_file(out / "stages" / "0" / "adapter_model.safetensors")
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(
                b[key], a[key], rtol=0, atol=ATOL, msg=lambda m, k=key: f"stages/0 is recipe B's, not A's ({k}): {m}"
            )
    _assert_same_result(out, ref_out)


# --- 2. full disk ---------------------------------------------------------------------------------------------


def _error_block(stderr: str) -> str:
    """The exception lines of a traceback (messages and notes), without the frames and their source lines."""
    lines = stderr.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    tail = lines[frames[-1] + 1 :] if frames else lines
    return "\n".join(line for line in tail if not line.startswith("    "))


@pytest.fixture
def full_disk(reference, tmp_path_factory):
    """One run dir taken through fusion, then run twice under a file-size limit: once failing on
    support.safetensors (rewritten by every run), once failing in stage 0 (its Trainer checkpoint or adapter).
    Records each failed run and the directory before and after it; made once."""
    if "full_disk" not in _CACHE:
        ref_recipe, ref_out = reference
        out = tmp_path_factory.mktemp("full-disk") / "run"
        recipe = with_changes(ref_recipe, out)
        run_pipeline(load_recipe(recipe), "fuse")
        support = (out / "support.safetensors").stat().st_size
        stage = (ref_out / "stages" / "0" / "adapter_model.safetensors").stat().st_size
        assert (out / "recipe.json").stat().st_size < support // 2 and support < stage
        cases = {}
        for case, limit, target in [
            ("support", support // 2, out / "support.safetensors"),
            ("stage", (support + stage) // 2, out / "stages" / "0"),
        ]:
            before = _snapshot(out)
            code, output = _run(recipe, out.parent / f"{case}.log", limit=limit, check=False)
            cases[case] = SimpleNamespace(
                limit=limit,
                target=target,
                code=code,
                output=output,
                before=before,
                after=_snapshot(out),
                temp=_temp_files(out),
            )
        _CACHE["full_disk"] = (recipe, out, cases)
    return _CACHE["full_disk"]


def test_full_disk_keeps_earlier_artifacts_and_a_rerun_completes(full_disk, reference):
    recipe, out, cases = full_disk
    for case in cases.values():
        assert case.code != 0, f"the run under a {case.limit}-byte file limit did not fail"
        assert "Traceback" in case.output and "File too large" in case.output, case.output[-3000:]
        for name, data in case.before.items():
            assert name in case.after, f"{name} disappeared when a later write failed"
            if name == "support.safetensors" and case.target.name != name:
                # rewritten by every run; safetensors orders its header at random, so compare the content
                assert _safetensors_content(case.after[name]) == _safetensors_content(data), name
                continue
            if name == "artifacts.json":  # the failed step records that it was writing; earlier records stay
                before, after = json.loads(data), json.loads(case.after[name])
                assert {k: after[k] for k in before} == before, name
                continue
            assert case.after[name] == data, f"{name} changed when a later write failed"
        assert not case.temp, f"temp files left behind after a failed write: {case.temp}"
    _assert_trusted_files_load(out)
    run_pipeline(load_recipe(recipe))
    _assert_trusted_files_load(out)
    _assert_same_result(out, reference[1])


def test_full_disk_error_names_the_file_and_the_os_error(full_disk):
    _, _, cases = full_disk
    problems = []
    for name, case in cases.items():
        message, target = _error_block(case.output), str(case.target)
        if "File too large" not in message and f"Errno {errno.EFBIG}" not in message:
            problems.append(f"{name}: the error does not name the OSError (EFBIG):\n{message}")
        if target not in message:
            problems.append(
                f"{name}: a write under {target} failed on a full disk; the error does not say which:\n{message}"
            )
    assert not problems, "\n\n".join(problems)


def test_failed_adapter_save_keeps_the_old_one_and_leaves_no_temp_folder(tmp_path):
    """save_pretrained_atomic when the disk fills half-way through a save (rlimit cannot reach this path in the
    pipeline: each step's Trainer writes a checkpoint of the same size first)."""

    class FullDisk:
        def save_pretrained(self, path, **kwargs):
            Path(path).mkdir(parents=True, exist_ok=True)  # as save_pretrained does
            (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    target = tmp_path / "stages" / "0"
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(OSError) as info:
        save_pretrained_atomic(FullDisk(), target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    leftovers = _temp_files(tmp_path)
    assert not leftovers, f"a failed save leaves {leftovers}"
    assert str(target) in str(info.value), f"the error does not name {target}: {info.value}"


# --- 3. truncated artifacts -----------------------------------------------------------------------------------

DAMAGED = [
    "cores/upper.safetensors",
    "stages/0/adapter_model.safetensors",
    "stages/1/adapter_model.safetensors",
    "probes/count/adapter_model.safetensors",
    "fused/delta.safetensors",
    "final/adapter_model.safetensors",
    "plan.json",
    "eval/cpi_ft.json",
]


@pytest.mark.parametrize("victim", DAMAGED)
def test_truncated_artifact_is_redone_or_named(victim, reference, tmp_path):
    """A completed run dir with one artifact cut to half its size: the rerun redoes that step (the file reads
    back again and the result equals the reference) or fails with an error naming the file; never trusts it."""
    ref_recipe, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    path = out / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    try:
        run_pipeline(load_recipe(with_changes(ref_recipe, out)))
    except Exception as e:  # noqa: BLE001
        assert str(path) in str(e), f"the rerun failed without naming {path}: {type(e).__name__}: {e}"
        print(f"{victim}: the rerun fails naming it: {e}")
        return
    assert _load_error(path) is None, f"the rerun completed and silently trusted the truncated {victim}"
    want = ref_out / victim
    if path.suffix == ".json":
        assert json.loads(path.read_text()) == json.loads(want.read_text()), f"{victim} was redone differently"
    else:
        a, b = load_file(want), load_file(path)
        assert a.keys() == b.keys(), f"{victim} was redone differently"
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=ATOL, msg=lambda m, k=key: f"{victim} {k}: {m}")
    _assert_same_result(out, ref_out)
    print(f"{victim}: the rerun redid it")


def test_atomic_writes_follow_the_umask_and_replace_folders_whole(tmp_path):
    """Artifacts are readable as the umask allows (not mkstemp's private 0600), and a replaced folder leaves
    neither its old contents nor temp folders behind."""
    from peft_isolate.files import atomic_dir, save_json

    save_json({"a": 1}, tmp_path / "x.json")
    for text in ("old", "new"):
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text(text)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.json"]


def test_a_write_leaves_the_temporaries_of_writes_in_progress_and_restores_a_killed_replace(tmp_path):
    """Two writers of one path (two processes converting one model): the second's cleanup of killed writes leaves
    the first's temporary and its file, which then find the path taken; a `.<name>.old` folder whose `<name>` is
    gone (killed between a replace's renames) is the last whole copy and is put back, not removed."""
    from peft_isolate.files import atomic_dir, atomic_path, remove_stale_temporaries

    target = tmp_path / "model"
    with pytest.raises(FileExistsError, match="exists and is not empty"), atomic_dir(target, replace=False) as first:
        (first / "config.json").write_text("first")
        with atomic_dir(target, replace=False) as second:
            (second / "config.json").write_text("second")
        assert (first / "config.json").read_text() == "first"
    assert (target / "config.json").read_text() == "second"
    with atomic_path(tmp_path / "x.json") as first:
        first.write_text("1")
        with atomic_path(tmp_path / "x.json") as second:
            second.write_text("2")
        assert first.read_text() == "1"
    assert (tmp_path / "x.json").read_text() == "1"
    (tmp_path / "run" / ".stage.old").mkdir(parents=True)
    (tmp_path / "run" / ".stage.old" / "f").write_text("whole")
    assert remove_stale_temporaries(tmp_path / "run") == [tmp_path / "run" / ".stage.old"]
    assert (tmp_path / "run" / "stage" / "f").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run", "x.json"]


# --- 4. other writers: a second run, a person's files, a killed write's temporaries ------------------------------


def _copy_of(reference, tmp_path, **changes) -> tuple[Path, Path]:
    """A copy of the reference run directory and a recipe for it (with `changes`): complete under its keys."""
    ref_recipe, ref_out = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    return with_changes(ref_recipe, out, **changes), out


def test_a_second_run_on_a_held_directory_is_refused_and_a_dead_runs_lock_is_taken_over(reference, tmp_path):
    ref_recipe, ref_out = reference
    out = tmp_path / "shared"
    recipe = with_changes(ref_recipe, out)
    proc = _start(recipe, tmp_path / "first.log")
    try:
        deadline = time.time() + 120
        while not (out / "probes").exists() and proc.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        assert proc.is_alive(), (tmp_path / "first.log").read_text()[-3000:]
        with pytest.raises(FileExistsError, match=rf"in use by another run \(process {proc.pid}, which holds"):
            run_pipeline(load_recipe(recipe))
        os.kill(proc.pid, signal.SIGKILL)  # its lock file stays, with its pid; the kernel released the lock
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
    assert (out / ".lock").read_text().strip() == str(proc.pid)
    _run(recipe, tmp_path / "rerun.log")  # takes the dead run's lock over
    _assert_same_result(out, ref_out)


def test_files_the_tool_did_not_write_are_never_deleted(reference, tmp_path):
    """A non-empty folder without state.json is refused; inside a run directory, a step that is redone refuses
    to replace an artifact holding a file it did not write, and a step whose artifact path a person filled first
    refuses too. Every such file is left as it was."""
    ref_recipe, _ = reference
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files but is not a peft-isolate run directory"):
        run_pipeline(load_recipe(with_changes(ref_recipe, foreign)))
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]

    data = yaml.safe_load(ref_recipe.read_text())
    recipe, out = _copy_of(reference, tmp_path, stages={**data["stages"], "lr": 5e-3})
    (out / "stages" / "0" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"stages/0/notes.txt was not written by peft-isolate"):
        run_pipeline(load_recipe(recipe))
    assert (out / "stages" / "0" / "notes.txt").read_text() == "mine"

    recipe, out = _copy_of(reference, tmp_path / "b", eval={**data["eval"], "max_new_tokens": 3})
    shutil.rmtree(out / "eval")
    (out / "eval").mkdir()
    (out / "eval" / "base.json").write_text('{"mine": 1}')
    for record in ("artifacts.json", "state.json"):  # as if no run ever wrote eval/base.json
        entries = json.loads((out / record).read_text())
        (out / record).write_text(json.dumps({k: v for k, v in entries.items() if k != "eval:base"}))
    with pytest.raises(FileExistsError, match=r"eval/base.json was not written by peft-isolate"):
        run_pipeline(load_recipe(recipe))
    assert (out / "eval" / "base.json").read_text() == '{"mine": 1}'


def test_a_rerun_removes_what_killed_atomic_writes_left_and_nothing_else(reference, tmp_path):
    recipe, out = _copy_of(reference, tmp_path)
    leftovers = [out / ".recipe.json.k3x9_q2a.tmp", out / "cores" / ".upper.safetensors.0a1b2c3d.tmp"]
    for f in leftovers:
        f.write_bytes(b"half a write")
    (out / "stages" / ".0.old").mkdir()
    (out / "stages" / ".0.old" / "adapter_model.safetensors").write_bytes(b"old")
    kept = [out / ".my-notes.tmp", out / "cores" / ".upper.safetensors.bak"]  # not names atomic writes make
    for f in kept:
        f.write_text("mine")
    run_pipeline(load_recipe(recipe))
    assert not any(f.exists() for f in [*leftovers, out / "stages" / ".0.old"])
    assert all(f.read_text() == "mine" for f in kept)
