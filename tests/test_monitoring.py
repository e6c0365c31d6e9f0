"""The observability artifacts in monitoring/ (issue 18): the Prometheus alerting rules, their unit
tests and the example scrape configuration, run through Debian's promtool and prometheus; the
Grafana dashboard's structure; and every metric name the rules and the dashboard query, held
against what a real agent and a real coordinator export.

The exported names come from the processes, never from a list kept here: a coordinated fleet (real
agents, a real coordinator, mutual TLS) migrates a workload, and a real Prometheus scrapes it with
the example configuration and evaluates the rules.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require
from tests.harness.fleet import CoordinatedFleet, api, coordinated_fleet, run_memhog, task_states
from tests.harness.prometheus import PrometheusProcess

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "monitoring" / "prometheus"
RULES = RULES_DIR / "ferryman-alerts.yml"
RULE_TESTS = RULES_DIR / "ferryman-alerts.test.yml"
SCRAPE_EXAMPLE = RULES_DIR / "prometheus.example.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "ferryman.json"
RUNBOOK = REPO / "docs" / "monitoring.md"
MODEL = REPO / "models" / "drain" / "drain.onnx"

PROMETHEUS_OWN = {"up"}
"""Series Prometheus makes itself for every target (no process exports them)."""
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}
"""Grafana's built-in range variables, replaced by durations so the expressions parse as PromQL."""
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


# ---- helpers ---------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    nested = [p for row in panels if row["type"] == "row" for p in row.get("panels", [])]
    return [p for p in panels + nested if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in dashboard_panels() for t in panel["targets"]]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's range variables replaced; `$instance` and the like sit
    inside label matchers' strings, where PromQL takes them as they are."""
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: each vector selector's name, or its __name__ matcher."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return True

    promql_parser.walk(promql_parser.parse(as_promql(expr)), visit)
    return names


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics text can carry, from its families' types: a family declared with
    no sample yet (a labelled metric nobody has set) counts, with its type's suffixes."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        suffixes = SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lowercase, punctuation dropped, spaces to '-')."""
    anchors = set()
    for line in markdown.splitlines():
        if m := re.match(r"#{1,6} +(.*)", line):
            anchors.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return anchors


# ---- the rules, with promtool ----------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_fire_every_alert() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Each alert is tested both ways: a case where it fires and one where it must not.
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it stays quiet"


def test_the_unit_tests_fail_when_an_alert_cannot_fire(tmp_path: Path) -> None:
    """Every alert's expression replaced in turn by one that never fires: promtool must then fail,
    naming that alert (the unit tests can fail, and fail for each alert)."""
    text = RULES.read_text()
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    for rule in alert_rules():
        expr_line = f"        expr: {rule['expr']}\n"
        assert text.count(expr_line) == 1, rule["alert"]
        (tmp_path / RULES.name).write_text(text.replace(expr_line, "        expr: vector(0) > 1\n"))
        result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
        assert result.returncode != 0 and f"alertname: {rule['alert']}," in result.stdout + result.stderr, rule


def test_every_alert_has_for_severity_annotations_and_a_runbook_section() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/monitoring.md" and anchor in anchors, f"{name}: {notes['runbook_url']} has no section"


