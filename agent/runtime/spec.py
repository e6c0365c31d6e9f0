"""OCI runtime spec (config.json) for a container: containerd's `ctr run` defaults + image config + request.

Pure functions, no I/O: /etc/passwd and /etc/group come in as text read from the image by the caller.
The defaults mirror containerd 1.6's `oci.populateDefaultUnixSpec` (what `ctr oci spec` prints), so a
container created by the agent behaves like one created by `ctr run`.
"""

from __future__ import annotations

import copy
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.model import CreateRequest
from core.errors import InvalidRequest

OCI_VERSION = "1.0.2-dev"  # what runc 1.1 reports as its spec version
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000  # µs: the CFS default, so `cpus` maps to quota = cpus * 100 ms
MIN_CPU_QUOTA = 1_000  # µs: the kernel rejects a CFS quota below 1 ms
MIN_MEMORY = 6 * 1024 * 1024  # below this runc init itself may be OOM-killed (Docker's minimum too)
MAX_ID = 0xFFFF_FFFE  # uid/gid 2^32-1 is "no id" to the kernel
HOST_NAME_MAX = 64

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

DEFAULT_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    },
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {
        "destination": "/run",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
)

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)

DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

NAMESPACES: tuple[str, ...] = ("pid", "ipc", "uts", "mount", "network")

_ENV_KEY_RE = re.compile(r"^[^=\0]+$")
_SYSTEMD_CGROUP_RE = re.compile(r"^[^:/]*:[^:/]*:[^:/]+$")


