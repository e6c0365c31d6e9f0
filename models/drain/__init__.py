"""The drain predictor: P(a host is drained within the horizon) from its telemetry (see README.md)."""
