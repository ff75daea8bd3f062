"""Prometheus metrics: a model replica's (replica.py), the ingress's (ingress.py), every process's
own (process.py), and the hub that gathers every replica's registry for the ingress `/metrics`
(hub.py)."""
