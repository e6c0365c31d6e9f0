"""The migration's agent-to-agent protocol: every control message one frozen dataclass, one strict codec.

A message travels as a CONTROL frame of the encrypted stream (docs/stream.md), a JSON object
`{"type": <tag>, <field>: <value>, ...}`; `encode` gives exactly that object and `decode` is its only
way back. `decode` checks the tag, that every required field is there, each field's type, and that
no other field is: a peer is authenticated, not trusted, and an identifier it sends may end up in a
path (a migration id names the work directory, a container id a containerd object, a pagemap name a
page store file), so those are checked against the same closed alphabets as at the HTTP API. Any
failure is a `ProtocolError` naming what was expected and what came.

`ALLOWED` says which messages each role may receive in each state of the migration (states.py), as
data: a link that follows a migration (`Link.follow`) checks every control message against it, so a
message in the wrong place is refused where it arrives, with the same error.

The wire is the one the string literals made before this module (docs/migration.md, "Peer protocol
messages"): a field that was left out unless set (`lazy`) is still left out at its default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from agent.checkpoint.pageserver import HEADER
from agent.migration.states import State
from agent.oci import parse_digest
from agent.peers import PeerFailed
from core.errors import FerrymanError
from core.ids import check_container_id, check_migration_id

M = TypeVar("M", bound="Message")


class PeerReportedFailure(PeerFailed):
    """The peer said it failed (as opposed to a link that broke)."""


class ProtocolError(PeerFailed):
    """A peer message that is malformed, unknown, or not allowed where it came."""

    code = "peer_protocol"

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"peer protocol: expected {expected}, got {got}")
        self.expected = expected
        self.got = got


MIGRATION_PROTOCOL = 2
"""This agent's migration protocol version. Bump it for any change an older peer would misread: a new
field (decoding is strict), a new message in a state's ALLOWED row, a changed meaning.

