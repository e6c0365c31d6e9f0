"""The shared core of ferryman: what the agent, the coordinator and ferryctl all use.

errors (the error tree), config (typed TOML tables), logs (JSON logging), lifecycle (signals, readiness,
exit codes), tasks (guarded background tasks), files (crash-safe writes), ids (identifier validation),
security (fleet PKI and mutual TLS), http (error middleware, request validation, access log).
The core imports neither `agent` nor `coordinator` (an import contract checks it).
"""
