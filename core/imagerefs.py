"""How an image reference splits: `name[:tag][@digest]`, the name's last `:` after its last `/`
being the tag's (a registry's port comes before a `/`). Shared by the agent's full parser
(agent/oci.py `Reference`, which validates each part) and the coordinator, which only needs a
reference's repository to tell releases of one image apart (coordinator/warm_features.py)."""

from __future__ import annotations


def split_reference(text: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of `text`, unvalidated; tag and digest None when absent."""
    name, digest = text, None
    if "@" in text:
        name, digest = text.split("@", 1)
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    return name, tag, digest
