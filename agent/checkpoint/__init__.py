"""Checkpoints: CRIU feature detection, dump images on disk, and the page-level delta between dumps."""
