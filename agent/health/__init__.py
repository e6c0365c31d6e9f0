"""Containers' health checks: what is checked (spec.py), what a result means (states.py, a pure
table), running the probes (probing.py) and the monitor that drives them next to each running
container and tells of every change at once (monitor.py). See docs/health.md.
"""
