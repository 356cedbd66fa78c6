"""Files put into a folder durably: the primitives, and the file handler's writer process.

The primitives (a dot-prefixed temp file in the same folder, fsync, rename, fsync of the
folder) serve the file handler and the documents' downloads. The file handler writes
through a child process, ``python -m tcbridge.files FOLDER`` (its daemon side is
:class:`tcbridge.filewriter.FolderWriter`), that writes a batch of files (temp file, fsync,
rename, on a few threads) and then fsyncs the folder once for the whole batch. This module
imports nothing but the standard library and orjson, so the child starts in a moment.

Why a process, not threads: each system call of a thread gives up the GIL and must take it
back, and while the event loop is busy ingesting webhooks every such take waits up to the
interpreter's switch interval (5 ms). A file is five calls, so at 1,000 events/s the drop
folder's threads waited far longer for the GIL than for the disk (issue 13, row 3 of
bench/README.md). The child has an interpreter of its own, and the second core.

The child speaks a small framed protocol on its stdin and stdout: a request is a 4-byte
big-endian length, a JSON header ``[[name, size], ...]`` of that length, then the bodies
one after the other; the answer is a 4-byte length and a JSON list with, per file, ``null``
(in place and durable) or the reason it is not. The child's first frame, once it has
started, is an answer for no files; the end of its input ends it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import orjson

from tcbridge.errors import describe

# write_atomically's temp file is ".<name>.<12 hex>.tmp" and must fit NAME_MAX (255 bytes on
# every common Linux file system) as well.
TEMP_RANDOM_HEX = 12
TEMP_FILE = re.compile(rf"^\..+\.[0-9a-f]{{{TEMP_RANDOM_HEX}}}\.tmp$")
BATCH_MAX = 256  # files per batch: a bound on one request's size, not a tuning knob
# Bytes of bodies per batch: a batch takes files until it holds this much (always at least
# one file, whatever its size), so a run of large bodies is never one request of gigabytes
# in both processes' memory.
BATCH_MAX_BYTES = 16 * 1024 * 1024
# The child's threads: concurrent fsyncs share the file system's journal commits (on this
# machine 1 thread wrote 3,530 files/s, 4 threads 7,036, 16 threads 9,910).
WRITER_THREADS = 8
LENGTH_BYTES = 4


def write_atomically(directory: Path, name: str, body: bytes, sync_directory: bool = True) -> None:
    """Temp file (dot-prefixed) in the same directory, fsync, rename, fsync the directory
    (``sync_directory=False``: the caller fsyncs it, once for many renames)."""
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".{name}.{secrets.token_hex(TEMP_RANDOM_HEX // 2)}.tmp"
    # os.open honours the umask (unlike mkstemp's 0600), so importers can read the file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, directory / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if sync_directory:
        fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """fsync a directory, so a rename in it is durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path) -> int:
    """Delete the temp files of write_atomically that a crash left behind (only names of
    that pattern: the folder is the importer's too); returns how many. Called when the
    handler is built, before any delivery runs, so none of them is being written."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:  # missing or unreadable: each delivery will say so
        return 0
    for entry in entries:
        if TEMP_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


def write_one(directory: Path, name: str, body: bytes) -> str | None:
    """Write one file without the directory's fsync; None, or why it is not in place."""
    try:
        write_atomically(directory, name, body, sync_directory=False)
    except (OSError, ValueError) as e:
        return f"cannot write {name!r}: {describe(e)}"
    return None


def write_batch(directory: Path, files: Sequence[tuple[str, bytes]],
                pool: Executor | None = None) -> list[str | None]:
    """Write every file (on ``pool``'s threads, whose fsyncs the file system commits
    together), then fsync the directory once; per file None (in place and durable) or why
    not. A failed fsync of the directory fails every file of the batch that was renamed:
    none is done without a durable rename."""
    if pool is None or len(files) == 1:
        errors = [write_one(directory, name, body) for name, body in files]
    else:
        errors = list(pool.map(lambda file: write_one(directory, *file), files))
    renamed = [i for i, error in enumerate(errors) if error is None]
    if renamed:
        try:
            fsync_directory(directory)
        except OSError as e:
            for i in renamed:
                errors[i] = f"cannot fsync the folder {str(directory)!r}: {describe(e)}"
    return errors


# --- the protocol -----------------------------------------------------------------------------


def encode_request(files: Sequence[tuple[str, bytes]]) -> bytes:
    """One batch as a request frame."""
    header = orjson.dumps([[name, len(body)] for name, body in files])
    return b"".join([len(header).to_bytes(LENGTH_BYTES, "big"), header,
                     *(body for _, body in files)])


def encode_answer(errors: Sequence[str | None]) -> bytes:
    """A batch's outcomes as an answer frame."""
    payload = orjson.dumps(list(errors))
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


def decode_answer(payload: bytes, files: int) -> list[str | None]:
    """The outcomes of an answer frame's payload; ValueError when it is not one for
    ``files`` files."""
    answer = orjson.loads(payload)
    if (not isinstance(answer, list) or len(answer) != files
            or not all(a is None or isinstance(a, str) for a in answer)):
        raise ValueError(f"not an answer for {files} files: {payload[:200]!r}")
    return answer


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) == size:
        return data
    if not data:
        return None
    raise EOFError(f"input ended {size - len(data)} bytes short")


def serve(directory: Path, requests: BinaryIO, answers: BinaryIO,
          pool: Executor | None = None) -> None:
    """The child's loop: a batch in, its outcomes out, until the input ends."""
    while (length := _read_exactly(requests, LENGTH_BYTES)) is not None:
        header = _read_exactly(requests, int.from_bytes(length, "big"))
        if header is None:
            raise EOFError("input ended inside a request")
        files = []
        for name, size in orjson.loads(header):
            body = _read_exactly(requests, size)  # b"" for an empty file
            if body is None:
                raise EOFError("input ended inside a request")
            files.append((name, body))
        answers.write(encode_answer(write_batch(directory, files, pool)))
        answers.flush()


def main(argv: Sequence[str]) -> int:
    """``python -m tcbridge.files FOLDER``: the writer process of a file handler."""
    # Ctrl-C on a terminal reaches the whole process group: the daemon decides when its
    # writer ends (by closing its input), so a batch is never cut by the daemon's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) != 1:
        print("usage: python -m tcbridge.files FOLDER", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(encode_answer([]))  # ready: an answer for no files
    sys.stdout.buffer.flush()
    with ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="write") as pool:
        serve(Path(argv[0]), sys.stdin.buffer, sys.stdout.buffer, pool)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
