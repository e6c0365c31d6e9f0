"""Alerts the coordinator raises itself: an Alertmanager-compatible webhook, beside the metrics.

A failed deployment, or a component of a running one that degrades, is an event an operator must
hear about even without a Prometheus rule, so the coordinator POSTs the Alertmanager webhook
payload (version 4, the format Alertmanager sends to its webhook receivers) to `[alerts]
webhook_url`: any receiver written for Alertmanager, or Alertmanager's own `/api/v2/alerts`-fed
tooling behind a relay, takes it as it is. One POST per alert, never retried (the metrics keep the
count either way); a receiver that fails is logged and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from coordinator.config import AlertsConfig
from coordinator.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)

RECEIVER = "ferryman-coordinator"
NEVER = "0001-01-01T00:00:00Z"
"""Alertmanager's endsAt for an alert without an end."""


@dataclass(frozen=True)
class Alert:
    name: str
    labels: Mapping[str, str]
    summary: str
    description: str
    starts_at: float
    severity: str = "critical"
    ends_at: float | None = None
    """When it stopped firing: the webhook says `resolved` (None: firing)."""

    def all_labels(self) -> dict[str, str]:
        return {"alertname": self.name, "severity": self.severity, **self.labels}


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def payload(alert: Alert, external_url: str = "") -> dict[str, Any]:
    """The Alertmanager webhook body (version 4) carrying `alert`, firing or resolved."""
    labels = alert.all_labels()
    status = "firing" if alert.ends_at is None else "resolved"
    annotations = {"summary": alert.summary, "description": alert.description}
    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "version": "4",
        "groupKey": f"{{}}:{{alertname={json.dumps(alert.name)}}}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": RECEIVER,
        "groupLabels": {"alertname": alert.name},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": _rfc3339(alert.starts_at),
                "endsAt": NEVER if alert.ends_at is None else _rfc3339(alert.ends_at),
                "generatorURL": external_url,
                "fingerprint": fingerprint,
            }
        ],
    }


class Alerter:
    """Sends alerts to the webhook, if one is configured."""

    def __init__(self, config: AlertsConfig, metrics: CoordinatorMetrics, external_url: str = "") -> None:
        self._config = config
        self._metrics = metrics
        self._external_url = external_url
        self._session: aiohttp.ClientSession | None = None

    async def fire(self, alert: Alert) -> bool:
        """POST the alert; True when the receiver answered 2xx (False, logged, otherwise)."""
        log.warning(alert.summary, extra={"alert": alert.name, **alert.labels})
        if not self._config.webhook_url:
            return False
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._config.timeout))
        try:
            async with self._session.post(self._config.webhook_url, json=payload(alert, self._external_url)) as resp:
                ok = 200 <= resp.status < 300
                detail = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, detail = False, str(exc) or type(exc).__name__
        self._metrics.alert_webhooks.labels(result="sent" if ok else "failed").inc()
        if not ok:
            log.error("alert webhook failed", extra={"alert": alert.name, "error": detail})
        return ok

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
