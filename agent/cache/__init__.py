"""The per-host layer cache: containerd's content store, bounded by bytes.

There is no second copy of any blob: the content store is the cache. This package decides what to
evict (policy.py, pure), counts where blobs came from (stats.py), and measures the store and deletes
the chosen images (service.py). See docs/cache.md.
"""
