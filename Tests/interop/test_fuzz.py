"""Seeded random requests to every method, as every role, against a gateway and database of their
own: each call must end with a status a client can act on (never INTERNAL or UNKNOWN, never a
status too large for the client to read), and the gateway must stay up throughout.

Half the requests are a valid request, nearly always with one field replaced by an awkward value,
so they get past validation to the handlers and the store; the other half are random messages,
truncated messages or noise."""
import os
import random
import time
import urllib.parse
import uuid

import grpc
import pytest
from google.protobuf import descriptor as D
from google.protobuf import json_format, message_factory

from conftest import _psql, credentials, start_gateway, stop_gateway

# Fixed, so a failure replays; TOLLGATE_FUZZ_SEED and TOLLGATE_FUZZ_CALLS run other and longer
# rounds by hand.
SEED = int(os.environ.get("TOLLGATE_FUZZ_SEED", "20261207"))
CALLS_PER_METHOD = int(os.environ.get("TOLLGATE_FUZZ_CALLS", "40"))
UNARY_TIMEOUT = 5
# Followed streams (StreamEvents with follow, WatchRun of a live run, Connect) only end at
# their deadline; a short one keeps the test fast, and DEADLINE_EXCEEDED is an answer.
STREAM_TIMEOUT = 1
TIMEOUT = 10

STRINGS = ["", "a", "acme", "globex", "fz-victim", "x" * 300, "\x00", "../../etc/passwd", "名前", "🙂" * 50,
           "' OR 1=1 --", "%s%n%x", "acme\n", " acme", "ACME", "a" * 20000, "spiffe://example.org/tenant/acme/partner/p",
           "-1", "9" * 40, "2026-13-45T99:99:99Z", "fz-task", "api_calls", "/tollgate.v1.TenantService/GetTenant",
           "00000000-0000-0000-0000-000000000000", "\u202e\u0000\ud7ff"]
INTS = [0, 1, -1, 2, 7, 100, 2**31 - 1, -2**31, 2**53, 2**63 - 1, -2**63]
UINTS = [0, 1, 2, 100, 2**31, 2**32 - 1, 2**53, 2**63, 2**64 - 1]
# Timestamps and durations: the edges of what the types allow, and beyond.
SECONDS = [0, -1, 1, 2**31, -62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800, 2**63 - 1, -2**63]
NANOS = [0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -2**31]


def value(field, rng):
    t = field.type
    if t == D.FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if t == D.FieldDescriptor.TYPE_BYTES:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 16, 300])))
    if t == D.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, 1e308, -1e308, float("nan"), float("inf"), -float("inf"), 3.5, 5e-324])
    if t == D.FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99, -5])
    if t in (D.FieldDescriptor.TYPE_UINT32, D.FieldDescriptor.TYPE_FIXED32):
        return rng.choice([u for u in UINTS if u < 2**32])
    if t in (D.FieldDescriptor.TYPE_UINT64, D.FieldDescriptor.TYPE_FIXED64):
        return rng.choice(UINTS)
    if t in (D.FieldDescriptor.TYPE_INT32, D.FieldDescriptor.TYPE_SINT32, D.FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([i for i in INTS if -2**31 <= i < 2**31])
    if field.containing_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return rng.choice(SECONDS) if field.name == "seconds" else rng.choice(INTS)
    return rng.choice(INTS)


def is_repeated(field):
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == D.FieldDescriptor.LABEL_REPEATED


def set_field(message, field, rng, depth):
    """Gives `field` of `message` an awkward value (a whole random submessage for messages)."""
    if field.type == D.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            target = getattr(message, field.name)
            for _ in range(rng.choice([0, 1, 3])):
                key = value(field.message_type.fields_by_name["key"], rng)
                vf = field.message_type.fields_by_name["value"]
                if vf.type == D.FieldDescriptor.TYPE_MESSAGE:
                    fill(target[key], rng, depth + 1)
                else:
                    target[key] = value(vf, rng)
        elif is_repeated(field):
            for _ in range(rng.choice([0, 1, 3, 40])):
                fill(getattr(message, field.name).add(), rng, depth + 1)
        else:
            sub = getattr(message, field.name)
            sub.SetInParent()
            if field.message_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
                sub.seconds, sub.nanos = rng.choice(SECONDS), rng.choice(NANOS)
            else:
                fill(sub, rng, depth + 1)
    elif is_repeated(field):
        getattr(message, field.name).extend(value(field, rng) for _ in range(rng.choice([0, 1, 3, 100])))
    else:
        try:
            setattr(message, field.name, value(field, rng))
        except (ValueError, TypeError):
            pass


def fill(message, rng, depth=0):
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.35 or (field.type == D.FieldDescriptor.TYPE_MESSAGE and depth > 3):
            continue
        set_field(message, field, rng, depth)
    return message


def mutate(message, rng):
    """One field somewhere in `message` (top level or one message down) given an awkward value."""
    target = message
    fields = list(target.DESCRIPTOR.fields)
    nested = [f for f in fields if f.type == D.FieldDescriptor.TYPE_MESSAGE and not is_repeated(f) and target.HasField(f.name)]
    if nested and rng.random() < 0.5:
        target = getattr(target, rng.choice(nested).name)
        fields = list(target.DESCRIPTOR.fields)
    if fields:
        field = rng.choice(fields)
        target.ClearField(field.name)
        set_field(target, field, rng, 1)
    return message


def payload(cls, baseline, rng):
    """Serialized request bytes: a mutated valid request, a random one, a truncated one or noise."""
    roll = rng.random()
    if baseline is not None and roll < 0.5:
        message = cls()
        message.CopyFrom(baseline)
        # Now and then the good request itself, so calls also reach the success paths.
        return (message if roll < 0.05 else mutate(message, rng)).SerializeToString()
    if roll < 0.6:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 5, 64, 1000])))
    data = fill(cls(), rng).SerializeToString()
    if roll < 0.7 and len(data) > 1:
        return data[: rng.randrange(1, len(data))]
    return data


