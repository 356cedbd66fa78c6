"""Files put into a folder durably (tcbridge.files): the primitives, the batch, the child's
protocol, and the writer process with its faults (a file that cannot be written, a failed
fsync of the folder, a child that exits, hangs, answers nonsense or cannot start)."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import textwrap
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tcbridge import files
from tcbridge.files import (
    decode_answer,
    encode_answer,
    encode_request,
    serve,
    write_atomically,
    write_batch,
)
from tcbridge.filewriter import FolderWriter, WriteFailed
from tests.support import writer_argv


def before_each_batch(code: str) -> str:
    """A prelude for the child that runs ``code`` (with ``batch``, its (name, body) pairs,
    in scope; os and time imported) before each batch is written."""
    return ("import os, time, tcbridge.files as f\nreal = f.write_batch\n"
            "def write_batch(directory, batch, pool=None):\n"
            f"{textwrap.indent(code, '    ')}\n"
            "    return real(directory, batch, pool)\n"
            "f.write_batch = write_batch\n")


def record_batches(path: Path) -> str:
    """A prelude by which the child records each batch's size in ``path``, a line each, so
    a test can see how files were grouped."""
    return before_each_batch(f"with open({str(path)!r}, 'a') as log:\n"
                             "    log.write(f'{len(batch)}\\n')")


# A batch with a file named "hang*" never ends (a hung disk); others are written.
HANG = before_each_batch('if any(name.startswith("hang") for name, _ in batch):\n'
                         '    time.sleep(3600)')
# A batch with a file named "die*" ends the process before it answers.
DIE = before_each_batch('if any(name.startswith("die") for name, _ in batch):\n'
                        '    os._exit(3)')
# Every answer to a batch is garbage (the child still says it is ready).
NONSENSE = """
import tcbridge.files as f
real = f.encode_answer
f.encode_answer = lambda errors: real(errors) if not errors else b"\\x00\\x00\\x00\\x05hello"
"""
# The folder's fsync fails (EIO), the files' own fsyncs do not.
FAILING_DIRECTORY_FSYNC = """
import tcbridge.files as f
def fsync_directory(directory):
    raise OSError(5, "Input/output error")
