"""Deployments: a catalog image and everything it requires, started in dependency order.

`plan` is the pure planner (levels, teardown order, shared volumes, the wiring environment).
See docs/deployments.md.
"""
