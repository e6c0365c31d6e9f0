"""The peer protocol's messages, codec and (role, state) table, and the peer port's router of
session kinds, without I/O.

Every message round-trips through the codec to the same wire dict the string literals sent before;
anything malformed, unknown, misplaced or carrying an unsafe identifier is a ProtocolError that
names what was expected. A session of a kind nobody serves, or with an id its kind refuses, is
refused before its stream starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from array import array
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.checkpoint.features import CriuFeatures
from agent.checkpoint.pageserver import HEADER, PS_IOV_GET
from agent.config import AgentConfig
from agent.migration.link import FileIn, Incoming, Link, PagesIn
from agent.migration.protocol import (
    ACCEPTED_PROTOCOLS,
    ALLOWED,
    ANYTIME,
    BLOB_SESSION,
    MESSAGES,
    MIGRATION_PROTOCOL,
    OPENERS,
    Blobs,
    BlobsDone,
    BlobsImage,
    BlobWant,
    Commit,
    Committed,
    Container,
    CriuTooOld,
    Decision,
    Failed,
    Message,
    NoCommonProtocol,
    Pagemap,
    PeerFailed,
    PeerReportedFailure,
    PeerVersionMismatch,
    Postcopy,
    Prepare,
    Prepared,
    PrepareOptions,
    ProtocolError,
    PsClosed,
    PsRep,
    PsReq,
    PushAck,
    Pushed,
    PushEnd,
    Query,
    Ready,
    Resolve,
    Restore,
    Restored,
    Resume,
    Resumed,
    Round,
    RwLayer,
    Stopcopy,
    check_allowed,
    check_criu,
    check_protocol,
    decode,
    decode_as,
    encode,
    negotiate,
)
from agent.migration.service import MigrationService
from agent.migration.states import State
from agent.oci import MEDIA_OCI_MANIFEST
from agent.peers import PeerSession, SessionRouter, UnknownSessionKind
from agent.peers.routing import PREAMBLE, encode_preamble, parse_preamble, preamble_length
from agent.stream import Control
from core.errors import InvalidRequest
from core.ids import check_migration_id

DIGEST = "sha256:" + "ab" * 32
REQUEST = HEADER.pack(PS_IOV_GET, 16, 0x7F0000000000, 42)
PREPARE_WIRE: dict[str, Any] = {
    "type": "prepare",
    "migration": "mig-0123456789ab",
    "container": {
        "id": "web-1",
        "image": "registry.local/web:1",
        "labels": {"ferryman.managed": "true"},
        "spec": {"ociVersion": "1.0.2", "process": {"args": ["sh"]}},
        "runtime": "io.containerd.runc.v2",
    },
    "estimated_bytes": 1 << 30,
    "options": {"downtime_target_ms": 300, "mode": "hybrid", "reservation": ""},
}

EXAMPLE_PREPARE = Prepare(
    migration="mig-0123456789ab",
    container=Container(
        id="web-1",
        image="registry.local/web:1",
        labels={"ferryman.managed": "true"},
        spec={"ociVersion": "1.0.2", "process": {"args": ["sh"]}},
        runtime="io.containerd.runc.v2",
    ),
    estimated_bytes=1 << 30,
    options=PrepareOptions(downtime_target_ms=300, mode="hybrid", reservation=""),
)

# One example of every message, with the wire dict the string literals produced for it before (and,
# for `prepare` and `prepared`, the fields of protocol 2).
EXAMPLES: list[tuple[Message, dict[str, Any]]] = [
    (EXAMPLE_PREPARE, PREPARE_WIRE),
    (
        dataclasses.replace(EXAMPLE_PREPARE, protocol=2, criu="4.2.1"),
        {**PREPARE_WIRE, "protocol": 2, "criu": "4.2.1"},
    ),
    (Prepared(), {"type": "prepared"}),
    (Prepared(protocol=2, criu="4.2.1"), {"type": "prepared", "protocol": 2, "criu": "4.2.1"}),
    (Pagemap(name="pagemap-1.img", number=0), {"type": "pagemap", "name": "pagemap-1.img", "number": 0}),
    (Round(number=2, pages=100, zero=3), {"type": "round", "number": 2, "pages": 100, "zero": 3}),
    (Stopcopy(), {"type": "stopcopy"}),
    (Stopcopy(lazy=True), {"type": "stopcopy", "lazy": True}),
    (Ready(), {"type": "ready"}),
    (RwLayer(digest=DIGEST), {"type": "rw_layer", "digest": DIGEST}),
    (Restore(rw_digest=DIGEST), {"type": "restore", "rw_digest": DIGEST}),
    (Restore(rw_digest=DIGEST, lazy=True), {"type": "restore", "rw_digest": DIGEST, "lazy": True}),
    (Restored(restore_ms=41.5), {"type": "restored", "restore_ms": 41.5}),
    (Resume(), {"type": "resume"}),
    (Resumed(), {"type": "resumed"}),
    (Commit(), {"type": "commit"}),
    (Committed(), {"type": "committed"}),
    (Failed(error="CRIU restore failed"), {"type": "failed", "error": "CRIU restore failed"}),
    (PsReq(raw=REQUEST), {"type": "ps_req", "raw": REQUEST.hex()}),
    (
        PsRep(header=REQUEST, local=((0, 4), (8, 2))),
        {"type": "ps_rep", "header": REQUEST.hex(), "local": [[0, 4], [8, 2]]},
    ),
    (PsClosed(status=0), {"type": "ps_closed", "status": 0}),
    (
        Pushed(pagemap="pagemap-7.img", vaddr=0x7F0000000000, nr_pages=256, held=((0, 44), (54, 202))),
        {
            "type": "pushed",
            "pagemap": "pagemap-7.img",
            "vaddr": 0x7F0000000000,
            "nr_pages": 256,
            "held": [[0, 44], [54, 202]],
        },
    ),
    (PushAck(), {"type": "push_ack"}),
    (PushEnd(pages=600), {"type": "push_end", "pages": 600}),
    (Query(migration="mig-1"), {"type": "query", "migration": "mig-1"}),
    (Decision(decision="pending"), {"type": "decision", "decision": "pending"}),
    (Resolve(migration="mig-1", decision="commit"), {"type": "resolve", "migration": "mig-1", "decision": "commit"}),
    (Postcopy(migration="mig-1", store=True), {"type": "postcopy", "migration": "mig-1", "store": True}),
    (Blobs(migration="mig-1"), {"type": "blobs", "migration": "mig-1"}),
    (
        BlobsImage(digest=DIGEST, media_type=MEDIA_OCI_MANIFEST, size=512),
        {"type": "blobs_image", "digest": DIGEST, "media_type": MEDIA_OCI_MANIFEST, "size": 512},
    ),
    (BlobWant(digest=DIGEST), {"type": "blob_want", "digest": DIGEST}),
    (BlobsDone(), {"type": "blobs_done"}),
]


def test_every_message_has_an_example() -> None:
    assert {type(message) for message, _ in EXAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize(("message", "wire"), EXAMPLES, ids=lambda v: getattr(v, "tag", ""))
def test_round_trip_keeps_the_wire_format(message: Message, wire: dict[str, Any]) -> None:
    assert encode(message) == wire
    assert message.body == wire and message.type == wire["type"]
    assert decode(json.loads(json.dumps(wire))) == message  # as it arrives: parsed JSON
    assert decode_as(type(message), wire) == message


def test_every_message_is_documented_in_one_line() -> None:
    for kind in MESSAGES.values():
        doc = kind.__doc__ or ""
        assert doc and "\n" not in doc.strip() and ("->" in doc or "Either way" in doc), kind


def test_every_message_can_be_received_somewhere() -> None:
    received = set(OPENERS) | set(ANYTIME) | set(BLOB_SESSION)
    for kinds in ALLOWED.values():
        received |= kinds
    assert received == set(MESSAGES.values())


# ----- malformed input --------------------------------------------------------------------------


def with_(wire: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**wire, **changes}


def without(wire: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k != key}


def container(**changes: Any) -> dict[str, Any]:
    return with_(PREPARE_WIRE, container=with_(PREPARE_WIRE["container"], **changes))


@pytest.mark.parametrize(
    ("wire", "expected", "got"),
    [
        # not a message at all
        (["prepare"], "a peer message (a JSON object)", "['prepare']"),
        ({"migration": "mig-1"}, "a peer message type", "type None"),
        ({"type": "teleport"}, "a peer message type", "type 'teleport'"),
        ({"type": 7}, "a peer message type", "type 7"),
        # missing and unknown fields
        (without(PREPARE_WIRE, "migration"), "'prepare' with the field 'migration'", "without it"),
        (with_(PREPARE_WIRE, extra=1), "'prepare' with the fields 'migration'", "the field 'extra'"),
        ({"type": "ready", "lazy": True}, "'ready' with the fields none", "the field 'lazy'"),
        (container(privileged=True), "'prepare' field 'container' with the fields 'id'", "the field 'privileged'"),
        ({"type": "round", "number": 1, "pages": 2}, "'round' with the field 'zero'", "without it"),
        # wrong types
        ({"type": "round", "number": "1", "pages": 2, "zero": 0}, "'round' field 'number' as a count", "'1'"),
        ({"type": "round", "number": True, "pages": 2, "zero": 0}, "'round' field 'number' as a count", "True"),
        ({"type": "round", "number": -1, "pages": 2, "zero": 0}, "'round' field 'number' as a count >= 0", "-1"),
        ({"type": "stopcopy", "lazy": 1}, "'stopcopy' field 'lazy' as bool", "1"),
        ({"type": "restored", "restore_ms": "fast"}, "'restored' field 'restore_ms' as float", "'fast'"),
        ({"type": "restored", "restore_ms": float("nan")}, "'restored' field 'restore_ms' as float", "nan"),
        ({"type": "failed", "error": None}, "'failed' field 'error' as str", "None"),
        (container(labels={"a": 1}), "'prepare' field 'container' field 'labels' as str", "1"),
        (container(spec=[]), "'prepare' field 'container' field 'spec' as an object", "[]"),
        (
            with_(PREPARE_WIRE, options={"downtime_target_ms": 1, "mode": "warp", "reservation": ""}),
            "one of 'precopy'",
            "'warp'",
        ),
        ({"type": "decision", "decision": "maybe"}, "'decision' field 'decision' as one of 'commit'", "'maybe'"),
        ({"type": "resolve", "migration": "m", "decision": "rollback"}, "'resolve' field 'decision'", "'rollback'"),
        ({"type": "ps_req", "raw": "zz"}, "'ps_req' field 'raw' as", "'zz'"),
        ({"type": "ps_req", "raw": REQUEST.hex().upper()}, "'ps_req' field 'raw' as", "'"),
        ({"type": "ps_req", "raw": REQUEST[:8].hex()}, f"'ps_req' field 'raw' as a {HEADER.size}-byte", "'"),
        ({"type": "ps_rep", "header": REQUEST.hex(), "local": [[0, 1, 2]]}, "'ps_rep' field 'local' as", "[0, 1, 2]"),
        (
            {"type": "ps_rep", "header": REQUEST.hex(), "local": {"0": 1}},
            "'ps_rep' field 'local' as a list",
            "{'0': 1}",
        ),
        # identifiers that would end up in paths
        (with_(PREPARE_WIRE, migration="../../etc"), "'prepare' field 'migration' as a migration id", "'../../etc'"),
        (with_(PREPARE_WIRE, migration="mig-1\n"), "'prepare' field 'migration' as a migration id", "'mig-1\\n'"),
        (with_(PREPARE_WIRE, migration=""), "'prepare' field 'migration' as a migration id", "''"),
        (container(id="../web"), "'prepare' field 'container' field 'id' as a container id", "'../web'"),
        (container(id="a/b"), "'prepare' field 'container' field 'id' as a container id", "'a/b'"),
        ({"type": "query", "migration": "x/../../y"}, "'query' field 'migration' as a migration id", "'x/../../y'"),
        (
            {"type": "postcopy", "migration": "..", "store": True},
            "'postcopy' field 'migration' as a migration id",
            "'..'",
        ),
        ({"type": "pagemap", "name": "../pagemap-1.img", "number": 0}, "'pagemap' field 'name' as a pagemap", "'../"),
        (
            {"type": "pushed", "pagemap": "pagemap-1.img/..", "vaddr": 0, "nr_pages": 1, "held": []},
            "a pagemap",
            "'pagemap-1.img/..'",
        ),
        (
            {"type": "rw_layer", "digest": "sha256:../../x"},
            "'rw_layer' field 'digest' as a sha256 digest",
            "'sha256:../../x'",
        ),
    ],
)
def test_malformed_input_is_a_protocol_error_naming_what_was_expected(wire: Any, expected: str, got: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(wire)
    error = caught.value
    assert isinstance(error, PeerFailed) and error.code == "peer_protocol"
    assert expected in error.expected, error.message
    assert got in error.got, error.message
    assert error.message == f"peer protocol: expected {error.expected}, got {error.got}"


def test_decode_as_names_the_expected_type() -> None:
    with pytest.raises(ProtocolError, match="expected 'restored', got 'ready'"):
        decode_as(Restored, {"type": "ready"})


def test_decoding_mutated_messages_raises_nothing_but_protocol_errors() -> None:
    """A small deterministic fuzz: every example with fields replaced, dropped or added at random."""
    rng = random.Random(20261124)
    junk: list[Any] = [None, True, 0, -1, 1.5, "", "../x", "sha256:", [], [[1]], {}, {"a": []}, "A" * 300]

    def mutate(value: Any, depth: int = 0) -> Any:
        if isinstance(value, dict) and value and depth < 3:
            out = dict(value)
            key = rng.choice(sorted(out))
            choice = rng.random()
            if choice < 0.3:
                del out[key]
            elif choice < 0.5:
                out[rng.choice(["x", "type", key])] = rng.choice(junk)
            else:
                out[key] = mutate(out[key], depth + 1)
            return out
        if isinstance(value, list) and value and rng.random() < 0.5:
            return [mutate(item, depth + 1) for item in value]
        return rng.choice(junk) if rng.random() < 0.7 else value

    decoded = 0
    for _ in range(3000):
        _, wire = rng.choice(EXAMPLES)
        try:
            message = decode(mutate(wire))
        except ProtocolError:
            continue
        decoded += 1
        assert decode(encode(message)) == message  # whatever passes is a well-formed message
    assert decoded  # some mutations are harmless (e.g. an optional field dropped)


def test_send_by_tag_passes_the_codec() -> None:
    """Tests and tools may send a tag and fields: the same checks apply."""
    sent: list[dict[str, Any]] = []
    link = Link(FakeChannel([], sent), idle_timeout=1)
    asyncio.run(link.send("pushed", pagemap="pagemap-1.img", vaddr=0, nr_pages=1, held=[]))
    assert sent == [{"type": "pushed", "pagemap": "pagemap-1.img", "vaddr": 0, "nr_pages": 1, "held": []}]
    with pytest.raises(ProtocolError, match="'pushed' with the field 'held'"):
        asyncio.run(link.send("pushed", pagemap="pagemap-1.img", vaddr=0, nr_pages=1))


# ----- the (role, state) table --------------------------------------------------------------------


def test_the_table_allows_each_step_of_a_migration() -> None:
    check_allowed("source", State.PREPARE, Prepared())
    check_allowed("target", State.PRECOPY, Round(number=1, pages=1, zero=0))
    check_allowed("target", State.PRECOPY, Stopcopy(lazy=True))
    check_allowed("source", State.STOPCOPY, Ready())
    check_allowed("target", State.STOPCOPY, Restore(rw_digest=DIGEST))
    check_allowed("source", State.RESTORE, Restored(restore_ms=1.0))
    check_allowed("target", State.RESTORE, Resume())
    check_allowed("source", State.POSTCOPY, Resumed())
    check_allowed("target", State.POSTCOPY, Commit())
    check_allowed("target", State.SWITCH, Commit())  # post-copy: every page came before `commit`
    check_allowed("source", State.SWITCH, Committed())
    for state in State:  # link-level messages go anywhere
        check_allowed("target", state, Failed(error="x"))
        check_allowed("source", state, Pagemap(name="pagemap-1.img", number=1))


@pytest.mark.parametrize(
    ("role", "state", "message", "expected"),
    [
        ("target", State.PRECOPY, Restore(rw_digest=DIGEST), "one of 'round', 'stopcopy' (target in PRECOPY)"),
        (
            "target",
            State.STOPCOPY,
            Round(number=3, pages=0, zero=0),
            "one of 'restore', 'rw_layer' (target in STOPCOPY)",
        ),
        ("source", State.PREPARE, Ready(), "'prepared' (source in PREPARE)"),
        ("source", State.SWITCH, PushAck(), "'committed' (source in SWITCH)"),
        ("source", State.RESTORE, Commit(), "'ps_req', 'push_ack', 'restored' (source in RESTORE)"),
        ("target", State.POSTCOPY, Resume(), "(target in POSTCOPY)"),
        ("source", State.PRECOPY, Prepared(), "nothing (source in PRECOPY)"),
        ("target", State.COMMIT, Commit(), "nothing (target in COMMIT)"),
        (
            "target",
            State.PRECOPY,
            Prepare(**{f.name: getattr(EXAMPLES[0][0], f.name) for f in dataclasses.fields(Prepare)}),
            "(target in PRECOPY)",
        ),
    ],
)
def test_the_table_refuses_a_message_in_the_wrong_state(
    role: Any, state: State, message: Message, expected: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_allowed(role, state, message)
    assert expected in caught.value.expected
    assert caught.value.got == repr(message.tag)


class FakeChannel:
    """The Channel protocol over two lists: what arrives, and what was sent."""

    def __init__(self, incoming: list[Incoming], sent: list[dict[str, Any]]) -> None:
        self.incoming = incoming
        self.sent = sent
        self.bytes_raw = 0
        self.bytes_wire = 0
        self.peer_speaks: tuple[int, ...] = ()

    async def send_control(self, obj: dict[str, Any]) -> None:
        self.sent.append(obj)

    async def send_file(self, path: Path | bytes, name: str) -> None:
        raise NotImplementedError

    async def send_pages(self, keys: array[int], data: bytes, zeros: array[int]) -> None:
        raise NotImplementedError

    async def recv(self) -> Incoming:
        return self.incoming.pop(0)

    async def abort(self, reason: str) -> None:
        pass

    async def close(self) -> None:
        pass


def test_a_link_that_follows_a_migration_checks_every_control_message() -> None:
    state = State.PRECOPY
    incoming: list[Incoming] = [
        Control({"type": "pagemap", "name": "pagemap-1.img", "number": 0}),
        Control({"type": "round", "number": 1, "pages": 10, "zero": 0}),
        PagesIn(keys=array("Q"), data=memoryview(b""), zeros=array("Q")),
        Control({"type": "restore", "rw_digest": DIGEST}),
    ]
    link = Link(FakeChannel(incoming, []), idle_timeout=1)
    link.follow("target", lambda: state)

    async def run() -> None:
        assert await link.expect(Round) == Round(number=1, pages=10, zero=0)  # the pagemap was absorbed
        assert link.pagemap_names == {0: "pagemap-1.img"}
        assert isinstance(await link.recv(), PagesIn)
        with pytest.raises(
            ProtocolError, match=r"expected one of 'round', 'stopcopy' \(target in PRECOPY\), got 'restore'"
        ):
            await link.recv()

    asyncio.run(run())


def test_expect_returns_the_dataclass_or_names_what_it_wanted() -> None:
    incoming: list[Incoming] = [
        Control({"type": "restored", "restore_ms": 12}),
        Control({"type": "ready"}),
        FileIn(name="rw.tar", path=Path("/nonexistent"), size=0),
        Control({"type": "failed", "error": "out of space"}),
    ]
    link = Link(FakeChannel(incoming, []), idle_timeout=1)

    async def run() -> None:
        restored = await link.expect(Restored)
        assert restored == Restored(restore_ms=12.0) and isinstance(restored.restore_ms, float)
        with pytest.raises(ProtocolError, match="expected 'committed', got 'ready'"):
            await link.expect(Committed)
        with pytest.raises(ProtocolError, match=r"expected 'ready', got file 'rw\.tar'"):
            await link.expect(Ready)
        with pytest.raises(PeerReportedFailure, match="out of space"):
            await link.expect(Ready)

    asyncio.run(run())


def test_a_session_opener_must_be_one_of_the_openers() -> None:
    link = Link(FakeChannel([Control({"type": "commit"})], []), idle_timeout=1)
    expected = "expected one of 'blobs', 'postcopy', 'prepare', 'query', 'resolve', got 'commit'"
    with pytest.raises(ProtocolError, match=expected):
        asyncio.run(link.expect_one_of(OPENERS))


# ----- the peer port's router of session kinds ----------------------------------------------------


async def _serve(session: PeerSession) -> None:
    pass


def test_the_router_refuses_an_unknown_session_kind() -> None:
    router = SessionRouter()
    router.add("migration", _serve, check_migration_id)
    assert router.route("migration", "mig-1") is _serve
    with pytest.raises(
        UnknownSessionKind, match=r"peer session kind 'layer' is not served here \(kinds: 'migration'\)"
    ):
        router.route("layer", "sha256:" + "0" * 64)
    assert issubclass(UnknownSessionKind, PeerFailed)
    with pytest.raises(ValueError, match="already has a handler"):
        router.add("migration", _serve, check_migration_id)


def test_the_router_checks_the_session_id_of_its_kind() -> None:
    router = SessionRouter()
    router.add("migration", _serve, check_migration_id)
    for bad in ("../../etc", "mig/1", "", "mig-1\n", "." * 3):
        with pytest.raises(InvalidRequest, match="invalid migration id"):
            router.route("migration", bad)


def test_the_preamble_names_kind_and_id_and_stays_readable_by_older_agents() -> None:
    raw = encode_preamble("migration", "mig-1")
    head, body = raw[: PREAMBLE.size], raw[PREAMBLE.size :]
    assert preamble_length(head) == len(body)
    assert json.loads(body) == {"kind": "migration", "migration": "mig-1"}  # older agents read ["migration"]
    assert parse_preamble(body) == ("migration", "mig-1")
    assert parse_preamble(b'{"migration": "mig-2"}') == ("migration", "mig-2")  # from an older agent
    assert parse_preamble(b'{"kind": "layer", "layer": "sha256:ab"}') == ("layer", "sha256:ab")


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"not json",
        b'{"kind": "layer"}',
        b'{"kind": "layer", "migration": "m"}',
        b'{"migration": 7}',
        b"{}",
        b'{"kind": 1, "1": "x"}',
        b'{"kind": "migration", "migration": "m", "extra": 1}',
    ],
)
def test_a_malformed_preamble_is_refused(body: bytes) -> None:
    with pytest.raises(PeerFailed):
        parse_preamble(body)


def test_a_preamble_that_is_not_ours_is_refused() -> None:
    with pytest.raises(PeerFailed, match="not a ferryman peer session"):
        preamble_length(PREAMBLE.pack(b"HTTP", 10))
    with pytest.raises(PeerFailed, match="not a ferryman peer session"):
        preamble_length(PREAMBLE.pack(b"FMP1", 65535))


# ----- property-based: hypothesis drives the decoder with generated input ---------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=16,
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(_JSON)
def test_any_json_value_decodes_or_is_a_protocol_error(value: Any) -> None:
    try:
        message = decode(value)
    except ProtocolError as exc:
        assert exc.message.startswith("peer protocol: expected ")
        return
    assert decode(encode(message)) == message


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.sampled_from(EXAMPLES), st.data())
def test_each_field_replaced_by_any_value_decodes_or_is_a_protocol_error(example: Any, data: st.DataObject) -> None:
    """A real message with one field (or one nested field) replaced by any JSON value: never another
    exception, and whatever decodes is well formed (ids included: no path can come through)."""
    _, wire = example
    wire = dict(wire)
    key = data.draw(st.sampled_from(sorted(wire)))
    if isinstance(wire[key], dict) and wire[key] and data.draw(st.booleans()):
        inner = dict(wire[key])
        inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(_JSON)
        wire[key] = inner
    else:
        wire[key] = data.draw(_JSON)
    try:
        message = decode(wire)
    except ProtocolError:
        return
    assert decode(encode(message)) == message
    for name in ("migration", "container"):
        value = getattr(message, name, None)
        ident = getattr(value, "id", value)
        if isinstance(ident, str):
            assert "/" not in ident and ident != ".."


# ----- versions: a migration between agents of two releases ---------------------------------------


def test_the_protocol_version_leaves_the_wire_of_version_1_unchanged() -> None:
    """Version 1 is the wire agents sent before `prepare` carried a version: both read each other."""
    prepare = decode_as(Prepare, PREPARE_WIRE)
    assert prepare.protocol == 1
    assert "protocol" not in encode(prepare)
    newer = dataclasses.replace(prepare, protocol=MIGRATION_PROTOCOL + 1)
    assert encode(newer)["protocol"] == MIGRATION_PROTOCOL + 1
    assert decode(encode(newer)) == newer


def test_a_target_accepts_its_own_version_and_the_one_before() -> None:
    assert MIGRATION_PROTOCOL in ACCEPTED_PROTOCOLS
    assert {MIGRATION_PROTOCOL - 1, MIGRATION_PROTOCOL} >= ACCEPTED_PROTOCOLS
    for version in ACCEPTED_PROTOCOLS:
        check_protocol(version)
    for version in (MIGRATION_PROTOCOL + 1, MIGRATION_PROTOCOL - 2, 0):
        if version in ACCEPTED_PROTOCOLS:
            continue
        with pytest.raises(PeerVersionMismatch, match=f"the source speaks migration protocol {version}; this agent"):
            check_protocol(version)


async def test_a_newer_source_is_refused_before_anything_moves(tmp_path: Path) -> None:
    """The target answers `failed` with both versions, and records, reserves and builds nothing."""
    config = AgentConfig(state_dir=str(tmp_path))
    service = MigrationService(
        config,
        cd=cast(Any, None),  # never reached: the version is checked first
        images=cast(Any, SimpleNamespace(platform=None)),
        containers=cast(Any, SimpleNamespace(criu_configs=None)),
        metrics=cast(Any, None),
        transport=cast(Any, None),
        host_name="h2",
    )
    sent: list[dict[str, Any]] = []
    newer = with_(PREPARE_WIRE, protocol=MIGRATION_PROTOCOL + 1)
    link = Link(FakeChannel([Control(newer)], sent), idle_timeout=1)
    await service.handle_session(link, "h1", PREPARE_WIRE["migration"])
    assert [m["type"] for m in sent] == ["failed"]
    assert f"the source speaks migration protocol {MIGRATION_PROTOCOL + 1}" in sent[0]["error"]
    assert service.journal.all() == []
    await service.close()


def test_the_source_speaks_the_highest_protocol_both_announce() -> None:
    """The target's HELLO lists what it speaks; an agent from before announcements speaks 1 only."""
    assert MIGRATION_PROTOCOL == 2
    assert set(ACCEPTED_PROTOCOLS) == {1, 2}
    assert negotiate("h2", ()) == 1
    assert negotiate("h2", (1,)) == 1
    assert negotiate("h2", (1, 2)) == 2
    assert negotiate("h2", (2, 3)) == 2
    with pytest.raises(NoCommonProtocol, match=r"h2 speaks migration protocol 3, 4; this agent speaks 1, 2") as err:
        negotiate("h2", (3, 4))
    assert err.value.code == "peer_version"


