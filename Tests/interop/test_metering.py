"""Interop: MeteringService through grpcio, a client that shares no code with the gateway."""
import datetime
import json
import os
import signal
import subprocess

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from conftest import Gateway, _env, admin_query, start_gateway, stop_gateway, tollctl

TIMEOUT = 10


def ts(when):
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(when)
    return t


def now():
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def metering_tenants(gateway, pki, stubs):
    """Tenants m-one and m-two, each with SUM meter api_calls (group_by region) and COUNT meter calls."""
    ch = grpc.secure_channel(f"127.0.0.1:{gateway}", credentials_for(pki.operator()))
    tenants = stubs.tenant_grpc.TenantServiceStub(ch)
    metering = stubs.metering_grpc.MeteringServiceStub(ch)
    m = stubs.metering
    for tid in ("m-one", "m-two"):
        tenants.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tid), timeout=TIMEOUT)
        md = (("tollgate-tenant", tid),)
        metering.DefineMeter(m.DefineMeterRequest(meter=m.Meter(
            name="api_calls", aggregation=m.AGGREGATION_SUM, group_by=["region"])), metadata=md, timeout=TIMEOUT)
        metering.DefineMeter(m.DefineMeterRequest(meter=m.Meter(
            name="users", aggregation=m.AGGREGATION_UNIQUE_COUNT, value_property="user")), metadata=md, timeout=TIMEOUT)
        metering.DefineMeter(m.DefineMeterRequest(meter=m.Meter(
            name="balance", aggregation=m.AGGREGATION_LATEST)), metadata=md, timeout=TIMEOUT)
    ch.close()
    return ("m-one", "m-two")


def credentials_for(identity):
    from conftest import credentials
    return credentials(identity)


def event(m, eid, value=1.0, subject="cust-1", meter="api_calls", when=None, source="py-agent", **props):
    return m.UsageEvent(id=eid, source=source, meter=meter, subject=subject, time=ts(when or now()),
                        value=value, properties=props)


def stream(stub, batches):
    return list(stub.IngestStream(iter(batches), timeout=TIMEOUT))


def test_resent_events_count_once_across_reconnects(metering_tenants, pki, channel_for, stubs):
    m = stubs.metering
    agent = pki.principal("m-one", "agent", "dup")
    batches = [m.IngestRequest(sequence=1, events=[event(m, "d1"), event(m, "d2"), event(m, "d1")]),
               m.IngestRequest(sequence=2, events=[event(m, "d2"), event(m, "d3")])]
    acks = stream(stubs.metering_grpc.MeteringServiceStub(channel_for(agent)), batches)
    assert [(a.sequence, a.accepted, a.duplicates) for a in acks] == [(1, 2, 1), (2, 1, 1)]
    # A new connection, as after a network drop, re-sending everything.
    again = stream(stubs.metering_grpc.MeteringServiceStub(channel_for(agent)), batches)
    assert [(a.accepted, a.duplicates) for a in again] == [(0, 3), (0, 2)]
    assert admin_query("SELECT count(*) FROM usage_events WHERE tenant_id = 'm-one' AND event_id LIKE 'd_'") == [("3",)]


