"""Predictive scaling's pure parts: per-second component series, the correlation engine, the model's
features and loader, and the scaling decisions (predictive and the HPA-like baseline). No I/O here:
the runtime (replicas behind a service address, monitoring) drives them. See docs/scaling.md."""
