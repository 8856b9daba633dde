"""Fixtures for the interop suite: an independent gRPC client (Python grpcio) against a real
`tollgate serve` process over mutual TLS, with its own throwaway database.

Needs TOLLGATE_TEST_DATABASE_URL (a superuser URL of a running cluster), TOLLGATE_BIN and
TOLLCTL_BIN; tools/test provides all three.
"""
import ctypes
import json
import os
import pathlib
import queue
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "example.org"
START_TIMEOUT_S = 90


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set; run the interop suite through tools/test", returncode=2)
    return value


@pytest.fixture(scope="session")
def work_dir():
    with tempfile.TemporaryDirectory(prefix="tollgate-interop-") as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="session")
def stubs(work_dir):
    """Python stubs generated from Protos/ with grpcio-tools (nothing generated is committed)."""
    from grpc_tools import protoc
    import grpc_tools

    out = work_dir / "py"
    out.mkdir()
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "Protos")) for p in (ROOT / "Protos" / "tollgate" / "v1").glob("*.proto"))
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'Protos'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    from tollgate.v1 import audit_service_pb2, audit_service_pb2_grpc, common_pb2, tenant_service_pb2, tenant_service_pb2_grpc
    from tollgate.v1 import metering_service_pb2, metering_service_pb2_grpc, workflow_service_pb2, workflow_service_pb2_grpc

    class Stubs:
        common = common_pb2
        tenant = tenant_service_pb2
        tenant_grpc = tenant_service_pb2_grpc
        audit = audit_service_pb2
        audit_grpc = audit_service_pb2_grpc
        metering = metering_service_pb2
        metering_grpc = metering_service_pb2_grpc
        workflow = workflow_service_pb2
        workflow_grpc = workflow_service_pb2_grpc

    return Stubs


def tollctl(*args, check=True, input=None):
    return subprocess.run([_env("TOLLCTL_BIN"), *args], check=check, capture_output=True, text=True, input=input)


class PKI:
    def __init__(self, root):
        self.root = root
        tollctl("certs", "init-ca", "--out", str(root / "ca"), "--trust-domain", TRUST_DOMAIN)
        tollctl("certs", "issue", "--ca", str(root / "ca"), "--server", "--dns", "localhost", "--ip", "127.0.0.1",
                "--out", str(root / "server"))
        # A second CA the gateway does not trust.
        tollctl("certs", "init-ca", "--out", str(root / "other-ca"), "--trust-domain", TRUST_DOMAIN)
        # The checkpoint signing key; the audit tests verify with audit.key.pub only.
        tollctl("certs", "audit-key", "--out", str(root / "audit.key"), "--name", "interop-audit")
        self.audit_verifier_key = (root / "audit.key.pub").read_text().strip()

    def issue(self, name, *args, ca="ca"):
        out = self.root / name
        if not out.exists():
            tollctl("certs", "issue", "--ca", str(self.root / ca), "--out", str(out), *args)
        return out

    def principal(self, tenant, role, name):
        return self.issue(f"{tenant}-{role}-{name}", "--tenant", tenant, "--role", role, "--name", name)

    def operator(self, name="alice"):
        return self.issue(f"operator-{name}", "--operator", name)


@pytest.fixture(scope="session")
def pki(work_dir):
    return PKI(work_dir)


def _psql(admin_url, sql, database=None):
    """Runs `sql` as the superuser; returns its rows as tuples of text."""
    u = urllib.parse.urlparse(admin_url)
    done = subprocess.run(
        ["psql", "-h", u.hostname, "-p", str(u.port or 5432), "-U", u.username,
         "-d", database or u.path.lstrip("/") or "postgres",
         "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-F", "\t", "-c", sql],
        check=True, capture_output=True, text=True,
    )
    return [tuple(line.split("\t")) for line in done.stdout.splitlines() if line]


def admin_query(sql):
    """Rows of `sql` run as the superuser on the interop gateway's database (past row-level security)."""
    return _psql(_env("TOLLGATE_TEST_DATABASE_URL"), sql, database=urllib.parse.urlparse(Gateway.app_url).path.lstrip("/"))


@pytest.fixture(scope="session")
def metrics_url(gateway):
    return f"http://127.0.0.1:{Gateway.metrics_port}/metrics"