1: the wire of agents from before versions (`protocol` left out of `prepare`).
2: `prepare` and `prepared` carry each side's CRIU version (`criu`), and the target refuses images
   from a newer CRIU than its own before anything moves (check_criu); `prepared` says the protocol."""
ACCEPTED_PROTOCOLS = frozenset({MIGRATION_PROTOCOL - 1, MIGRATION_PROTOCOL}) - {0}
"""The versions this agent speaks, as source or target: its own and the one before, so during a rolling
upgrade old and new agents migrate to each other both ways (docs/migration.md, "Versions")."""


class PeerVersionMismatch(PeerFailed):
    """The peer speaks no migration protocol this agent speaks: refused before anything moves."""

    code = "peer_version"

    def __init__(self, version: int) -> None:
        accepted = ", ".join(str(v) for v in sorted(ACCEPTED_PROTOCOLS))
        super().__init__(
            f"the source speaks migration protocol {version}; this agent speaks {MIGRATION_PROTOCOL} and accepts "
            f"{accepted}: migrate from the older agent to the newer one, or upgrade this host first"
        )
        self.version = version


class NoCommonProtocol(PeerVersionMismatch):
    """The target announced migration protocols of which the source speaks none."""

    def __init__(self, peer: str, speaks: tuple[int, ...]) -> None:
        PeerFailed.__init__(
            self,
            f"{peer} speaks migration protocol {', '.join(map(str, speaks))}; this agent speaks "
            f"{', '.join(str(v) for v in sorted(ACCEPTED_PROTOCOLS))}: upgrade the older of the two first",
        )
        self.version = max(speaks)


def check_protocol(version: int) -> None:
    """PeerVersionMismatch unless a target of this version accepts a `prepare` of `version`."""
    if version not in ACCEPTED_PROTOCOLS:
        raise PeerVersionMismatch(version)


def negotiate(peer: str, peer_speaks: tuple[int, ...]) -> int:
    """The migration protocol a source speaks with a target that announced `peer_speaks` in its HELLO:
    the highest both speak. An agent from before announcements speaks 1 only. NoCommonProtocol, before
    anything is sent, when there is none."""
    common = set(peer_speaks or (1,)) & ACCEPTED_PROTOCOLS
    if not common:
        raise NoCommonProtocol(peer, peer_speaks)
    return max(common)


class CriuTooOld(PeerFailed):
    """The source's CRIU is newer than the target's: its images may not restore here."""

    code = "criu_version"

    def __init__(self, source: str, own: str) -> None:
        super().__init__(
            f"the source dumps with CRIU {source}, newer than this host's CRIU {own}, which may not restore "
            "its images: upgrade CRIU here first (the ferryman-criu package)"
        )


def criu_version(text: str) -> tuple[int, ...]:
    """'4.2.1' -> (4, 2, 1); ValueError for anything else."""
    if not _CRIU_RE.fullmatch(text):
        raise ValueError(text)
    return tuple(int(part) for part in text.split("."))


def check_criu(source: str, own: str) -> None:
    """CriuTooOld unless this host's CRIU (`own`) is at least the source's: a CRIU restores images of
    its own version and older ones."""
    if criu_version(source) > criu_version(own):
        raise CriuTooOld(source, own)


# ----- field types with a check --------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """Annotated metadata: `check(value)` raises (any FerrymanError or ValueError) when value is not `what`."""

    what: str
    check: Callable[[Any], object]


_PAGEMAP_RE = re.compile(r"pagemap-[A-Za-z0-9_-]{1,64}\.img")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
_CRIU_RE = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,4}){0,3}")


def _check_pagemap(name: str) -> None:
    if not _PAGEMAP_RE.fullmatch(name):
        raise ValueError(name)


def _check_header(raw: bytes) -> None:
    if len(raw) != HEADER.size:
        raise ValueError(raw)


def _one_of(*values: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in values:
            raise ValueError(value)

    return check


def _check_count(value: int) -> None:
    if value < 0:
        raise ValueError(value)


MigrationIdField = Annotated[str, Check("a migration id", check_migration_id)]
ContainerIdField = Annotated[str, Check("a container id", check_container_id)]
PagemapName = Annotated[str, Check("a pagemap image name (pagemap-<id>.img)", _check_pagemap)]
DigestField = Annotated[str, Check("a sha256 digest", parse_digest)]
PageHeader = Annotated[bytes, Check(f"a {HEADER.size}-byte page-server header", _check_header)]
Count = Annotated[int, Check("a count >= 0", _check_count)]
CriuVersion = Annotated[str, Check("a CRIU version (like 4.2.1)", criu_version)]
ModeField = Annotated[str, Check("one of 'precopy', 'lazy', 'hybrid'", _one_of("precopy", "lazy", "hybrid"))]
DecisionField = Annotated[
    str, Check("one of 'commit', 'rollback', 'pending'", _one_of("commit", "rollback", "pending"))
]
CommitField = Annotated[str, Check("'commit'", _one_of("commit"))]
Ranges = tuple[tuple[Count, Count], ...]
"""Page runs within a request or batch, [[first, count], ...] on the wire."""

_OMIT = "omitted at its default"


def optional(default: Any) -> Any:
    """A field the sender leaves out while it has its default, as the wire always did."""
    return field(default=default, metadata={_OMIT: True})


# ----- messages -----------------------------------------------------------------------------------

MESSAGES: dict[str, type[Message]] = {}
"""Every message type by its tag."""


class Message:
    """Base of every peer message. `tag` is its "type" on the wire."""

    tag: ClassVar[str] = ""

    def __init_subclass__(cls, tag: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if tag:
            if tag in MESSAGES:
                raise TypeError(f"two peer messages with the tag {tag!r}")
            cls.tag = tag
            MESSAGES[tag] = cls

    @property
    def type(self) -> str:
        return self.tag

    @property
    def body(self) -> dict[str, Any]:
        """The message as it goes on the wire."""
        return encode(self)


@dataclass(frozen=True)
class Container:
    """The container a `prepare` announces, as the source's containerd has it."""

    id: ContainerIdField
    image: str
    labels: dict[str, str]
    spec: dict[str, Any]
    """The OCI runtime spec (JSON); the target adapts it to its host."""
    runtime: str


