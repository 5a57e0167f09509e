"""Atomic writes and checked safetensors reads: every file peft-isolate writes goes through here."""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def honour_umask(path: Path) -> None:
    """Give `path` the mode a plain open or mkdir would: mkstemp's 0600 and mkdtemp's 0700 would make every
    artifact private to its writer."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


_STALE = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.tmp|old)")  # what a killed atomic write leaves: see below


def _claim(path: Path) -> int:
    """An open descriptor holding an exclusive flock on `path` (a file or folder) for as long as a write fills or
    replaces it: a leftover no live writer claims is what a killed write left."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _abandoned(leftover: Path) -> bool:
    """Whether no live writer claims `leftover` (another process's write in progress keeps its temporary)."""
    try:
        fd = os.open(leftover, os.O_RDONLY)
    except OSError:
        return False  # gone already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _clear(leftover: Path) -> bool:
    """Remove a killed write's leftover, or put a `.<name>.old` folder back where `<name>` is missing (the kill fell
    between the two renames of a replace: the old folder is the last whole copy). False if a live write holds it."""
    if not _abandoned(leftover):
        return False
    published = leftover.with_name(_STALE.fullmatch(leftover.name)["name"])
    if leftover.name.endswith(".old") and not published.exists():
        leftover.rename(published)
    elif leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
    else:
        leftover.unlink(missing_ok=True)
    return True


def _remove_stale(path: Path) -> None:
    """Clear what an earlier write of `path` that was killed (SIGKILL, power loss) left beside it: its
    `.<name>.<random>.tmp` temporary and, for a folder, `.<name>.old`."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if (m := _STALE.fullmatch(leftover.name)) and m["name"] == path.name:
            _clear(leftover)


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Clear, anywhere below `root`, the temporaries killed atomic writes left (names only this module makes:
    `.<name>.<8 random characters>.tmp` and `.<name>.old`). Returns what was cleared."""
    found = [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files if _STALE.fullmatch(n)]
    return [leftover for leftover in found if _clear(leftover)]


