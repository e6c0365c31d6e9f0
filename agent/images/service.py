"""The image service the API calls: pull, list, remove.

Concurrent pulls of one reference are one pull: the first starts it, the others wait for it and
show its progress, and all get its result or its error (six at once used to fight over containerd's
ingest locks, five failing with "ref locked").
"""

from __future__ import annotations

from agent.config import PullConfig
from agent.containerd import Containerd
from agent.errors import ContainerdNotFound, ImageNotFound
from agent.images.local import read_image
from agent.images.pull import Puller
from agent.metrics import AgentMetrics
from agent.model import ImageSummary, PullProgress
from agent.oci import Platform, Reference
from agent.registry.client import RegistryClient
from core.errors import InvalidRequest
from core.singleflight import SingleFlight


class ImageService:
    def __init__(self, cd: Containerd, registry: RegistryClient, config: PullConfig, metrics: AgentMetrics) -> None:
        self._cd = cd
        self._config = config
        self._puller = Puller(cd, registry, config, metrics)
        self._pulls: SingleFlight[Reference, PullProgress, ImageSummary] = SingleFlight(
            "pull", lambda image: PullProgress(ref=str(image))
        )
        self.platform = Platform.parse(config.platform) if config.platform else Platform.host()

    async def pull(self, ref: str, progress: PullProgress | None = None) -> ImageSummary:
        image = Reference.parse(ref)
        # Before any traffic: which hosts this agent connects to is the operator's choice, not the caller's.
        if not self._config.allows_registry(image.host):
            raise InvalidRequest(
                f"registry {image.host} is not allowed on this host ([pull] allowed_registries:"
                f" {', '.join(self._config.allowed_registries)})"
            )
        mine = progress or PullProgress(ref=ref)
        try:
            return await self._pulls.run(image, lambda shared: self._puller.pull(image, shared), joined=mine.follow)
        finally:
            mine.refresh()

    async def list(self) -> list[ImageSummary]:
        out = []
        for record in await self._cd.images.list():
            try:
                size = (await read_image(self._cd, record.name, self.platform)).size
            except (ImageNotFound, ContainerdNotFound):
                size = record.size  # content for another platform, or being collected
            out.append(ImageSummary(name=record.name, digest=record.digest, media_type=record.media_type, size=size))
        return out

    async def layer_digests(self) -> tuple[str, ...]:
        """Every layer this host holds for its platform: placement counts the bytes a target would pull."""
        held: dict[str, None] = {}
        for record in await self._cd.images.list():
            try:
                held.update(dict.fromkeys((await read_image(self._cd, record.name, self.platform)).layers))
            except (ImageNotFound, ContainerdNotFound):
                continue
        return tuple(held)

    async def remove(self, name: str) -> None:
        try:
            await self._cd.images.delete(str(Reference.parse(name)))
        except ContainerdNotFound as exc:
            raise ImageNotFound(f"image {name} is not pulled on this host") from exc