@dataclass(frozen=True)
class PrepareOptions:
    """What the source's caller asked of the migration."""

    downtime_target_ms: int
    mode: ModeField
    reservation: str


# The migration itself, in the order it happens.


@dataclass(frozen=True)
class Prepare(Message, tag="prepare"):
    """Source -> target, first on a new session: start a migration of this container to you."""

    migration: MigrationIdField
    container: Container
    estimated_bytes: Count
    options: PrepareOptions
    protocol: int = optional(1)
    """The protocol the source chose (negotiate); the target checks it (check_protocol) before anything else."""
    criu: CriuVersion = optional("")  # noqa: RUF009 (a str: immutable)
    """Protocol 2: the source's CRIU version; the target refuses a newer one than its own (check_criu)."""


@dataclass(frozen=True)
class Prepared(Message, tag="prepared"):
    """Target -> source: room checked, reservation held, image pull started; send pre-copy rounds."""

    protocol: int = optional(1)
    """The protocol of the `prepare` it answers (2 and later; left out at 1)."""
    criu: CriuVersion = optional("")  # noqa: RUF009 (a str: immutable)
    """Protocol 2: the target's CRIU version."""


@dataclass(frozen=True)
class Pagemap(Message, tag="pagemap"):
    """Either way, before the first page batch of a pagemap: its page keys carry `number` for `name`."""

    name: PagemapName
    number: Count


@dataclass(frozen=True)
class Round(Message, tag="round"):
    """Source -> target: pre-copy round `number` is sent, with `pages` changed pages, `zero` of them zero."""

    number: Count
    pages: Count
    zero: Count


@dataclass(frozen=True)
class Stopcopy(Message, tag="stopcopy"):
    """Source -> target: pre-copy is over; answer `ready` when the freeze may start (`lazy`: post-copy)."""

    lazy: bool = optional(False)


@dataclass(frozen=True)
class Ready(Message, tag="ready"):
    """Target -> source: image pulled and pager started; freeze now."""


@dataclass(frozen=True)
class RwLayer(Message, tag="rw_layer"):
    """Source -> target: the rw layer file follows, with this digest; build the container on arrival."""

    digest: DigestField


@dataclass(frozen=True)
class Restore(Message, tag="restore"):
    """Source -> target: every image is sent; restore the task and leave it paused."""

    rw_digest: DigestField
    lazy: bool = optional(False)


@dataclass(frozen=True)
class Restored(Message, tag="restored"):
    """Target -> source: restored (paused, or pausing in post-copy) in `restore_ms`; image from `image_from`."""

    restore_ms: float
    image_ms: float = optional(0.0)
    """The image was ready after this long (fetched while the pages came)."""
    image_from: str = optional("")
    """Where the image came from: "local", "peer" (the source) or "registry"."""


@dataclass(frozen=True)
class Resume(Message, tag="resume"):
    """Source -> target, post-copy: the source decided; run the restored task, its pages follow."""


@dataclass(frozen=True)
class Resumed(Message, tag="resumed"):
    """Target -> source, post-copy: the task runs (sent again on every reconnect; repeats are harmless)."""


@dataclass(frozen=True)
class Commit(Message, tag="commit"):
    """Source -> target: the source decided (pre-copy) or every page is there (post-copy); own the workload."""


@dataclass(frozen=True)
class Committed(Message, tag="committed"):
    """Target -> source: the target owns the workload; the source removes its copy."""


@dataclass(frozen=True)
class Failed(Message, tag="failed"):
    """Either way, any time: the sender failed (`error` says why); the migration ends."""

    error: str


# Post-copy page traffic (relay.py, pageserve.py, pagepush.py).


