"""ferryctl's coordinator commands, and the coordinator's model wiring, against the real daemon.

The coordinator runs as a real process on loopback with the shipped ONNX model; the test plays the
agents (host certificates from the fleet CA) and pushes telemetry the way agents do. Migrations here
cannot reach an agent (none runs), which is the failure path; tests/test_fleet_mesh.py has the real ones.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.ctl.main import main
from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, new_token, registration, sample
from tests.test_ctl_scripting import _documented_json_keys

MODEL = Path(__file__).resolve().parent.parent / "models" / "drain" / "drain.onnx"
SHIPPED = json.loads(MODEL.with_name("card.json").read_text())
"""The shipped model's version and threshold, as the coordinator reports them."""
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("fleet-ctl-pki"))


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


def _process(workdir: Path, pki: CoordinatorPki, token: str) -> CoordinatorProcess:
    return CoordinatorProcess(
        workdir,
        pki,
        tokens=(token,),
        overrides={
            "model": {"path": str(MODEL), "tick_period": 0.3},
            "heartbeat": {"suspect_after": 600.0, "down_after": 1200.0},
            "migrations": {"poll_period": 0.1},
        },
    )


@pytest.fixture
async def coordinator(workdir: Path, pki: CoordinatorPki, token: str) -> AsyncIterator[CoordinatorProcess]:
    proc = _process(workdir, pki, token)
    await proc.start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0, proc.logs()


async def _agent_push(
    proc: CoordinatorProcess, pki: CoordinatorPki, name: str, samples: list[dict[str, Any]], register: bool = True
) -> None:
    async with proc.client(pki.agent(name)) as agent:
        if register:
            status, body = await agent.post("/v1/register", registration(name))
            assert status == 200, body
        status, body = await agent.post("/v1/telemetry", {"host": name, "samples": samples})
        assert status == 200 and body["accepted"] == len(samples), body


def _quiet(now: float, n: int = 10, **fields: Any) -> list[dict[str, Any]]:
    return [sample(now - n + i, **fields) for i in range(n)]


async def ctl(proc: CoordinatorProcess, pki: CoordinatorPki, *argv: str, token: str | None = None) -> int:
    who = (
        ["--token", token]
        if token
        else ["--cert", str(pki.operator().cert_file), "--key", str(pki.operator().key_file)]
    )
    base = ["--coordinator", proc.url, "--ca", str(pki.server.ca_file), *who]
    return await asyncio.to_thread(main, [*base, *argv])


async def _predictions(proc: CoordinatorProcess, pki: CoordinatorPki, hosts: set[str]) -> dict[str, Any]:
    async with proc.client(pki.operator()) as ops:
        for _ in range(100):
            status, body = await ops.get("/v1/predictions")
            assert status == 200, body
            if {p["host"] for p in body["predictions"]} >= hosts:
                return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"no predictions for {hosts}")