def baselines(stubs, run_id):
    """A valid request per method, as JSON, so each mutation changes one thing of a good call."""
    now = int(time.time())
    hour_ago = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now - 3600))}"
    event = {"id": "e1", "source": "fz", "meter": "api_calls", "subject": "s1",
             "time": time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now)), "value": 1}
    return {
        "CreateTenant": {"tenantId": "fz-new", "displayName": "Fuzz"},
        "GetTenant": {"tenantId": "acme"},
        "ListTenants": {"pageSize": 5},
        "UpdateQuota": {"tenantId": "acme", "quota": {"monthlyUsageEvents": "100000"}},
        "SuspendTenant": {"tenantId": "fz-victim", "reason": "fuzz"},
        "ResumeTenant": {"tenantId": "fz-victim"},
        "RevokeCertificate": {"serialHex": "0a1b2c", "reason": "fuzz"},
        "ListRevocations": {"pageSize": 5},
        "DefineMeter": {"meter": {"name": "api_calls", "aggregation": "AGGREGATION_SUM"}},
        "ListMeters": {"pageSize": 5},
        "Ingest": {"sequence": "1", "events": [event]},
        "IngestStream": {"sequence": "1", "events": [event]},
        "QueryUsage": {"meter": "api_calls", "range": {"startTime": hour_ago}, "windowSize": "WINDOW_SIZE_HOUR"},
        "StreamEvents": {"startIndex": "0"},
        "GetCheckpoint": {},
        "GetInclusionProof": {"index": "0", "treeSize": "1"},
        "GetConsistencyProof": {"oldSize": "1", "newSize": "2"},
        "Dispatch": {"type": "fz-task", "payload": "eA==", "maxAttempts": 2},
        "GetRun": {"runId": run_id},
        "ListRuns": {"pageSize": 5},
        "CancelRun": {"runId": run_id},
        "Approve": {"runId": run_id, "approverId": "pat", "comment": "ok"},
        "Reject": {"runId": run_id, "approverId": "pat", "comment": "no"},
        "WatchRun": {"runId": run_id},
        "Connect": {"hello": {"taskTypes": ["fz-task"], "capacity": 1, "workerName": "fz", "heldLeaseIds": [str(uuid.uuid4())]}},
    }


def methods(stubs):
    for module in (stubs.tenant, stubs.audit, stubs.metering, stubs.workflow):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                yield service.full_name, m, message_factory.GetMessageClass(m.input_type)


