"""The layer predictor: P(a host needs a layer within the horizon) from its recent starts (see README.md)."""
