"""Container runtime side of the agent: OCI runtime specs, rootfs access and the container service.

Submodules are imported directly (`agent.runtime.spec`, `agent.runtime.service`); nothing is re-exported
here so importing the pure spec code does not pull in the containerd client.
"""
