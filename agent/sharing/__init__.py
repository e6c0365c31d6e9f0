"""Blob sharing between fleet agents: each agent serves the blobs it holds (or is still pulling) to
its peers over HTTPS with mutual TLS, and a pull fetches from peers before the registry.

This package is the adapter for that wire: the HTTP server (server.py) and client (client.py), which
own the aiohttp and TLS details, and the pure decisions the pull's peer source takes (striping.py:
which ranges, from which peer, who served bad bytes; throttle.py: the upload rate). What is served
comes from a `BlobStore` the images service implements (agent/images/shared.py); where a pull gets
its blobs is agent/images/peersource.py. See docs/sharing.md for the protocol.
"""