async def test_hosts_drain_uncordon_and_predictions(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    web = {"id": "web", "image": "busybox", "memory_bytes": str(64 * MiB), "cpu_millis": 100.0}
    await _agent_push(coordinator, pki, "h1", _quiet(now, containers=[web]))
    await _agent_push(coordinator, pki, "h2", _quiet(now))
    await _predictions(coordinator, pki, {"h1", "h2"})
    capsys.readouterr()

    assert await ctl(coordinator, pki, "hosts") == 0
    table = capsys.readouterr().out
    assert "HOST" in table and "P(DRAIN)" in table and "h1" in table and "h2" in table and "ready" in table

    assert await ctl(coordinator, pki, "--json", "hosts", token=token) == 0
    hosts = {h["name"]: h for h in json.loads(capsys.readouterr().out)["hosts"]}
    assert hosts["h1"]["containers"][0]["id"] == "web" and hosts["h1"]["drain_probability"] < 0.5
    assert hosts["h2"]["model_version"] == SHIPPED["model_version"]

    # h2 runs nothing: drained at once. h1's container cannot move (no agent answers): it stays draining.
    assert await ctl(coordinator, pki, "drain", "h2", "--wait", "5") == 0
    assert "h2 drained" in capsys.readouterr().out
    assert await ctl(coordinator, pki, "drain", "h1", "--wait", "1") == 7  # not drained in time
    captured = capsys.readouterr()
    assert "h1 draining" in captured.out and "error: not_drained: h1 is still draining" in captured.err
    assert await ctl(coordinator, pki, "--json", "migrations") == 0
    (planned,) = json.loads(capsys.readouterr().out)["migrations"]
    assert planned["container"] == "web" and planned["requested_by"] == "policy"

    assert await ctl(coordinator, pki, "uncordon", "h2") == 0
    assert "h2 ready" in capsys.readouterr().out

    assert await ctl(coordinator, pki, "predictions") == 0
    out = capsys.readouterr().out
    assert f"model {SHIPPED['model_version']}, threshold {100 * SHIPPED['threshold']:.1f}%" in out
    assert "h1" in out and "h2" in out

    assert await ctl(coordinator, pki, "predictions", "--explain", "h1") == 0
    out = capsys.readouterr().out
    assert out.startswith("h1: P(drain) ") and "from the model" in out, out
    assert await ctl(coordinator, pki, "predictions", "--explain", "nope") != 0
    assert "host_not_found" in capsys.readouterr().err

    # --json of the coordinator commands carries the keys docs/ferryctl.md promises.
    documented = _documented_json_keys()
    for name, argv in (
        ("`drain` (coordinator)", ["drain", "h2"]),
        ("`uncordon` (coordinator)", ["uncordon", "h2"]),
        ("`predictions` (coordinator)", ["predictions"]),
        ("`predictions --explain HOST` (coordinator)", ["predictions", "--explain", "h1"]),
        ("`hosts` (coordinator)", ["hosts"]),
        ("`migrations` (coordinator)", ["migrations"]),
        ("`decisions` (coordinator)", ["decisions"]),
        ("`model` (coordinator)", ["model"]),
        ("`reservations create` (coordinator)", ["reservations", "create", "-m", "1M", "--host", "h2"]),
        ("`reservations` (coordinator)", ["reservations"]),
    ):
        assert await ctl(coordinator, pki, *argv, "--json") == 0, name
        data = json.loads(capsys.readouterr().out)
        assert [k for k in documented[name] if k not in data] == [], (name, data)


async def test_migrate_through_the_coordinator_reports_the_outcome(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    job = {"id": "job", "image": "busybox", "memory_bytes": str(16 * MiB)}
    await _agent_push(coordinator, pki, "h1", _quiet(now, containers=[job]))
    await _agent_push(coordinator, pki, "h2", _quiet(now))
    capsys.readouterr()
    # A named target is tried once; the source agent cannot be reached here, so it is abandoned.
    assert await ctl(coordinator, pki, "migrate", "job", "--to", "h2", "--mode", "precopy") == 4  # not migrated
    captured = capsys.readouterr()
    assert "job h1 -> h2: abandoned" in captured.out
    assert "pending manual; to h2; mode precopy" in captured.err  # the history, as it happened
    assert "error: abandoned: " in captured.err
    assert await ctl(coordinator, pki, "--json", "migrations") == 0
    (record,) = json.loads(capsys.readouterr().out)["migrations"]
    assert await ctl(coordinator, pki, "migrations", "show", record["id"]) == 0
    shown = capsys.readouterr().out
    assert record["id"] in shown and "failed" in shown and "abandoned" in shown

    assert await ctl(coordinator, pki, "migrate", "nope", "--to", "auto") == 1
    assert "error: container_not_found:" in capsys.readouterr().err
    assert await ctl(coordinator, pki, "migrate", "job", "--to", "h2", "--downtime-target", "100") == 2
    assert "--downtime-target: set on the agents' [migration]" in capsys.readouterr().err


async def test_who_may_do_what_and_usage_errors(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, capsys: pytest.CaptureFixture[str]
) -> None:
    await _agent_push(coordinator, pki, "h1", _quiet(time.time()))
    capsys.readouterr()
    base = ["--coordinator", coordinator.url, "--ca", str(pki.server.ca_file)]
    agent = pki.agent("h1")
    as_agent = [*base, "--cert", str(agent.cert_file), "--key", str(agent.key_file)]
    assert await asyncio.to_thread(main, [*as_agent, "drain", "h1"]) == 1
    assert "error: forbidden: 'h1' is an agent identity" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*base, "hosts"]) == 1
    assert "error: unauthorized:" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*base, "--token", "not-a-token", "hosts"]) == 1
    assert "error: unauthorized: the bearer token is not valid" in capsys.readouterr().err
    assert await ctl(coordinator, pki, "drain", "ghost") == 1
    assert "error: host_not_found:" in capsys.readouterr().err
    # Nothing was drained by any of that.
    async with coordinator.client(pki.operator()) as ops:
        _, h1 = await ops.get("/v1/hosts/h1")
    assert h1["state"] == "ready"

    # Without a coordinator: coordinator-only commands and "--to auto" are usage errors.
    assert await asyncio.to_thread(main, ["--agent", "unix:///nonexistent.sock", "hosts"]) == 2
    assert "hosts talks to the coordinator: give --coordinator URL" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["--agent", "unix:///nonexistent.sock", "migrate", "c", "--to", "auto"]) == 2
    assert "--to auto needs a coordinator" in capsys.readouterr().err
    # ... while a named target still goes straight to the agent.
    assert await asyncio.to_thread(main, ["--agent", "unix:///nonexistent.sock", "migrate", "c", "--to", "h2"]) == 6
    assert "error: agent_unreachable:" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["--coordinator", "http://127.0.0.1:1", "hosts"]) == 2
    assert "expected https://host:port" in capsys.readouterr().err


