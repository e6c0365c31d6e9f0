"""The coordinator's store on etcd, for fleets that run several coordinator replicas.

`kv.py` is the adapter: the only module that imports aetcd and gRPC, with a narrow interface (get,
range, a guarded transaction) in our own types and etcd's errors translated to ours. `store.py`
keeps the coordinator's records in etcd keys through it and makes reservations atomic with
compare-revision transactions. Telemetry time series stay out of etcd (per-replica memory).
"""
