"""Interop: the audit log checked by an independent implementation.

RFC 6962 hashing and proofs, the C2SP signed-note format and Ed25519 are re-implemented here from
the specifications (hashlib and the `cryptography` package only), so a proof the gateway serves is
accepted only if a second, unrelated implementation agrees with it.
"""
import base64
import hashlib
import json
import os
import queue
import subprocess
import threading

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conftest import admin_query

TIMEOUT = 10
TENANT = "audit-interop"
UPDATE_QUOTA = "/tollgate.v1.TenantService/UpdateQuota"


# --- RFC 6962 §2.1, written from the RFC ---------------------------------------------------

def leaf_hash(leaf):
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves):
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = split(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m, leaves):
    if len(leaves) == 1:
        return []
    k = split(len(leaves))
    if m < k:
        return path(m, leaves[:k]) + [mth(leaves[k:])]
    return path(m - k, leaves[k:]) + [mth(leaves[:k])]


def subproof(m, leaves, complete):
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = split(n)
    if m <= k:
        return subproof(m, leaves[:k], complete) + [mth(leaves[k:])]
    return subproof(m - k, leaves[k:], False) + [mth(leaves[:k])]


def root_from_inclusion(index, size, leaf, proof):
    """Recomputes the root from an audit path (RFC 9162 §2.1.3.2)."""
    fn, sn, r = index, size - 1, leaf_hash(leaf)
    for p in proof:
        assert sn != 0, "proof too long"
        if fn % 2 == 1 or fn == sn:
            r = node_hash(p, r)
            while fn % 2 == 0 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    assert sn == 0, "proof too short"
    return r


# --- C2SP signed note -------------------------------------------------------------------------

def parse_verifier_key(text):
    name, key_id, key = text.split("+", 2)
    raw = base64.b64decode(key)
    assert raw[0] == 1 and len(raw) == 33
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == key_id
    return name, raw[1:]


def verify_note(note, name, public_key):
    """Returns (origin, size, root) if `note` carries a valid Ed25519 signature by the key."""
    body, _, signatures = note.partition("\n\n")
    body += "\n"
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + public_key).digest()[:4]
    for line in signatures.splitlines():
        dash, signer, blob = line.split(" ")
        raw = base64.b64decode(blob)
        if dash == "\u2014" and signer == name and raw[:4] == key_id:
            Ed25519PublicKey.from_public_bytes(public_key).verify(raw[4:], body.encode())
            origin, size, root = body.splitlines()[:3]
            return origin, int(size), base64.b64decode(root)
    raise AssertionError("no signature by the verifier key")


# --- the test ---------------------------------------------------------------------------------

def stream_records(responses):
    """The records of a StreamEvents response stream, in order (checkpoint messages skipped)."""
    return [r for m in responses if m.WhichOneof("item") == "records" for r in m.records.records]


@pytest.fixture
def audit_log(gateway, pki, channel_for, stubs):
    op = channel_for(pki.operator())
    tenants = stubs.tenant_grpc.TenantServiceStub(op)
    try:
        tenants.CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=TENANT), timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    acting = [("tollgate-tenant", TENANT)]
    for i in range(21):
        request = stubs.tenant.UpdateQuotaRequest(quota=stubs.common.Quota(monthly_usage_events=1000 + i))
        tenants.UpdateQuota(request, metadata=acting, timeout=TIMEOUT)
    return stubs.audit_grpc.AuditServiceStub(op), acting


