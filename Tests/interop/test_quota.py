"""Interop: per-tenant quotas as a grpcio client sees them."""
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

TIMEOUT = 10


def set_quota(stubs, channel_for, pki, tenant, create=True, **classes):
    """Creates `tenant` (unless create=False) and sets rate/burst per class, e.g. query=(0.1, 2)."""
    op = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.operator()))
    if create:
        op.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tenant), timeout=TIMEOUT)
    c = stubs.common
    limits = [c.RateLimit(quota_class=getattr(c, f"QUOTA_CLASS_{name.upper()}"), rate_per_second=rate, burst=burst)
              for name, (rate, burst) in classes.items()]
    return op.UpdateQuota(stubs.tenant.UpdateQuotaRequest(tenant_id=tenant, quota=c.Quota(rate_limits=limits)),
                          timeout=TIMEOUT)


def test_over_the_rate_is_resource_exhausted_with_quota_failure_retry_info_and_pushback(pki, channel_for, stubs):
    set_quota(stubs, channel_for, pki, "q-rate", query=(0.1, 2))
    stub = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.principal("q-rate", "partner", "p")))
    for _ in range(2):
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its query rate" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    # One emission interval at 0.1/s is 10 s, less the time the burst took.
    pushback = int(trailers["grpc-retry-pushback-ms"])
    assert 5_000 < pushback <= 10_000
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failure, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert any(d.Unpack(failure) for d in status.details)
    assert any(d.Unpack(retry) for d in status.details)
    assert failure.violations[0].subject == "tenant:q-rate"
    assert failure.violations[0].description == "query rate 0.10/s burst 2"
    assert abs(retry.retry_delay.ToMilliseconds() - pushback) <= 1
    # Another class keeps its own budget.
    stub.ListRevocations(stubs.tenant.ListRevocationsRequest(), timeout=TIMEOUT)


def test_a_raised_quota_applies_at_once_and_bad_values_are_refused(pki, channel_for, stubs):
    set_quota(stubs, channel_for, pki, "q-live", query=(0.1, 1))
    stub = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.principal("q-live", "partner", "p")))
    stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The operator's change is in force on this replica when UpdateQuota answers.
    set_quota(stubs, channel_for, pki, "q-live", create=False, query=(1000, 100))
    for _ in range(20):
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as bad:
        set_quota(stubs, channel_for, pki, "q-live", create=False, query=(-1, 0))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rate_per_second" in bad.value.details() or "burst" in bad.value.details()


def test_a_suspended_tenant_is_refused_then_resumed_with_its_quota(pki, channel_for, stubs):
    set_quota(stubs, channel_for, pki, "q-susp", query=(1000, 100))
    op = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.operator()))
    stub = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.principal("q-susp", "partner", "p")))
    op.SuspendTenant(stubs.tenant.SuspendTenantRequest(tenant_id="q-susp", reason="audit"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    op.ResumeTenant(stubs.tenant.ResumeTenantRequest(tenant_id="q-susp"), timeout=TIMEOUT)
    resumed = stub.GetTenant(stubs.tenant.GetTenantRequest(), timeout=TIMEOUT)
    assert [(l.rate_per_second, l.burst) for l in resumed.tenant.quota.rate_limits
            if l.quota_class == stubs.common.QUOTA_CLASS_QUERY] == [(1000, 100)]
