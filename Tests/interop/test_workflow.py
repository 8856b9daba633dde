"""Interop: WorkflowService through grpcio, with a Python worker on the Connect stream."""
import base64
import datetime
import json
import os
import queue
import signal
import subprocess
import threading
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from conftest import Gateway, _env, admin_query, credentials, start_gateway, stop_gateway, tollctl

TIMEOUT = 10


@pytest.fixture
def tenant(gateway, pki, stubs):
    """A fresh tenant per test, so one test's queued runs never reach another's workers."""
    tid = "w-" + uuid.uuid4().hex[:10]
    ch = grpc.secure_channel(f"127.0.0.1:{gateway}", credentials(pki.operator()))
    stubs.tenant_grpc.TenantServiceStub(ch).CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=tid), timeout=TIMEOUT)
    ch.close()
    return tid


def stub_for(port, identity, stubs):
    return stubs.workflow_grpc.WorkflowServiceStub(grpc.secure_channel(f"127.0.0.1:{port}", credentials(identity)))


class PyWorker:
    """One Connect stream driven by the test: send() queues a message, next() waits for the server's."""

    def __init__(self, stub, w, types, capacity, name="py-worker", held=()):
        self.w = w
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        self.requests.put(w.WorkerMessage(hello=w.WorkerHello(
            task_types=types, capacity=capacity, worker_name=name, held_lease_ids=list(held))))

        def outgoing():
            while True:
                message = self.requests.get()
                if message is None:
                    return
                yield message

        self.call = stub.Connect(outgoing(), timeout=60)

        def pump():
            try:
                for message in self.call:
                    self.responses.put(message)
                self.responses.put(None)
            except grpc.RpcError as e:
                self.responses.put(e)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def send(self, message):
        self.requests.put(message)

    def next(self, timeout=TIMEOUT):
        message = self.responses.get(timeout=timeout)
        if isinstance(message, Exception):
            raise message
        assert message is not None, "the server ended the worker stream"
        return message

    def task(self, timeout=TIMEOUT):
        message = self.next(timeout)
        assert message.WhichOneof("kind") == "task", message
        return message.task

    def ack(self):
        message = self.next()
        assert message.WhichOneof("kind") == "ack", message
        return message.ack

    def complete(self, task, result=b"ok"):
        self.send(self.w.WorkerMessage(completed=self.w.TaskCompleted(lease_id=task.lease_id, result=result)))
        ack = self.ack()
        assert ack.accepted and ack.lease_id == task.lease_id, ack

    def fail(self, task, error, retryable):
        self.send(self.w.WorkerMessage(failed=self.w.TaskFailed(lease_id=task.lease_id, error=error, retryable=retryable)))
        return self.ack()

    def close(self):
        self.requests.put(None)
        self.thread.join(TIMEOUT)


def bad_request_fields(err):
    status = status_pb2.Status()
    status.ParseFromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    fields = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return set(fields)