def test_each_bad_event_gets_its_own_reason(metering_tenants, pki, channel_for, stubs):
    m = stubs.metering
    stub = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("m-one", "agent", "bad")))
    reply = stub.Ingest(m.IngestRequest(sequence=9, events=[
        event(m, "ok-1"),
        event(m, "x", value=float("inf")),
        event(m, "y", when=now() + datetime.timedelta(hours=1)),
        event(m, "z", when=now() - datetime.timedelta(days=30)),
        event(m, "w", meter="undefined_meter"),
        m.UsageEvent(id="v", source="s", meter="api_calls", subject="c"),
    ]), timeout=TIMEOUT)
    assert (reply.sequence, reply.accepted, reply.rejected) == (9, 1, 5)
    assert [(r.index, r.reason) for r in reply.rejections] == [
        (1, "NON_FINITE_VALUE"), (2, "TIME_IN_FUTURE"), (3, "TIME_TOO_OLD"), (4, "UNKNOWN_METER"), (5, "MISSING_FIELD")]
    with pytest.raises(grpc.RpcError) as err:
        stub.Ingest(m.IngestRequest(sequence=10), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_aggregations_and_late_events_match_hand_computed_answers(metering_tenants, pki, channel_for, stubs):
    m = stubs.metering
    day = now().replace(minute=0, second=0, microsecond=0) - datetime.timedelta(days=1)
    late = day - datetime.timedelta(days=4)
    agent = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("m-two", "agent", "agg")))
    events = [
        event(m, "a1", 10, "alice", when=day + datetime.timedelta(minutes=1), region="eu"),
        event(m, "a2", 5, "bob", when=day + datetime.timedelta(minutes=2), region="us"),
        event(m, "a3", 2, "alice", when=day + datetime.timedelta(minutes=70), region="eu"),
        event(m, "a4", 100, "alice", when=late, region="eu"),
        event(m, "u1", 0, "alice", meter="users", when=day, user="p"),
        event(m, "u2", 0, "alice", meter="users", when=day, user="q"),
        event(m, "u3", 0, "alice", meter="users", when=day, user="p"),
        event(m, "b1", 7, "alice", meter="balance", when=day + datetime.timedelta(minutes=5)),
        event(m, "b2", 3, "alice", meter="balance", when=day + datetime.timedelta(minutes=9)),
    ]
    assert agent.Ingest(m.IngestRequest(sequence=1, events=events), timeout=TIMEOUT).accepted == len(events)
    partner = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("m-two", "partner", "agg")))

    def query(meter, start, **kw):
        rng = stubs.common.TimeRange(start_time=ts(start), end_time=ts(day + datetime.timedelta(hours=3)))
        return list(partner.QueryUsage(m.QueryUsageRequest(meter=meter, range=rng, **kw), timeout=TIMEOUT).rows)

    assert [r.value for r in query("api_calls", day)] == [17]
    assert [r.value for r in query("api_calls", late)] == [117]  # the late event counts
    hourly = query("api_calls", day, window_size=m.WINDOW_SIZE_HOUR, group_by_subject=True)
    assert [(r.window_start.ToDatetime(datetime.timezone.utc) - day, r.subject, r.value) for r in hourly] == [
        (datetime.timedelta(0), "alice", 10), (datetime.timedelta(0), "bob", 5), (datetime.timedelta(hours=1), "alice", 2)]
    by_region = query("api_calls", day, group_by_properties=["region"])
    assert [(dict(r.group), r.value) for r in by_region] == [({"region": "eu"}, 12), ({"region": "us"}, 5)]
    assert [r.value for r in query("users", day)] == [2]
    assert [r.value for r in query("balance", day)] == [3]


def test_monthly_quota_exhaustion_names_the_quota(gateway, pki, channel_for, stubs):
    m = stubs.metering
    op = channel_for(pki.operator())
    stubs.tenant_grpc.TenantServiceStub(op).CreateTenant(stubs.tenant.CreateTenantRequest(
        tenant_id="m-quota", quota=stubs.common.Quota(monthly_usage_events=2)), timeout=TIMEOUT)
    stubs.metering_grpc.MeteringServiceStub(op).DefineMeter(m.DefineMeterRequest(meter=m.Meter(
        name="api_calls", aggregation=m.AGGREGATION_COUNT)), metadata=(("tollgate-tenant", "m-quota"),), timeout=TIMEOUT)
    stub = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("m-quota", "agent", "q")))
    first = stub.Ingest(m.IngestRequest(events=[event(m, "q1"), event(m, "q2"), event(m, "q3")]), timeout=TIMEOUT)
    assert (first.accepted, [r.reason for r in first.rejections]) == (2, ["QUOTA_EXCEEDED"])
    with pytest.raises(grpc.RpcError) as err:
        stub.Ingest(m.IngestRequest(events=[event(m, "q3")]), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.value.trailing_metadata())
    assert int(trailers["grpc-retry-pushback-ms"]) > 0
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    failure = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(failure) for d in status.details)
    assert failure.violations[0].subject == "tenant:m-quota"
    # Duplicates are still answered; they cost no quota.
    dup = stub.Ingest(m.IngestRequest(events=[event(m, "q1")]), timeout=TIMEOUT)
    assert (dup.accepted, dup.duplicates) == (0, 1)


