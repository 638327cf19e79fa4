"""Several Docker hosts on one machine, for issue 16's end-to-end tests (docs/multihost-design.md
section 3).

Host N is a network namespace ``pbmhN`` whose ``eth0`` (203.0.113.N/24) hangs on an underlay
bridge in the namespace ``pbmh-ul``; etcd listens on that bridge (203.0.113.254:2379). Each host
has a long-lived "anchor" process (``sleep infinity``) holding a private mount namespace with
its own tmpfs on /run/docker, /run/containerd and /etc/docker and a sysfs of its own network
namespace; dockerd, pybridge and every command of a test enter the anchor's mount and network
namespaces, so the host's dockerd finds ITS pybridge at /run/docker/plugins/pybridge.sock.
Nothing is reachable beyond the underlay: the namespaces have no link to the machine's uplink.

Everything is named ``pbmh``: netns pbmh-ul and pbmhN, veths pbmhuN, /run/pbmh/hN,
/var/lib/pbmh-N, cgroups pbmh-hN. ``sweep()`` removes whatever an interrupted run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness import IMAGE, write_image_tar
from tests.hostenv import ROOT

PREFIX = "pbmh"
UNDERLAY_NS = "pbmh-ul"
UNDERLAY_BRIDGE = "ul"
UNDERLAY_PREFIX = "203.0.113"  # TEST-NET-3: no route of this machine may overlap it
UNDERLAY_LEN = 24
ETCD_IP = f"{UNDERLAY_PREFIX}.254"
UNDERLAY_MAC = "02:cb:00:71:00:fe"
ETCD_PORT = 2379
ETCD_URL = f"http://{ETCD_IP}:{ETCD_PORT}"
RUN_DIR = Path("/run/pbmh")
LOCK_FILE = "/run/lock/pbmh.lock"  # held by the one cluster of this machine
PLUGIN_SOCKET = "/run/docker/plugins/pybridge.sock"  # inside a host's mount namespace
# In the environment of every process the harness starts, so a sweep finds them all.
MARK = b"PBMH_HOST="
NUL = b"\0"


def marked_env(who: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[MARK.decode().rstrip("=")] = who
    return env


@dataclass(frozen=True)
class Daemon:
    """A dockerd build: its binary and what goes first on its PATH (containerd, shim,
    docker-proxy of the same release)."""

    version: str
    dockerd: Path
    extra_path: tuple[Path, ...] = ()

    def available(self) -> str | None:
        """None when it can run here, else why not."""
        if not os.access(self.dockerd, os.X_OK):
            return f"no dockerd {self.version} at {self.dockerd}"
        return None


def daemon(version: str) -> Daemon:
    """'20.10': Debian bookworm's /usr/sbin/dockerd. '28': Debian sid's docker.io 28.5 with
    containerd 2.1, unpacked by `DOCKERD_VERSION=28 scripts/dockerd-service.sh fetch` into
    DOCKERD28_DIR (default .cache/docker28); it runs with bookworm's runc."""
    if version == "20.10":
        return Daemon(version, Path("/usr/sbin/dockerd"))
    if version == "28":
        root = Path(os.environ.get("DOCKERD28_DIR") or ROOT / ".cache" / "docker28") / "root"
        return Daemon(version, root / "usr/sbin/dockerd", (root / "usr/sbin", root / "usr/bin"))
    raise ValueError(f"unknown dockerd version {version!r}: use 20.10 or 28")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _ns_inode(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _netns_inode(name: str) -> str | None:
    try:
        return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _kill9(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


class Underlay:
    """The namespace ``pbmh-ul`` with the bridge every host's eth0 hangs on."""

    def __init__(self) -> None:
        self.ns = UNDERLAY_NS

    def create(self) -> None:
        run(["ip", "netns", "add", self.ns])
        for argv in (
            ["link", "set", "lo", "up"],
            # A fixed MAC: a bridge without one takes its lowest port's, so a host rebooted
            # (its veth added again with a new MAC) could change the MAC behind etcd's address
            # under the other hosts' neighbour entries (their connections to etcd then hung).
            ["link", "add", UNDERLAY_BRIDGE, "address", UNDERLAY_MAC, "type", "bridge"],
            ["addr", "add", f"{ETCD_IP}/{UNDERLAY_LEN}", "dev", UNDERLAY_BRIDGE],
            ["link", "set", UNDERLAY_BRIDGE, "up"],
        ):
            run(["ip", "-n", self.ns, *argv])

    def attach(self, host_ns: str, n: int) -> None:
        """A veth pbmhuN (on the bridge) to eth0 (203.0.113.N/24) in ``host_ns``."""
        port = f"{PREFIX}u{n}"
        run(["ip", "link", "add", port, "netns", self.ns, "type", "veth", "peer", "name",
             "eth0", "netns", host_ns])  # fmt: skip
        run(["ip", "-n", self.ns, "link", "set", port, "master", UNDERLAY_BRIDGE, "up"])
        run(["ip", "-n", host_ns, "addr", "add", f"{UNDERLAY_PREFIX}.{n}/{UNDERLAY_LEN}",
             "dev", "eth0"])  # fmt: skip
        run(["ip", "-n", host_ns, "link", "set", "eth0", "up"])

    def destroy(self) -> None:
        _kill_in_netns(self.ns)
        run(["ip", "netns", "del", self.ns], check=False)


class Etcd:
    """Debian's etcd-server in the underlay's namespace, on 203.0.113.254:2379, with a
    throwaway data directory."""

    def __init__(self, underlay: Underlay) -> None:
        self.underlay = underlay
        self.url = ETCD_URL
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise AssertionError("etcd is not installed: apt-get install etcd-server")
        if shutil.which("etcdctl") is None:
            raise AssertionError("etcdctl is not installed: apt-get install etcd-client")
        if self._tmp is None:  # (a restart keeps the data)
            # On tmpfs: etcd's fsyncs on a busy disk would make calls miss pybridge's bounds.
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._tmp = tempfile.TemporaryDirectory(prefix="pbmh-etcd-", dir=shm)
        peer = "http://127.0.0.1:2380"  # loopback of the underlay's namespace
        with open(f"{self._tmp.name}/etcd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.underlay.ns}", binary,
                 "--name", "e0", "--data-dir", f"{self._tmp.name}/data",
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"e0={peer}", "--logger", "zap", "--log-outputs", "stderr"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=marked_env("etcd"),
                start_new_session=True,
            )  # fmt: skip
        wait_until("etcd", self.healthy, timeout=20)

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited {self.proc.returncode}: {self.log()[-2000:]}")
        probe = run(["nsenter", f"--net=/run/netns/{self.underlay.ns}", "etcdctl",
                     "--endpoints", self.url, "--command-timeout=2s", "endpoint", "health"],
                    check=False, timeout=10)  # fmt: skip
        return probe.returncode == 0

    def log(self) -> str:
        if self._tmp is None:
            return ""
        return Path(self._tmp.name, "etcd.log").read_text(errors="replace")

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """etcd dies (SIGKILL); its data stays for ``restart``."""
        _kill9(self.proc)
        self.proc = None

    def restart(self) -> None:
        """etcd again, on the data it had."""
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        _stop(self.proc, timeout=10)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class DockerHost:
    """Docker host N: netns pbmhN, eth0 203.0.113.N, its own mount namespace, dockerd and
    (when started) pybridge. Files: /var/lib/pbmh-N/{docker,pydriver,*.log},
    /run/pbmh/hN/{docker.sock,docker.pid}."""

    def __init__(self, n: int, underlay: Underlay, version: str = "20.10") -> None:
        if not 1 <= n <= 253:
            raise ValueError(f"host number {n} is not in 1..253")
        self.n = n
        self.underlay = underlay
        self.daemon = daemon(version)
        self.name = f"h{n}"
        self.ns = f"{PREFIX}{n}"
        self.address = f"{UNDERLAY_PREFIX}.{n}"
        self.data = Path(f"/var/lib/{PREFIX}-{n}")
        self.state_dir = self.data / "pydriver"
        self.run_dir = RUN_DIR / self.name
        self.socket = self.run_dir / "docker.sock"
        self.cgroup_parent = f"{PREFIX}-{self.name}"
        self.anchor: subprocess.Popen[bytes] | None = None
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.pybridge: subprocess.Popen[bytes] | None = None

    # --- namespaces -------------------------------------------------------------------------

    def create(self) -> None:
        """The namespaces and the mounts; no daemon yet."""
        run(["ip", "netns", "add", self.ns])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        # As on a fresh machine: dockerd turns forwarding on and then sets FORWARD DROP.
        run(["ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
        self.underlay.attach(self.ns, self.n)
        (self.data / "docker").mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "cg").mkdir(parents=True, exist_ok=True)
        self._start_anchor()

    def _start_anchor(self) -> None:
        # nsenter and unshare exec: the Popen's pid is the sleep that holds the mount namespace.
        self.anchor = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "-m", "--propagation",
             "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            env=marked_env(self.name),
            start_new_session=True,
        )  # fmt: skip
        own_mnt = _ns_inode("self", "mnt")
        wait_until(
            "the anchor's mount namespace",
            lambda: (
                _ns_inode(self.anchor_pid, "mnt") not in (None, own_mnt)
                and _ns_inode(self.anchor_pid, "net") == _netns_inode(self.ns)
            ),
            timeout=10,
            step=0.01,
        )
        cg = self.run_dir / "cg"
        # /sys: a sysfs of this netns (else /sys/class/net lists the machine's interfaces),
        # keeping the cgroup mounts dockerd needs (rbind aside, mount sysfs, move back).
        script = (
            "set -e; mount -t tmpfs tmpfs /run/docker; mkdir /run/docker/plugins;"
            " mount -t tmpfs tmpfs /run/containerd; mount -t tmpfs tmpfs /etc/docker;"
            f" mount --rbind /sys/fs/cgroup {cg}; mount -t sysfs sysfs /sys;"
            f" mount --move {cg} /sys/fs/cgroup"
        )
        run(self.ns_argv("sh", "-c", script))

    @property
    def anchor_pid(self) -> int:
        assert self.anchor is not None, f"{self.name} is not created"
        return self.anchor.pid

    def ns_argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's mount and network namespaces."""
        return ["nsenter", f"--target={self.anchor_pid}", "--mount", "--net", "--", *argv]

    def exec_ns(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (ip, iptables, ...) in this host."""
        return run(self.ns_argv(*argv), check=check, timeout=timeout, input=input)

    def path(self, inside: str) -> Path:
        """A path of this host's mount namespace, as seen from the machine."""
        return Path(f"/proc/{self.anchor_pid}/root") / inside.lstrip("/")

    # --- dockerd ----------------------------------------------------------------------------

    def start_dockerd(self, wait: bool = True) -> None:
        why_not = self.daemon.available()
        if why_not:
            raise AssertionError(why_not)
        env = marked_env(self.name)
        env["PATH"] = ":".join([*map(str, self.daemon.extra_path), env.get("PATH", "")])
        self.socket.unlink(missing_ok=True)
        self._forget_dead_containerd()
        with open(self.data / "dockerd.log", "ab") as log:
            self.dockerd = subprocess.Popen(
                self.ns_argv(
                    str(self.daemon.dockerd),
                    "--data-root", str(self.data / "docker"),
                    "--exec-root", "/run/docker",  # pybridge finds sandboxes under /run/docker
                    "--pidfile", str(self.run_dir / "docker.pid"),
                    "-H", f"unix://{self.socket}",
                    "--cgroup-parent", self.cgroup_parent,
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        if wait:
            self.wait_dockerd()

    def _forget_dead_containerd(self) -> None:
        """A dockerd killed with SIGKILL takes its managed containerd along (parent-death
        signal), but this machine's PID 1 reaps orphans late: kill(pid, 0) still succeeds on
        the zombie, the next dockerd says "containerd is still running", waits for its socket
        and exits ("timeout waiting for containerd to start"). A prompt init would have reaped
        it: forget a pid file whose process is a zombie or gone. The signal is not instant
        either: right after the SIGKILL the old containerd may still run for a moment, and a
        dockerd started then waits for it and exits the same way (seen in CI), so give it up to
        10 s to go."""
        pidfile = self.path("/run/docker/containerd/containerd.pid")
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 10
        while _state(pid) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        if _state(pid) in (None, "Z"):
            pidfile.unlink(missing_ok=True)

    def wait_dockerd(self, timeout: float = 60) -> None:
        def answers() -> bool:
            assert self.dockerd is not None
            if self.dockerd.poll() is not None:
                raise AssertionError(f"dockerd of {self.name} exited: {self.log('dockerd')}")
            try:
                return self.docker_result("version", timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                # dockerd accepts API connections before it answers them: after a SIGKILL it
                # first stops the containers it finds running (10 s for one ignoring SIGTERM).
                return False

        wait_until(f"dockerd of {self.name}", answers, timeout=timeout, step=0.1)

    def stop_dockerd(self, timeout: float = 30) -> None:
        _stop(self.dockerd, timeout)
        self.dockerd = None

    def kill9_dockerd(self) -> None:
        """SIGKILL dockerd alone (its containerd, shims and containers live on)."""
        _kill9(self.dockerd)
        self.dockerd = None

    def docker_result(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["docker", "-H", f"unix://{self.socket}", *args], check=False, timeout=timeout)

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """The docker CLI against this host's dockerd: its stripped output."""
        result = self.docker_result(*args, timeout=timeout)
        if check and result.returncode != 0:
            # pybridge's side of it, in the message (CI keeps only the test's output).
            said = f"\n--- {self.name} pydriver.log (end):\n{self.log('pydriver', 2500)}"
            raise AssertionError(f"docker {' '.join(args)} on {self.name}: {result.stderr}{said}")
        return result.stdout.strip()

    def load_image(self, tar: Path, name: str = IMAGE) -> None:
        self.docker("import", "-c", 'CMD ["sh"]', str(tar), name)

    # --- pybridge ---------------------------------------------------------------------------

    @property
    def plugin_socket(self) -> Path:
        return self.path(PLUGIN_SOCKET)

    @property
    def cluster_env(self) -> dict[str, str]:
        """The environment of a pybridge of this host that joins the harness's etcd."""
        return {
            "PYDRIVER_CLUSTER": f"etcd://{ETCD_IP}:{ETCD_PORT}",
            "PYDRIVER_ADVERTISE_ADDRESS": self.address,
            "PYDRIVER_HEAL_INTERVAL": "2",
        }

    def start_pybridge(self, *extra_args: str, env: dict[str, str] | None = None) -> None:
        """`pydriver serve` in this host with its own state dir, on the socket this host's
        dockerd looks at; returns once the socket answers."""
        environment = marked_env(self.name)
        environment["DOCKER_HOST"] = f"unix://{self.socket}"
        environment.update(env or {})
        with open(self.data / "pydriver.log", "ab") as log:
            self.pybridge = subprocess.Popen(
                self.ns_argv(sys.executable, "-m", "pydriver.cli", "serve",
                             "--socket", PLUGIN_SOCKET, "--state-dir", str(self.state_dir),
                             *extra_args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )  # fmt: skip

        def serving() -> bool:
            assert self.pybridge is not None
            if self.pybridge.poll() is not None:
                raise AssertionError(f"pybridge of {self.name} exited: {self.log('pydriver')}")
            return _connects(self.plugin_socket)

        wait_until(f"pybridge of {self.name}", serving, timeout=30, step=0.05)

    def stop_pybridge(self, timeout: float = 15) -> None:
        _stop(self.pybridge, timeout)
        self.pybridge = None

    def kill9_pybridge(self) -> None:
        _kill9(self.pybridge)
        self.pybridge = None

    def log(self, which: str, tail: int = 3000) -> str:
        """The end of this host's 'dockerd' or 'pydriver' log."""
        try:
            return (self.data / f"{which}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # --- the end ----------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every process of this host but the anchor: dockerd, containerd, shims,
        containers (found by netns, mount namespace or cgroup), pybridge. A power cut."""
        ours = [proc for proc in (self.pybridge, self.dockerd) if proc is not None]
        self.pybridge = self.dockerd = None
        anchor = self.anchor.pid if self.anchor is not None else None
        _kill_matching(
            _netns_inode(self.ns),
            _ns_inode(anchor, "mnt") if anchor is not None else None,
            self.cgroup_parent,
            spare=anchor,
        )
        for proc in ours:
            proc.wait(timeout=10)

    def reboot(self) -> None:
        """A simulated reboot: everything killed with SIGKILL, the mount namespace (tmpfs
        /run/docker, /run/containerd, plugin sockets) and the netns (links, iptables) gone;
        then the namespaces again, with the same data root and state dir. Neither dockerd nor
        pybridge is started: call start_pybridge and start_dockerd in the order under test."""
        self.destroy(keep_data=True)
        self.create()

    def destroy(self, keep_data: bool = False, gentle: bool = False) -> None:
        """Processes killed (SIGKILL: nothing of the host is kept, and dockerd's shutdown
        waits 10 s for each container that ignores SIGTERM; ``gentle`` stops pybridge and
        dockerd with SIGTERM first), cgroups, netns, mounts and files removed."""
        if gentle:
            self.stop_pybridge()
            self.stop_dockerd()
        self.kill_all()
        _kill9(self.anchor)
        self.anchor = None  # the mount namespace goes with its last process
        _remove_cgroups(self.cgroup_parent)
        # At once: a netns is torn down asynchronously, and a reboot adds the same veth again.
        run(["ip", "-n", self.underlay.ns, "link", "del", f"{PREFIX}u{self.n}"], check=False)
        if Path(f"/run/netns/{self.ns}").exists():
            run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if not keep_data:
            shutil.rmtree(self.data, ignore_errors=True)


# --- processes, cgroups and a sweep of leftovers ------------------------------------------------


def _state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _proc_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _in_cgroup(pid: int, parent: str) -> bool:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    return any(f"/{parent}/" in line or line.endswith(f"/{parent}") for line in lines)


def _kill_matching(
    net: str | None,
    mnt: str | None,
    cgroup_parent: str | None,
    spare: int | None = None,
    also: int | None = None,
) -> None:
    """SIGKILL, until none is left, every process in netns ``net``, mount namespace ``mnt`` or
    under cgroup ``cgroup_parent`` (and ``also``): only processes of namespaces and cgroups
    this harness made, never the machine's own."""
    me = os.getpid()
    if net is not None and net == _ns_inode(me, "net"):
        raise AssertionError("refusing to kill the processes of the machine's netns")
    if mnt is not None and mnt == _ns_inode(me, "mnt"):
        raise AssertionError("refusing to kill the processes of the machine's mount namespace")
    for _ in range(50):
        victims = [
            pid
            for pid in _proc_pids()
            if pid not in (me, spare)
            and (
                pid == also
                or (net is not None and _ns_inode(pid, "net") == net)
                or (mnt is not None and _ns_inode(pid, "mnt") == mnt)
                or (cgroup_parent is not None and _in_cgroup(pid, cgroup_parent))
            )
        ]
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of {net or mnt or cgroup_parent} survive SIGKILL")


def _kill_in_netns(ns: str) -> None:
    net = _netns_inode(ns)
    if net is not None:
        _kill_matching(net, None, None)


def _cgroup_roots() -> Iterable[Path]:
    """Where dockerd's cgroupfs driver puts ``--cgroup-parent X``: <hierarchy>/X, and for a
    hierarchy where this process sits below the root (memory here), under that path too."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") or [""]:
            own[controller.removeprefix("name=")] = path
    base = Path("/sys/fs/cgroup")
    if not base.is_dir():
        return []
    roots = []
    for hierarchy in base.iterdir():
        roots.append(hierarchy)
        inner = own.get("" if hierarchy.name == "unified" else hierarchy.name, "/")
        if inner != "/":
            roots.append(hierarchy / inner.lstrip("/"))
    if (base / "cgroup.procs").exists():  # cgroup v2 only
        roots.append(base)
    return roots


def _remove_cgroups(parent: str) -> None:
    for root in _cgroup_roots():
        top = root / parent
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            # A cgroup still in use stays, and leftovers() reports it.
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def leftovers() -> list[str]:
    """What of this harness is still on the machine (netns, links, mounts, dirs, processes)."""
    found = [f"netns {ns}" for ns in _netns_names()]
    found += [f"link {name}" for name in os.listdir("/sys/class/net") if name.startswith(PREFIX)]
    mounts = Path("/proc/mounts").read_text().splitlines()
    found += [f"mount {line}" for line in mounts if PREFIX in line]
    found += [f"dir {d}" for d in _dirs()]
    if RUN_DIR.exists():
        found.append(f"dir {RUN_DIR}")
    for pid in _proc_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if _marked(pid):
            found.append(f"process {pid} {cmdline.replace(NUL, b' ').decode(errors='replace')}")
    for root in _cgroup_roots():
        found += [f"cgroup {d}" for d in root.glob(f"{PREFIX}-h*")]
    return found


def _marked(pid: int) -> bool:
    """Whether the harness started ``pid`` (or its parent did, with the environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(item.startswith(MARK) for item in environ.split(NUL))


def _netns_names() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def sweep() -> None:
    """Remove what an interrupted run left: every process in a pbmh netns or cgroup, and the
    netns, cgroups and directories themselves."""
    for ns in _netns_names():
        _kill_in_netns(ns)
    own_mnt = _ns_inode("self", "mnt")
    for pid in _proc_pids():  # anchors, daemons and etcd whose netns is already gone
        if _marked(pid):
            mnt = _ns_inode(pid, "mnt")
            _kill_matching(None, mnt if mnt != own_mnt else None, None, also=pid)
    for root in _cgroup_roots():
        for top in root.glob(f"{PREFIX}-h*"):
            _kill_matching(None, None, top.name)
            _remove_cgroups(top.name)
    for ns in _netns_names():
        run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    for d in _dirs():
        shutil.rmtree(d, ignore_errors=True)


def _dirs() -> list[Path]:
    """The hosts' data roots, and etcd's and the image's temporary directories."""
    tmp = Path(tempfile.gettempdir())
    return [
        *Path("/var/lib").glob(f"{PREFIX}-*"),
        *tmp.glob(f"{PREFIX}-etcd-*"),
        *Path("/dev/shm").glob(f"{PREFIX}-etcd-*"),
        *tmp.glob(f"{PREFIX}-image-*"),
    ]


# --- a whole cluster ---------------------------------------------------------------------------


class Cluster:
    """The underlay, etcd and ``count`` Docker hosts with the test image loaded, dockerd
    running and no pybridge yet (tests start it, with the arguments they need)."""

    def __init__(self, count: int = 3, version: str = "20.10") -> None:
        self.underlay = Underlay()
        self.etcd = Etcd(self.underlay)
        self.hosts = [DockerHost(n, self.underlay, version) for n in range(1, count + 1)]
        self.timings: dict[str, float] = {}
        self._lock: int | None = None

    def up(self) -> None:
        started = time.monotonic()
        self._take_lock()
        sweep()
        why_not = self.hosts[0].daemon.available()
        if why_not:
            raise AssertionError(why_not)
        self.underlay.create()
        self.etcd.start()
        for host in self.hosts:
            host.create()
            host.start_dockerd(wait=False)  # the daemons start side by side
        with tempfile.TemporaryDirectory(prefix="pbmh-image-") as tmp:
            tar = Path(tmp) / "rootfs.tar"
            write_image_tar(tar)
            for host in self.hosts:
                host.wait_dockerd()
                host.load_image(tar)
        self.timings["up"] = time.monotonic() - started

    def down(self) -> None:
        started = time.monotonic()
        try:
            for host in self.hosts:
                host.destroy()
            self.etcd.stop()
            self.underlay.destroy()
        finally:
            sweep()
            if self._lock is not None:
                os.close(self._lock)  # releases the flock
                self._lock = None
        self.timings["down"] = time.monotonic() - started

    def _take_lock(self, timeout: float = 900) -> None:
        """One cluster at a time on a machine: the names and addresses are fixed, and up()
        sweeps away whatever carries them."""
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise AssertionError(f"another multi-host run holds {LOCK_FILE}") from None
                time.sleep(1)
        self._lock = fd