def test_a_target_refuses_images_of_a_newer_criu() -> None:
    check_criu("4.2.1", "4.2.1")
    check_criu("4.2", "4.2.1")
    check_criu("3.19", "4.2.1")
    with pytest.raises(CriuTooOld, match=r"CRIU 4.10, newer than this host's CRIU 4.2.1") as err:
        check_criu("4.10", "4.2.1")
    assert err.value.code == "criu_version"
    # Not a version: refused by the codec, like any malformed field.
    with pytest.raises(ProtocolError, match="a CRIU version"):
        decode({**PREPARE_WIRE, "protocol": 2, "criu": "4.2.1; rm -rf /"})


async def test_a_source_with_a_newer_criu_is_refused_before_anything_moves(tmp_path: Path) -> None:
    """Protocol 2: the target compares CRIU versions first, answers `failed` naming both, and records,
    reserves and builds nothing."""
    config = AgentConfig(state_dir=str(tmp_path))
    service = MigrationService(
        config,
        cd=cast(Any, None),  # never reached: the versions are checked first
        images=cast(Any, SimpleNamespace(platform=None)),
        containers=cast(Any, SimpleNamespace(criu_configs=None)),
        metrics=cast(Any, None),
        transport=cast(Any, None),
        host_name="h2",
    )
    service._features = CriuFeatures(version="4.2.1", mem_dirty_track=True, uffd=True)
    sent: list[dict[str, Any]] = []
    newer = with_(PREPARE_WIRE, protocol=2, criu="5.0")
    link = Link(FakeChannel([Control(newer)], sent), idle_timeout=1)
    await service.handle_session(link, "h1", PREPARE_WIRE["migration"])
    assert [m["type"] for m in sent] == ["failed"]
    assert "the source dumps with CRIU 5.0, newer than this host's CRIU 4.2.1" in sent[0]["error"]
    assert service.journal.all() == []
    await service.close()