def build_spec(
    image_config: Mapping[str, Any],
    request: CreateRequest,
    *,
    cgroups_path: str | None = None,
    passwd: str | None = None,
    group: str | None = None,
    netns_path: str | None = None,
    volume_mounts: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The runtime spec for `request` on an image whose config JSON is `image_config`.

    `cgroups_path` defaults to `/ferryman/<id>` (cgroupfs driver; `slice:prefix:name` for systemd).
    `passwd`/`group` are the image's /etc/passwd and /etc/group, needed only for user names.
    `netns_path` joins an existing network namespace (a service address's) instead of a new empty one.
    `volume_mounts` are bind mounts of shared volumes (agent/runtime/volumes.py `mounts`).
    Raises InvalidRequest for anything runc would reject later with a less useful message.
    """
    config = _image_section(image_config)
    if not request.id or len(request.id) > HOST_NAME_MAX:
        raise InvalidRequest(f"container id must be 1-{HOST_NAME_MAX} characters to serve as hostname")
    uid, gid, extra_gids = resolve_user(request.user or config.get("User") or "", passwd, group)
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if extra_gids:
        user["additionalGids"] = extra_gids
    process: dict[str, Any] = {
        "terminal": False,
        "user": user,
        "args": process_args(config, request.args),
        "env": merge_env(_str_list(config, "Env"), request.env),
        "cwd": _cwd(request.workdir, config.get("WorkingDir")),
        "capabilities": {key: list(DEFAULT_CAPABILITIES) for key in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs"},
        "hostname": request.id,
        "mounts": copy.deepcopy(list(DEFAULT_MOUNTS)) + [dict(m) for m in volume_mounts],
        "linux": {
            "resources": resources(request.resources.cpus, request.resources.memory),
            "cgroupsPath": _cgroups_path(cgroups_path, request.id),
            "namespaces": [{"type": ns} for ns in NAMESPACES],
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }
    if request.labels:
        spec["annotations"] = {str(k): str(v) for k, v in request.labels.items()}
    if netns_path is not None:
        set_network_namespace(spec, netns_path)
    return spec


def set_network_namespace(spec: dict[str, Any], path: str | None) -> None:
    """Point the spec's network namespace at `path` (None: a new empty one, runc's default).

    In place; for a spec that moves hosts (a migration target joins its own prepared namespace).
    """
    if path is not None and not path.startswith("/"):
        raise InvalidRequest(f"network namespace path must be absolute, got {path!r}")
    namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
    entry: dict[str, Any] = {"type": "network"}
    if path is not None:
        entry["path"] = path
    for i, ns in enumerate(namespaces):
        if ns.get("type") == "network":
            namespaces[i] = entry
            return
    namespaces.append(entry)


def _image_section(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    section = image_config.get("config")
    if section is None:  # Docker writes "config": null for images built FROM scratch with no settings
        return {}
    if not isinstance(section, Mapping):
        raise InvalidRequest("image config: `config` is not an object")
    return section


def _str_list(config: Mapping[str, Any], key: str) -> list[str]:
    value = config.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"image config: {key} must be a list of strings")
    return list(value)


def process_args(config: Mapping[str, Any], args: Sequence[str] | None) -> list[str]:
    """Request args replace Entrypoint+Cmd entirely (like `ctr run image id cmd...`); else Entrypoint+Cmd."""
    out = list(args) if args is not None else _str_list(config, "Entrypoint") + _str_list(config, "Cmd")
    if not out:
        raise InvalidRequest("no command: the image has no Entrypoint or Cmd and the request gives no args")
    if not out[0]:
        raise InvalidRequest("the command must not be empty")
    return out


def merge_env(image_env: Sequence[str], overrides: Mapping[str, str]) -> list[str]:
    """Image env with request values replacing by key (order kept, new keys appended); PATH defaulted."""
    for key in overrides:
        if not _ENV_KEY_RE.match(key):
            raise InvalidRequest(f"invalid environment variable name {key!r}")
    for value in overrides.values():
        if "\0" in value:
            raise InvalidRequest("environment values must not contain NUL")
    keys: list[str] = []
    values: dict[str, str] = {}
    for entry in image_env:
        key = entry.split("=", 1)[0]
        if key not in values:
            keys.append(key)
        values[key] = entry  # a later duplicate wins, as in execve's last-one-seen lookups
    for key, value in overrides.items():
        if key not in values:
            keys.append(key)
        values[key] = f"{key}={value}"
    if "PATH" not in values:
        # containerd's WithDefaultPathEnv puts PATH first, before the image's variables.
        keys.insert(0, "PATH")
        values["PATH"] = DEFAULT_PATH_ENV
    return [values[k] for k in keys]


def _cwd(requested: str | None, image_dir: Any) -> str:
    if requested is not None:
        if not requested.startswith("/"):
            raise InvalidRequest(f"workdir must be an absolute path, got {requested!r}")
        return posixpath.normpath(requested)
    if image_dir is None or image_dir == "":
        return "/"
    if not isinstance(image_dir, str):
        raise InvalidRequest("image config: WorkingDir must be a string")
    # Docker resolves a relative WorkingDir against /; runc would refuse it as is.
    return posixpath.normpath(posixpath.join("/", image_dir))


def _cgroups_path(path: str | None, container_id: str) -> str:
    if path is None:
        return f"/ferryman/{container_id}"
    if path.startswith("/") or _SYSTEMD_CGROUP_RE.match(path):
        return path
    raise InvalidRequest(f"cgroups path must be absolute or slice:prefix:name, got {path!r}")


def resources(cpus: float | None, memory: int | None) -> dict[str, Any]:
    """linux.resources: deny all devices (runc adds its safe defaults back), CPU quota, memory limit."""
    out: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if cpus is not None:
        if not math.isfinite(cpus) or cpus <= 0:
            raise InvalidRequest(f"cpus must be a positive number, got {cpus}")
        out["cpu"] = {"quota": max(MIN_CPU_QUOTA, round(cpus * CPU_PERIOD)), "period": CPU_PERIOD}
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < MIN_MEMORY:
            raise InvalidRequest(f"memory must be an integer of at least {MIN_MEMORY} bytes, got {memory!r}")
        out["memory"] = {"limit": memory}
    return out


# ----- users -----------------------------------------------------------------------------------------


def _parse_db(text: str | None, fields: int) -> list[list[str]]:
    """Lines of an /etc/passwd (7 fields) or /etc/group (4 fields) file; malformed lines are skipped."""
    rows: list[list[str]] = []
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields - 1 and parts[2].isdigit():  # /etc/group may omit the member list
            rows.append(parts + [""] * (fields - len(parts)))
    return rows


def _numeric_id(text: str, what: str) -> int:
    value = int(text)
    if value > MAX_ID:
        raise InvalidRequest(f"{what} {value} out of range")
    return value


def resolve_user(spec: str, passwd: str | None = None, group: str | None = None) -> tuple[int, int, list[int]]:
    """`user`, `uid`, `user:group`, `uid:gid` (any mix) -> (uid, gid, additional gids).

    Like containerd's WithUser: a numeric uid needs no /etc/passwd (gid then comes from its entry if
    there is one, else 0); a name must exist. Supplementary groups come from /etc/group membership.
    """
    spec = spec.strip()
    if not spec:
        return 0, 0, []
    user_part, sep, group_part = spec.partition(":")
    if not user_part or (sep and not group_part):
        raise InvalidRequest(f"invalid user {spec!r}")
    users = _parse_db(passwd, 7)
    groups = _parse_db(group, 4)
    name: str | None = None
    if user_part.isdigit():
        uid = _numeric_id(user_part, "uid")
        entry = next((row for row in users if int(row[2]) == uid), None)
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
        name = entry[0] if entry is not None else None
    else:
        if passwd is None:
            raise InvalidRequest(f"user {user_part!r} cannot be resolved: the image has no /etc/passwd")
        entry = next((row for row in users if row[0] == user_part), None)
        if entry is None:
            raise InvalidRequest(f"unknown user {user_part!r} in the image's /etc/passwd")
        uid = int(entry[2])
        gid = int(entry[3]) if entry[3].isdigit() else 0
        name = entry[0]
    if sep:
        if group_part.isdigit():
            gid = _numeric_id(group_part, "gid")
        else:
            if group is None:
                raise InvalidRequest(f"group {group_part!r} cannot be resolved: the image has no /etc/group")
            g = next((row for row in groups if row[0] == group_part), None)
            if g is None:
                raise InvalidRequest(f"unknown group {group_part!r} in the image's /etc/group")
            gid = int(g[2])
    extra: list[int] = []
    if name is not None and not sep:
        # An explicit group replaces the user's groups (Docker does the same with `-u user:group`).
        for row in groups:
            members = [m for m in row[3].split(",") if m]
            g_id = int(row[2])
            if name in members and g_id != gid and g_id not in extra:
                extra.append(g_id)
    return uid, gid, extra
