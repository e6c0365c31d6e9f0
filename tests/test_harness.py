"""The harness is real: images built here run in a real containerd, and teardown leaves nothing behind."""

from __future__ import annotations

import gzip
import io
import json
import secrets
import subprocess
import tarfile
from pathlib import Path

import aiohttp
import pytest

from agent.oci import (
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_MANIFEST_LIST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    chain_ids,
    sha256_digest,
)
from tests.conftest import require
from tests.harness.containerd import PrivateContainerd, cgroup_controller_dirs, mounts_under
from tests.harness.images import (
    TEST_ABSENT,
    TEST_FILES,
    TEST_KEEP,
    File,
    ImageBuilder,
    Layer,
    OpaqueWhiteout,
    RawEntry,
    Symlink,
    Whiteout,
    build_index,
    build_test_image,
    busybox_layer,
    random_layer,
    symlink_escape_layers,
    traversal_layer,
)
from tests.harness.registry import DockerRegistry
from tests.harness.tls import CertAuthority
from tests.harness.tokenserver import TokenServer


def unique(prefix: str) -> str:
    # Container ids double as cgroup names and shim socket keys: unique per run keeps helpers apart.
    return f"{prefix}-{secrets.token_hex(4)}"


def run(ctrd: PrivateContainerd, ref: str, *cmd: str) -> str:
    cid = unique("t")
    return ctrd.ctr("run", "--rm", *ctrd.run_flags(cid), ref, cid, *cmd).stdout


# ----- the builder on its own --------------------------------------------------------------------------


def test_layer_digests_and_entries() -> None:
    layer = Layer(
        [
            File("a/b.txt", b"hello", 0o600),
            Symlink("a/link", "/etc/passwd"),
            Whiteout("a/old"),
            OpaqueWhiteout("c"),
            RawEntry("../evil", data=b"x"),
        ]
    )
    assert layer.diff_id == sha256_digest(gzip.decompress(layer.blob))
    assert layer.digest == sha256_digest(layer.blob)
    assert layer.names() == ["a/b.txt", "a/link", "a/.wh.old", "c/.wh..wh..opq", "../evil"]
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
        assert tar.getmember("a/b.txt").mode == 0o600
        assert tar.getmember("a/link").linkname == "/etc/passwd"
    # Deterministic: the same entries give the same blob, so pushes are idempotent.
    assert Layer(layer.entries).digest == layer.digest
    plain = Layer(layer.entries, compression="none")
    assert plain.digest == plain.diff_id == layer.diff_id


def test_builder_config_and_manifest() -> None:
    image = build_test_image().build()
    config = image.config_json
    manifest = json.loads(image.manifest)
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["config"]["WorkingDir"] == "/data"
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    assert len(config["history"]) == len(image.layers)
    assert manifest["mediaType"] == MEDIA_OCI_MANIFEST
    assert manifest["config"]["digest"] == sha256_digest(image.config)
    assert [entry["digest"] for entry in manifest["layers"]] == [layer.digest for layer in image.layers]
    docker = build_test_image(docker=True).build()
    assert json.loads(docker.manifest)["mediaType"] == MEDIA_DOCKER_MANIFEST


def test_random_layer_is_incompressible_and_seeded() -> None:
    a = random_layer(300_000, seed=1, file_size=100_000)
    assert len([n for n in a.names() if "/f" in n]) == 3
    assert a.size > 300_000  # gzip gains nothing on random data
    assert random_layer(300_000, seed=1, file_size=100_000).digest == a.digest
    assert random_layer(300_000, seed=2, file_size=100_000).digest != a.digest


# ----- against the real registry and containerd --------------------------------------------------------


async def test_push_is_visible_in_registry(registry: DockerRegistry) -> None:
    builder = build_test_image()
    digest = await builder.push(registry.url, "harness/visible", "v1")
    again = await builder.push(registry.host, "harness/visible", "v1")  # HEAD skips existing blobs
    assert digest == again == builder.build().digest
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{registry.url}/v2/harness/visible/manifests/v1", headers={"Accept": MEDIA_OCI_MANIFEST}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == digest


async def test_push_with_token_auth_over_tls(workdir: Path) -> None:
    ca = CertAuthority(workdir / "ca")
    tokens = TokenServer(signer=ca.issue_signing(), users={"ops": "s3cret"})
    await tokens.start()
    reg = DockerRegistry(workdir / "reg", tls=ca.issue_server(), token=tokens)
    try:
        await reg.start()
        image = build_test_image().build()
        with pytest.raises(RuntimeError, match="credentials"):
            await image.push(reg.url, "harness/locked", "v1", ssl_context=ca.client_context())
        digest = await image.push(
            reg.url, "harness/locked", "v1", auth=("ops", "s3cret"), ssl_context=ca.client_context()
        )
        assert digest == image.digest
        assert any(r.account == "ops" and r.status == 200 for r in tokens.requests)
    finally:
        await reg.stop()
        await tokens.stop()