def test_log_and_proofs_verify_independently(audit_log, pki, stubs, channel_for):
    audit, acting = audit_log
    name, public_key = parse_verifier_key(pki.audit_verifier_key)

    first = audit.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=acting, timeout=TIMEOUT).checkpoint
    origin, size, root = verify_note(first.signed_note, name, public_key)
    assert origin == f"tollgate/example.org/{TENANT}"
    assert size == first.tree_size >= 21
    assert bytes(first.public_key) == public_key

    records = stream_records(audit.StreamEvents(stubs.audit.StreamEventsRequest(), metadata=acting, timeout=TIMEOUT))
    assert [r.index for r in records] == list(range(len(records)))
    leaves = [bytes(r.leaf) for r in records[:size]]
    assert mth(leaves) == root
    for r in records:
        # The decoded event is the leaf, byte for byte, and the call it records is on this tenant.
        assert stubs.audit.AuditEvent.FromString(bytes(r.leaf)) == r.event
        assert r.event.tenant_id == TENANT
    updates = [r for r in records if r.event.method == "/tollgate.v1.TenantService/UpdateQuota"]
    assert len(updates) >= 21 and all(r.event.impersonated and r.event.outcome_code == 0 for r in updates)

    for index in range(size):
        proof = audit.GetInclusionProof(stubs.audit.GetInclusionProofRequest(index=index, tree_size=size),
                                        metadata=acting, timeout=TIMEOUT)
        assert bytes(proof.leaf) == leaves[index]
        assert [bytes(h) for h in proof.hashes] == path(index, leaves)
        assert root_from_inclusion(index, size, leaves[index], [bytes(h) for h in proof.hashes]) == root

    # The log grows (this test's own reads are audited); the old tree is a prefix of the new one.
    audit.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=acting, timeout=TIMEOUT)
    second = audit.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=acting, timeout=TIMEOUT).checkpoint
    _, new_size, new_root = verify_note(second.signed_note, name, public_key)
    assert new_size > size
    records = stream_records(audit.StreamEvents(stubs.audit.StreamEventsRequest(), metadata=acting, timeout=TIMEOUT))
    all_leaves = [bytes(r.leaf) for r in records[:new_size]]
    assert all_leaves[:size] == leaves
    assert mth(all_leaves) == new_root
    for old in (1, size // 2, size, new_size - 1):
        proof = audit.GetConsistencyProof(stubs.audit.GetConsistencyProofRequest(old_size=old, new_size=new_size),
                                          metadata=acting, timeout=TIMEOUT).proof
        assert [bytes(h) for h in proof.hashes] == subproof(old, all_leaves, True)


def test_denied_call_is_in_the_log_and_auditors_read_only_their_tenant(audit_log, pki, stubs, channel_for):
    partner = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.principal(TENANT, "partner", "p")))
    with pytest.raises(grpc.RpcError) as info:
        partner.ListTenants(stubs.tenant.ListTenantsRequest(), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    auditor = stubs.audit_grpc.AuditServiceStub(channel_for(pki.principal(TENANT, "auditor", "compliance")))
    # Follow until the denial (a read, committed by the batch within a second) arrives.
    stream = auditor.StreamEvents(
        stubs.audit.StreamEventsRequest(follow=True, methods=["/tollgate.v1.TenantService/ListTenants"]),
        timeout=TIMEOUT)
    first = next(m for m in stream if m.WhichOneof("item") == "records").records.records[0]
    stream.cancel()
    assert first.event.outcome_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert first.event.principal.spiffe_id == f"spiffe://example.org/tenant/{TENANT}/partner/p"

    with pytest.raises(grpc.RpcError) as info:
        auditor.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=[("tollgate-tenant", "acme")], timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(grpc.RpcError) as info:
        auditor.GetInclusionProof(stubs.audit.GetInclusionProofRequest(index=10**9, tree_size=10**9 + 1), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tree_size" in info.value.details()


def run_tollctl(*args):
    return subprocess.run([os.environ["TOLLCTL_BIN"], *args], capture_output=True, text=True, timeout=60)


def test_tollctl_export_verify_and_tamper(audit_log, gateway, pki, work_dir, stubs, channel_for):
    identity = ["--gateway", f"127.0.0.1:{gateway}", "--identity", str(pki.operator()), "--tenant", TENANT]
    key = str(pki.root / "audit.key.pub")
    export = work_dir / "export.jsonl"

    done = run_tollctl("audit", "export", "--out", str(export), *identity)
    assert done.returncode == 0, done.stderr
    verified = run_tollctl("audit", "verify", "--export", str(export), "--key", key)
    assert verified.returncode == 0, verified.stderr
    assert "verified" in verified.stdout

    live = run_tollctl("audit", "verify", "--key", key, *identity)
    assert live.returncode == 0, live.stderr

    # A range from index 7: re-hashed onto one inclusion proof's left edge. One byte of record 9
    # changed in PostgreSQL is named, and the range after it still verifies.
    ranged = run_tollctl("audit", "verify", "--start", "7", "--key", key, *identity)
    assert ranged.returncode == 0, ranged.stderr
    assert "verified" in ranged.stdout
    # A start past the signed end means a wrong start or a log cut back: a finding, not "0 verified".
    beyond = run_tollctl("audit", "verify", "--start", "1000000", "--key", key, *identity)
    assert beyond.returncode == 1, beyond.stdout + beyond.stderr
    assert "cut back" in beyond.stderr
    # Inside the request digest (field 9: tag 0x4a, length 0x20), so the event still decodes.
    at = "position('\\x4a20'::bytea IN leaf) + 10"
    flip = (f"UPDATE audit_leaves SET leaf = set_byte(leaf, {at}, get_byte(leaf, {at}) # 1) "
            f"WHERE tenant_id = '{TENANT}' AND leaf_index = 9")
    admin_query(flip)
    try:
        bad_range = run_tollctl("audit", "verify", "--start", "7", "--key", key, *identity)
        assert bad_range.returncode == 1, bad_range.stdout + bad_range.stderr
        assert "first bad index 9" in bad_range.stderr
        after = run_tollctl("audit", "verify", "--start", "10", "--key", key, *identity)
        assert after.returncode == 0, after.stderr
    finally:
        admin_query(flip)

    # One byte of record 4's leaf changed in the file: verify names index 4, located with the
    # gateway's consistency proofs.
    lines = export.read_text().splitlines()
    entry = json.loads(lines[1 + 4])
    leaf = bytearray(base64.b64decode(entry["leaf"]))
    leaf[-3] ^= 0x01
    entry["leaf"] = base64.b64encode(bytes(leaf)).decode()
    lines[1 + 4] = json.dumps(entry)
    tampered = work_dir / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n")
    bad = run_tollctl("audit", "verify", "--export", str(tampered), "--key", key, *identity)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "first bad index 4" in bad.stderr
    # Offline, with no gateway to ask for proofs, the mismatch is reported without a location.
    offline = run_tollctl("audit", "verify", "--export", str(tampered), "--key", key)
    assert offline.returncode == 1, offline.stdout + offline.stderr
    assert "do not hash to the signed root" in offline.stderr

    # A key that did not sign the checkpoint is refused.
    other = run_tollctl("certs", "audit-key", "--out", str(work_dir / "other.key"))
    assert other.returncode == 0, other.stderr
    wrong = run_tollctl("audit", "verify", "--export", str(export), "--key", str(work_dir / "other.key.pub"))
    assert wrong.returncode == 1
    assert "checkpoint does not verify" in wrong.stderr

    # A scheduled check resumes from the checkpoint it last verified, and the log must still
    # extend it. A mutation first (in the log when its reply arrives), so the log has grown past
    # the export.
    tenants = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.operator()))
    tenants.UpdateQuota(stubs.tenant.UpdateQuotaRequest(quota=stubs.common.Quota(monthly_usage_events=1020)),
                        metadata=[("tollgate-tenant", TENANT)], timeout=TIMEOUT)
    state = work_dir / "acme.checkpoint"
    first = run_tollctl("audit", "verify", "--key", key, "--save-checkpoint", str(state), *identity)
    assert first.returncode == 0, first.stderr
    saved_size = int(state.read_text().splitlines()[1])
    export_size = int(json.loads(export.read_text().splitlines()[0])["checkpoint"].splitlines()[1])
    assert saved_size > export_size
    resumed = run_tollctl("audit", "verify", "--key", key, "--since-checkpoint", str(state),
                          "--save-checkpoint", str(state), *identity)
    assert resumed.returncode == 0, resumed.stderr
    assert f"extends the checkpoint of size {saved_size} verified earlier" in resumed.stdout
    assert int(state.read_text().splitlines()[1]) >= saved_size
    # The export is older than the checkpoint verified since: the log it shows was cut back.
    stale = run_tollctl("audit", "verify", "--export", str(export), "--key", key, "--since-checkpoint", str(state))
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "cut back" in stale.stderr
    # A checkpoint file the key did not sign is not trusted as the starting point.
    foreign = run_tollctl("audit", "verify", "--key", str(work_dir / "other.key.pub"), "--since-checkpoint", str(state), *identity)
    assert foreign.returncode != 0 and "--since-checkpoint" in foreign.stderr
    # After a rotation the saved file is checked with --since-key, and the log with --key.
    rotated = run_tollctl("audit", "verify", "--key", str(work_dir / "other.key.pub"), "--since-key", key,
                          "--since-checkpoint", str(state), *identity)
    assert rotated.returncode == 1 and "checkpoint does not verify" in rotated.stderr, rotated.stderr

    tail = run_tollctl("audit", "tail", "--json", "--method", "/tollgate.v1.TenantService/UpdateQuota", *identity)
    assert tail.returncode == 0, tail.stderr
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert len(events) >= 21
    assert all(e["event"]["method"] == "/tollgate.v1.TenantService/UpdateQuota" for e in events)