def _durable(path: Path) -> None:
    """fsync a file, or a folder with everything below it, before a rename publishes it."""
    for f in [path, *path.rglob("*")] if path.is_dir() else [path]:
        _fsync(f)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)  # claimed until published: another process's write of `path` leaves it be
    try:
        try:
            yield Path(tmp)
            _durable(Path(tmp))
            honour_umask(Path(tmp))
        except (OSError, SafetensorError) as e:
            if (err := write_error(path, e)) is e:
                raise
            raise err from e
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a crash
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds, else it is removed
    and an I/O failure is re-raised naming `path`. `replace=False`: `path` must not exist or be an empty folder
    (a FileExistsError otherwise, also when another process made it first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    honour_umask(tmp)
    claims = [_claim(tmp)]
    try:
        try:
            yield tmp
            _durable(tmp)
        except BaseException as e:
            if (err := write_error(path, e)) is e:
                raise
            raise err from e
        if not replace:
            try:
                os.rename(tmp, path)  # onto an empty folder or nothing; refuses a non-empty one
            except OSError as e:
                raise FileExistsError(f"{path} exists and is not empty: remove it or choose another one") from e
        else:
            old = path.with_name(f".{path.name}.old")  # the previous folder stays whole until the new one is in place
            if path.exists():
                claims.append(_claim(path))  # as `.old`, claimed until removed
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for fd in claims:
            os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_new_output(path: str | os.PathLike, directory: bool) -> Path:
    """`path` as a Path if something new may be written there: not a symlink, and for a `directory` absent or an
    empty folder; else a one-line error saying why (nothing the tool did not write is ever overwritten)."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link: give the real path of a new output")
    if directory and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty: remove it or choose another output directory")
    if not directory and path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name for the output")
    return path


def write_error(path: str | os.PathLike, e: BaseException) -> BaseException:
    """`e`, raised while writing `path`, as an OSError that names the file (I/O failures only: a full disk,
    a file-size limit, a read-only folder); any other error is returned unchanged."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(m.group(1))
    if code is None:
        return e
    return OSError(code, f"could not write {path}: {os.strerror(code)}", str(path))


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    return write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def existing_file(path: str | os.PathLike) -> Path:
    """`path` as a Path, or a clear error when it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def load_json(path: str | os.PathLike) -> Any:
    path = existing_file(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") from e


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save `tensors` as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def open_tensors(path: str | os.PathLike):
    """Open a safetensors file lazily, turning a truncated or corrupt file into a clear error."""
    path = existing_file(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted: "
            "recreate it with the step that wrote it"
        ) from e


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file and its header metadata, with clear errors."""
    with open_tensors(path) as f:
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is truncated or corrupted ({e}): recreate it") from e
        return tensors, dict(f.metadata() or {})


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorReader:
    """Read whole tensors or flat element ranges of a safetensors file with pread.

    safe_open maps the file, so every page read stays in the process RSS while the map lives;
    streaming a checkpoint through it grows RSS to the checkpoint size. pread copies only the
    bytes asked for into fresh buffers, so memory stays bounded by what the caller holds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._header, self._data_start = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> tuple[dict[str, Any], int]:
        size = os.fstat(self._fd).st_size
        bad = f"{self.path} is not a readable safetensors file"
        fix = "it may be truncated or corrupted: recreate it with the step that wrote it"
        raw = os.pread(self._fd, 8, 0)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{bad} (header length {n}, file size {size}); {fix}")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{bad} ({e}); {fix}") from e
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{bad} (data ends at {8 + n + end} bytes, file has {size}); {fix}")
        return header, 8 + n

    def names(self) -> list[str]:
        return [k for k in self._header if k != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)["dtype"]
        if code not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which peft-isolate cannot read")
        return _ST_DTYPES[code]

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._header or name == "__metadata__":
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._header[name]

    def data_offset(self, name: str) -> int:
        """Where tensor `name`'s bytes start in the file."""
        return self._data_start + self._entry(name)["data_offsets"][0]

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Flat elements [start, start + count) of tensor `name` (all of it by default), in its dtype."""
        dtype = self.dtype(name)
        numel = math.prod(self.shape(name))
        count = numel - start if count is None else count
        if start < 0 or count < 0 or start + count > numel:
            raise IndexError(f"{name}: range [{start}, {start + count}) outside its {numel} elements")
        out = torch.empty(count, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        offset = self.data_offset(name) + start * out.element_size()
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise ValueError(f"{self.path} ended while reading {name!r}: it is truncated; recreate it")
            done += n
        return out

    def will_need(self, name: str) -> None:
        """Ask the kernel to start reading tensor `name` in the background (a hint; returns at once)."""
        begin, end = self._entry(name)["data_offsets"]
        os.posix_fadvise(self._fd, self._data_start + begin, end - begin, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def save_pretrained_atomic(
    model, path: Path, tokenizer=None, state_dict=None, finish: Callable[[Path], object] | None = None
) -> Path:
    """`save_pretrained` into a temporary folder (then `finish(folder)`, e.g. to add to its card), then swap it
    in: a crash never leaves half an artifact."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if finish is not None:
            finish(tmp)
    return path


def artifact_damage(artifact: Path) -> str | None:
    """Why a step's artifact (a file or a folder) cannot be trusted, or None: missing, or one of its
    safetensors files has a bad header or is shorter than its header says, or a JSON file does not parse."""
    if not artifact.exists():
        return f"{artifact} is missing"
    files = sorted(p for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else [artifact]
    for f in files:
        try:
            if f.suffix == ".safetensors":
                TensorReader(f).close()
            elif f.suffix == ".json":
                load_json(f)
        except (OSError, ValueError) as e:
            return str(e)
    return None
