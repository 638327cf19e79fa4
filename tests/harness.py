"""What the end-to-end tests and the benchmarks (bench/run.py) share: the docker CLI, the small
test image (Debian's busybox-static plus pbtest-echo, imported without a registry), removing
networks, and waiting. The commands, leak guard and outside host are in tests/hostenv.py; a
pybridge in a throwaway network namespace is tests/privileged/serving.py."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.hostenv import ROOT, run

ECHO_SOURCE = Path(__file__).parent / "e2e" / "image" / "pbtest-echo.c"
IMAGE = "pybridge-test/busybox:" + hashlib.sha256(ECHO_SOURCE.read_bytes()).hexdigest()[:12]


def build_image() -> None:
    """busybox (Debian's busybox-static) plus pbtest-echo, imported as IMAGE. The tag carries
    a hash of what goes in, so a changed helper means a new image."""
    if run(["docker", "image", "inspect", IMAGE], check=False).returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        write_image_tar(tar)
        imported = run(["docker", "import", "-c", 'CMD ["sh"]', str(tar), IMAGE], check=False)
        assert imported.returncode == 0, imported.stderr


def write_image_tar(dest: Path) -> None:
    """The test image's root file system as a tar file at ``dest``, for `docker import` into
    any daemon (tests/multihost imports it into each host's dockerd)."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is needed for the test image (apt-get install busybox-static)"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bin", "etc", "tmp", "www"):
            (root / sub).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        applets = run([busybox, "--list"]).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        run(["gcc", "-static", "-O2", "-o", str(root / "bin" / "pbtest-echo"), str(ECHO_SOURCE)])
        (root / "www" / "index.html").write_text("hello from pybridge\n")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        run(["tar", "-C", str(root), "-cf", str(dest), "."])


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    return run(["docker", *args], check=check, timeout=timeout).stdout.strip()


def docker_fails(*args: str, timeout: float = 120) -> str:
    """Run a docker command that must fail; return its error output."""
    result = run(["docker", *args], check=False, timeout=timeout)
    assert result.returncode != 0, f"docker {' '.join(args)} succeeded but should have failed"
    return result.stderr.strip()


def remove_network(name: str) -> None:
    """`docker network rm`, tolerating a dockerd that still counts endpoints of containers just
    removed. dockerd 20.10 can lose count for good under many parallel starts (seen in CI: every
    Leave and DeleteEndpoint answered, no container attached, "has active endpoints" until
    dockerd restarts and recounts)."""

    def removed() -> bool:
        result = run(["docker", "network", "rm", name], check=False)
        return result.returncode == 0 or "No such network" in result.stderr

    if wait_for(removed, timeout=10, interval=0.5):
        return
    attached = docker("network", "inspect", "-f", "{{len .Containers}}", name, check=False)
    if attached == "0":
        run([str(ROOT / "scripts" / "dockerd-service.sh"), "restart"], timeout=180)
        wait_for(removed, timeout=10, interval=0.5)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.2) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds (asked every ``interval``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
