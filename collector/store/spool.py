"""A bounded local disk queue for batches Elasticsearch could not take: acknowledged, then replayed.

Each batch is one file, written to a temporary name, fsynced and renamed, so a reader never sees half of one
and a batch acknowledged to a client survives ``kill -9``. Any number of collectors may share a directory: a
replayer takes a file by renaming it to its own claim (a rename succeeds for one process only), and a claim
left by a process that died is given back when the next spool opens. Replaying a batch twice stores nothing
twice, because each document's id comes from its trace and span id.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from payscope.errors import StoreError

DEFAULT_BOUND = 1 << 30  # 1 GiB


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    def __init__(self, directory: Path, bound_bytes: int = DEFAULT_BOUND) -> None:
        self.directory = directory
        self.bound_bytes = bound_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot use the spool directory {directory}: {exc.strerror}") from None
        for claimed in directory.glob("*.batch.claimed.*"):
            pid = claimed.name.rsplit(".", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                os.replace(claimed, claimed.with_name(claimed.name.split(".claimed.")[0]))

    def size(self) -> int:
        total = 0
        for path in self.directory.glob("*.batch*"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def pending(self) -> int:
        return sum(1 for _ in self.directory.glob("*.batch"))

    def put(self, body: bytes) -> None:
        """Keep one batch durably; refuse when the spool is full (the client is told to retry)."""
        if self.size() + len(body) > self.bound_bytes:
            raise StoreError(f"Elasticsearch is unreachable and the spool {self.directory} is full "
                             f"({self.bound_bytes >> 20} MiB): not acknowledged")
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.batch"
        tmp = self.directory / (name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / name)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def claim(self) -> Iterator[tuple[Path, bytes]]:
        """Batches to replay, oldest first, each claimed by this process; ``done`` or ``give_back`` each."""
        for path in sorted(self.directory.glob("*.batch")):
            claimed = path.with_name(f"{path.name}.claimed.{os.getpid()}")
            try:
                os.replace(path, claimed)
            except FileNotFoundError:
                continue  # another collector took it
            yield claimed, claimed.read_bytes()

    @staticmethod
    def done(claimed: Path) -> None:
        claimed.unlink(missing_ok=True)

    @staticmethod
    def give_back(claimed: Path) -> None:
        os.replace(claimed, claimed.with_name(claimed.name.split(".claimed.")[0]))
