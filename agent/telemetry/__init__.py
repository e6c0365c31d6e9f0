"""Host telemetry: sampling /proc and the containers, Prometheus export, pushing to the coordinator.

Modules: `procfs` (pure parsers), `host` (reading the kernel files), `containers` (cgroup use and
limits), `events` (notice files, OOM kills, EDAC errors), `capacity`, `sampler` (one sample),
`push` (buffered mTLS pusher), `registration`, `service` (the periodic loop).
"""