@dataclass(frozen=True)
class PsReq(Message, tag="ps_req"):
    """Target -> source: the lazy-pages daemon's page-server request `raw` (a header), for CRIU's page server."""

    raw: PageHeader


@dataclass(frozen=True)
class PsRep(Message, tag="ps_rep"):
    """Source -> target: the page server's reply `header`; its pages follow, but `local` and `pushed` runs."""

    # `local`: runs the target holds from pre-copy; `pushed`: runs a push on this link carried already
    # (left out only for a request marked FRESH: none of its pages reached the target's daemon).

    header: PageHeader
    local: Ranges
    pushed: Ranges = optional(())  # noqa: RUF009 (an empty tuple: immutable)


@dataclass(frozen=True)
class PsClosed(Message, tag="ps_closed"):
    """Source -> target: the daemon's close, answered by the page server with `status`; post-copy is over."""

    status: int


@dataclass(frozen=True)
class Pushed(Message, tag="pushed"):
    """Source -> target: `nr_pages` pushed pages of `pagemap` at `vaddr` follow, but the `held` runs."""

    pagemap: PagemapName
    vaddr: Count
    nr_pages: Count
    held: Ranges


@dataclass(frozen=True)
class PushAck(Message, tag="push_ack"):
    """Target -> source: one pushed batch stored (or a first credit); the push may send one more."""


@dataclass(frozen=True)
class PushEnd(Message, tag="push_end"):
    """Source -> target: the push is over after `pages` pages; what waited for it goes to the source."""

    pages: Count


# Sessions after a broken link or a restart: each is the first message of a new session.


@dataclass(frozen=True)
class Query(Message, tag="query"):
    """Target -> source: a restored copy waits; what did the source decide for `migration`?"""

    migration: MigrationIdField


@dataclass(frozen=True)
class Decision(Message, tag="decision"):
    """Source -> target, the answer to `query`: commit, rollback, or pending (ask again)."""

    decision: DecisionField


@dataclass(frozen=True)
class Resolve(Message, tag="resolve"):
    """Source -> target: a restarted source delivers its decision for `migration`; answer `committed`."""

    migration: MigrationIdField
    decision: CommitField


@dataclass(frozen=True)
class Postcopy(Message, tag="postcopy"):
    """Target -> source: page traffic of `migration` continues on this session; `store`: pre-copy pages kept."""

    migration: MigrationIdField
    store: bool


# The image's blobs, on a session of their own (target -> source): see blobs.py.


@dataclass(frozen=True)
class Blobs(Message, tag="blobs"):
    """Target -> source, first on a new session: send me blobs of `migration`'s image."""

    migration: MigrationIdField


@dataclass(frozen=True)
class BlobsImage(Message, tag="blobs_image"):
    """Source -> target, the answer to `blobs`: what the image's name points at here (index or manifest)."""

    digest: DigestField
    media_type: str
    size: Count


@dataclass(frozen=True)
class BlobWant(Message, tag="blob_want"):
    """Target -> source: send the blob `digest` (a file named by blob_file_name); `failed` if you cannot."""

    digest: DigestField


@dataclass(frozen=True)
class BlobsDone(Message, tag="blobs_done"):
    """Target -> source: no more blobs; the session ends."""


# ----- who may receive what, when ------------------------------------------------------------------

Role = Literal["source", "target"]