def test_random_requests_get_actionable_statuses_and_the_gateway_stays_up(pki, stubs):
    admin = os.environ["TOLLGATE_TEST_DATABASE_URL"]
    db = "fuzz_" + uuid.uuid4().hex[:12]
    _psql(admin, f"CREATE DATABASE {db} OWNER tollgate")
    u = urllib.parse.urlparse(admin)
    app_url = f"postgres://tollgate:{os.environ.get('TOLLGATE_TEST_APP_PASSWORD', 'tollgate')}@{u.hostname}:{u.port}/{db}?sslmode=disable"
    proc = None
    channels = {}
    try:
        proc, port, _ = start_gateway(pki, app_url)
        identities = [
            ("operator", pki.operator(), []),
            ("operator@acme", pki.operator(), [("tollgate-tenant", "acme")]),
            ("partner", pki.principal("acme", "partner", "fuzz"), []),
            ("agent", pki.principal("acme", "agent", "fuzz"), []),
            ("auditor", pki.principal("acme", "auditor", "fuzz"), []),
            ("worker", pki.principal("acme", "worker", "fuzz"), []),
        ]
        channels = {name: grpc.secure_channel(f"127.0.0.1:{port}", credentials(identity)) for name, identity, _ in identities}
        tenants = stubs.tenant_grpc.TenantServiceStub(channels["operator"])
        for tenant in ("acme", "globex", "fz-victim"):
            tenants.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tenant), timeout=UNARY_TIMEOUT)
        meters = stubs.metering_grpc.MeteringServiceStub(channels["partner"])
        meters.DefineMeter(stubs.metering.DefineMeterRequest(
            meter=stubs.metering.Meter(name="api_calls", aggregation=stubs.metering.AGGREGATION_SUM)), timeout=UNARY_TIMEOUT)
        run_id = stubs.workflow_grpc.WorkflowServiceStub(channels["partner"]).Dispatch(
            stubs.workflow.DispatchRequest(type="fz-task", payload=b"x",
                                           approval=stubs.workflow.ApprovalGate(required_approver="finance", reason="fuzz")),
            timeout=UNARY_TIMEOUT).run.run_id
        good = baselines(stubs, run_id)

        rng = random.Random(SEED)
        raw = lambda b: b  # noqa: E731
        bad, answered = [], 0
        for service, method, cls in methods(stubs):
            path = f"/{service}/{method.name}"
            baseline = json_format.ParseDict(good[method.name], cls()) if method.name in good else None
            for i in range(CALLS_PER_METHOD):
                name, _, metadata = identities[i % len(identities)]
                ch = channels[name]
                try:
                    if method.client_streaming:
                        messages = [payload(cls, baseline, rng) for _ in range(rng.choice([1, 2, 5]))]
                        if method.server_streaming:
                            for _ in ch.stream_stream(path, request_serializer=raw, response_deserializer=raw)(
                                    iter(messages), metadata=metadata, timeout=STREAM_TIMEOUT):
                                pass
                        else:
                            ch.stream_unary(path, request_serializer=raw, response_deserializer=raw)(
                                iter(messages), metadata=metadata, timeout=UNARY_TIMEOUT)
                    elif method.server_streaming:
                        for _ in ch.unary_stream(path, request_serializer=raw, response_deserializer=raw)(
                                payload(cls, baseline, rng), metadata=metadata, timeout=STREAM_TIMEOUT):
                            pass
                    else:
                        ch.unary_unary(path, request_serializer=raw, response_deserializer=raw)(
                            payload(cls, baseline, rng), metadata=metadata, timeout=UNARY_TIMEOUT)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as e:
                    code, details = e.code(), e.details() or ""
                answered += 1
                # INTERNAL and UNKNOWN tell the client nothing it can act on; UNAVAILABLE here means
                # the gateway went away; a status too big for its trailers reaches the client as
                # its own RESOURCE_EXHAUSTED about metadata size.
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE) \
                        or "metadata size" in details:
                    bad.append((path, name, i, code, details[:300]))
        assert answered == sum(1 for _ in methods(stubs)) * CALLS_PER_METHOD
        errors = [line for line in proc.log if '"level":"error"' in line or '"level":"critical"' in line]
        assert not bad, "\n".join(map(str, bad[:20])) + "\ngateway errors:\n" + "".join(errors[-10:])
        # Bad input is the client's problem: the gateway may warn, but has nothing to report as its
        # own error.
        assert not errors, "".join(errors[:10])
        assert proc.poll() is None, "".join(proc.errors[-40:])
    finally:
        for ch in channels.values():
            ch.close()
        if proc is not None:
            stop_gateway(proc)
        _psql(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    assert proc.returncode == 0, "".join(proc.errors[-40:])


def sum_meter(stubs, metering, name):
    """Defines SUM meter `name` for `metering`'s tenant, if an earlier test has not."""
    m = stubs.metering
    try:
        metering.DefineMeter(m.DefineMeterRequest(meter=m.Meter(name=name, aggregation=m.AGGREGATION_SUM)), timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS


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
    sum_meter(stubs, metering, "times")
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


def test_control_characters_in_audit_filters_are_refused_by_field(gateway, seeded, pki, stubs, channel_for):
    """A NUL cannot reach PostgreSQL, which has no text that holds one: it was INTERNAL."""
    audit = stubs.audit_grpc.AuditServiceStub(channel_for(pki.operator()))
    acting = [("tollgate-tenant", "acme")]
    for request, field in [
        (stubs.audit.StreamEventsRequest(principal_spiffe_id="spiffe://example.org/\x00"), "principal_spiffe_id"),
        (stubs.audit.StreamEventsRequest(methods=["/tollgate.v1.TenantService/\x00"]), "methods[0]"),
        (stubs.audit.StreamEventsRequest(methods=["/tollgate.v1.TenantService/" + "G" * 300]), "methods[0]"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(audit.StreamEvents(request, metadata=acting, timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(f"invalid stream request: {field}"), info.value.details()


def test_usage_values_that_would_overflow_a_sum_are_refused_and_stored_ones_are_out_of_range(
        gateway, seeded, pki, stubs, channel_for):
    import time as clock

    from google.protobuf import timestamp_pb2

    from conftest import admin_query

    m = stubs.metering
    partner = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("globex", "partner", "huge")))
    sum_meter(stubs, partner, "huge")
    now = timestamp_pb2.Timestamp(seconds=int(clock.time()))
    reply = partner.Ingest(m.IngestRequest(sequence=1, events=[
        m.UsageEvent(id=f"h{i}", source="s", meter="huge", subject="c", time=now, value=v)
        for i, v in enumerate([1e308, -1e16, 1e15, -1e15])]), timeout=TIMEOUT)
    assert (reply.accepted + reply.duplicates, [(r.index, r.reason) for r in reply.rejections]) == (
        2, [(0, "VALUE_OUT_OF_RANGE"), (1, "VALUE_OUT_OF_RANGE")])
    # Values stored before the cap (written here by hand) overflow the sum: OUT_OF_RANGE, not INTERNAL.
    admin_query("UPDATE usage_events SET value = 1e308 WHERE tenant_id = 'globex' AND meter = 'huge'")
    query = m.QueryUsageRequest(meter="huge", range=stubs.common.TimeRange(
        start_time=timestamp_pb2.Timestamp(seconds=now.seconds - 3600)))
    with pytest.raises(grpc.RpcError) as info:
        partner.QueryUsage(query, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, info.value.details()
    assert "overflowed" in info.value.details()


def test_a_forged_usage_page_token_is_refused_not_a_crash(gateway, seeded, pki, stubs, channel_for):
    """Usage page tokens are not signed and a query's fingerprint is public arithmetic, so a
    client can forge one: its dates must be checked like a request's (one far out of range
    trapped in the driver's conversion to microseconds)."""
    import base64
    import hashlib
    import json
    import time as clock

    from google.protobuf import timestamp_pb2

    m = stubs.metering
    partner = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("globex", "partner", "token")))
    sum_meter(stubs, partner, "paged")
    query = m.QueryUsageRequest(meter="paged", range=stubs.common.TimeRange(
        start_time=timestamp_pb2.Timestamp(seconds=int(clock.time()) - 3600)))
    fingerprint = hashlib.sha256(query.SerializeToString(deterministic=True)).digest()[:12].hex()
    for until, resume, window in [(1e300, 0.0, 0.0), (1.9e9, -1e300, 0.0), (1.9e9, 1.8e9, 1e300)]:
        state = {"query": fingerprint, "until": until, "resume": resume,
                 "after": {"window": window, "subject": "", "group": []}}
        token = base64.urlsafe_b64encode(("usage:" + json.dumps(state)).encode()).decode().rstrip("=")
        forged = m.QueryUsageRequest()
        forged.CopyFrom(query)
        forged.page_token = token
        with pytest.raises(grpc.RpcError) as info:
            partner.QueryUsage(forged, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "page_token" in info.value.details()
    partner.QueryUsage(query, timeout=TIMEOUT)