async def test_histories_survive_a_restart_and_a_bad_model_keeps_the_active_one(
    workdir: Path, pki: CoordinatorPki, token: str
) -> None:
    proc = _process(workdir, pki, token)
    await proc.start()
    try:
        now = time.time()
        notice = [{"kind": "DRAIN_NOTICE", "ts": now - 1, "detail": "terminate at +120s"}]
        await _agent_push(proc, pki, "h1", [*_quiet(now - 2, 20), sample(now - 1, events=notice)])
        await _agent_push(proc, pki, "h2", _quiet(now, 20))
        first = await _predictions(proc, pki, {"h1", "h2"})
        p1 = {p["host"]: p["probability"] for p in first["predictions"]}
        assert p1["h1"] >= first["threshold"] > p1["h2"], first  # the notice is the model's precursor
        async with proc.client(pki.operator()) as ops:
            for _ in range(50):  # the model alone drains after model.confirm_ticks (2) ticks above
                _, h1 = await ops.get("/v1/hosts/h1")
                if h1["state"] in ("draining", "drained"):  # no containers: the next tick may finish it
                    break
                await asyncio.sleep(0.1)
        assert h1["state"] in ("draining", "drained"), h1
        drain = next(d for d in h1["decisions"] if d["kind"] == "drain")
        assert drain["detail"].startswith("predicted: model ") and drain["model_version"] == SHIPPED["model_version"]
        assert drain["probability"] >= first["threshold"]
    finally:
        assert await proc.stop() == 0, proc.logs()

    # Restarted: no push since, yet h1's history (the notice included) is rebuilt from the store.
    restart_at = time.time()
    await proc.start()
    try:
        async with proc.client(pki.operator()) as ops:
            for _ in range(100):
                # The restarted leader's own scores (the stored ones move only past the deadband).
                fresh = {h: (await ops.get(f"/v1/predictions/{h}"))[1] for h in ("h1", "h2")}
                if all((e.get("ts") or 0) > restart_at for e in fresh.values()):
                    break
                await asyncio.sleep(0.1)
            _, body = await ops.get("/v1/predictions")
            assert fresh["h1"]["probability"] >= body["threshold"] > fresh["h2"]["probability"], fresh
            assert "telemetry histories rebuilt" in proc.log_path.read_text()

            # A model file that fails to load: 422, and the active model scores on.
            broken = workdir / "broken.onnx"
            broken.write_bytes(MODEL.read_bytes()[:5000])
            status, body = await ops.post("/v1/model", {"path": str(broken)})
            assert status == 422 and body["error"]["code"] == "model_load_failed", body
            assert "broken.onnx" in body["error"]["message"]
            status, model = await ops.get("/v1/model")
            assert model == {
                "active": SHIPPED["model_version"],
                "previous": None,
                "threshold": pytest.approx(SHIPPED["threshold"], abs=1e-3),
            }
            before = time.time()
            for _ in range(50):
                _, body = await ops.get("/v1/predictions")
                if all(p["ts"] > before for p in body["predictions"]):
                    break
                await asyncio.sleep(0.1)
            assert {p["model_version"] for p in body["predictions"]} == {SHIPPED["model_version"]}

            # A good file activates; the replaced model is kept for rollback.
            copy = workdir / "copy.onnx"
            shutil.copy(MODEL, copy)
            status, model = await ops.post("/v1/model", {"path": str(copy)})
            assert status == 200 and model["active"] == model["previous"] == SHIPPED["model_version"], model
            status, model = await ops.post("/v1/model/rollback")
            assert status == 200 and model["previous"] == SHIPPED["model_version"], model
    finally:
        assert await proc.stop() == 0, proc.logs()
