"""The chains' narrow storage protocol: one record per chain, written whole on every transition.

Only the chain manager (coordinator/chains/service.py) writes these records, one chain at a time
from the one task driving it, so a put is a plain upsert and the record is the journal a restarted
coordinator resumes from. `sqlite_store.py` implements it (schema version 5), as does the etcd store
(one key per chain).
"""

from __future__ import annotations

from typing import Protocol

from coordinator.chains.states import ChainRecord


class ChainStore(Protocol):
    async def put_chain(self, record: ChainRecord) -> None:
        """Insert or replace the record with its id."""
        ...

    async def get_chain(self, chain_id: str) -> ChainRecord | None: ...

    async def list_chains(self) -> list[ChainRecord]:
        """Every chain, oldest first."""
        ...