class FollowingTail:
    """`tollctl audit tail --follow --json` of `method` records from index `start`, through the
    gateway on `port`, as the operator acting on TENANT, with any further `options`."""

    def __init__(self, pki, port, method, start, *options):
        self.proc = subprocess.Popen(
            [os.environ["TOLLCTL_BIN"], "audit", "tail", "--follow", "--json", "--method", method, "--start", str(start),
             *options, "--gateway", f"127.0.0.1:{port}", "--identity", str(pki.operator()), "--tenant", TENANT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.printed, self.errors = queue.Queue(), []
        threading.Thread(target=lambda: [self.printed.put(line) for line in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.errors.append(line) for line in self.proc.stderr], daemon=True).start()

    def next_index(self):
        try:
            return int(json.loads(self.printed.get(timeout=30))["index"])
        except queue.Empty:
            raise AssertionError("tail printed nothing within 30 s; stderr: " + "".join(self.errors))

    def reconnected(self):
        """Still running, and said it reconnected."""
        return self.proc.poll() is None and any("reconnecting" in line for line in self.errors)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def follow_test_setup(audit_log, pki, stubs, channel_for):
    """(update, start, logged) for a tail test: `update()` makes one UpdateQuota, in the log when
    answered; `start` is past every earlier record; `logged()` lists the indices of UpdateQuota
    records from `start` as the log holds them."""
    audit, acting = audit_log
    tenants = stubs.tenant_grpc.TenantServiceStub(channel_for(pki.operator()))

    def update():
        request = stubs.tenant.UpdateQuotaRequest(quota=stubs.common.Quota(monthly_usage_events=1020))
        tenants.UpdateQuota(request, metadata=acting, timeout=TIMEOUT)

    start = audit.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=acting, timeout=TIMEOUT).checkpoint.tree_size

    def logged():
        return [r.index for r in stream_records(audit.StreamEvents(
            stubs.audit.StreamEventsRequest(start_index=start, methods=[UPDATE_QUOTA]), metadata=acting, timeout=TIMEOUT))]

    return update, start, logged


def test_tail_follow_resumes_across_a_gateway_restart(audit_log, pki, stubs, channel_for):
    """`tollctl audit tail --follow` outlives a restart of its gateway: it reconnects and
    resumes after the last record it printed, skipping none and printing none twice."""
    from conftest import Gateway, start_gateway, stop_gateway

    update, start, logged = follow_test_setup(audit_log, pki, stubs, channel_for)
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    tail = FollowingTail(pki, port, UPDATE_QUOTA, start)
    try:
        seen = []
        for _ in range(2):
            update()
            seen.append(tail.next_index())
        stop_gateway(proc)
        proc = None
        update()
        update()
        proc, _, _ = start_gateway(pki, Gateway.app_url, port=port)
        seen += [tail.next_index(), tail.next_index()]
        update()
        seen.append(tail.next_index())
        assert tail.reconnected(), tail.errors
        assert seen == logged(), (seen, logged())
    finally:
        tail.stop()
        if proc is not None:
            stop_gateway(proc)


def test_tail_follow_reconnects_when_its_connection_goes_silent(audit_log, pki, stubs, channel_for):
    """A connection that dies without a reset (here a relay that stops passing anything, as a NAT
    that dropped its state would) is found by tollctl's keepalive: `audit tail --follow` gives it
    up, reconnects and resumes, skipping none and printing none twice. Without keepalive it would
    wait for ever on a quiet log."""
    from conftest import FreezingRelay, Gateway, start_gateway, stop_gateway

    # A timeout as long as the interval would never expire (each ping restarts it); tollctl says so.
    refused = run_tollctl("audit", "tail", "--keepalive-time-ms", "1000", "--keepalive-timeout-ms", "1000",
                          "--identity", str(pki.operator()))
    assert refused.returncode != 0 and "must be below --keepalive-time-ms" in refused.stderr, refused.stderr

    update, start, logged = follow_test_setup(audit_log, pki, stubs, channel_for)
    # A gateway of its own, to allow pings as often as this test's client sends them.
    proc, port, _ = start_gateway(pki, Gateway.app_url, extra_args=("--min-client-ping-interval-ms", "100"))
    relay = FreezingRelay(port)
    tail = FollowingTail(pki, relay.port, UPDATE_QUOTA, start, "--keepalive-time-ms", "1000", "--keepalive-timeout-ms", "300")
    try:
        update()
        seen = [tail.next_index()]
        relay.freeze()
        update()
        update()
        seen += [tail.next_index(), tail.next_index()]
        assert tail.reconnected(), tail.errors
        assert seen == logged(), (seen, logged())
    finally:
        tail.stop()
        relay.close()
        stop_gateway(proc)


def test_the_gateway_ends_a_stream_whose_connection_went_silent(audit_log, pki, stubs, channel_for):
    """The gateway's side of a connection that died without a reset ends too, with its streams: a
    follower here, a worker's stream alike, which would otherwise go on being offered tasks that
    are lost until their leases expire. Its keepalive ping goes unacknowledged, and the kernel gives
    up on the connection after the keepalive timeout (TCP_USER_TIMEOUT), instead of retransmitting
    for about 15 minutes."""
    from conftest import FreezingRelay, Gateway, credentials, next_log_entry, start_gateway, stop_gateway

    update, start, _ = follow_test_setup(audit_log, pki, stubs, channel_for)
    _, acting = audit_log
    proc, port, _ = start_gateway(pki, Gateway.app_url,
                                  extra_args=("--keepalive-time-ms", "1000", "--keepalive-timeout-ms", "500"))
    relay = FreezingRelay(port)
    channel = grpc.secure_channel(f"127.0.0.1:{relay.port}", credentials(pki.operator()))
    follower = stubs.audit_grpc.AuditServiceStub(channel).StreamEvents(
        stubs.audit.StreamEventsRequest(start_index=start, methods=[UPDATE_QUOTA], follow=True), metadata=acting)
    first = threading.Event()

    def follow():
        try:
            for _ in follower:
                first.set()
        except grpc.RpcError:
            pass

    threading.Thread(target=follow, daemon=True).start()

    def follower_call(entry):
        return entry.get("message") == "call" and entry.get("method") == "tollgate.v1.AuditService/StreamEvents"

    try:
        update()
        assert first.wait(30), "the follower got no record"
        relay.freeze()
        # The keepalive ping goes out at most 1 s after the last read and is given up on 0.5 s
        # later; 20 s leaves room for a loaded machine, not for the kernel's 15 minutes.
        ended = next_log_entry(proc, follower_call, timeout=20)
        assert ended is not None, "the gateway still holds the follower 20 s after its connection went silent"
    finally:
        follower.cancel()
        channel.close()
        relay.close()
        stop_gateway(proc)


def test_two_gateway_processes_append_one_unforked_log(audit_log, gateway, replica, pki, stubs):
    """Two `tollgate serve` processes on one database, called concurrently, build one history."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import credentials

    tenant = "audit-replicas"
    acting = [("tollgate-tenant", tenant)]
    channels = [grpc.secure_channel(f"127.0.0.1:{port}", credentials(pki.operator())) for port in (gateway, replica)]
    try:
        stubs_by_process = [stubs.tenant_grpc.TenantServiceStub(ch) for ch in channels]
        try:
            stubs_by_process[0].CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tenant), timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS

        def update(i):
            request = stubs.tenant.UpdateQuotaRequest(quota=stubs.common.Quota(monthly_usage_events=i + 1))
            stubs_by_process[i % 2].UpdateQuota(request, metadata=acting, timeout=TIMEOUT)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(update, range(60)))

        name, public_key = parse_verifier_key(pki.audit_verifier_key)
        audits = [stubs.audit_grpc.AuditServiceStub(ch) for ch in channels]
        checkpoints = [a.GetCheckpoint(stubs.audit.GetCheckpointRequest(), metadata=acting, timeout=TIMEOUT).checkpoint
                       for a in audits]
        records = stream_records(audits[1].StreamEvents(stubs.audit.StreamEventsRequest(), metadata=acting,
                                                        timeout=TIMEOUT))
        assert [r.index for r in records] == list(range(len(records)))
        leaves = [bytes(r.leaf) for r in records]
        assert sum(r.event.method.endswith("/UpdateQuota") for r in records) == 60
        # Each process's checkpoint is a prefix root of the same single sequence of leaves.
        for checkpoint in checkpoints:
            _, size, root = verify_note(checkpoint.signed_note, name, public_key)
            assert size >= 60
            assert mth(leaves[:size]) == root
    finally:
        for ch in channels:
            ch.close()
