"""agent.runtime.spec: the rules, then the proof that runc 1.1 accepts and applies what it generates."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.model import CreateRequest, Resources
from agent.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH_ENV,
    build_spec,
    merge_env,
    resolve_user,
)
from core.errors import InvalidRequest
from tests.conftest import require, require_root
from tests.harness.containerd import cgroup_controller_dirs, remove_cgroup
from tests.harness.images import GROUP, PASSWD, busybox_layer, etc_layer


def image(**config: Any) -> dict[str, Any]:
    """A minimal OCI image config JSON with `config` set to the given fields."""
    return {"architecture": "amd64", "os": "linux", "config": config, "rootfs": {"type": "layers", "diff_ids": []}}


def req(**kw: Any) -> CreateRequest:
    kw.setdefault("id", "c1")
    kw.setdefault("image", "127.0.0.1:5000/app:v1")
    return CreateRequest(**kw)


BASE = image(Entrypoint=["/bin/app"], Cmd=["--serve"], Env=["PATH=/bin", "A=1"], WorkingDir="/srv")


# ----- defaults ----------------------------------------------------------------------------------------


def test_defaults_match_containerd() -> None:
    spec = build_spec(image(Cmd=["/bin/sh"]), req())
    assert spec["ociVersion"] == "1.0.2-dev"
    assert spec["root"] == {"path": "rootfs"}
    assert spec["hostname"] == "c1"
    proc = spec["process"]
    assert proc["terminal"] is False
    assert proc["cwd"] == "/"
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["noNewPrivileges"] is True
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    for kind in ("bounding", "effective", "permitted"):
        assert proc["capabilities"][kind] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPABILITIES and len(DEFAULT_CAPABILITIES) == 14
    assert [m["destination"] for m in spec["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/run"
    ]  # fmt: skip
    sysfs = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert sysfs["type"] == "sysfs" and "ro" in sysfs["options"]
    assert next(m for m in spec["mounts"] if m["destination"] == "/dev")["type"] == "tmpfs"
    linux = spec["linux"]
    assert [ns["type"] for ns in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert linux["cgroupsPath"] == "/ferryman/c1"
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert "/proc/kcore" in linux["maskedPaths"] and "/sys/firmware" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"] and "/proc/sysrq-trigger" in linux["readonlyPaths"]
    assert "annotations" not in spec
    assert json.loads(json.dumps(spec)) == spec  # plain JSON, ready for containerd's Any


def test_matches_ctr_oci_spec_output() -> None:
    """Byte-for-byte the same defaults as containerd's own `ctr oci spec` (process args/env aside)."""
    ctr = require("ctr")
    theirs = json.loads(subprocess.run([ctr, "oci", "spec"], capture_output=True, check=True, text=True).stdout)
    ours = build_spec(image(Cmd=["/bin/sh"]), req(), cgroups_path="/default")
    for key in ("root", "mounts"):  # ociVersion follows the containerd release, not the defaults
        assert ours[key] == theirs[key], key
    assert ours["linux"] == theirs["linux"]
    for key in ("user", "cwd", "capabilities", "rlimits", "noNewPrivileges"):
        assert ours["process"][key] == theirs["process"][key], key