def test_tenants_never_see_each_others_usage(metering_tenants, pki, channel_for, stubs):
    m = stubs.metering
    for tid, value in (("m-one", 1.0), ("m-two", 1000.0)):
        stub = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal(tid, "agent", "iso")))
        stub.Ingest(m.IngestRequest(events=[event(m, "iso-1", value, subject="iso-subject")]), timeout=TIMEOUT)
    partner = stubs.metering_grpc.MeteringServiceStub(channel_for(pki.principal("m-one", "partner", "iso")))
    request = m.QueryUsageRequest(meter="api_calls", subjects=["iso-subject"],
                                  range=stubs.common.TimeRange(start_time=ts(now() - datetime.timedelta(hours=1))))
    assert [r.value for r in partner.QueryUsage(request, timeout=TIMEOUT).rows] == [1.0]
    with pytest.raises(grpc.RpcError) as err:
        partner.QueryUsage(request, metadata=(("tollgate-tenant", "m-two"),), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_acknowledged_events_survive_sigkill(gateway, metering_tenants, pki, stubs):
    """A second gateway process is killed with SIGKILL mid-stream; every acked event is stored."""
    m = stubs.metering
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    acked = []
    try:
        ch = grpc.secure_channel(f"127.0.0.1:{port}", credentials_for(pki.principal("m-one", "agent", "crash")))
        stub = stubs.metering_grpc.MeteringServiceStub(ch)

        def batches():
            for seq in range(1, 10_000):
                yield m.IngestRequest(sequence=seq, events=[event(m, f"k{seq}-{i}", source="crash") for i in range(50)])

        with pytest.raises(grpc.RpcError):
            for ack in stub.IngestStream(batches(), timeout=60):
                acked.append(ack.sequence)
                if len(acked) == 5:
                    os.kill(proc.pid, signal.SIGKILL)
        ch.close()
    finally:
        stop_gateway(proc)
    assert len(acked) >= 5
    stored = {row[0] for row in admin_query("SELECT event_id FROM usage_events WHERE source = 'crash'")}
    for seq in acked:
        assert {f"k{seq}-{i}" for i in range(50)} <= stored, f"batch {seq} was acknowledged but is not stored"


def test_tollctl_meters_and_usage(gateway, pki, stubs, work_dir):
    op = pki.operator()
    gw = ["--gateway", f"127.0.0.1:{gateway}"]
    tollctl("tenants", "create", "m-cli", "--identity", str(op), *gw)
    partner = pki.principal("m-cli", "partner", "cli")
    ident = ["--identity", str(partner), *gw]
    tollctl("meters", "define", "api_calls", "--aggregation", "sum", "--group-by", "region", *ident)
    listed = tollctl("meters", "list", *ident).stdout
    assert "api_calls" in listed and "SUM" in listed
    lines = [json.dumps({"id": f"c{i}", "source": "cli", "meter": "api_calls", "subject": "s",
                         "time": now().strftime("%Y-%m-%dT%H:%M:%SZ"), "value": i, "properties": {"region": "eu"}}) for i in range(1, 5)]
    lines.append(json.dumps({"id": "bad", "source": "cli", "meter": "api_calls", "subject": "s", "value": 1}))
    path = work_dir / "usage.jsonl"
    path.write_text("\n".join(lines) + "\n")
    first = tollctl("usage", "ingest", "--file", str(path), *ident, check=False)
    assert first.returncode == 1, first.stderr
    assert "accepted 4, duplicates 0, rejected 1" in first.stdout
    assert "line 5: MISSING_FIELD" in first.stderr
    again = tollctl("usage", "ingest", *ident, check=False, input="\n".join(lines[:4]) + "\n")
    assert again.returncode == 0, again.stderr
    assert "accepted 0, duplicates 4, rejected 0" in again.stdout
    start = (now() - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tollctl("usage", "query", "--meter", "api_calls", "--from", start, "--group-by", "region", "--json", *ident).stdout
    rows = json.loads(out)["rows"]
    assert [(r["group"], r["value"]) for r in rows] == [({"region": "eu"}, 10)]
    table = tollctl("usage", "query", "--meter", "api_calls", "--from", start, *ident).stdout
    assert table.splitlines()[0].split() == ["WINDOW", "START", "WINDOW", "END", "VALUE"]
    assert table.splitlines()[1].split()[-1] == "10"


def cli_tenant_and_events(gateway, pki, work_dir, tenant, quota, source, count):
    """Tenant `tenant` with `quota` (tollctl tenants quota arguments) and a COUNT meter api_calls,
    made with tollctl; returns a JSON-lines file of `count` events of `source`, ids 0 to count-1."""
    op = ["--identity", str(pki.operator()), "--gateway", f"127.0.0.1:{gateway}"]
    tollctl("tenants", "create", tenant, *op)
    tollctl("tenants", "quota", tenant, *quota, *op)
    tollctl("meters", "define", "api_calls", "--aggregation", "count", "--tenant", tenant, *op)
    path = work_dir / f"{source}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{source}{i}", "source": source, "meter": "api_calls", "subject": "s",
                                        "time": now().strftime("%Y-%m-%dT%H:%M:%SZ"), "value": 1}) + "\n" for i in range(count)))
    return path


