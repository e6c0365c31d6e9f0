"""The migration's view of the peer connection: control messages, image files and page batches.

`Link` narrows agent.stream's channel to what the drivers need, and adds what the stream does not
know about: control messages as the protocol's typed messages (protocol.py, decoded strictly and, on
a link that follows a migration, checked against what its state allows), addressing pages by
(pagemap, address), and waiting for a given message with the migration's idle timeout, so a cut link
fails the step instead of hanging it.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
from array import array
from collections.abc import AsyncIterable, Callable, Collection
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.checkpoint.delta import PageBatch
from agent.checkpoint.images import PAGE_SIZE
from agent.migration.protocol import (
    Failed,
    Message,
    Pagemap,
    PeerFailed,
    PeerReportedFailure,
    ProtocolError,
    Role,
    check_allowed,
    decode,
    encode,
    tags,
)
from agent.migration.states import State
from agent.peers import FileIn, Incoming, PagesIn
from agent.stream import Control
from core.errors import FerrymanError

M = TypeVar("M", bound=Message)

# The slowest transfer rate (bytes/s) a file send may have before it counts as a stalled link.
MIN_RATE = 1 << 20
SMALL_FILE = 1 << 20  # bytes: send_files bundles files up to this size
COPY_CHUNK = 1 << 20
IMAGE_BUNDLE = "images.tar"
"""send_files' small files, as one stream file: a stream file costs ~0.4 ms on each side here, and a
lazy dump has 20-odd of them, all sent while the workload is frozen."""
# Page keys on the wire: pagemap number in the top bits, page frame number below.
_PFN_BITS = 40


def page_key(pagemap_no: int, vaddr: int) -> int:
    return (pagemap_no << _PFN_BITS) | (vaddr // PAGE_SIZE)


def split_key(key: int) -> tuple[int, int]:
    return key >> _PFN_BITS, (key & ((1 << _PFN_BITS) - 1)) * PAGE_SIZE


ControlIn = Message
"""A control message from the peer, decoded (the name the drivers and tests know)."""
Received = Message | FileIn | PagesIn
"""What the link delivers."""


class Channel(Protocol):
    """A session's stream (agent.peers.StreamChannel): control bodies still undecoded, files, pages."""

    @property
    def bytes_raw(self) -> int: ...
    @property
    def peer_speaks(self) -> tuple[int, ...]: ...
    @property
    def bytes_wire(self) -> int: ...

    async def send_control(self, obj: dict[str, Any]) -> None: ...
    async def send_file(self, path: Path | bytes, name: str) -> None: ...
    async def send_stream(self, chunks: AsyncIterable[bytes], name: str, size: int, sha256: str) -> None: ...
    async def send_pages(self, keys: array[int], data: bytes, zeros: array[int]) -> None: ...
    async def recv(self) -> Incoming: ...
    async def abort(self, reason: str) -> None: ...
    async def close(self) -> None: ...


