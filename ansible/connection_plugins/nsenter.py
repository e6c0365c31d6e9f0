"""Ansible connection plugin: run tasks inside a host whose PID 1 is a process on this machine.

The fleet tests boot Debian roots with systemd as PID 1 in their own PID, mount, UTS, IPC and
network namespaces (tests/harness/systemd_host.py). This plugin reaches such a host the way ssh
reaches a real one: every command runs in all of its namespaces, chrooted to its root, so a task
sees the host's files, processes, systemd and address, and nothing of the controller. Files move
through a pipe into `cat` inside the host, never through the controller's view of its root.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
name: nsenter
short_description: run tasks in the namespaces and root of a process (a test host's PID 1)
description:
  - Runs every command with C(nsenter --target PID --mount --uts --ipc --net --pid --root --wd)
    on the controller, as root, so that it executes inside the host whose init is PID.
  - Files are copied with C(cat) inside the host, reading from a pipe.
author: ferryman
version_added: "2.19"
options:
  pid:
    description: PID (in the controller's PID namespace) of the host's init.
    type: int
    required: true
    vars:
      - name: ansible_nsenter_pid
  nsenter:
    description: the nsenter binary on the controller.
    type: str
    default: nsenter
    vars:
      - name: ansible_nsenter_executable
"""

display = Display()

BUFSIZE = 1 << 16


class Connection(ConnectionBase):
    """Commands and file copies in the namespaces of `ansible_nsenter_pid`."""

    transport = "nsenter"
    has_pipelining = True
    default_user = "root"

    def _connect(self) -> Connection:
        if not self._connected:
            pid = int(self.get_option("pid"))
            if not Path(f"/proc/{pid}/ns/mnt").exists():
                raise AnsibleConnectionFailure(f"no process {pid} to enter (the host is down)")
            if os.geteuid() != 0:
                raise AnsibleConnectionFailure("the nsenter connection needs root on the controller")
            self._connected = True
        return self

    def _prefix(self) -> list[str]:
        pid = str(int(self.get_option("pid")))
        # --root and --wd: the host's root (its chroot) and cwd, or paths would resolve on the controller.
        return [self.get_option("nsenter"), "-t", pid, "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--"]

    def _run(self, argv: list[str], stdin: bytes | int | None) -> tuple[int, bytes, bytes]:
        display.vvv(f"NSENTER {shlex.join(argv)}", host=self._play_context.remote_addr)
        data = stdin if isinstance(stdin, bytes) else None
        proc = subprocess.Popen(
            [*self._prefix(), *argv],
            stdin=subprocess.PIPE if data is not None else (stdin if stdin is not None else subprocess.DEVNULL),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = proc.communicate(data)
        return proc.returncode, out, err

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        shell = self._play_context.executable or "/bin/sh"
        return self._run([shell, "-c", cmd], in_data if in_data is not None else None)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        self._connect()
        if not Path(in_path).exists():
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with Path(in_path).open("rb") as src:
            rc, _, err = self._run(["/bin/sh", "-c", 'cat >"$1"', "sh", out_path], src.fileno())
        if rc != 0:
            raise AnsibleError(f"failed to write {out_path} in the host: {err.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        self._connect()
        with Path(out_path).open("wb") as dst:
            proc = subprocess.Popen(
                [*self._prefix(), "/bin/cat", "--", in_path], stdout=dst, stderr=subprocess.PIPE
            )
            _, err = proc.communicate()
        if proc.returncode != 0:
            raise AnsibleError(f"failed to read {in_path} in the host: {err.decode(errors='replace')}")

    def close(self) -> None:
        self._connected = False
