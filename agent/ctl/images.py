"""ferryctl's image archive commands: `image import FILE [--name REF]` and `image export REF -o FILE`.

Both stream: the archive goes to the agent (or comes from it) in pieces, never whole in memory.
`-` reads the archive from stdin, or writes it to stdout. An export lands in its file only when it
is complete (written beside it, then renamed), so a broken export never leaves a truncated archive.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import shtab

from agent.ctl import render
from agent.ctl.client import AgentClient, ApiError
from agent.ctl.exits import Exit
from core.files import atomic_writer

CHUNK = 1 << 20


def add_parser(sub: Any) -> None:
    """Add `image import` and `image export` to ferryctl's subcommands."""
    p = sub.add_parser("image", help="import or export an image archive")
    actions = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    q = actions.add_parser("import", help="store the images of an OCI or docker-save archive")
    q.add_argument("file", help="the archive (- reads stdin)").complete = shtab.FILE  # type: ignore[attr-defined]
    q.add_argument("--name", metavar="REF", help="the image's name (an archive of one image; default: its own)")
    q = actions.add_parser("export", help="write an image as an OCI archive")
    q.add_argument("ref")
    q.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the archive file (- writes stdout)"
    ).complete = shtab.FILE  # type: ignore[attr-defined]


async def run(client: AgentClient, args: argparse.Namespace) -> int:
    if args.image_command == "import":
        return await _import(client, args)
    return await _export(client, args)


async def _import(client: AgentClient, args: argparse.Namespace) -> int:
    if args.file == "-":
        images = await client.import_archive(_chunks(sys.stdin.buffer), args.name)
    else:
        try:
            file = await asyncio.to_thread(Path(args.file).open, "rb")
        except OSError as exc:
            raise ApiError("io_error", f"cannot read {args.file}: {exc.strerror}") from exc
        with file:
            images = await client.import_archive(_chunks(file), args.name)
    if args.json:
        render.print_json({"images": images})
    else:
        for image in images:
            render.say(f"imported {image['name']} {image['digest']} ({render.human_size(image.get('size'))})")
    return Exit.OK


async def _export(client: AgentClient, args: argparse.Namespace) -> int:
    if args.output == "-":
        written = await _copy(client.export_image(args.ref), sys.stdout.buffer)
    else:
        path = Path(args.output)
        try:
            with atomic_writer(path) as file:
                written = await _copy(client.export_image(args.ref), file)
        except OSError as exc:
            raise ApiError("io_error", f"cannot write {args.output}: {exc.strerror or exc}") from exc
    if args.json and args.output != "-":
        render.print_json({"name": args.ref, "file": args.output, "size": written})
    elif args.output != "-":
        render.say(f"exported {args.ref} to {args.output} ({render.human_size(written)})")
    return Exit.OK


async def _chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(file.read, CHUNK):
        yield chunk


async def _copy(chunks: AsyncIterator[bytes], file: BinaryIO) -> int:
    written = 0
    async for chunk in chunks:
        await asyncio.to_thread(file.write, chunk)
        written += len(chunk)
    await asyncio.to_thread(file.flush)
    return written