def test_the_example_scrape_config_passes_promtool(tmp_path: Path) -> None:
    config = _scrape_config(tmp_path, agents=["h1.example.net:7444"], coordinator="coordinator.example.net:7543")
    result = promtool("check", "config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


# ---- the dashboard ---------------------------------------------------------------------------------


def test_the_dashboard_is_grafana_json_with_a_datasource_and_targets_everywhere() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 38 and doc["uid"] and doc["title"]  # Grafana 10 and later
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("instance", "host"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    panels = dashboard_panels()
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        assert panel["targets"], f"{title}: no targets"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["expr"].strip(), title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
    wanted = ("migrations", "downtime", "stream", "pull", "drain probability", "reservation", "pressure")
    titles = " | ".join(p["title"].lower() for p in panels)
    assert all(w in titles for w in wanted), titles


def test_dashboard_expressions_are_promql_to_prometheus(tmp_path: Path) -> None:
    """Prometheus's own parser, through promtool: each expression as a recording rule."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"ferryman:dashboard:{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_are_read_from_the_syntax_tree() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, instance) (rate(a_seconds_bucket{instance=~"$instance"}'
        "[$__rate_interval]))) > on(instance) group_left b_total * time() "
        'or label_replace(c, "x", "$1", "instance", "(.*)") unless {__name__="d", job="up"} '
        "or absent(e_info) or max_over_time(f[5m:1m]) or vector(1) or sum without (rate) (g)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d", "e_info", "f", "g"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(x[5m])")


def test_exported_names_include_declared_families_without_samples() -> None:
    text = (
        "# HELP a_total A\n# TYPE a_total counter\n"
        "# HELP b B\n# TYPE b histogram\n"
        '# HELP c C\n# TYPE c gauge\nc{x="1"} 2.0\n'
    )
    assert exported_names(text) == {"a_total", "b_bucket", "b_sum", "b_count", "c"}


# ---- against a real fleet --------------------------------------------------------------------------


def _scrape_config(directory: Path, agents: list[str], coordinator: str, ops: Any = None) -> Path:
    """prometheus.example.yml with only its targets and certificate paths replaced; the rules beside it."""
    config = yaml.safe_load(SCRAPE_EXAMPLE.read_text())
    files = (
        {"ca_file": ops.ca_file, "cert_file": ops.cert_file, "key_file": ops.key_file}
        if ops is not None
        else {name: directory / f"{name}.pem" for name in ("ca_file", "cert_file", "key_file")}
    )
    for path in files.values():
        if ops is None:
            Path(path).write_text("")
    targets = {"ferryman-agent": agents, "ferryman-coordinator": [coordinator]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        job["tls_config"].update({k: str(v) for k, v in files.items()})
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (directory / RULES.name).write_text(RULES.read_text())
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def fleet2(base_dir: Path) -> AsyncIterator[CoordinatedFleet]:
    async with coordinated_fleet(base_dir, 2, coordinator={"model": {"path": str(MODEL)}}) as f:
        yield f


async def _scrape(f: CoordinatedFleet) -> tuple[dict[str, str], str]:
    agents = {h.name: str(await api(h, "GET", "/metrics")) for h in f.mesh.hosts}
    return agents, str(await f.call("GET", "/metrics"))


def _value(exposition: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no {name}{labels} in the scrape")


def _queried_names() -> Iterator[tuple[str, str]]:
    for rule in alert_rules():
        yield from ((f"alert {rule['alert']}", n) for n in metric_names(rule["expr"]))
    for panel in dashboard_panels():
        for target in panel["targets"]:
            yield from ((f"panel {panel['title']!r}", n) for n in metric_names(target["expr"]))


def _missing(queried: Iterable[tuple[str, str]], exported: set[str]) -> list[str]:
    return sorted({f"{where}: {name}" for where, name in queried if name not in exported | PROMETHEUS_OWN})


@pytest.mark.slow
async def test_a_real_fleet_exports_every_name_and_prometheus_scrapes_it(
    fleet2: CoordinatedFleet, tmp_path: Path
) -> None:
    f = fleet2
    h1, h2 = f.mesh["h1"], f.mesh["h2"]
    await run_memhog(h1, f.mesh, "web", resident_mib=16)
    await f.wait_for("h1 reports web", lambda: _reports(f, "h1", "web"))
    moved = await f.ferryctl("migrate", "web", "--to", "h2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert task_states(h2).get("web") == "RUNNING"

    agents, coordinator = await _scrape(f)
    exported = set.union(*(exported_names(text) for text in (*agents.values(), coordinator)))
    assert _missing(_queried_names(), exported) == []

    # The metrics issue 18 added move in the real processes.
    source = agents["h1"]
    mode = next(m for m in ("precopy", "lazy", "hybrid") if _value(source, "ferryman_migrations_total",
                role="source", result="committed", mode=m))
    assert _value(agents["h2"], "ferryman_migrations_total", role="target", result="committed", mode="") == 1
    assert _value(source, "ferryman_migrations_total", role="source", result="rolled_back", mode=mode) == 0
    assert _value(source, "ferryman_migration_downtime_target_seconds") == 0.3  # the default 300 ms
    assert _value(source, "ferryman_stream_bytes_total", direction="sent", kind="wire") > 16 << 20
    assert _value(agents["h2"], "ferryman_stream_bytes_total", direction="received", kind="wire") > 16 << 20
    url = f.coordinator.url
    assert all(_value(text, "ferryman_telemetry_coordinator_up", coordinator=url) == 1 for text in agents.values())
    assert _value(coordinator, "ferryman_coordinator_migration_transitions_total", state="committed") == 1
    assert _value(coordinator, "ferryman_coordinator_migration_transitions_total", state="abandoned") == 0
    assert 0 < _value(coordinator, "ferryman_coordinator_drain_threshold") < 1  # the shipped model's

    # A real Prometheus with the example configuration scrapes both daemons over mutual TLS and
    # evaluates the rules: every target up, every rule healthy, and nothing firing on a quiet fleet.
    config = _scrape_config(
        tmp_path,
        agents=[f"{h.address}:{h.ops_port}" for h in f.mesh.hosts],  # type: ignore[attr-defined]
        coordinator=f"{f.coordinator.host}:{f.coordinator.port}",
        ops=f.operator,
    )
    prometheus = PrometheusProcess(tmp_path, config, f.mesh.fabric.netns)
    await prometheus.start()
    try:
        await _until_scraped(prometheus)
        targets = (await prometheus.api("targets"))["activeTargets"]
        assert sorted(t["labels"]["job"] for t in targets) == ["ferryman-agent"] * 2 + ["ferryman-coordinator"]
        assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]
        groups = (await prometheus.api("rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_rules())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        assert [r["name"] for r in rules if r["state"] != "inactive"] == []
        scraped = set(await prometheus.api("label/__name__/values"))
        assert "ferryman_stream_bytes_total" in scraped and "ferryman_coordinator_drain_probability" in scraped
        stored = await prometheus.api("query", query='sum(ferryman_stream_bytes_total{kind="wire"})')
        assert float(stored["result"][0]["value"][1]) > 16 << 20
    finally:
        await prometheus.stop()


async def _reports(f: CoordinatedFleet, host: str, container: str) -> bool:
    return any(c["id"] == container for c in (await f.host(host))["containers"])


async def _until_scraped(prometheus: PrometheusProcess, within: float = 30.0) -> None:
    """Until every target has been scraped and the rules evaluated at least once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        targets = (await prometheus.api("targets"))["activeTargets"]
        groups = (await prometheus.api("rules"))["groups"]
        evaluated = all(not g["lastEvaluation"].startswith("0001-") for g in groups)  # Go's zero time
        if targets and all(t["health"] != "unknown" for t in targets) and groups and evaluated:
            return
        if loop.time() > deadline:
            raise AssertionError(f"prometheus scraped nothing in {within:g}s: {targets}\n{prometheus.logs()}")
        await asyncio.sleep(0.5)