def test_spec_is_a_fresh_copy() -> None:
    a = build_spec(BASE, req())
    a["mounts"][0]["options"].append("mutated")
    a["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    b = build_spec(BASE, req())
    assert "mutated" not in b["mounts"][0]["options"]
    assert "CAP_SYS_ADMIN" not in b["process"]["capabilities"]["bounding"]


def test_cgroups_path_parameter() -> None:
    assert build_spec(BASE, req(), cgroups_path="/ferryman/x/c1")["linux"]["cgroupsPath"] == "/ferryman/x/c1"
    systemd = "system.slice:ferryman:c1"
    assert build_spec(BASE, req(), cgroups_path=systemd)["linux"]["cgroupsPath"] == systemd
    with pytest.raises(InvalidRequest):
        build_spec(BASE, req(), cgroups_path="relative/path")


def test_hostname_is_the_id() -> None:
    assert build_spec(BASE, req(id="web-1.prod"))["hostname"] == "web-1.prod"
    with pytest.raises(InvalidRequest):
        build_spec(BASE, req(id="x" * 65))


# ----- args, env, cwd ----------------------------------------------------------------------------------


def test_args_from_entrypoint_and_cmd() -> None:
    assert build_spec(BASE, req())["process"]["args"] == ["/bin/app", "--serve"]
    assert build_spec(image(Entrypoint=["/bin/app"]), req())["process"]["args"] == ["/bin/app"]
    assert build_spec(image(Cmd=["/bin/sh", "-c", "x"]), req())["process"]["args"] == ["/bin/sh", "-c", "x"]


def test_request_args_replace_entrypoint_and_cmd() -> None:
    assert build_spec(BASE, req(args=("/bin/sh", "-c", "echo hi")))["process"]["args"] == [
        "/bin/sh",
        "-c",
        "echo hi",
    ]


@pytest.mark.parametrize(
    ("config", "args"),
    [({}, None), ({"Cmd": []}, None), (BASE["config"], ()), (BASE["config"], ("",))],
)
def test_no_command_is_invalid(config: dict[str, Any], args: tuple[str, ...] | None) -> None:
    with pytest.raises(InvalidRequest):
        build_spec(image(**config), req(args=args))


def test_null_config_section() -> None:
    spec = build_spec({"architecture": "amd64", "os": "linux", "config": None}, req(args=("/bin/true",)))
    assert spec["process"]["env"] == [DEFAULT_PATH_ENV]
    assert spec["process"]["cwd"] == "/"


def test_malformed_image_config() -> None:
    with pytest.raises(InvalidRequest):
        build_spec(image(Cmd="/bin/sh"), req())
    with pytest.raises(InvalidRequest):
        build_spec(image(Cmd=["/bin/sh"], Env=[1]), req())


def test_env_merge_by_key() -> None:
    env = build_spec(BASE, req(env={"A": "2", "B": "3"}))["process"]["env"]
    assert env == ["PATH=/bin", "A=2", "B=3"]  # image order kept, override in place, new keys appended


def test_env_default_path_first() -> None:
    assert merge_env(["A=1"], {}) == [DEFAULT_PATH_ENV, "A=1"]
    assert merge_env([], {"PATH": "/opt/bin"}) == ["PATH=/opt/bin"]
    assert merge_env(["A=1", "A=2"], {}) == [DEFAULT_PATH_ENV, "A=2"]
    assert merge_env(["A=x=y"], {"B": ""}) == [DEFAULT_PATH_ENV, "A=x=y", "B="]


@pytest.mark.parametrize("key", ["", "A=B", "A\0"])
def test_env_bad_key(key: str) -> None:
    with pytest.raises(InvalidRequest):
        merge_env([], {key: "v"})


def test_cwd() -> None:
    assert build_spec(BASE, req())["process"]["cwd"] == "/srv"
    assert build_spec(BASE, req(workdir="/tmp/w/"))["process"]["cwd"] == "/tmp/w"
    assert build_spec(image(Cmd=["x"], WorkingDir="app"), req())["process"]["cwd"] == "/app"
    with pytest.raises(InvalidRequest):
        build_spec(BASE, req(workdir="relative"))


def test_labels_become_annotations() -> None:
    spec = build_spec(BASE, req(labels={"team": "core", "tier": "web"}))
    assert spec["annotations"] == {"team": "core", "tier": "web"}


# ----- resources ---------------------------------------------------------------------------------------


def test_resources() -> None:
    res = build_spec(BASE, req(resources=Resources(cpus=1.5, memory=64 << 20)))["linux"]["resources"]
    assert res["cpu"] == {"quota": 150_000, "period": 100_000}
    assert res["memory"] == {"limit": 64 << 20}
    assert res["devices"] == [{"allow": False, "access": "rwm"}]
    tiny = build_spec(BASE, req(resources=Resources(cpus=0.001)))["linux"]["resources"]
    assert tiny["cpu"]["quota"] == 1_000 and "memory" not in tiny


@pytest.mark.parametrize(
    "resources",
    [Resources(cpus=0), Resources(cpus=-1), Resources(cpus=float("nan")), Resources(memory=1024), Resources(memory=0)],
)
def test_bad_resources(resources: Resources) -> None:
    with pytest.raises(InvalidRequest):
        build_spec(BASE, req(resources=resources))


# ----- users -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (0, 0, [])),
        ("0", (0, 0, [])),
        ("root", (0, 0, [])),
        ("1000", (1000, 1000, [50])),  # gid and groups from the passwd entry
        ("4242", (4242, 0, [])),  # numeric uid without an entry: gid 0, like containerd
        ("app", (1000, 1000, [50])),
        ("app:staff", (1000, 50, [])),  # an explicit group replaces the supplementary ones
        ("app:0", (1000, 0, [])),
        ("1000:65534", (1000, 65534, [])),
        ("nobody", (65534, 65534, [])),
        ("4242:nogroup", (4242, 65534, [])),
    ],
)
def test_resolve_user(user: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(user, PASSWD, GROUP) == expected


def test_numeric_user_needs_no_files() -> None:
    assert resolve_user("1000:1000") == (1000, 1000, [])
    assert resolve_user("1000") == (1000, 0, [])


@pytest.mark.parametrize(
    ("user", "passwd", "group"),
    [
        ("ghost", PASSWD, GROUP),  # unknown user
        ("app", None, GROUP),  # a name with no /etc/passwd
        ("app:ghosts", PASSWD, GROUP),  # unknown group
        ("app:staff", PASSWD, None),  # a group name with no /etc/group
        ("app:", PASSWD, GROUP),
        (":50", PASSWD, GROUP),
        ("4294967295", None, None),  # (uid_t)-1 is not a user
    ],
)
def test_resolve_user_errors(user: str, passwd: str | None, group: str | None) -> None:
    with pytest.raises(InvalidRequest):
        resolve_user(user, passwd, group)


def test_user_from_image_and_request() -> None:
    img = image(Cmd=["/bin/sh"], User="nobody")
    assert build_spec(img, req(), passwd=PASSWD, group=GROUP)["process"]["user"] == {"uid": 65534, "gid": 65534}
    user = build_spec(img, req(user="app"), passwd=PASSWD, group=GROUP)["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [50]}
    with pytest.raises(InvalidRequest):
        build_spec(img, req(user="ghost"), passwd=PASSWD, group=GROUP)


def test_passwd_parsing_tolerates_junk() -> None:
    passwd = "# comment\n\nbroken line\nx:x:notanumber:0::/:/bin/sh\napp:x:7:8:app:/:/bin/sh\n"
    assert resolve_user("app", passwd, "grp:x:9:app\nshort:x:10\n") == (7, 8, [9])


# ----- runc accepts and applies the spec ---------------------------------------------------------------


def _cgroup_file(cgroup: str, v1_name: str, v2_name: str) -> str:
    """A limit file of `cgroup` on cgroup v1 (its controller's hierarchy) or v2 (the unified one)."""
    for d in cgroup_controller_dirs(cgroup):
        for name in (v1_name, v2_name):
            if (d / name).exists():
                return (d / name).read_text().strip()
    raise AssertionError(f"no {v1_name}/{v2_name} for {cgroup}")


def _runc(runc: str, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([runc, "--root", str(state), *args], capture_output=True, text=True, timeout=60)


# Capability numbers from linux/capability.h, to check what runc actually grants.
CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31,
}  # fmt: skip


class RuncBundle:
    """A bundle with a busybox + /etc rootfs, run by runc directly with its own state dir."""

    def __init__(self, workdir: Path) -> None:
        require_root()
        self.runc = require("runc")
        require("busybox")
        self.workdir = workdir
        self.bundle = workdir / "bundle"
        self.state = workdir / "runc-state"
        self.parent = f"/ferryman-spec-{secrets.token_hex(4)}"  # removed by close()
        self.ids: list[str] = []
        rootfs = self.bundle / "rootfs"
        rootfs.mkdir(parents=True)
        for layer in (busybox_layer(compression="none"), etc_layer()):
            with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
                tar.extractall(rootfs, filter="fully_trusted")  # our own layers: trusted

    def runc_cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.runc, "--root", str(self.state), *args], capture_output=True, text=True, timeout=60)

    def create(self, spec: dict[str, Any]) -> Path:
        """`runc create` with `spec`; returns the file collecting the container's stdout."""
        cid = spec["hostname"]
        (self.bundle / "config.json").write_text(json.dumps(spec))
        out_path, err_path = self.workdir / f"{cid}.out", self.workdir / f"{cid}.err"
        self.ids.append(cid)
        with out_path.open("w") as out, err_path.open("w") as err:
            # Files, not pipes: the container keeps runc's stdio open after `runc create` returns.
            created = subprocess.run(
                [self.runc, "--root", str(self.state), "create", "--bundle", str(self.bundle), cid],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60, check=False,
            )  # fmt: skip
        assert created.returncode == 0, err_path.read_text()
        return out_path

    def start_and_wait(self, cid: str, out_path: Path) -> list[str]:
        assert self.runc_cmd("start", cid).returncode == 0
        deadline = time.monotonic() + 30
        while json.loads(self.runc_cmd("state", cid).stdout)["status"] != "stopped":
            assert time.monotonic() < deadline, "container did not finish"
            time.sleep(0.05)
        return out_path.read_text().splitlines()

    def close(self) -> None:
        for cid in self.ids:
            self.runc_cmd("delete", "--force", cid)
        remove_cgroup(self.parent)