f.fsync_directory = fsync_directory
"""


@pytest.fixture
async def writer_factory() -> AsyncIterator[Callable[..., FolderWriter]]:
    """FolderWriters closed at the end of the test (their children ended)."""
    made: list[FolderWriter] = []

    def make(directory: Path, prelude: str | None = None, hung_after_s: float = 10.0,
             argv: list[str] | None = None) -> FolderWriter:
        if argv is None and prelude is not None:
            argv = writer_argv(prelude)
        writer = FolderWriter(directory, name="drop", hung_after_s=hung_after_s, argv=argv)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        await writer.close(1.0)


# --- primitives and the batch -----------------------------------------------------------------


@pytest.fixture
def disk_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The fsyncs (of a file or a directory) and renames of tcbridge.files, in order."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Path, dst: Path) -> None:
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return calls


def test_the_file_is_fsynced_then_renamed_then_the_directory_fsynced(
    tmp_path: Path, disk_calls: list[str]
) -> None:
    write_atomically(tmp_path, "e1.json", b"{}")
    assert disk_calls == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "e1.json").read_bytes() == b"{}"


@pytest.mark.parametrize("threads", [0, 4])
def test_a_batch_renames_every_file_before_its_one_directory_fsync(
    tmp_path: Path, disk_calls: list[str], threads: int
) -> None:
    calls = disk_calls
    batch = [(f"e{i}.json", f"body {i}".encode()) for i in range(6)]
    with ThreadPoolExecutor(threads or 1) as pool:
        errors = write_batch(tmp_path / "new" / "deeper", batch, pool if threads else None)
    assert errors == [None] * 6
    assert calls.count("fsync file") == 6 and calls.count("rename") == 6
    assert calls[-1] == "fsync dir" and calls.count("fsync dir") == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "new" / "deeper").iterdir()} == dict(batch)


def test_the_temp_file_has_the_name_the_stale_cleanup_knows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temps: list[str] = []
    real_replace = os.replace

    def replace(src: Path, dst: Path) -> None:
        temps.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    write_atomically(tmp_path, "e1.json", b"{}")
    (temp,) = temps
    assert files.TEMP_FILE.match(temp) and temp.startswith(".e1.json.")
    assert len(temp) == len(".e1.json.") + files.TEMP_RANDOM_HEX + len(".tmp")


def test_a_file_follows_the_umask_so_importers_can_read_it(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_batch(tmp_path, [("e1.json", b"{}")])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e1.json").stat().st_mode) == 0o644


def test_only_our_stale_temp_files_are_removed_and_counted(tmp_path: Path) -> None:
    ours = [".o1.json.0123456789ab.tmp", ".o2.json.abcdef012345.tmp", ".o3.json.0000000000ff.tmp"]
    for name in ours:
        (tmp_path / name).write_text("{}")
    (tmp_path / ".d.json.0123456789ab.tmp").mkdir()  # not a file: kept
    (tmp_path / "target").write_text("the importer's")
    (tmp_path / ".l.json.0123456789ab.tmp").symlink_to(tmp_path / "target")  # kept
    assert files.remove_stale_temp_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".d.json.0123456789ab.tmp", ".l.json.0123456789ab.tmp", "target"]
    assert files.remove_stale_temp_files(tmp_path / "missing") == 0


def test_a_file_that_cannot_be_written_fails_alone_and_leaves_no_temp_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "e2.json").mkdir()  # the target is a non-empty directory: rename fails
    (tmp_path / "e2.json" / "keep").write_text("x")
    errors = write_batch(tmp_path, [("e1.json", b"1"), ("e2.json", b"2"), ("e3.json", b"3")])
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and errors[1].startswith("cannot write 'e2.json': ")
    assert "IsADirectoryError" in errors[1] or "OSError: [Errno 39]" in errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1.json", "e2.json", "e3.json"]


def test_a_failed_directory_fsync_fails_every_renamed_file_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync_directory(directory: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "fsync_directory", fsync_directory)
    (tmp_path / "bad.json").mkdir()
    (tmp_path / "bad.json" / "keep").write_text("x")
    errors = write_batch(tmp_path, [("a.json", b"1"), ("bad.json", b"2"), ("b.json", b"3")])
    assert errors[1] is not None and errors[1].startswith("cannot write 'bad.json'")
    for error in (errors[0], errors[2]):
        assert error == (f"cannot fsync the folder {str(tmp_path)!r}: "
                         "OSError: [Errno 5] Input/output error")


def test_nothing_written_means_no_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(files, "fsync_directory", synced.append)
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    errors = write_batch(plain, [("a.json", b"1")])
    assert errors[0] is not None and "cannot write 'a.json'" in errors[0]
    assert synced == []


# --- the protocol -----------------------------------------------------------------------------


def test_the_child_answers_each_batch_in_turn(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.mkdir()
    (bad / "keep").write_text("x")
    requests = io.BytesIO(encode_request([("a.json", b"\x00\xffbinary"), ("empty.json", b"")])
                          + encode_request([("bad.json", b"x")]))
    answers = io.BytesIO()
    serve(tmp_path, requests, answers)
    stream = io.BytesIO(answers.getvalue())
    first = decode_answer(stream.read(int.from_bytes(stream.read(4), "big")), 2)
    second = decode_answer(stream.read(int.from_bytes(stream.read(4), "big")), 1)
    assert first == [None, None] and stream.read() == b""
    assert second[0] is not None and second[0].startswith("cannot write 'bad.json'")
    assert (tmp_path / "a.json").read_bytes() == b"\x00\xffbinary"
    assert (tmp_path / "empty.json").read_bytes() == b""


@pytest.mark.parametrize(("cut", "message"), [
    (2, "input ended 2 bytes short"),  # inside the length
    (4, "input ended inside a request"),  # after the length, before the header
    (6, r"input ended \d+ bytes short"),  # inside the header
    (-4, "input ended inside a request"),  # after the header, before the body
    (-1, "input ended 1 bytes short"),  # inside the body
])
def test_input_that_ends_inside_a_request_is_an_error(
    tmp_path: Path, cut: int, message: str
) -> None:
    request = encode_request([("a.json", b"body")])
    with pytest.raises(EOFError, match=f"^{message}$"):
        serve(tmp_path, io.BytesIO(request[:cut]), io.BytesIO())
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("payload", [b"[null]", b'{"a": 1}', b"[null, 3]", b"[null, null, null]"])
def test_an_answer_for_another_batch_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="not an answer for 2 files"):
        decode_answer(payload, 2)


def test_answers_round_trip() -> None:
    frame = encode_answer([None, "cannot write 'x': boom"])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_answer(frame[4:], 2) == [None, "cannot write 'x': boom"]


# --- the writer process -----------------------------------------------------------------------


async def test_files_handed_in_together_share_a_batch(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    batches = tmp_path / "batches"
    writer = writer_factory(tmp_path / "drop", record_batches(batches))
    await writer.write("first.json", b"1")  # the child starts: one batch of one
    await asyncio.gather(*(writer.write(f"e{i}.json", b"x" * i) for i in range(20)))
    assert batches.read_text().split() == ["1", "20"]
    assert len(list((tmp_path / "drop").iterdir())) == 21
    assert (tmp_path / "drop" / "e7.json").read_bytes() == b"x" * 7


@pytest.mark.parametrize(("bound", "sizes", "batches"), [
    # 4 + 4 fit in 10 bytes, a third 4 does not; 30 bytes go alone though over the bound,
    # and the 2 bytes after them in a batch of their own.
    (10, [4, 4, 4, 30, 2], ["2", "1", "1", "1"]),
    (8, [4, 4], ["2"]),  # 4 + 4 bytes: at the bound, not over it
])
async def test_a_batch_is_bounded_by_the_bytes_of_its_bodies(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter], monkeypatch: pytest.MonkeyPatch,
    bound: int, sizes: list[int], batches: list[str],
) -> None:
    monkeypatch.setattr("tcbridge.filewriter.BATCH_MAX_BYTES", bound)
    recorded = tmp_path / "batches"
    writer = writer_factory(tmp_path / "drop", record_batches(recorded))
    await writer.write("first.json", b"1")  # the child starts: one batch of one
    await asyncio.gather(*(writer.write(f"e{i}.json", b"x" * n) for i, n in enumerate(sizes)))
    assert recorded.read_text().split() == ["1", *batches]
    assert sorted(p.stat().st_size for p in (tmp_path / "drop").iterdir()) == sorted(
        [1, *sizes])


async def test_one_bad_file_fails_only_its_own_write(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    (tmp_path / "bad.json").mkdir()
    (tmp_path / "bad.json" / "keep").write_text("x")
    writer = writer_factory(tmp_path)
    results = await asyncio.gather(writer.write("a.json", b"1"), writer.write("bad.json", b"2"),
                                   return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], WriteFailed) and "cannot write 'bad.json'" in str(results[1])


async def test_a_failed_directory_fsync_in_the_child_fails_the_writes(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, FAILING_DIRECTORY_FSYNC)
    with pytest.raises(WriteFailed, match=r"cannot fsync the folder .*Input/output error"):
        await writer.write("a.json", b"1")


async def test_a_child_that_exits_fails_its_batch_and_the_next_one_gets_a_new_child(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, DIE)
    await writer.write("a.json", b"1")
    first = writer.pid
    with pytest.raises(WriteFailed, match=rf"the file writer \(pid {first}\) ended "
                                          r"\(exit code 3\)"):
        await writer.write("die.json", b"2")
    assert writer.pid is None
    await writer.write("b.json", b"3")
    assert writer.pid not in (None, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


async def test_a_hung_child_is_killed_after_the_deadline_and_replaced(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, HANG, hung_after_s=1.0)
    await writer.write("a.json", b"1")
    hung = writer.pid
    with capture_logs() as logs:
        with pytest.raises(WriteFailed, match=rf"\(pid {hung}\) did not answer within 1 s"):
            await writer.write("hang.json", b"2")
    assert [e["why"] for e in logs if e["event"] == "files.writer_killed"] == ["did not answer"]
    await writer.write("b.json", b"3")  # a new child, once the killed one has exited
    assert writer.pid not in (None, hung)
    assert not (tmp_path / "hang.json").exists()


async def test_no_new_child_while_a_killed_one_has_not_exited(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process in uninterruptible sleep (a dead NFS server) dies only once its I/O
    returns: the writer must not start one process per hung batch."""
    writer = writer_factory(tmp_path, HANG, hung_after_s=1.0)
    await writer.write("a.json", b"1")
    stuck = writer._child
    assert stuck is not None
    monkeypatch.setattr(asyncio.subprocess.Process, "kill", lambda self: None)  # unkillable
    with pytest.raises(WriteFailed, match="did not answer"):
        await writer.write("hang.json", b"2")
    with pytest.raises(WriteFailed, match=rf"killed earlier \(pid {stuck.pid}\) has not exited"):
        await writer.write("b.json", b"3")
    monkeypatch.undo()
    stuck.kill()
    await stuck.wait()
    await writer.write("b.json", b"3")
    assert (tmp_path / "b.json").exists()


