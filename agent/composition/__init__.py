"""Composition manifests: a DAG of layers from any images, assembled on this host into one image.

`manifest.py` parses and validates (pure), `priority.py` orders the fetches (pure), `image.py`
writes the result's config and manifest (pure), `service.py` drives containerd and the pull's blob
path, `costs.py` measures fetches and assembly. docs/composition.md describes the format.
"""
