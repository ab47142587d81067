"""The local backend: a real endpoint platform on this machine (one process per workspace).

client (start, status, stop) -> daemon (the process) -> platform (the reconciler), control (its API), gateway
(the data plane), instances, store, metrics, workspace; `LocalBackend` (backend) talks to it over loopback.
"""