@pytest.fixture
def runc_bundle(workdir: Path) -> Iterator[RuncBundle]:
    bundle = RuncBundle(workdir)
    try:
        yield bundle
    finally:
        bundle.close()


def test_runc_runs_the_spec_as_user(runc_bundle: RuncBundle) -> None:
    cid = f"spec-{secrets.token_hex(4)}"
    script = (
        "id -u; id -g; id -G; pwd; hostname; echo $GREETING; echo $PATH; "
        "grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; ls /dev/shm /dev/mqueue >/dev/null && echo mounts ok"
    )
    spec = build_spec(
        image(Env=["GREETING=image"], WorkingDir="/home/app", User="app", Cmd=["/bin/false"]),
        req(id=cid, args=("/bin/sh", "-c", script), env={"GREETING": "hello"},
            resources=Resources(cpus=0.5, memory=32 << 20)),
        cgroups_path=f"{runc_bundle.parent}/{cid}",
        passwd=PASSWD,
        group=GROUP,
    )  # fmt: skip
    out = runc_bundle.create(spec)
    cgroup = f"{runc_bundle.parent}/{cid}"
    assert _cgroup_file(cgroup, "cpu.cfs_quota_us", "cpu.max").split()[0] == "50000"
    assert _cgroup_file(cgroup, "memory.limit_in_bytes", "memory.max") == str(32 << 20)
    lines = runc_bundle.start_and_wait(cid, out)
    assert lines[:7] == ["1000", "1000", "1000 50", "/home/app", cid, "hello", DEFAULT_PATH_ENV[5:]]
    # A non-root user keeps no effective capabilities (none are ambient).
    assert lines[7] == "CapEff:\t0000000000000000"
    assert lines[8] == "NoNewPrivs:\t1"
    assert lines[9] == "mounts ok"


def test_runc_runs_the_spec_as_root(runc_bundle: RuncBundle) -> None:
    cid = f"spec-{secrets.token_hex(4)}"
    script = (
        "id -u; grep '^CapEff' /proc/self/status; ulimit -n; "
        "touch /sys/x 2>/dev/null || echo sys ro; cat /proc/kcore | wc -c"
    )
    spec = build_spec(
        image(Entrypoint=["/bin/sh", "-c"], Cmd=[script]), req(id=cid), cgroups_path=f"{runc_bundle.parent}/{cid}"
    )
    lines = runc_bundle.start_and_wait(cid, runc_bundle.create(spec))
    mask = sum(1 << CAP_NUMBERS[cap] for cap in DEFAULT_CAPABILITIES)
    assert lines == ["0", f"CapEff:\t{mask:016x}", "1024", "sys ro", "0"]  # /proc/kcore masked: empty
