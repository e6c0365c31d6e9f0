"""Image pulls: registry -> containerd content store -> unpacked snapshots -> image record."""