OPENERS: frozenset[type[Message]] = frozenset({Prepare, Query, Resolve, Postcopy, Blobs})
"""The first message of an inbound migration session: what the session is for."""
ANYTIME: frozenset[type[Message]] = frozenset({Pagemap, Failed})
"""Link-level messages, allowed in every state (the link absorbs them)."""
BLOB_SESSION: frozenset[type[Message]] = frozenset({BlobsImage, BlobWant, BlobsDone})
"""What a `blobs` session carries after its opener (blobs.py); it follows no migration state."""
_POSTCOPY_TO_TARGET = frozenset({PsRep, PsClosed, Pushed, PushEnd})
ALLOWED: dict[tuple[Role, State], frozenset[type[Message]]] = {
    ("source", State.PREPARE): frozenset({Prepared}),
    ("source", State.STOPCOPY): frozenset({Ready}),
    ("source", State.RESTORE): frozenset({Restored, PsReq, PushAck}),
    ("source", State.POSTCOPY): frozenset({Resumed, PsReq, PushAck}),
    ("source", State.SWITCH): frozenset({Committed}),
    ("target", State.PRECOPY): frozenset({Round, Stopcopy}),
    ("target", State.STOPCOPY): frozenset({RwLayer, Restore}),
    # Page traffic starts with the restore: the source may answer (and the daemon finish) while the
    # target still waits for the decision.
    ("target", State.RESTORE): frozenset({Commit, Resume, Decision}) | _POSTCOPY_TO_TARGET,
    ("target", State.POSTCOPY): frozenset({Commit}) | _POSTCOPY_TO_TARGET,
    ("target", State.SWITCH): frozenset({Commit}),  # a lazy target has every page before `commit` comes
}
"""(role, state) -> the messages that side may receive in that state, besides ANYTIME's. A pair not
listed receives nothing. The receiver's state may lag the sender's by one step (its own task moves
it), so a row holds what the next state's first messages can be too."""


def tags(kinds: Collection[type[Message]]) -> str:
    """'a', or one of 'a', 'b' (sorted); "nothing" for none."""
    names = sorted(repr(kind.tag) for kind in kinds)
    if not names:
        return "nothing"
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def check_allowed(role: Role, state: State, message: Message) -> None:
    """ProtocolError unless `role` may receive `message` in `state`."""
    allowed = ALLOWED.get((role, state), frozenset())
    if type(message) not in allowed and type(message) not in ANYTIME:
        raise ProtocolError(f"{tags(allowed)} ({role} in {state.value})", repr(message.tag))


# ----- the codec ----------------------------------------------------------------------------------


def encode(message: Message) -> dict[str, Any]:
    """The wire form: {"type": tag, field: value, ...}; bytes as lowercase hex, tuples as lists."""
    return {"type": message.tag, **_encode_fields(message)}


def decode(wire: object) -> Message:
    """The message a control body is, checked strictly; ProtocolError naming what was expected otherwise."""
    if not isinstance(wire, dict):
        raise ProtocolError("a peer message (a JSON object)", _show(wire))
    tag = wire.get("type")
    kind = MESSAGES.get(tag) if isinstance(tag, str) else None
    if kind is None:
        raise ProtocolError(f"a peer message type ({tags(MESSAGES.values())})", f"type {_show(tag)}")
    return _decode_fields(kind, wire, repr(kind.tag), skip="type")


def decode_as(kind: type[M], wire: object) -> M:
    """decode(wire), which must be a `kind`."""
    message = decode(wire)
    if not isinstance(message, kind):
        raise ProtocolError(repr(kind.tag), repr(message.tag))
    return message


_Spec = dict[str, tuple[Any, bool, bool]]  # field -> (type hint, required, omitted at its default)
_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        spec = _SPECS[cls] = {
            f.name: (
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                bool(f.metadata.get(_OMIT)),
            )
            for f in dataclasses.fields(cls)
        }
    return spec


def _encode_fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get(_OMIT) and value == f.default:
            continue
        out[f.name] = _encode_value(value)
    return out


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_encode_value(item) for item in value]
    if dataclasses.is_dataclass(value):
        return _encode_fields(value)
    return value


Where = tuple[str, str]
"""(message, field) a value is in, formatted only for an error."""
Decoder = Callable[[Any, Where], Any]
"""A field's decoder: (JSON value, where it is) -> the value, or ProtocolError."""
_DECODERS: dict[Any, Decoder] = {}