class Link:
    def __init__(self, channel: Channel, idle_timeout: float) -> None:
        self.channel = channel
        self.idle_timeout = idle_timeout
        self._pagemap_no: dict[str, int] = {}
        self.pagemap_names: dict[int, str] = {}
        self._follows: tuple[Role, Callable[[], State]] | None = None

    def follow(self, role: Role, state: Callable[[], State]) -> None:
        """From now on every control message must be one `role` may receive in `state()` (protocol.ALLOWED)."""
        self._follows = (role, state)

    @property
    def peer_speaks(self) -> tuple[int, ...]:
        """The migration protocol versions the peer announced in its HELLO (none from agents of before)."""
        return self.channel.peer_speaks

    @property
    def bytes_raw(self) -> int:
        return self.channel.bytes_raw

    @property
    def bytes_wire(self) -> int:
        return self.channel.bytes_wire

    async def send(self, message: Message | str, /, **fields: Any) -> None:
        """Send one message. Tests and tools may give a tag and fields instead: they pass the same codec."""
        if isinstance(message, str):
            message = decode({"type": message, **fields})
        # Sends time out too: on a cut link they block on flow control, not on an error.
        async with asyncio.timeout(self.idle_timeout):
            await self.channel.send_control(encode(message))

    async def send_file(self, path: Path, name: str) -> None:
        size = (await asyncio.to_thread(path.stat)).st_size
        async with asyncio.timeout(self.idle_timeout + size / MIN_RATE):
            await self.channel.send_file(path, name)

    async def send_stream(self, chunks: AsyncIterable[bytes], name: str, size: int, sha256: str) -> None:
        """A file read as it goes (a blob from the content store), checked against `sha256` (hex) there."""
        async with asyncio.timeout(self.idle_timeout + size / MIN_RATE):
            await self.channel.send_stream(chunks, name, size, sha256)

    async def send_files(self, paths: list[Path]) -> None:
        """A dump's image files: the small ones as one IMAGE_BUNDLE (packed in one worker-thread
        call), the others one by one. The receiver unpacks the bundle with `unpack_files`."""
        small = [path for path in paths if path.stat().st_size <= SMALL_FILE]
        if small:
            bundle = await asyncio.to_thread(pack_files, small)
            async with asyncio.timeout(self.idle_timeout):
                await self.channel.send_file(bundle, IMAGE_BUNDLE)
        for path in paths:
            if path not in small:
                await self.send_file(path, path.name)

    async def send_pages(self, batch: PageBatch) -> None:
        number = self._pagemap_no.get(batch.pagemap)
        if number is None:
            number = self._pagemap_no[batch.pagemap] = len(self._pagemap_no)
            await self.send(Pagemap(name=batch.pagemap, number=number))
        keys = array("Q", (page_key(number, v) for v in batch.vaddrs))
        zeros = array("Q", (page_key(number, v) for v in batch.zeros))
        async with asyncio.timeout(self.idle_timeout):
            await self.channel.send_pages(keys, b"".join(batch.data), zeros)

    async def send_raw_pages(self, keys: array[int], data: bytes) -> None:
        """Pages under keys the caller made (post-copy replies), no pagemap announcement."""
        async with asyncio.timeout(self.idle_timeout):
            await self.channel.send_pages(keys, data, array("Q"))

    async def recv(self) -> Received:
        """The next message; a `pagemap` announcement is absorbed here, `failed` raised. Times out after
        idle_timeout. ProtocolError for a control message that is malformed or, on a link that follows
        a migration, not allowed in its state."""
        while True:
            async with asyncio.timeout(self.idle_timeout):
                msg = await self.channel.recv()
            if not isinstance(msg, Control):
                return msg
            message = decode(msg.body)
            if isinstance(message, Pagemap):
                self.pagemap_names[message.number] = message.name
                continue
            if isinstance(message, Failed):
                raise PeerReportedFailure(f"peer failed: {message.error}")
            if self._follows is not None:
                role, state = self._follows
                check_allowed(role, state(), message)
            return message

    async def expect(self, kind: type[M]) -> M:
        """The next message, which must be a `kind`."""
        msg = await self.recv()
        if not isinstance(msg, kind):
            raise ProtocolError(repr(kind.tag), describe(msg))
        return msg

    async def expect_one_of(self, kinds: Collection[type[Message]]) -> Message:
        """The next message, which must be one of `kinds`."""
        msg = await self.recv()
        if not isinstance(msg, Message) or type(msg) not in kinds:
            raise ProtocolError(tags(kinds), describe(msg))
        return msg

    def split_pages(self, msg: PagesIn) -> list[tuple[str, list[int], memoryview, list[int]]]:
        """A batch as (pagemap, vaddrs, their page data, zero vaddrs) per pagemap it touches."""
        groups: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for index, key in enumerate(msg.keys):
            number, vaddr = split_key(key)
            vaddrs, indexes, _ = groups.setdefault(number, ([], [], []))
            vaddrs.append(vaddr)
            indexes.append(index)
        for key in msg.zeros:
            number, vaddr = split_key(key)
            groups.setdefault(number, ([], [], []))[2].append(vaddr)
        out = []
        for number, (vaddrs, indexes, zeros) in groups.items():
            if not indexes or indexes[-1] - indexes[0] == len(indexes) - 1:  # one contiguous run: no copy
                first = indexes[0] if indexes else 0
                data = msg.data[first * PAGE_SIZE : (first + len(indexes)) * PAGE_SIZE]
            else:
                data = memoryview(b"".join(msg.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in indexes))
            name = self.pagemap_names.get(number)
            if name is None:
                raise ProtocolError(f"a 'pagemap' announcement of pagemap {number}", "its pages first")
            out.append((name, vaddrs, data, zeros))
        return out

    async def fail(self, error: str) -> None:
        """Tell the peer this side failed; best effort, the link may already be gone."""
        try:
            async with asyncio.timeout(2):
                await self.send(Failed(error=error))
        except (TimeoutError, OSError, FerrymanError):
            pass

    async def close(self) -> None:
        try:
            async with asyncio.timeout(2):
                await self.channel.close()
        except (TimeoutError, OSError, FerrymanError):
            pass


def describe(msg: Received) -> str:
    """A received message in an error: its tag, or what else it is."""
    if isinstance(msg, Message):
        return repr(msg.tag)
    if isinstance(msg, FileIn):
        return f"file {msg.name!r}"
    return f"{len(msg.keys)} pages"


def pack_files(paths: list[Path]) -> bytes:
    """The files as an uncompressed tar, by name only (the stream compresses)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            tar.add(path, arcname=path.name, recursive=False)
    return out.getvalue()


def unpack_files(bundle: Path, dest: Path) -> list[str]:
    """Extract a `pack_files` bundle into dest and remove it; returns the names. Anything but plain
    files named without a directory is refused (a peer is authenticated, not trusted to write)."""
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
        for member in members:
            if not member.isfile() or "/" in member.name or member.name in ("", ".", ".."):
                raise PeerFailed(f"the image bundle holds {member.name!r}: only plain files by name")
        # Copied member by member, not extractall(filter="data"): that filter came with Python
        # 3.11.4 and Debian 12 ships 3.11.2. The check above already admits only plain files by name.
        for member in members:
            data = tar.extractfile(member)
            if data is None:
                raise PeerFailed(f"the image bundle's {member.name!r} has no content")
            with data, (dest / member.name).open("wb") as out:
                shutil.copyfileobj(data, out, COPY_CHUNK)
    bundle.unlink()
    return [member.name for member in members]
