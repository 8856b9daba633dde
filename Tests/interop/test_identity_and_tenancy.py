"""Interop: grpcio (an independent HTTP/2 + TLS stack) against the gateway."""
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf import descriptor_pool, message_factory

from conftest import credentials

TIMEOUT = 10


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_partner_reads_its_own_tenant(seeded, pki, tenants, stubs):
    stub = tenants(pki.principal("acme", "partner", "billing"))
    reply = stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    assert reply.tenant.tenant_id == "acme"
    assert reply.tenant.display_name == "Acme"
    assert reply.tenant.state == stubs.tenant.TENANT_STATE_ACTIVE
    assert reply.tenant.create_time.seconds > 0


def test_no_client_certificate_fails_at_handshake(seeded, pki, channel_for, stubs):
    creds = grpc.ssl_channel_credentials(root_certificates=(pki.root / "ca" / "ca.pem").read_bytes())
    ch = channel_for(None, creds)
    err = code_of(lambda: stubs.tenant_grpc.TenantServiceStub(ch).GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # The connection itself failed (TLS), as opposed to a status sent by the server.
    assert "failed to connect" in err.details()
    # The server is fine afterwards.
    ok = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.principal("acme", "partner", "billing")))
    assert ok.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT).tenant.tenant_id == "acme"


def test_certificate_from_another_ca_fails(seeded, pki, channel_for, stubs):
    impostor = pki.issue("impostor", "--operator", "alice", ca="other-ca")
    creds = credentials(impostor, root_ca=pki.root / "ca" / "ca.pem")
    stub = stubs.tenant_grpc.TenantServiceStub(channel_for(None, creds))
    err = code_of(lambda: stub.ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in err.details()


def test_partner_of_a_is_denied_tenant_b(seeded, pki, tenants, stubs):
    stub = tenants(pki.principal("acme", "partner", "billing"))
    err = code_of(lambda: stub.GetTenant(stubs.tenant.GetTenantRequest(tenant_id="globex"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "globex" in err.details()
    err = code_of(lambda: stub.GetTenant(stubs.tenant.GetTenantRequest(), metadata=[("tollgate-tenant", "globex")],
                                         timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_agent_cannot_call_tenant_service(seeded, pki, tenants, stubs):
    stub = tenants(pki.principal("acme", "agent", "edge-1"))
    err = code_of(lambda: stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent" in err.details()


def test_suspended_tenant_is_refused(seeded, pki, tenants, stubs):
    op = tenants(pki.operator())
    partner = tenants(pki.principal("globex", "partner", "ops"))
    assert partner.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT).tenant.tenant_id == "globex"
    op.SuspendTenant(stubs.tenant.SuspendTenantRequest(tenant_id="globex", reason="audit"), timeout=TIMEOUT)
    try:
        err = code_of(lambda: partner.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "suspended" in err.details()
    finally:
        op.ResumeTenant(stubs.tenant.ResumeTenantRequest(tenant_id="globex"), timeout=TIMEOUT)
    assert partner.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT).tenant.state == stubs.tenant.TENANT_STATE_ACTIVE


def test_revoked_certificate_is_refused(seeded, pki, tenants, stubs):
    from cryptography import x509

    victim = pki.principal("acme", "partner", "leaky")
    stub = tenants(victim)
    assert stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT).tenant.tenant_id == "acme"
    cert = x509.load_pem_x509_certificate((victim / "cert.pem").read_bytes())
    op = tenants(pki.operator())
    op.RevokeCertificate(stubs.tenant.RevokeCertificateRequest(serial_hex=format(cert.serial_number, "x"), reason="leaked"),
                         timeout=TIMEOUT)
    fresh = tenants(victim)  # a new connection, so no state of the old one can matter
    err = code_of(lambda: fresh.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.details()
    listed = op.ListRevocations(stubs.tenant.ListRevocationsRequest(), timeout=TIMEOUT)
    assert format(cert.serial_number, "x") in [r.serial_hex for r in listed.revocations]


def test_malformed_tenant_id_is_invalid_argument_with_field_violation(seeded, pki, tenants, stubs):
    op = tenants(pki.operator())
    err = code_of(lambda: op.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id="Not_A_Tenant!"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(err.trailing_metadata()).get("grpc-status-details-bin")
    assert details, "no google.rpc.Status in the trailers"
    status = status_pb2.Status.FromString(details)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == ["tenant_id"]


def test_reflection_lists_and_describes_services(seeded, pki, channel_for):
    ch = channel_for(pki.principal("acme", "partner", "billing"))
    db = ProtoReflectionDescriptorDatabase(ch)
    services = set(db.get_services())
    assert {"tollgate.v1.TenantService", "grpc.health.v1.Health"} <= services
    # A generic client: build the request type from reflected descriptors alone and call the method.
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("tollgate.v1.TenantService").FindMethodByName("GetTenant")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = ch.unary_unary("/tollgate.v1.TenantService/GetTenant",
                          request_serializer=request_cls.SerializeToString,
                          response_deserializer=response_cls.FromString)
    reply = call(request_cls(), timeout=TIMEOUT)
    assert reply.tenant.tenant_id == "acme"


def test_health_reports_serving(seeded, pki, channel_for):
    stub = health_pb2_grpc.HealthStub(channel_for(pki.principal("acme", "partner", "billing")))
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    err = code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_operator_pages_through_tenants(seeded, pki, tenants, stubs):
    op = tenants(pki.operator())
    seen, token = [], ""
    while True:
        page = op.ListTenants(stubs.tenant.ListTenantsRequest(page_size=1, page_token=token), timeout=TIMEOUT)
        seen += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and {"acme", "globex"} <= set(seen)


def test_oversized_message_is_resource_exhausted(seeded, pki, tenants, stubs):
    op = tenants(pki.operator())
    big = stubs.tenant.CreateTenantRequest(tenant_id="bigco", display_name="x" * 100_000)
    err = code_of(lambda: op.CreateTenant(big, timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in err.details()
    # Nothing was created, and the same channel still works.
    err = code_of(lambda: op.GetTenant(stubs.tenant.GetTenantRequest(tenant_id="bigco"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def _metric(url, name, **labels):
    import urllib.request
    text = urllib.request.urlopen(url, timeout=TIMEOUT).read().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_refused_calls(seeded, pki, tenants, stubs, metrics_url):
    labels = dict(grpc_service="tollgate.v1.TenantService", grpc_method="GetTenant", grpc_code="PermissionDenied")
    before = _metric(metrics_url, "grpc_server_handled_total", **labels)
    agent = tenants(pki.principal("acme", "agent", "edge-9"))
    for _ in range(2):
        code_of(lambda: agent.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT))
    assert _metric(metrics_url, "grpc_server_handled_total", **labels) == before + 2