def _decode_fields(cls: type, data: dict[Any, Any], what: str, skip: str = "") -> Any:
    spec = _spec(cls)
    for key in data:
        if key != skip and key not in spec:
            known = ", ".join(repr(name) for name in spec) or "none"
            raise ProtocolError(f"{what} with the fields {known}", f"the field {_show(key)}")
    values: dict[str, Any] = {}
    for name, (hint, required, _) in spec.items():
        if name in data:
            values[name] = _decoder(hint)(data[name], (what, name))
        elif required:
            raise ProtocolError(f"{what} with the field {name!r} ({_describe(hint)})", f"{what} without it")
    return cls(**values)


def _decoder(hint: Any) -> Decoder:
    """The decoder for a type hint, built once: every post-copy fault decodes a message or two."""
    decoder = _DECODERS.get(hint)
    if decoder is None:
        decoder = _DECODERS[hint] = _build_decoder(hint)
    return decoder


def _build_decoder(hint: Any) -> Decoder:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    described = _describe(hint)

    def fail(value: Any, where: Where) -> typing.NoReturn:
        raise ProtocolError(f"{where[0]} field {where[1]!r} as {described}", _show(value))

    if origin is Annotated:  # a scalar with a check: either failing names the check
        base = _decoder(args[0])
        checks = [arg for arg in args[1:] if isinstance(arg, Check)]

        def checked(value: Any, where: Where) -> Any:
            try:
                decoded = base(value, where)
                for check in checks:
                    check.check(decoded)
            except (ProtocolError, FerrymanError, ValueError):
                fail(value, where)
            return decoded

        return checked
    if hint is Any:
        return lambda value, where: value
    if hint in (bool, int, str):
        exact = typing.cast(type, hint)

        def scalar(value: Any, where: Where) -> Any:
            if type(value) is not exact:  # JSON gives exact types; and True is no int here
                fail(value, where)
            return value

        return scalar
    if hint is float:

        def number(value: Any, where: Where) -> Any:
            if type(value) not in (int, float) or not math.isfinite(value):
                fail(value, where)
            return float(value)

        return number
    if hint is bytes:

        def hexadecimal(value: Any, where: Where) -> Any:
            if type(value) is not str or not _HEX_RE.fullmatch(value):
                fail(value, where)
            return bytes.fromhex(value)

        return hexadecimal
    if origin is Literal:

        def literal(value: Any, where: Where) -> Any:
            if type(value) is not str or value not in args:
                fail(value, where)
            return value

        return literal
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _decoder(args[0])

        def variadic(value: Any, where: Where) -> Any:
            if type(value) is not list:
                fail(value, where)
            return tuple(item(element, where) for element in value)

        return variadic
    if origin is tuple:
        items = [_decoder(arg) for arg in args]

        def fixed(value: Any, where: Where) -> Any:
            if type(value) is not list or len(value) != len(items):
                fail(value, where)
            return tuple(item(element, where) for item, element in zip(items, value, strict=True))

        return fixed
    if origin is dict:
        item = _decoder(args[1])

        def mapping(value: Any, where: Where) -> Any:
            if type(value) is not dict or not all(type(key) is str for key in value):
                fail(value, where)
            return {key: item(element, where) for key, element in value.items()}

        return mapping
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        nested = hint

        def obj(value: Any, where: Where) -> Any:
            if type(value) is not dict:
                fail(value, where)
            return _decode_fields(nested, value, f"{where[0]} field {where[1]!r}")

        return obj
    raise TypeError(f"the codec has no rule for {hint!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return next((a.what for a in args[1:] if isinstance(a, Check)), _describe(args[0]))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    if origin is dict:
        return f"an object of {_describe(args[1])}"
    if hint is bytes:
        return "lowercase hex"
    if hint is Any:
        return "any JSON value"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"an object ({', '.join(_spec(hint))})"
    if isinstance(hint, type | types.GenericAlias):
        return getattr(hint, "__name__", str(hint))
    return str(hint)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
