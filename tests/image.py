"""The small test image: Debian's busybox-static plus pbtest-echo, imported without a registry.
Shared by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.hostenv import run

ECHO_SOURCE = Path(__file__).parent / "e2e" / "image" / "pbtest-echo.c"
IMAGE = "pybridge-test/busybox:" + hashlib.sha256(ECHO_SOURCE.read_bytes()).hexdigest()[:12]


def build_image() -> None:
    """busybox (Debian's busybox-static) plus pbtest-echo, imported as IMAGE. The tag carries
    a hash of what goes in, so a changed helper means a new image."""
    if run(["docker", "image", "inspect", IMAGE], check=False).returncode == 0:
        return
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
        tar_proc = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-c", 'CMD ["sh"]', "-", IMAGE],
            stdin=tar_proc.stdout,
            capture_output=True,
            timeout=120,
            check=False,
        )
        tar_proc.wait()
        assert imported.returncode == 0, imported.stderr