def start_gateway(pki, app_url, extra_args=(), tls_dir=None, port=0):
    """Starts `tollgate serve` on free ports (or the given gRPC port, to restart a gateway where
    its clients expect it); returns (process, port, metrics port). Failed workflow attempts are
    retried after 50 ms (doubling), so retry tests take no time. `tls_dir`, if given, holds the
    server's cert.pem, key.pem and client-CA ca.pem instead of the shared PKI's."""
    server = pki.root / "server"
    cert, key, ca = server / "cert.pem", server / "key.pem", pki.root / "ca" / "ca.pem"
    if tls_dir is not None:
        cert, key, ca = tls_dir / "cert.pem", tls_dir / "key.pem", tls_dir / "ca.pem"
    proc = subprocess.Popen(
        [_env("TOLLGATE_BIN"), "serve", "--listen", f"127.0.0.1:{port}",
         "--tls-cert", str(cert), "--tls-key", str(key),
         "--client-ca", str(ca), "--trust-domain", TRUST_DOMAIN,
         "--database-url", app_url, "--database-timeout-ms", "2000", "--max-message-bytes", "65536",
         "--metrics-listen", "127.0.0.1:0", "--audit-signing-key", str(pki.root / "audit.key"),
         "--workflow-retry-base-ms", "50", *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = queue.Queue()
    log, errors = [], []

    def pump():
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    def pump_errors():
        for line in proc.stderr:
            errors.append(line)

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=pump_errors, daemon=True).start()
    port = metrics_port = None
    try:
        while port is None or metrics_port is None:
            line = lines.get(timeout=START_TIMEOUT_S)
            if line is None:
                raise RuntimeError("tollgate exited before listening:\n" + "".join(log + errors))
            entry = json.loads(line)
            if entry["message"] == "gateway listening":
                port = int(entry["port"])
            if entry["message"] == "metrics listening":
                metrics_port = int(entry["port"])
    except BaseException:
        stop_gateway(proc)
        raise
    proc.log, proc.errors, proc.lines = log, errors, lines
    return proc, port, metrics_port


def next_log_entry(proc, predicate, timeout):
    """The next JSON line `proc` (from start_gateway) logs, after those already taken, for which
    `predicate` holds; None if none comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = proc.lines.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        entry = json.loads(line)
        if predicate(entry):
            return entry
    return None


def stop_gateway(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drop_incoming_packets(sock):
    """Attaches a classic BPF filter that drops every packet arriving for `sock`. TCP runs socket
    filters before it processes a segment, so nothing that arrives is acknowledged any more: the
    peer sees a connection that went silent, not one that stopped reading (Linux; needs no
    privilege)."""
    so_attach_filter = 26
    drop_all = (ctypes.c_uint8 * 8)(*struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET | BPF_K, 0 bytes
    sock.setsockopt(socket.SOL_SOCKET, so_attach_filter, struct.pack("HL", 1, ctypes.addressof(drop_all)))


class FreezingRelay:
    """A TCP relay on a free loopback port to `127.0.0.1:target`. `freeze()` makes the connections
    open at that moment a black hole, as a NAT or firewall that dropped their state would: they
    stay open, nothing more crosses them in either direction, and neither end's packets are
    acknowledged any more. Later connections pass."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.links = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            link = {"sockets": (client, upstream), "frozen": threading.Event()}
            with self.lock:
                self.links.append(link)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, link["frozen"]), daemon=True).start()

    @staticmethod
    def _pump(src, dst, frozen):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        if not frozen.is_set():
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self):
        with self.lock:
            for link in self.links:
                link["frozen"].set()
                for sock in link["sockets"]:
                    drop_incoming_packets(sock)

    def close(self):
        # shutdown() first: on Linux, close() alone does not wake a thread blocked on the socket.
        with self.lock:
            sockets = [self.listener] + [sock for link in self.links for sock in link["sockets"]]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Gateway:
    metrics_port = None
    app_url = None


@pytest.fixture(scope="session")
def gateway(pki, work_dir):
    """A `tollgate serve` on a free port; yields its port, stops it and drops its database."""
    admin = _env("TOLLGATE_TEST_DATABASE_URL")
    db = "interop_" + uuid.uuid4().hex[:12]
    _psql(admin, f"CREATE DATABASE {db} OWNER tollgate")
    u = urllib.parse.urlparse(admin)
    app_url = f"postgres://tollgate:{os.environ.get('TOLLGATE_TEST_APP_PASSWORD', 'tollgate')}@{u.hostname}:{u.port}/{db}?sslmode=disable"
    try:
        proc, port, metrics_port = start_gateway(pki, app_url)
        Gateway.metrics_port = metrics_port
        Gateway.app_url = app_url
        try:
            yield port
        finally:
            stop_gateway(proc)
    finally:
        _psql(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture
def replica(gateway, pki):
    """A second `tollgate serve` process on the same database; yields its port."""
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    try:
        yield port
    finally:
        stop_gateway(proc)


def credentials(identity_dir, root_ca=None):
    d = pathlib.Path(identity_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=(root_ca or d / "ca.pem").read_bytes(),
        private_key=(d / "key.pem").read_bytes(),
        certificate_chain=(d / "cert.pem").read_bytes(),
    )


@pytest.fixture
def channel_for(gateway):
    """channel_for(identity_dir) -> a secure channel to the gateway presenting that certificate."""
    opened = []

    def make(identity_dir, creds=None):
        ch = grpc.secure_channel(f"127.0.0.1:{gateway}", creds or credentials(identity_dir))
        opened.append(ch)
        return ch

    yield make
    for ch in opened:
        ch.close()


@pytest.fixture
def tenants(channel_for, stubs):
    """tenants(identity_dir) -> a TenantService stub for that certificate."""
    return lambda identity: stubs.tenant_grpc.TenantServiceStub(channel_for(identity))


@pytest.fixture(scope="session")
def seeded(gateway, pki, stubs):
    """Tenants acme and globex, created once by an operator."""
    ch = grpc.secure_channel(f"127.0.0.1:{gateway}", credentials(pki.operator()))
    stub = stubs.tenant_grpc.TenantServiceStub(ch)
    for tid in ("acme", "globex"):
        try:
            stub.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tid, display_name=tid.title()), timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    ch.close()
    return ("acme", "globex")
