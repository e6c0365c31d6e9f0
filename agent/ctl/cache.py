"""ferryctl's `cache`: the agent's layer cache (docs/cache.md).

`cache [status]` shows the bound, the bytes used, the hit rates and the images in the content store;
`cache pin|unpin|evict REF` and `cache prefetch REF [--pin]` act on one image; `cache prefetch --layer
DIGEST --from REF` warms one layer (composition manifests, docs/composition.md).
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape

from agent.ctl import render


class CacheUsageError(Exception):
    """A cache command given options that do not go together."""


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="the layer cache: status, pin, unpin, evict or prefetch an image")
    actions = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    actions.add_parser("status", help="bound, use, hit rates and images (the default)")
    for name, text in (
        ("pin", "keep an image through any eviction"),
        ("unpin", "let the policy evict an image again"),
        ("evict", "evict an image now (refused while it is in use or pinned)"),
    ):
        actions.add_parser(name, help=text).add_argument("ref")
    q = actions.add_parser("prefetch", help="pull an image, or warm one layer of it, without running it")
    q.add_argument("ref", nargs="?", help="the image to pull (not with --layer)")
    q.add_argument("--pin", action="store_true", help="pin it once pulled")
    q.add_argument("--layer", metavar="DIGEST", help="fetch only this layer (POST /v1/prefetch/layers/DIGEST)")
    q.add_argument("--from", dest="layer_ref", metavar="REF", help="with --layer: the image holding the layer")
    q.add_argument("--ttl", type=float, metavar="SECONDS", help="with --layer: how long a lease keeps it (600)")


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    command = args.cache_command or "status"
    if command == "status":
        status = await client.request("GET", "/v1/cache/status")
        if args.json:
            render.print_json(status)
        else:
            for line in status_lines(status):
                render.say(line)
            render.print_table(out, cache_table(status.get("images", [])))
        return 0
    if command == "prefetch" and args.layer:
        if not args.layer_ref or args.ref or args.pin:
            raise CacheUsageError("--layer DIGEST needs --from REF, and takes no image and no --pin")
        body: dict[str, Any] = {"ref": args.layer_ref, **({"ttl": args.ttl} if args.ttl is not None else {})}
        done = await client.request("POST", f"/v1/prefetch/layers/{args.layer}", body=body)
        if done.get("kept"):
            text = f"kept {done['digest']} (here already, {render.human_size(done.get('size'))}; nothing fetched)"
        else:
            text = f"warmed {done['digest']} ({render.human_size(done.get('bytes_fetched'))} fetched)"
        return _print(args, done, text)
    if command == "prefetch":
        if args.ref is None or args.layer_ref or args.ttl is not None:
            raise CacheUsageError("prefetch takes an image REF, or --layer DIGEST --from REF")
        done = await client.request("POST", "/v1/cache/prefetch", body={"ref": args.ref, "pin": args.pin})
        text = f"prefetched {done['name']} ({render.human_size(done.get('bytes_fetched'))} fetched)"
        return _print(args, done, text + (", pinned" if done.get("pinned") else ""))
    done = await client.request("POST", f"/v1/cache/{command}", body={"ref": args.ref})
    if command == "evict":
        return _print(args, done, f"evicted {done['name']} ({render.human_size(done.get('freed_bytes'))} freed)")
    return _print(args, done, f"{done['name']} {'pinned' if done.get('pinned') else 'unpinned'}")


def _print(args: argparse.Namespace, data: dict[str, Any], line: str) -> int:
    if args.json:
        render.print_json(data)
    else:
        render.say(line)
    return 0


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def status_lines(status: dict[str, Any]) -> list[str]:
    hs = render.human_size
    served = status.get("served", {})
    by_source = ", ".join(
        f"{source} {t['requests']} ({hs(t['bytes'])})" for source, t in served.items() if t.get("requests")
    )
    rates = status.get("hit_rate", {})
    return [
        f"used {hs(status['used_bytes'])} of {hs(status['capacity_bytes'])}"
        f" (evicts down to {hs(status['low_watermark_bytes'])}), {status['entries']} images,"
        f" pinned {hs(status['pinned_bytes'])}",
        f"hit rate {_rate(rates.get('requests'))} of blobs, {_rate(rates.get('bytes'))} of bytes;"
        f" served: {by_source or 'nothing yet'}",
        f"evictions {status['evictions']} ({hs(status['evicted_bytes'])})",
        *_warm_lines(status.get("warms")),
    ]


def _warm_lines(warms: dict[str, Any] | None) -> list[str]:
    if not warms:
        return []
    hs = render.human_size
    lines = []
    if warms.get("warmed"):
        model = f" (model {warms['model_version']})" if warms.get("model_version") else ""
        lines.append(
            f"prefetch: {warms['warmed']} layers warmed ({hs(warms['warmed_bytes'])}){model}, "
            f"{warms['hits']} hits ({hs(warms['hit_bytes'])}), wasted {hs(warms['wasted_bytes'])} "
            f"({_rate(warms.get('waste'))} of settled), {warms['pending']} pending"
        )
    keeps = warms.get("keeps") or {}
    if keeps.get("kept"):
        lines.append(
            f"prefetch keeps: {keeps['kept']} layers here kept ({hs(keeps['kept_bytes'])}), "
            f"{keeps['used']} used ({hs(keeps['used_bytes'])}), {keeps['ended']} ended unused "
            f"({hs(keeps['ended_bytes'])}), {keeps['pending']} pending"
        )
    return lines


def cache_table(images: list[dict[str, Any]]) -> Any:
    table = render.new_table("IMAGE", "SIZE", "UNIQUE", "USES", "LAST USE", "ORIGIN", "KEPT BECAUSE")
    for i in sorted(images, key=lambda i: str(i.get("last_use") or "")):
        table.add_row(
            escape(str(i["name"])),
            render.human_size(i.get("size")),
            render.human_size(i.get("unique_bytes")),
            str(i.get("uses", "")),
            render.age(i["last_use"]) if i.get("last_use") else "-",
            str(i.get("origin", "")),
            escape(str(i.get("protected") or "")),
        )
    return table