async def test_push_with_basic_auth(workdir: Path) -> None:
    reg = DockerRegistry(workdir / "reg", htpasswd={"ops": "s3cret"})
    try:
        await reg.start()
        image = ImageBuilder([Layer([File("x", b"x")])], cmd=["/x"]).build()
        with pytest.raises(RuntimeError, match="still unauthorized"):
            await image.push(reg.host, "harness/basic", "v1", auth=("ops", "wrong"))
        assert await image.push(reg.host, "harness/basic", "v1", auth=("ops", "s3cret")) == image.digest
    finally:
        await reg.stop()


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-schema2"])
async def test_pull_and_run_multilayer_image(
    registry: DockerRegistry, containerd: PrivateContainerd, docker: bool
) -> None:
    repo = unique("harness/multi")
    builder = build_test_image(docker=docker)
    digest = await builder.push(registry.url, repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    await containerd.actr("images", "pull", "--plain-http", ref)

    listing = containerd.ctr("images", "ls").stdout
    assert digest in listing

    # The snapshot chain containerd built is keyed by our diff_ids.
    snapshots = containerd.ctr("snapshots", "ls").stdout
    for chain_id in chain_ids([layer.diff_id for layer in builder.layers]):
        assert chain_id in snapshots

    out = run(containerd, ref, "/bin/sh", "-c", "ls /; echo ==; cat /data/keep; echo ==; ls -a /data /data/dir")
    root_listing, keep, data_listing = out.split("==\n")
    assert {"bin", "data", "etc", "tmp"} <= set(root_listing.split())
    assert keep.encode() == TEST_KEEP
    names = set(data_listing.split())
    assert {"keep", "added", "hardlink", "new"} <= names
    assert "gone" not in names and "old" not in names
    assert not any(n.startswith(".wh.") for n in names)

    script = "; ".join(
        [f"cat {path}" for path in TEST_FILES]
        + [f"test -e {path} && echo present {path}" for path in TEST_ABSENT]
        + ["stat -c %h /data/keep", "pwd", "echo $FERRYMAN_TEST"]
    )
    out = run(containerd, ref, "/bin/sh", "-c", script)
    # Explicit args replace Cmd only: the image's WorkingDir and Env still apply.
    assert out == b"".join(TEST_FILES.values()).decode() + "2\n/data\n1\n"
    assert "present" not in out
    containerd.ctr("images", "rm", ref)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
async def test_index_pulls_host_platform(registry: DockerRegistry, containerd: PrivateContainerd, docker: bool) -> None:
    repo = unique("harness/index")
    amd64 = build_test_image(extra_layers=[Layer([File("arch", b"amd64\n")])], docker=docker)
    arm64 = ImageBuilder(
        [busybox_layer(), Layer([File("arch", b"arm64\n")])], architecture="arm64", variant="v8", docker=docker
    )
    index = build_index([amd64, arm64], docker=docker)
    digest = await index.push(registry.url, repo, "multi")
    index_json = json.loads(index.manifest)
    assert index_json["mediaType"] == (MEDIA_DOCKER_MANIFEST_LIST if docker else MEDIA_OCI_INDEX)
    assert [m["platform"] for m in index_json["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    ref = f"{registry.host}/{repo}:multi"
    await containerd.actr("images", "pull", "--plain-http", ref)

    assert digest in containerd.ctr("images", "ls").stdout
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert index.image_for("linux", "amd64").digest in content
    # Only the host platform's layers came down: arm64's own layer and config are absent.
    arm = index.image_for("linux", "arm64")
    assert arm.layers[1].digest not in content
    assert arm.config_digest not in content
    assert run(containerd, ref, "cat", "/arch") == "amd64\n"
    containerd.ctr("images", "rm", ref)


def escaped_payloads(ctrd: PrivateContainerd, outside: Path, evil: str) -> list[Path]:
    """Payload files that landed outside a rootfs: in `outside`, in /, or beside a snapshot's fs dir."""
    hits = [*outside.iterdir(), *Path("/").glob(f"{evil}*")]
    # Inside containerd's root a payload may only sit at the top of a snapshot's fs dir (its rootfs).
    hits += [hit for hit in ctrd.workdir.rglob(f"{evil}*") if hit.parent.name != "fs"]
    return hits


async def test_malicious_layers_stay_inside(
    registry: DockerRegistry, containerd: PrivateContainerd, tmp_path: Path
) -> None:
    outside = tmp_path / unique("outside")
    outside.mkdir()
    evil = unique("ferryman-evil")
    builder = build_test_image(extra_layers=[*symlink_escape_layers(outside), traversal_layer(evil)])
    repo = unique("harness/evil")
    await builder.push(registry.url, repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    # containerd's own unpacker scopes every path to the rootfs: whether it errors or not, the host
    # must be untouched. That proves the helpers build what they claim, not that containerd is safe.
    res = await containerd.actr("images", "pull", "--plain-http", ref, check=False)
    assert escaped_payloads(containerd, outside, evil) == []
    if res.returncode == 0:
        # The payloads exist, inside the rootfs (where exactly depends on containerd's overlay applier,
        # which writes into the upper dir and so replaces the lower `escape` symlink with a directory).
        found = run(containerd, ref, "/bin/sh", "-c", f"find / -xdev -name 'pwned*' -o -xdev -name '{evil}*'")
        assert "pwned" in found and "pwned-2" in found
        assert f"/{evil}\n" in found and f"/{evil}-2\n" in found and f"/{evil}-abs\n" in found
        containerd.ctr("images", "rm", ref)


# ----- teardown ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash", [True, False], ids=["daemon-killed", "daemon-alive"])
async def test_stop_leaves_nothing(registry: DockerRegistry, workdir: Path, crash: bool) -> None:
    repo = unique("harness/stop")
    await build_test_image().push(registry.url, repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    ctrd = PrivateContainerd(workdir / "c")
    try:
        await ctrd.start()
        await ctrd.actr("images", "pull", "--plain-http", ref)
        cids = [unique("sleeper") for _ in range(2)]
        await ctrd.actr("run", "-d", *ctrd.run_flags(cids[0]), ref, cids[0], "sleep", "1000")
        # Like a container the agent creates: cgroup /<namespace>/<id>, outside the instance's parent.
        own_flags = ["--runc-root", str(ctrd.runc_root), "--fifo-dir", str(ctrd.fifo_dir)]
        await ctrd.actr("run", "-d", *own_flags, ref, cids[1], "sleep", "1000")
        outside_cgroup = f"/{ctrd.namespace}/{cids[1]}"
        assert any(d.is_dir() for d in cgroup_controller_dirs(outside_cgroup))
        shims = ctrd.shim_pids()
        assert shims, "a running task must have a shim"
        # stop() removes the sockets of shims it kills: make sure we compute their names right.
        assert all(ctrd._shim_socket(ctrd.namespace, cid).exists() for cid in cids)
        # The runc state went to this instance's runc root, not the shared /run/containerd/runc.
        assert {p.name for p in (ctrd.runc_root / ctrd.namespace).iterdir()} == set(cids)
        assert mounts_under(ctrd.workdir), "a running task has its rootfs mounted"
        task_pids = [int(line.split()[1]) for line in ctrd.ctr("tasks", "ls").stdout.splitlines()[1:]]
        assert len(task_pids) == 2
        if crash:
            # A crashed daemon: stop() must still find the shims and tasks it left orphaned.
            assert ctrd.proc is not None
            ctrd.proc.kill()
    finally:
        await ctrd.stop()
    await ctrd.stop()  # idempotent

    assert_nothing_left(ctrd, [*shims, *task_pids], cids)
    assert not any(d.exists() for d in cgroup_controller_dirs(outside_cgroup))


def _alive(pid: int) -> bool:
    """True for a live process; a zombie (already dead, waiting for init to reap it) counts as gone."""
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def assert_nothing_left(ctrd: PrivateContainerd, pids: list[int], cids: list[str]) -> None:
    assert mounts_under(ctrd.workdir) == []
    assert ctrd.shim_pids() == []
    assert [pid for pid in pids if _alive(pid)] == []
    for d in (ctrd.root, ctrd.state, ctrd.tmpdir):
        assert not d.exists()
    assert not any(d.exists() for d in cgroup_controller_dirs(ctrd.cgroup_parent))
    assert not Path(ctrd.socket).exists()
    for cid in cids:
        assert not ctrd._shim_socket(ctrd.namespace, cid).exists()


async def test_stop_before_start_and_after_failed_start(workdir: Path) -> None:
    ctrd = PrivateContainerd(workdir / "never")
    await ctrd.stop()
    broken = PrivateContainerd(workdir / "broken")
    broken.config_text = lambda: "version = 2\nthis is not toml ]["  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="exited early"):
        await broken.start(within=10)
    assert broken.proc is None
    assert not broken.root.exists()


def test_missing_prerequisite_is_an_error() -> None:
    # pytest.fail, never pytest.skip: a green run must mean the real components ran.
    with pytest.raises(pytest.fail.Exception, match="prerequisite ferryman-no-such-tool missing"):
        require("ferryman-no-such-tool")


def test_ctr_failure_carries_stderr(containerd: PrivateContainerd) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        containerd.ctr("tasks", "kill", "no-such-task")
    assert info.value.stderr or info.value.stdout
