"""Interop: what an operator reads from a running `tollgate serve` process: its JSON logs."""
import json

import grpc

from conftest import Gateway, credentials, start_gateway, stop_gateway

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
