"""Atomic output files and folders: write to a temporary name beside the target, fsync, rename.

Every writer of the package goes through `atomic_path` (or the small helpers below), so a crash, a Ctrl-C or a full
disk never leaves a truncated file or a half-written folder under the final name, and nothing temporary is left
behind on failure. A failure to write becomes one `StorageError` line naming the path; a full disk (ENOSPC / EDQUOT,
or a library that hides the errno, such as libsndfile's "System error" or safetensors' `SafetensorError`) reads
"no space left on DEVICE (PATH)".

    with atomic_path(out) as tmp:          # a file: write tmp with any library (savefig, soundfile, torch.save)
        fig.savefig(tmp)
    with atomic_path(out_dir, directory=True) as tmp:   # a folder: tmp is an empty folder to fill
        save_model(model, tmp)
    write_text(path, text); write_bytes(path, data)

Reading: `read_lines` / `read_jsonl` decode each line on its own, so one line that is not UTF-8 (a latin-1 byte)
or not JSON is reported with its line number (`LineProblem`) and the caller decides to stop or skip just that line.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from funaudiochat.errors import InputError, StorageError

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# libraries that wrap the OS error in their own exception still say so in their message
_FULL_WORDS = ("no space left", "storagefull", "code: 28", "disk quota exceeded", "filesystemquotaexceeded")
_LOW_SPACE = 64 * 1024  # free bytes under which an unexplained write failure is taken for a full disk


def user_cache_dir() -> Path:
    """The package's cache folder (compiled graphs, built kernels): $XDG_CACHE_HOME/funaudiochat, else
    ~/.cache/funaudiochat. Not created here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "funaudiochat"


def temp_name(target: Path) -> Path:
    """`.STEM.tmp-PID.SUFFIX` beside the target: hidden, on the same file system (so the rename is atomic), and
    with the target's suffix (soundfile and matplotlib pick the format from it)."""
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")


@contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it to `target` (replacing it);
    on any failure remove it and re-raise (write failures as one `StorageError`)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, no permission, a full disk: one line
        if is_disk_full(err, target.parent):
            raise StorageError(no_space_message(target)) from err
        raise StorageError(f"cannot write {target}: cannot make the folder {target.parent} "
                           f"({err.strerror or err})") from err
    if directory and target.exists() and not target.is_dir():  # never replace a user's file with a folder
        raise StorageError(f"cannot write {target}: it exists and is not a folder")
    tmp = temp_name(target)
    _remove(tmp)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if not tmp.exists():
            raise StorageError(f"cannot write {target}: nothing was written")
        _fsync_tree(tmp)
        _replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as err:
        full = is_disk_full(err, target.parent)
        _remove(tmp)
        if isinstance(err, StorageError):
            if directory and str(tmp) in str(err):  # a nested atomic write failed: name the final path, not tmp
                raise StorageError(str(err).replace(str(tmp), str(target))) from err
            raise
        if full:
            raise StorageError(no_space_message(target)) from err
        if isinstance(err, OSError) and getattr(err, "filename", None) in (str(tmp), str(target), None):
            raise StorageError(f"cannot write {target}: {err.strerror or err}") from err
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """For writers that cannot use a temporary name (an append-only journal): a failure to write `path`
    becomes one `StorageError` line."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err, Path(path).parent):
            raise StorageError(no_space_message(Path(path))) from err
        raise StorageError(f"cannot write {path}: {err.strerror or err}") from err


def is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, (KeyboardInterrupt, SystemExit, StorageError)):
        return False
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(w in str(e).lower() for w in _FULL_WORDS):
            return True
    if isinstance(err, OSError) and err.errno is not None:
        return False  # a real errno that says something else (permission, not found, ...)
    return free_bytes(folder) < _LOW_SPACE


def free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(_existing(folder))
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def no_space_message(path: Path) -> str:
    return f"no space left on {device_of(path)} ({path})"


def device_of(path: Path) -> str:
    """'DEVICE mounted at MOUNTPOINT' for the file system that holds `path` (from /proc/self/mounts)."""
    where = os.path.realpath(_existing(Path(path)))
    best = ("", "")
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 2:
                    continue
                dev, mount = parts[0], parts[1].replace("\\040", " ")
                inside = where == mount or where.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (dev, mount)
    except OSError:
        pass
    return f"{best[0]} mounted at {best[1]}" if best[1] else "the device"


# ------------------------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class LineProblem:
    """A line that cannot be used: kind "not utf-8", "invalid json" or "bad format", and what is wrong."""
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | LineProblem]]:
    """(line number, text without its line end) per non-blank line; a line that is not UTF-8 gives a LineProblem
    (the other lines still come). Lines end at \\n only (a JSON string may hold U+2028)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    with f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, LineProblem("not utf-8", f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                                        f"{err.start + 1}); save the file as UTF-8")
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_no, text


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | LineProblem]]:
    """(line number, JSON object) per non-blank line; a line that is not UTF-8, not JSON or not an object gives a
    LineProblem."""
    for line_no, text in read_lines(path):
        if isinstance(text, LineProblem):
            yield line_no, text
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield line_no, LineProblem("invalid json", f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            yield line_no, LineProblem("bad format", f"expected a JSON object, got {type(record).__name__}")
            continue
        yield line_no, record


# ------------------------------------------------------------------------------------------------------ helpers

def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _replace(tmp: Path, target: Path) -> None:
    """Rename tmp to target. A folder cannot be renamed over a non-empty one: move the old one aside first."""
    if tmp.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)
