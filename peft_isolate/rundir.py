"""The run directory: recognised by its state file, held by one run at a time, and never a place where the tool
deletes or overwrites files it did not write.

`state.json` ({step: input key}) marks a directory as a run directory and says which steps are complete.
`artifacts.json` ({step: {"path": ..., "files": [...] or null}}) lists the files each step wrote (null while
the step is writing), so a step that is redone can tell its own files from files a person put beside them.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import load_json, remove_stale_temporaries, save_json

STATE = "state.json"
ARTIFACTS = "artifacts.json"
LOCK = ".lock"


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold `out` as this run's directory for the block: refuse a non-empty folder that is not a run directory,
    a folder this process cannot write, and a run directory another live run holds (its lock is released by the
    kernel when that process dies, so a dead run's lock is simply taken over); remove what killed writes left."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file: choose a new or empty folder")
    if out.is_dir() and not (out / STATE).is_file() and any(f.name != LOCK for f in out.iterdir()):
        raise FileExistsError(
            f"output_dir {out} holds files but is not a peft-isolate run directory (it has no {STATE}): choose a "
            "new or empty folder, so that nothing in it is overwritten"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / STATE).is_file():
            save_json({}, out / STATE)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PermissionError(
            f"cannot write output_dir {out} ({os.strerror(e.errno or errno.EACCES)}): choose a folder you can write"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FileExistsError(
                f"output_dir {out} is in use by another run (process {holder}, which holds {out / LOCK}): wait for it "
                "to finish, or give this run another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temporaries(out)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, so no second run can lock a file about to be unlinked


def _files(artifact: Path) -> set[str]:
    """The files of an artifact (a file, or every file below a folder), relative to the artifact."""
    if artifact.is_dir():
        return {str(f.relative_to(artifact)) for f in artifact.rglob("*") if f.is_file() or f.is_symlink()}
    return {"."} if artifact.exists() or artifact.is_symlink() else set()


def check_own(out: Path, step: str, artifact: Path) -> None:
    """Before `step` rewrites `artifact`, refuse if it holds files this run did not write: the whole artifact when
    no step ever recorded writing it, else the files beyond those its last write listed."""
    present = _files(artifact)
    if not present:
        return
    record = _artifacts(out).get(step)
    if record is None:
        if step in (load_json(out / STATE) if (out / STATE).is_file() else {}):
            return  # completed by a peft-isolate that kept no file lists: everything in it is its own
        foreign = sorted(present)
    elif record.get("files") is None:
        return  # written by this step when a kill stopped it: all of it is the step's own
    else:
        foreign = sorted(present - set(record["files"]))
    if foreign:
        where = artifact if foreign == ["."] else artifact / foreign[0]
        raise FileExistsError(
            f"{where} was not written by peft-isolate, and step {step} is about to replace {artifact}: move it out "
            f"of the run directory, then rerun"
        )


def record_writing(out: Path, step: str, artifact: Path, done: bool) -> None:
    """Record that `step` is writing `artifact` (`done=False`) or wrote the files now in it (`done=True`)."""
    artifacts = _artifacts(out)
    files = sorted(_files(artifact)) if done else None
    artifacts[step] = {"path": str(artifact.relative_to(out)), "files": files}
    save_json(artifacts, out / ARTIFACTS)


def _artifacts(out: Path) -> dict:
    return load_json(out / ARTIFACTS) if (out / ARTIFACTS).is_file() else {}