def test_dispatch_is_idempotent_and_validated(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    first = partner.Dispatch(w.DispatchRequest(type="invoice-export", payload=b"inv-7", idempotency_key="inv-7"), timeout=TIMEOUT)
    assert first.created and first.run.state == w.RUN_STATE_QUEUED and first.run.max_attempts == 3
    again = partner.Dispatch(w.DispatchRequest(type="invoice-export", payload=b"inv-7", idempotency_key="inv-7"), timeout=TIMEOUT)
    assert not again.created and again.run.run_id == first.run.run_id
    with pytest.raises(grpc.RpcError) as err:
        partner.Dispatch(w.DispatchRequest(type="invoice-export", payload=b"other", idempotency_key="inv-7"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        partner.Dispatch(w.DispatchRequest(type="", priority=101, max_attempts=1000), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == {"type", "priority", "max_attempts"}
    with pytest.raises(grpc.RpcError) as err:
        partner.GetRun(w.GetRunRequest(run_id="not-a-run"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert partner.GetRun(w.GetRunRequest(run_id=first.run.run_id), timeout=TIMEOUT).run.payload == b"inv-7"


def test_python_worker_runs_a_task_and_watch_sees_every_state(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs), w, ["export"], 2)
    try:
        run = partner.Dispatch(w.DispatchRequest(type="export", payload=b"job"), timeout=TIMEOUT).run
        task = worker.task()
        assert (task.run_id, task.payload, task.attempt, task.type) == (run.run_id, b"job", 1, "export")
        assert task.lease_timeout.seconds == 30
        worker.send(w.WorkerMessage(heartbeat=w.Heartbeat(lease_ids=[task.lease_id])))
        worker.complete(task, b"result-bytes")
    finally:
        worker.close()
    events = list(partner.WatchRun(w.WatchRunRequest(run_id=run.run_id), timeout=TIMEOUT))
    assert [e.run.state for e in events] == [w.RUN_STATE_QUEUED, w.RUN_STATE_RUNNING, w.RUN_STATE_SUCCEEDED]
    assert [e.previous_state for e in events] == [w.RUN_STATE_UNSPECIFIED, w.RUN_STATE_QUEUED, w.RUN_STATE_RUNNING]
    assert events[-1].run.result == b"result-bytes"


def test_approval_gates_and_rejection_is_final(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    gated = partner.Dispatch(w.DispatchRequest(
        type="export", payload=b"gated", approval=w.ApprovalGate(required_approver="finance", reason="large")), timeout=TIMEOUT).run
    assert gated.state == w.RUN_STATE_PENDING_APPROVAL and gated.approval.reason == "large"
    doomed = partner.Dispatch(w.DispatchRequest(
        type="export", approval=w.ApprovalGate(required_approver="finance")), timeout=TIMEOUT).run
    approved = partner.Approve(w.ApproveRequest(run_id=gated.run_id, approver_id="ann", comment="fine"), timeout=TIMEOUT).run
    assert approved.state == w.RUN_STATE_QUEUED
    rejected = partner.Reject(w.RejectRequest(run_id=doomed.run_id, approver_id="ann", comment="no"), timeout=TIMEOUT).run
    assert rejected.state == w.RUN_STATE_REJECTED
    for run_id in (gated.run_id, doomed.run_id):
        with pytest.raises(grpc.RpcError) as err:
            partner.Approve(w.ApproveRequest(run_id=run_id, approver_id="ann"), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs), w, ["export"], 4)
    try:
        task = worker.task()
        assert task.run_id == gated.run_id
        worker.complete(task)
    finally:
        worker.close()
    # Workers may not approve anything.
    with pytest.raises(grpc.RpcError) as err:
        stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs).Approve(
            w.ApproveRequest(run_id=gated.run_id, approver_id="x"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_failures_retry_until_dead(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    flaky = partner.Dispatch(w.DispatchRequest(type="export", payload=b"flaky", max_attempts=3), timeout=TIMEOUT).run
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs), w, ["export"], 1)
    try:
        for attempt in (1, 2, 3):
            task = worker.task()
            assert (task.run_id, task.attempt) == (flaky.run_id, attempt)
            assert worker.fail(task, f"boom {attempt}", retryable=True).accepted
        fatal = partner.Dispatch(w.DispatchRequest(type="export", payload=b"fatal", max_attempts=9), timeout=TIMEOUT).run
        task = worker.task()
        assert task.run_id == fatal.run_id
        assert worker.fail(task, "malformed invoice", retryable=False).accepted
    finally:
        worker.close()
    dead = partner.GetRun(w.GetRunRequest(run_id=flaky.run_id), timeout=TIMEOUT).run
    assert (dead.state, dead.attempt, dead.last_error) == (w.RUN_STATE_DEAD, 3, "boom 3")
    fatal = partner.GetRun(w.GetRunRequest(run_id=fatal.run_id), timeout=TIMEOUT).run
    assert (fatal.state, fatal.attempt, fatal.last_error) == (w.RUN_STATE_DEAD, 1, "malformed invoice")


def test_cancelling_a_running_task_revokes_its_lease(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    run = partner.Dispatch(w.DispatchRequest(type="export"), timeout=TIMEOUT).run
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs), w, ["export"], 1)
    try:
        task = worker.task()
        assert partner.CancelRun(w.CancelRunRequest(run_id=run.run_id, reason="stop"), timeout=TIMEOUT).run.state == w.RUN_STATE_CANCELLED
        message = worker.next()
        assert message.WhichOneof("kind") == "revoked"
        assert (message.revoked.lease_id, message.revoked.reason) == (task.lease_id, "CANCELLED")
        worker.send(w.WorkerMessage(completed=w.TaskCompleted(lease_id=task.lease_id)))
        assert not worker.ack().accepted
    finally:
        worker.close()


def test_scheduled_run_starts_when_due(gateway, pki, stubs, tenant):
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs), w, ["export"], 1)
    try:
        due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(due)
        run = partner.Dispatch(w.DispatchRequest(type="export", run_after=when), timeout=TIMEOUT).run
        task = worker.task()
        received = datetime.datetime.now(datetime.timezone.utc)
        assert task.run_id == run.run_id
        assert received >= due - datetime.timedelta(milliseconds=50)
        assert received < due + datetime.timedelta(seconds=1)
        worker.complete(task)
    finally:
        worker.close()


def test_tenants_never_see_each_others_runs(gateway, pki, stubs, tenant):
    w = stubs.workflow
    ch = grpc.secure_channel(f"127.0.0.1:{gateway}", credentials(pki.operator()))
    other = "w-" + uuid.uuid4().hex[:10]
    stubs.tenant_grpc.TenantServiceStub(ch).CreateTenant(stubs.tenant.CreateTenantRequest(tenant_id=other), timeout=TIMEOUT)
    ch.close()
    mine = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    theirs = stub_for(gateway, pki.principal(other, "partner", "p"), stubs)
    secret = mine.Dispatch(w.DispatchRequest(type="export", payload=b"secret"), timeout=TIMEOUT).run
    with pytest.raises(grpc.RpcError) as err:
        theirs.GetRun(w.GetRunRequest(run_id=secret.run_id), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(theirs.ListRuns(w.ListRunsRequest(), timeout=TIMEOUT).runs) == []
    own = theirs.Dispatch(w.DispatchRequest(type="export", payload=b"own"), timeout=TIMEOUT).run
    worker = PyWorker(stub_for(gateway, pki.principal(other, "worker", "wk"), stubs), w, ["export"], 8)
    try:
        task = worker.task()
        assert task.run_id == own.run_id
        worker.complete(task)
    finally:
        worker.close()
    assert admin_query(f"SELECT state FROM workflow_runs WHERE run_id = '{secret.run_id}'") == [("queued",)]


def test_leased_runs_survive_sigkill(gateway, pki, stubs, tenant):
    """A gateway holding leases is killed with SIGKILL: the completed run stays completed once, the
    others are offered again (attempt 2) once their leases expire, and a stale lease's result is refused."""
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    runs = [partner.Dispatch(w.DispatchRequest(type="export", payload=f"r{i}".encode()), timeout=TIMEOUT).run for i in range(3)]
    proc, port, _ = start_gateway(pki, Gateway.app_url, ["--workflow-lease-timeout-ms", "1000"])
    try:
        doomed = PyWorker(stub_for(port, pki.principal(tenant, "worker", "crash"), stubs), w, ["export"], 3)
        tasks = [doomed.task() for _ in range(3)]
        assert {t.run_id for t in tasks} == {r.run_id for r in runs}
        doomed.complete(tasks[0])
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError):
            doomed.next()
    finally:
        stop_gateway(proc)
    # The session gateway's reaper expires the dead replica's leases (1 s) and re-offers the runs.
    worker = PyWorker(stub_for(gateway, pki.principal(tenant, "worker", "after"), stubs), w, ["export"], 3)
    try:
        again = [worker.task(timeout=15) for _ in range(2)]
        assert {t.run_id for t in again} == {t.run_id for t in tasks[1:]}
        assert all(t.attempt == 2 for t in again)
        worker.send(w.WorkerMessage(completed=w.TaskCompleted(lease_id=tasks[1].lease_id, result=b"stale")))
        assert not worker.ack().accepted
        for task in again:
            worker.complete(task, b"fresh")
    finally:
        worker.close()
    rows = admin_query(
        f"SELECT run_id, state, attempt, encode(result, 'escape') FROM workflow_runs WHERE tenant_id = '{tenant}' ORDER BY run_id")
    by_id = {r[0]: list(r[1:]) for r in rows}
    assert by_id[tasks[0].run_id] == ["succeeded", "1", "ok"]
    for task in tasks[1:]:
        assert by_id[task.run_id] == ["succeeded", "2", "fresh"]


def test_tollctl_runs_and_worker(gateway, pki, stubs, tenant):
    gw = ["--gateway", f"127.0.0.1:{gateway}"]
    partner = ["--identity", str(pki.principal(tenant, "partner", "cli")), *gw]
    worker = ["--identity", str(pki.principal(tenant, "worker", "cli-worker")), *gw]
    run = json.loads(tollctl("runs", "dispatch", "shout", "--payload", "hello", "--key", "k1", *partner).stdout)
    same = tollctl("runs", "dispatch", "shout", "--payload", "hello", "--key", "k1", *partner)
    assert json.loads(same.stdout)["run_id"] == run["run_id"] and "existing run" in same.stderr
    gated = json.loads(tollctl("runs", "dispatch", "shout", "--payload", "later", "--approver", "finance", *partner).stdout)
    assert gated["state"] == "RUN_STATE_PENDING_APPROVAL"
    fatal = json.loads(tollctl("runs", "dispatch", "fatal", "--max-attempts", "5", *partner).stdout)
    out = tollctl("worker", "--type", "shout", "--type", "fatal", "--capacity", "1", "--max-tasks", "2",
                  "--exec", 'if [ "$TOLLGATE_TASK_TYPE" = fatal ]; then echo broken >&2; exit 65; fi; tr a-z A-Z', *worker)
    assert "completed" in out.stdout and "failed (exit 65)" in out.stdout, out.stdout + out.stderr
    got = json.loads(tollctl("runs", "get", run["run_id"], *partner).stdout)
    assert got["state"] == "RUN_STATE_SUCCEEDED" and base64.b64decode(got["result"]) == b"HELLO"
    dead = json.loads(tollctl("runs", "get", fatal["run_id"], *partner).stdout)
    assert (dead["state"], dead["attempt"], dead["last_error"]) == ("RUN_STATE_DEAD", 1, "broken")
    watch = tollctl("runs", "watch", run["run_id"], *partner)
    assert [line.split()[1] for line in watch.stdout.splitlines()] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert tollctl("runs", "watch", fatal["run_id"], *partner, check=False).returncode == 1
    listed = tollctl("runs", "list", "--state", "dead", *partner).stdout.splitlines()
    assert listed[0].startswith("RUN ID") and len(listed) == 2 and fatal["run_id"] in listed[1]
    rejected = json.loads(tollctl("runs", "reject", gated["run_id"], "--approver", "ann", *partner).stdout)
    assert rejected["state"] == "RUN_STATE_REJECTED"
    refused = tollctl("runs", "approve", gated["run_id"], "--approver", "ann", *partner, check=False)
    assert refused.returncode == 2 and "failedPrecondition" in refused.stderr.replace("failed_precondition", "failedPrecondition")


def spawn_tollctl(*args, identity, port):
    """A tollctl process against the gateway on `port`; returns it and queues of its stdout and
    stderr lines (None at the end of each)."""
    p = subprocess.Popen([_env("TOLLCTL_BIN"), *args, "--identity", str(identity), "--gateway", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, errors = queue.Queue(), queue.Queue()
    for stream, q in ((p.stdout, lines), (p.stderr, errors)):
        threading.Thread(target=_pump, args=(stream, q), daemon=True).start()
    return p, lines, errors


def _pump(stream, q):
    for line in stream:
        q.put(line)
    q.put(None)


def wait_for(q, text, what):
    """The lines of `q` up to the first holding `text` (None: up to its end)."""
    seen = []
    while True:
        try:
            line = q.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"no {what} within 30 s; saw {seen}")
        if line is None:
            if text is None:
                return seen
            raise AssertionError(f"no {what}: the output ended; saw {seen}")
        seen.append(line)
        if text is not None and text in line:
            return seen


def release_fifo(path):
    """Writes to a FIFO if a reader waits on it, so no command of a failed test outlives it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"go")
        os.close(fd)
    except OSError:
        pass


def test_tollctl_worker_and_watch_outlive_a_gateway_restart(gateway, pki, stubs, tenant, tmp_path):
    """`tollctl worker` keeps its command running through a restart of its gateway, takes the lease
    back on the new stream and completes the run in its first attempt; at capacity 1 it is given
    nothing else meanwhile. `tollctl runs watch` goes on after the last change it printed."""
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    started, release, log = tmp_path / "started", tmp_path / "release", tmp_path / "log"
    os.mkfifo(started)
    os.mkfifo(release)
    # The first run's command says it started, then waits to be released; every command logs
    # its start and end, so any overlap of the two runs shows.
    command = (f'read -r p; echo "start $p" >> {log}; '
               f'if [ "$p" = first ]; then echo up > {started}; cat {release} > /dev/null; fi; '
               f'echo "end $p" >> {log}; echo "$p" | tr a-z A-Z')
    first = partner.Dispatch(w.DispatchRequest(type="held", payload=b"first\n"), timeout=TIMEOUT).run
    proc, port, _ = start_gateway(pki, Gateway.app_url)
    worker, _, worker_errors = spawn_tollctl("worker", "--type", "held", "--capacity", "1", "--max-tasks", "2",
                                             "--exec", command, identity=pki.principal(tenant, "worker", "cli"), port=port)
    watch, watched, watch_errors = spawn_tollctl("runs", "watch", first.run_id,
                                                 identity=pki.principal(tenant, "partner", "p"), port=port)
    signalled = queue.Queue()
    threading.Thread(target=lambda: signalled.put(started.read_text()), daemon=True).start()
    try:
        try:
            assert signalled.get(timeout=30) == "up\n"
        except queue.Empty:
            state = admin_query(f"SELECT state FROM workflow_runs WHERE run_id = '{first.run_id}'")
            raise AssertionError(f"the first run's command did not start; the run is {state}; worker stderr: "
                                 + "".join(filter(None, list(worker_errors.queue))))
        second = partner.Dispatch(w.DispatchRequest(type="held", payload=b"second\n"), timeout=TIMEOUT).run
        printed = wait_for(watched, "RUNNING", "RUNNING from the watch")
        stop_gateway(proc)
        proc = None
        proc, _, _ = start_gateway(pki, Gateway.app_url, port=port)
        wait_for(worker_errors, "connected again; taking back 1 leases", "reconnection of the worker")
        release.write_text("go")
        assert worker.wait(timeout=60) == 0
        assert watch.wait(timeout=60) == 0
        printed += wait_for(watched, None, "end of the watch")
        assert [line.split()[1] for line in printed] == ["QUEUED", "RUNNING", "SUCCEEDED"], printed
        assert any("reconnecting" in line for line in wait_for(watch_errors, None, "end of the watch's stderr"))
    finally:
        release_fifo(release)
        for p in (worker, watch):
            if p.poll() is None:
                p.kill()
                p.wait()
        if proc is not None:
            stop_gateway(proc)
    assert log.read_text().splitlines() == ["start first", "end first", "start second", "end second"]
    for run, result in ((first, b"FIRST\n"), (second, b"SECOND\n")):
        done = partner.GetRun(w.GetRunRequest(run_id=run.run_id), timeout=TIMEOUT).run
        assert (done.state, done.attempt, done.result) == (w.RUN_STATE_SUCCEEDED, 1, result)


def test_a_bad_worker_hello_is_invalid_argument(gateway, pki, stubs, tenant):
    w = stubs.workflow
    stub = stub_for(gateway, pki.principal(tenant, "worker", "wk"), stubs)
    worker = PyWorker(stub, w, ["bad type!"], 0)
    try:
        with pytest.raises(grpc.RpcError) as err:
            worker.next()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == {"hello.task_types[0]", "hello.capacity"}
    finally:
        worker.close()
    worker = PyWorker(stub, w, ["export"], 1, held=[str(uuid.uuid4()), "lease-from-yesterday"])
    try:
        with pytest.raises(grpc.RpcError) as err:
            worker.next()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == {"hello.held_lease_ids[1]"}
        assert "lease-from-yesterday" in err.value.details()
    finally:
        worker.close()
    # A worker holds at most 256 leases, so a heartbeat names at most that many.
    worker = PyWorker(stub, w, ["export"], 1)
    try:
        worker.send(w.WorkerMessage(heartbeat=w.Heartbeat(lease_ids=[str(uuid.uuid4()) for _ in range(257)])))
        with pytest.raises(grpc.RpcError) as err:
            worker.next()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == {"heartbeat.lease_ids"}
    finally:
        worker.close()
    # A stream that starts with anything but hello is refused too.
    requests = iter([w.WorkerMessage(heartbeat=w.Heartbeat())])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Connect(requests, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in err.value.details()


def test_tollctl_worker_drains_on_sigterm(gateway, pki, stubs, tenant, tmp_path):
    """SIGTERM makes `tollctl worker` finish what it runs, report it and exit 0; a second signal
    stops the commands and exits at once."""
    w = stubs.workflow
    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    started, release = tmp_path / "started", tmp_path / "release"
    os.mkfifo(started)
    os.mkfifo(release)
    command = f'echo up > {started}; cat {release} > /dev/null; echo done'
    identity = pki.principal(tenant, "worker", "drained")
    outcomes = []
    try:
        for signals in (1, 2):
            run = partner.Dispatch(w.DispatchRequest(type="drained"), timeout=TIMEOUT).run
            worker, _, errors = spawn_tollctl("worker", "--type", "drained", "--exec", command, identity=identity, port=gateway)
            signalled = queue.Queue()
            threading.Thread(target=lambda: signalled.put(started.read_text()), daemon=True).start()
            try:
                assert signalled.get(timeout=30) == "up\n"
                worker.send_signal(signal.SIGTERM)
                wait_for(errors, "stopping: taking no more tasks, finishing 1 running", "the worker's drain")
                if signals == 2:
                    worker.send_signal(signal.SIGTERM)
                    assert worker.wait(timeout=30) == 128 + signal.SIGTERM
                else:
                    release.write_text("go")
                    assert worker.wait(timeout=30) == 0, "".join(wait_for(errors, None, "stderr"))
            finally:
                release_fifo(release)
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            outcomes.append(partner.GetRun(w.GetRunRequest(run_id=run.run_id), timeout=TIMEOUT).run)
    finally:
        release_fifo(release)
    drained, stopped = outcomes
    assert (drained.state, drained.attempt, drained.result) == (w.RUN_STATE_SUCCEEDED, 1, b"done\n")
    # Stopped at once: the lease stands until it expires, and the run is offered again then.
    assert (stopped.state, stopped.attempt) == (w.RUN_STATE_RUNNING, 1)



def test_tollctl_worker_carries_on_with_a_certificate_renewed_on_disk(gateway, pki, stubs, tenant, tmp_path):
    """A stream ends a second after its certificate expires. `tollctl worker` reads its identity
    files again, as a SPIFFE agent's renewal leaves them, and reconnects with the renewed
    certificate. (The test waits for a certificate of eight seconds to expire.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from conftest import TRUST_DOMAIN

    w = stubs.workflow
    ca_dir = pki.root / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    short = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewing")]))
             .issuer_name(ca_cert.subject)
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(seconds=8))
             .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                 f"spiffe://{TRUST_DOMAIN}/tenant/{tenant}/worker/renewing")]), critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .sign(ca_key, hashes.SHA256()))
    identity = tmp_path / "identity"
    identity.mkdir()
    (identity / "cert.pem").write_bytes(short.public_bytes(serialization.Encoding.PEM))
    (identity / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (identity / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())

    partner = stub_for(gateway, pki.principal(tenant, "partner", "p"), stubs)
    worker, lines, errors = spawn_tollctl("worker", "--type", "renewal", "--capacity", "1", "--max-tasks", "2",
                                          "--exec", "cat", identity=identity, port=gateway)
    try:
        # A first run shows the stream is up on the short-lived certificate.
        partner.Dispatch(w.DispatchRequest(type="renewal", payload=b"one"), timeout=TIMEOUT)
        wait_for(lines, "completed", "the first run")
        renewed = pki.principal(tenant, "worker", "renewing")
        for name in ("cert.pem", "key.pem"):
            (identity / name).write_bytes((renewed / name).read_bytes())
        wait_for(errors, "reconnect with a renewed certificate", "the stream's end at expiry")
        second = partner.Dispatch(w.DispatchRequest(type="renewal", payload=b"two"), timeout=TIMEOUT).run
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    done = partner.GetRun(w.GetRunRequest(run_id=second.run_id), timeout=TIMEOUT).run
    assert (done.state, done.result) == (w.RUN_STATE_SUCCEEDED, b"two")