async def test_a_child_that_answers_nonsense_is_killed(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, NONSENSE)
    with pytest.raises(WriteFailed, match="gave a wrong answer"):
        await writer.write("a.json", b"1")
    assert writer.pid is None


async def test_a_writer_that_cannot_start_says_so(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, argv=[str(tmp_path / "no-such-python")])
    with pytest.raises(WriteFailed, match=r"cannot start the file writer .*FileNotFoundError"):
        await writer.write("a.json", b"1")


async def hang_a_batch(writer: FolderWriter) -> asyncio.Task[None]:
    """A first file written (the child is up), then a batch that hangs in the child."""
    await writer.write("a.json", b"1")
    hung = asyncio.create_task(writer.write("hang.json", b"2"))
    await asyncio.sleep(0.1)
    return hung


async def test_a_write_given_up_before_its_batch_is_sent_is_never_written(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, HANG, hung_after_s=1.0)
    hung = await hang_a_batch(writer)  # the next batch waits behind it
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await writer.write("late.json", b"3")
    with pytest.raises(WriteFailed):
        await hung
    await writer.write("b.json", b"4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


async def test_close_ends_the_child_and_refuses_later_writes(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path)
    await writer.write("a.json", b"1")
    child = writer._child
    assert child is not None
    await writer.close(1.0)
    assert child.returncode == 0  # ended by its closed input, not killed
    with pytest.raises(WriteFailed, match="closed"):
        await writer.write("b.json", b"2")


async def test_close_gives_a_child_slow_to_end_its_timeout_before_killing_it(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    # After its input ends the child takes 0.5 s to exit (a slow disk flushing, say).
    slow_exit = ("import time, tcbridge.files as f\nreal = f.serve\n"
                 "f.serve = lambda *a, **k: (real(*a, **k), time.sleep(0.5))[0]\n")
    writer = writer_factory(tmp_path, slow_exit)
    await writer.write("a.json", b"1")
    child = writer._child
    assert child is not None
    await writer.close(5.0)
    assert child.returncode == 0  # it ended on its own, within the 5 s


class _Unkillable:
    """What a killed child in uninterruptible sleep looks like: it never exits."""

    pid = 4242424
    returncode = None

    async def wait(self) -> int:
        await asyncio.Event().wait()
        return 0


async def test_close_waits_a_bounded_time_for_a_killed_child_that_does_not_exit(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path)
    writer._killed = _Unkillable()  # type: ignore[assignment]
    await asyncio.wait_for(writer.close(0.3), 5)  # neither raises nor hangs
    assert writer._killed is not None  # still there: it is not forgotten


async def test_close_with_a_hung_batch_is_bounded_and_kills_the_child(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, HANG, hung_after_s=30)
    hung = await hang_a_batch(writer)
    child = writer._child
    assert child is not None
    with capture_logs() as logs:
        await asyncio.wait_for(writer.close(0.3), 10)
    assert [e["event"] for e in logs] == ["files.writer_abandoned", "files.writer_killed"]
    with pytest.raises(WriteFailed, match="stopped"):
        await hung
    assert child.returncode == -9  # reaped by close itself: no process or pipe left behind


async def test_close_says_so_when_the_child_it_killed_does_not_go(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = writer_factory(tmp_path, HANG, hung_after_s=30)
    hung = await hang_a_batch(writer)
    child = writer._child
    assert child is not None
    monkeypatch.setattr(asyncio.subprocess.Process, "kill", lambda self: None)  # unkillable
    with capture_logs() as logs:
        await asyncio.wait_for(writer.close(0.3), 10)  # bounded all the same
    assert [e["event"] for e in logs] == [
        "files.writer_abandoned", "files.writer_killed", "files.writer_unreaped"]
    assert logs[-1]["pid"] == child.pid
    with pytest.raises(WriteFailed, match="stopped"):
        await hung
    monkeypatch.undo()
    child.kill()
    assert await asyncio.wait_for(child.wait(), 10) == -9


async def test_close_fails_the_files_still_waiting_behind_a_hung_batch(
    tmp_path: Path, writer_factory: Callable[..., FolderWriter]
) -> None:
    writer = writer_factory(tmp_path, HANG, hung_after_s=30)
    hung = await hang_a_batch(writer)
    waiting = asyncio.create_task(writer.write("b.json", b"3"))  # the next batch's
    await asyncio.sleep(0.05)
    with capture_logs():
        await asyncio.wait_for(writer.close(0.3), 10)
    for write in (hung, waiting):
        with pytest.raises(WriteFailed, match=r"^the writer of 'drop' stopped: "):
            await write
    assert not (tmp_path / "b.json").exists()
