"""The catalog's operations, as the API calls them: register, look up, remove, plan.

Every write is checked against one snapshot of the catalog and lands only if the catalog is still
at that snapshot's revision (the store compares it in the write's transaction); if another write
came first, the check runs again on the new snapshot. So two registrations that would each be
fine alone but close a cycle together never both land, and nothing of a refused request is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from coordinator.catalog.model import (
    Catalog,
    CatalogChanged,
    CatalogEntry,
    CatalogEntryExists,
    CatalogEntryInUse,
    CatalogEntryNotFound,
    Reference,
    UnknownReference,
)
from coordinator.catalog.validation import EntryValidator, check_in_catalog
from coordinator.deployments.plan import DeploymentPlan, plan
from coordinator.store import CatalogStore

WRITE_ATTEMPTS = 5
"""Snapshots a write is checked against before it gives up with CatalogChanged (409)."""


@dataclass(frozen=True)
class EntryView:
    """What `show` tells about a name, or one version of it: the entries and who requires them."""

    name: str
    versions: tuple[CatalogEntry, ...]
    """Oldest registration first."""
    required_by: tuple[tuple[CatalogEntry, Reference], ...]
    """Entries whose references resolve to one of `versions` now, with the reference."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [e.to_dict() for e in self.versions],
            "required_by": [{"id": e.id, "requires": str(ref)} for e, ref in self.required_by],
        }


@dataclass(frozen=True)
class Registered:
    entry: CatalogEntry
    created: bool
    """False when the same entry was registered before (registering is idempotent)."""


class CatalogService:
    def __init__(
        self, store: CatalogStore, clock: Callable[[], float], validator: EntryValidator | None = None
    ) -> None:
        self.store = store
        self.clock = clock
        self.validator = validator if validator is not None else EntryValidator()

    @property
    def schema(self) -> bytes:
        """The JSON Schema registrations are checked with."""
        return self.validator.schema_bytes

    async def register(self, document: Any, by: str) -> Registered:
        """Check `document` and store it as a new entry; ManifestInvalid, UnknownReference,
        DependencyCycle, PlanConflict or CatalogEntryExists (a different entry under its id) if not."""
        entry = self.validator.parse(document)
        for _ in range(WRITE_ATTEMPTS):
            catalog = await self.store.catalog()
            existing = catalog.get(entry.name, entry.version)
            if existing is not None:
                if existing.document() == entry.document():
                    return Registered(existing, created=False)
                raise CatalogEntryExists(
                    f"{entry.id} is already registered with a different image or manifest; "
                    "entries do not change: register a new version"
                )
            check_in_catalog(catalog, entry)
            stamped = replace(entry, registered_at=self.clock(), registered_by=by)
            try:
                await self.store.add_catalog_entry(stamped, catalog.revision)
            except CatalogChanged:
                continue
            return Registered(stamped, created=True)
        raise CatalogChanged(f"the catalog kept changing while {entry.id} was registered; try again")

    async def catalog(self) -> Catalog:
        return await self.store.catalog()

    async def show(self, name: str, version: str | None = None) -> EntryView:
        """Every version of `name`, or one; CatalogEntryNotFound when there is none."""
        catalog = await self.store.catalog()
        if version is None:
            versions = catalog.versions(name)
        else:
            one = catalog.get(name, version)
            versions = () if one is None else (one,)
        if not versions:
            raise CatalogEntryNotFound(f"no catalog entry {name if version is None else f'{name}@{version}'}")
        ids = {e.id for e in versions}
        users = tuple((e, ref) for e, ref in catalog.required_by(name) if _resolves_to(catalog, ref, ids))
        return EntryView(name, versions, users)

    async def remove(self, name: str, version: str | None = None) -> Sequence[CatalogEntry]:
        """Remove one version, or every version of `name`; CatalogEntryInUse naming the entries
        whose references would no longer resolve."""
        what = name if version is None else f"{name}@{version}"
        for _ in range(WRITE_ATTEMPTS):
            catalog = await self.store.catalog()
            if version is None:
                targets: Sequence[CatalogEntry] = catalog.versions(name)
            else:
                one = catalog.get(name, version)
                targets = () if one is None else (one,)
            if not targets:
                raise CatalogEntryNotFound(f"no catalog entry {what}")
            users = catalog.dependents(targets)
            if users:
                names = ", ".join(f"{entry.id} (requires {ref})" for entry, ref in users)
                raise CatalogEntryInUse(f"{what} is required by {names}; remove or re-register those first")
            try:
                await self.store.remove_catalog_entries([t.id for t in targets], catalog.revision)
            except CatalogChanged:
                continue
            return targets
        raise CatalogChanged(f"the catalog kept changing while {what} was removed; try again")

    async def plan(self, name: str, version: str | None = None) -> DeploymentPlan:
        """How `name` (newest, or `version`) would deploy now: levels, teardown, volumes."""
        catalog = await self.store.catalog()
        try:
            catalog.resolve(Reference(name, version))
        except UnknownReference as exc:  # the root itself: not found; a dependency missing stays a 400
            raise CatalogEntryNotFound(exc.message) from None
        return plan(catalog, name, version)


def _resolves_to(catalog: Catalog, ref: Reference, ids: set[str]) -> bool:
    try:
        return catalog.resolve(ref).id in ids
    except UnknownReference:  # none is stored (registration and removal keep references whole)
        return False
