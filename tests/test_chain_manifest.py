"""The chain manifest, version 1: the shipped schema and the graph checks (coordinator/chains/manifest.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from coordinator.chains.manifest import ChainManifestInvalid, ManifestValidator

DOCS = Path(__file__).resolve().parent.parent / "docs" / "chains.md"


def _stage(name: str, consumes: str = "", **extra: Any) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": name,
        "image": f"registry:5000/{name}:1",
        "health": {"kind": "http", "port": 8080, "path": "/healthz"},
        "handover": {"protocol": "http_state", "port": 8080},
    }
    if consumes:
        stage["consumes"] = {"from": consumes, "state": ["counter", "buffer"]}
    stage.update(extra)
    return stage


GOOD: dict[str, Any] = {
    "version": 1,
    "name": "counter",
    "port": 8080,
    "stages": [
        _stage("ingest"),
        _stage("transform", "ingest", fallback="transform-safe"),
        _stage("publish", "transform"),
    ],
    "fallbacks": [_stage("transform-safe", "ingest")],
}


def problems(document: Any) -> list[str]:
    with pytest.raises(ChainManifestInvalid) as info:
        ManifestValidator().parse(document)
    return list(info.value.problems)


def test_a_good_manifest_parses_with_its_defaults_filled_in() -> None:
    manifest = ManifestValidator().parse(GOOD)
    assert [s.name for s in manifest.stages] == ["ingest", "transform", "publish"]
    handover = manifest.to_dict()["stages"][1]["handover"]
    assert handover == {
        "protocol": "http_state", "port": 8080, "encoding": "msgpack", "drain": 1.0, "deadline": 60.0, "live": False
    }
    assert ManifestValidator().parse(manifest.to_dict()) == manifest  # what is stored parses again the same


def test_the_schema_is_valid_draft_2020_12_and_every_field_is_documented() -> None:
    validator = ManifestValidator()
    jsonschema.Draft202012Validator.check_schema(json.loads(validator.schema_bytes))
    text = DOCS.read_text()
    for name in ("consumes", "resources", "predicted", "handover", "run_for", "fallback", "drain", "deadline"):
        assert f"`{name}`" in text, name


def test_schema_problems_are_named_with_their_paths() -> None:
    bad = copy.deepcopy(GOOD)
    bad["name"] = "Counter"
    del bad["stages"][0]["image"]
    bad["stages"][1]["handover"] = {"protocol": "criu", "become": True, "port": 1}
    bad["stages"][2]["handover"] = {"protocol": "http_state"}
    bad["stages"][2]["colour"] = "blue"
    found = problems(bad)
    assert "name: 'Counter' is not valid: A DNS label: lower-case letters, digits and '-', 1-63 characters" in found
    assert "stages[0]: give exactly one of image and entry" in found
    assert "stages[1].handover.port: not allowed with protocol 'criu'" in found
    assert "stages[2].handover: 'port' is a required property" in found
    assert any(p.startswith("stages[2]: Additional properties are not allowed ('colour'") for p in found)


def test_an_unknown_version_is_refused_before_anything_else() -> None:
    assert problems({**GOOD, "version": 2}) == ["version: 2 is not a manifest version this coordinator reads (1)"]


def test_graph_problems_name_the_stage_and_what_is_wrong() -> None:
    bad = copy.deepcopy(GOOD)
    bad["stages"][2]["consumes"]["from"] = "ingest"  # skips transform
    bad["stages"][1]["fallback"] = "nowhere"
    bad["fallbacks"].append(_stage("ingest"))  # a name taken
    found = problems(bad)
    assert (
        "stages[2].consumes.from: publish runs after transform, so it consumes from 'transform', not 'ingest'" in found
    )
    assert "stages[1].fallback: 'nowhere' is not one of fallbacks" in found
    assert "fallbacks[1].name: 'ingest' is already the name of stages[0]; stage names are unique" in found
    assert "fallbacks[0]: no stage names 'transform-safe' as its fallback" in found


def test_a_cycle_is_named_and_criu_handovers_are_checked_clearly() -> None:
    bad = copy.deepcopy(GOOD)
    bad["stages"][0]["consumes"] = {"from": "publish"}
    assert "stages: consumes edges close a cycle: ingest -> publish -> transform -> ingest" in problems(bad)
    bad = copy.deepcopy(GOOD)
    bad["stages"][2]["handover"] = {"protocol": "criu"}
    assert problems(bad) == ["stages[2].handover: 'port' is a required property"]  # without become: the contract
    bad["stages"][2]["handover"] = {"protocol": "criu", "port": 8080, "path": "/x"}
    assert problems(bad) == ["stages[2].handover.path: not allowed with protocol 'criu'"]
    bad["stages"][2]["handover"] = {"protocol": "criu", "become": True}
    assert problems(bad) == ["stages[2].handover.become: publish is the last stage; there is no stage to become"]
    bad = copy.deepcopy(GOOD)
    bad["stages"][1]["handover"] = {"protocol": "criu", "become": True}
    bad["stages"][2]["standby"] = "frozen"
    assert problems(bad) == [
        "stages[2].image: publish is transform's process moved (its handover is criu with become), so its image "
        "is transform's",
        "stages[2].standby: publish is transform's process moved; it has no standby",
    ]
    good = copy.deepcopy(GOOD)
    good["stages"][1]["handover"] = {"protocol": "criu", "become": True}
    good["stages"][2]["image"] = good["stages"][1]["image"]
    assert ManifestValidator().parse(good).stages[1].handover.to_dict() == {
        "protocol": "criu", "become": True, "drain": 1.0, "deadline": 60.0
    }  # fmt: skip
    bad = copy.deepcopy(GOOD)
    bad["stages"][0]["handover"] = {"protocol": "shared_volume", "port": 8080, "path": "/shared/state"}
    bad["stages"][1]["handover"] = {"protocol": "shared_volume", "port": 8080, "path": "/other"}
    assert problems(bad) == [
        "stages[1].handover.path: '/other', but stages[0] mounts the chain's volume at '/shared/state'; a chain "
        "has one volume, at one path"
    ]
    bad = copy.deepcopy(GOOD)
    bad["stages"][1]["standby"] = "warm"
    assert problems(bad) == ["stages[1].standby: 'warm' is not one of ['none', 'frozen', 'checkpointed']"]
    bad["stages"][1]["standby"] = "frozen"
    bad["stages"][0]["standby"] = "frozen"
    assert problems(bad) == ["stages[0].standby: ingest is the first stage; nothing runs before it to keep one"]
    bad = copy.deepcopy(GOOD)
    bad["stages"][0]["handover"] = {"protocol": "shared_volume", "port": 8080, "path": "/shared/state"}
    bad["stages"][1]["handover"] = {"protocol": "shared_volume", "path": "/shared/state"}
    assert problems(bad) == ["stages[1].handover: 'port' is a required property"]


def test_a_stage_given_by_image_needs_a_health_check() -> None:
    bad = copy.deepcopy(GOOD)
    del bad["stages"][0]["health"]
    assert problems(bad) == ["stages[0].health: required for a stage given by image (an entry brings its own)"]
