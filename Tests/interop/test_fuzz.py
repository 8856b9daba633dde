"""Requests with awkward values: each must end with a status a client can act on, and the
gateway must stay up."""
import grpc
import pytest

TIMEOUT = 10


# Seconds beyond what google.protobuf.Timestamp allows, at both ends; SwiftProtobuf's conversion to
# a date traps on overflow at the extremes, which took the whole gateway down.
OUT_OF_RANGE = [(2**63 - 1, 0), (-2**63, 0), (253_402_300_800, 0), (0, -1), (0, 1_000_000_000)]


def test_timestamps_out_of_range_are_refused_by_field_not_a_crash(gateway, seeded, pki, stubs, channel_for):
    from google.protobuf import timestamp_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    def stamp(seconds, nanos):
        return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)

    def refused_field(call):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid timestamp" in info.value.details()
        status = rpc_status.from_call(info.value)
        bad = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad)
        return [v.field for v in bad.field_violations]

    acting = [("tollgate-tenant", "acme")]
    operator = channel_for(pki.operator())
    audit = stubs.audit_grpc.AuditServiceStub(operator)
    partner = channel_for(pki.principal("acme", "partner", "times"))
    metering = stubs.metering_grpc.MeteringServiceStub(partner)
    workflow = stubs.workflow_grpc.WorkflowServiceStub(partner)
    try:
        metering.DefineMeter(stubs.metering.DefineMeterRequest(meter=stubs.metering.Meter(
            name="times", aggregation=stubs.metering.AGGREGATION_SUM)), timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    for seconds, nanos in OUT_OF_RANGE:
        t = stamp(seconds, nanos)
        assert refused_field(lambda: list(audit.StreamEvents(stubs.audit.StreamEventsRequest(
            range=stubs.common.TimeRange(start_time=t)), metadata=acting, timeout=TIMEOUT))) == ["range.start_time"]
        assert refused_field(lambda: list(audit.StreamEvents(stubs.audit.StreamEventsRequest(
            range=stubs.common.TimeRange(end_time=t)), metadata=acting, timeout=TIMEOUT))) == ["range.end_time"]
        assert refused_field(lambda: metering.QueryUsage(stubs.metering.QueryUsageRequest(
            meter="times", range=stubs.common.TimeRange(start_time=t)), timeout=TIMEOUT)) == ["range.start_time"]
        assert refused_field(lambda: metering.QueryUsage(stubs.metering.QueryUsageRequest(
            meter="times", range=stubs.common.TimeRange(start_time=stamp(0, 0), end_time=t)),
            timeout=TIMEOUT)) == ["range.end_time"]
        assert refused_field(lambda: workflow.Dispatch(stubs.workflow.DispatchRequest(
            type="times", run_after=t), timeout=TIMEOUT)) == ["run_after"]
        # An event is refused on its own, with a reason; the batch's other events are kept.
        reply = metering.Ingest(stubs.metering.IngestRequest(sequence=1, events=[
            stubs.metering.UsageEvent(id=f"t-{seconds}-{nanos}", source="s", meter="times", subject="c", time=t, value=1),
        ]), timeout=TIMEOUT)
        assert [(r.reason, "not a valid timestamp" in r.message) for r in reply.rejections] == [("INVALID_FIELD", True)]


def test_a_status_never_repeats_a_huge_request_field_in_full(gateway, seeded, pki, stubs, channel_for):
    """Statuses travel in trailers, which clients refuse over 16 KiB: a status echoing a 20,000
    character field would reach the client as its own RESOURCE_EXHAUSTED about metadata."""
    from grpc_status import rpc_status

    huge = "m" * 20_000
    audit = stubs.audit_grpc.AuditServiceStub(channel_for(pki.operator()))
    with pytest.raises(grpc.RpcError) as info:
        list(audit.StreamEvents(stubs.audit.StreamEventsRequest(methods=[huge] * 3, start_index=0),
                                metadata=[("tollgate-tenant", "acme")], timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("invalid stream request: methods[0]") and len(info.value.details().encode()) <= 512
    status = rpc_status.from_call(info.value)
    assert status is not None and len(status.details) == 1
