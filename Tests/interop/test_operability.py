"""Interop: what an operator reads from a running `tollgate serve`: JSON logs, flags, dashboard, status."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import grpc

from conftest import Gateway, credentials, start_gateway, stop_gateway, tollctl

TIMEOUT = 10
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_logs_are_one_json_object_per_line_with_a_line_per_call(seeded, pki, stubs):
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    try:
        ch = grpc.secure_channel(f"127.0.0.1:{port}", credentials(pki.principal("acme", "partner", "logs")))
        stub = stubs.tenant_grpc.TenantServiceStub(ch)
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT,
                       metadata=(("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),))
        try:
            stub.ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        ch.close()
    finally:
        stop_gateway(proc)
    assert proc.returncode == 0, "".join(proc.errors)
    entries = [json.loads(line) for line in proc.log]
    assert all({"time", "level", "message"} <= e.keys() for e in entries)
    calls = [e for e in entries if e["message"] == "call"]
    ok = [e for e in calls if e["method"] == "tollgate.v1.TenantService/GetTenant"]
    assert len(ok) == 1
    assert ok[0]["status"] == "OK" and ok[0]["tenant"] == "acme" and ok[0]["role"] == "partner"
    assert ok[0]["principal"].startswith("spiffe://") and ok[0]["trace_id"] == TRACE_ID
    assert len(ok[0]["request_id"]) == 16 and isinstance(ok[0]["latency_ms"], float)
    denied = [e for e in calls if e["method"] == "tollgate.v1.TenantService/ListTenants"]
    assert [e["status"] for e in denied] == ["PermissionDenied"]
    text = "".join(proc.log)
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text


ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_dashboard_is_grafana_json_over_documented_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "tollgate.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:tollgate|grpc_server)_[a-z_]+)", target["expr"]):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert f"`{base}" in readme, f"{panel['title']}: {base} is not documented in the README"


def test_every_setting_in_the_readme_is_a_flag_of_tollgate_serve():
    readme = (ROOT / "README.md").read_text()
    flags = set(re.findall(r"^\| `(--[a-z0-9-]+)` \| `TOLLGATE_", readme, re.M))
    assert len(flags) > 20
    help_text = subprocess.run([os.environ["TOLLGATE_BIN"], "serve", "--help"], capture_output=True, text=True).stdout
    missing = sorted(f for f in flags if f not in help_text)
    assert not missing, f"documented but not accepted by tollgate serve: {missing}"


def test_tollctl_status_summarises_a_running_gateway(gateway, metrics_url, seeded):
    out = tollctl("status", "--metrics", metrics_url, "--interval", "0.3").stdout
    assert out.startswith("Tollgate ")
    assert re.search(r"^tenants\s+\d+$", out, re.M)
    for heading in ("calls/s", "in flight", "audit", "database pool", "workflow runs", "workers connected"):
        assert heading in out, out
    summary = json.loads(tollctl("status", "--metrics", metrics_url, "--interval", "0.3", "--json").stdout)
    assert summary["tenants"] >= 2 and summary["uptimeSeconds"] > 0
    assert summary["workersConnected"] >= 0


def test_sighup_reloads_the_client_ca_without_dropping_open_connections(seeded, pki, stubs, tmp_path):
    for name, src in (("cert.pem", pki.root / "server" / "cert.pem"), ("key.pem", pki.root / "server" / "key.pem"),
                      ("ca.pem", pki.root / "ca" / "ca.pem")):
        shutil.copy(src, tmp_path / name)
    # Only SIGHUP reloads: the file watcher is off, so the reload below is the signal's doing.
    proc, port, _ = start_gateway(pki, Gateway.app_url, ("--tls-watch-interval-ms", "0"), tls_dir=tmp_path)
    try:
        def list_tenants(identity):
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials(identity, root_ca=pki.root / "ca" / "ca.pem")) as ch:
                return stubs.tenant_grpc.TenantServiceStub(ch).ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT)

        newcomer = pki.issue("operator-other-ca", "--operator", "carol", ca="other-ca")
        opened = grpc.secure_channel(f"127.0.0.1:{port}", credentials(pki.operator()))
        stubs.tenant_grpc.TenantServiceStub(opened).ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT)
        try:
            list_tenants(newcomer)
            raise AssertionError("a certificate from a CA not yet trusted was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        # A bad bundle is refused on SIGHUP and the old one stays.
        (tmp_path / "ca.pem").write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("TLS material refused" in line for line in proc.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("TLS material refused" in line for line in proc.log)
        list_tenants(pki.operator())
        # Both CAs now, joined as `cat` joins files that lack a final newline (END and BEGIN on one
        # line): the newcomer is accepted, and the connection opened before is still up.
        (tmp_path / "ca.pem").write_text(
            (pki.root / "ca" / "ca.pem").read_text().rstrip() + (pki.root / "other-ca" / "ca.pem").read_text())
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("TLS material reloaded" in line for line in proc.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("TLS material reloaded" in line for line in proc.log), proc.log[-2:]
        list_tenants(newcomer)
        stubs.tenant_grpc.TenantServiceStub(opened).ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT)
        opened.close()
    finally:
        stop_gateway(proc)
    assert proc.returncode == 0, "".join(proc.errors)


def test_a_private_key_others_can_read_is_warned_about_at_start(seeded, pki, tmp_path):
    for name, src in (("cert.pem", pki.root / "server" / "cert.pem"), ("key.pem", pki.root / "server" / "key.pem"),
                      ("ca.pem", pki.root / "ca" / "ca.pem")):
        shutil.copy(src, tmp_path / name)
    (tmp_path / "key.pem").chmod(0o644)
    assert (pki.root / "audit.key").stat().st_mode & 0o077 == 0
    proc, _, _ = start_gateway(pki, Gateway.app_url, tls_dir=tmp_path)
    try:
        warnings = [json.loads(line) for line in proc.log if "readable by other users" in line]
        # The TLS key (0644) is named, with its mode; the signing key (0600, from tollctl) is not.
        assert [(w["setting"], w["mode"], w["level"]) for w in warnings] == [("--tls-key", "644", "warning")], warnings
        assert warnings[0]["path"] == str(tmp_path / "key.pem")
    finally:
        stop_gateway(proc)
    assert proc.returncode == 0, "".join(proc.errors)