def test_tollctl_ingest_resumes_across_a_gateway_restart(gateway, pki, work_dir):
    """`tollctl usage ingest` outlives a restart of its gateway mid-stream: it sends the batches
    not yet acknowledged on a new stream once the gateway is back, and every event is stored once."""
    import pty
    import queue
    import threading

    # Paced to 20 messages a second, so the stream is still going when the gateway stops.
    path = cli_tenant_and_events(gateway, pki, work_dir, "m-resume", ["--limit", "ingest=20/1"], "resume", 60)
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    # stderr on a terminal, so tollctl shows its progress: the first figure says the stream is up.
    master, slave = pty.openpty()
    ingest = subprocess.Popen(
        [_env("TOLLCTL_BIN"), "usage", "ingest", "--file", str(path), "--batch-size", "1",
         "--identity", str(pki.principal("m-resume", "agent", "a")), "--gateway", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    errors = queue.Queue()

    def pump():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO once the child has closed its side
                data = b""
            if not data:
                errors.put(None)
                return
            errors.put(data.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    seen = []
    try:
        while "ingested " not in "".join(seen):
            chunk = errors.get(timeout=30)
            assert chunk is not None, "tollctl ended before any progress: " + "".join(seen)
            seen.append(chunk)
        stop_gateway(proc)
        proc = None
        proc, _, _ = start_gateway(pki, Gateway.app_url, port=port)
        out, _ = ingest.communicate(timeout=120)
    finally:
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
        if proc is not None:
            stop_gateway(proc)
    while (chunk := errors.get(timeout=30)) is not None:
        seen.append(chunk)
    os.close(master)
    stderr = "".join(seen)
    assert ingest.returncode == 0, stderr
    assert "resuming at batch" in stderr, stderr
    assert "accepted 60, duplicates 0, rejected 0" in out, out + stderr
    stored = admin_query("SELECT count(*), count(DISTINCT event_id) FROM usage_events WHERE source = 'resume'")
    assert stored == [("60", "60")]


def test_tollctl_ingest_stops_at_once_when_the_month_is_used_up(gateway, pki, work_dir):
    """A used-up monthly quota answers RESOURCE_EXHAUSTED with a pushback until the month turns:
    `tollctl usage ingest` does not wait that out; it stops, saying what it stored."""
    path = cli_tenant_and_events(gateway, pki, work_dir, "m-month", ["--monthly-usage-events", "2"], "month", 4)
    out = tollctl("usage", "ingest", "--file", str(path), "--batch-size", "1", "--give-up-after", "5",
                  "--identity", str(pki.principal("m-month", "agent", "a")), "--gateway", f"127.0.0.1:{gateway}", check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "resourceExhausted" in out.stderr.replace("resource_exhausted", "resourceExhausted"), out.stderr
    assert "longer than --give-up-after" in out.stderr, out.stderr
    assert "stopped before batch 3 of 4: accepted 2, duplicates 0, rejected 0" in out.stdout, out.stdout

