import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import PostgresNIO
import SwiftProtobuf
import Synchronization
import Testing
import TollgateCertificates
import TollgateAudit
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos
import TollgateStore
@testable import TollgateWorkflow

/// WorkflowService over real mTLS against real Postgres, with real worker streams.
@Suite(.timeLimit(.minutes(2))) struct WorkflowTests {
  typealias Workflow = Tollgate_V1_WorkflowService.Client<HTTP2ClientTransport.Posix>

  static func createTenants(_ gw: TestGateway, _ tenants: [String], typeConcurrency: [String: UInt32] = [:]) async throws {
    try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
      let admin = Tollgate_V1_TenantService.Client(wrapping: client)
      for tenant in tenants {
        _ = try await admin.createTenant(.with {
          $0.tenantID = tenant
          $0.quota.workflowTypeConcurrency = typeConcurrency
        })
      }
    }
  }

  static func dispatch(
    _ workflow: Workflow,
    _ type: String = "export",
    payload: String = "",
    key: String = "",
    priority: Int32 = 0,
    maxAttempts: UInt32 = 0,
    approver: String = "",
    runAfter: Date? = nil
  ) async throws -> Tollgate_V1_Run {
    try await workflow.dispatch(.with {
      $0.type = type
      $0.payload = Data(payload.utf8)
      $0.idempotencyKey = key
      $0.priority = priority
      $0.maxAttempts = maxAttempts
      if !approver.isEmpty { $0.approval = .with { $0.requiredApprover = approver; $0.reason = "over budget" } }
      if let runAfter { $0.runAfter = Google_Protobuf_Timestamp(date: runAfter) }
    }).run
  }

  /// Watches `gated` through `watching` from before its approval (through `approving`) until
  /// `worker` has run it, and returns every state the watch saw.
  static func approveAndWatch(
    _ gated: Tollgate_V1_Run,
    approving: Workflow,
    watching: Workflow,
    worker: TestWorker
  ) async throws -> [Tollgate_V1_RunState] {
    let (started, watchStarted) = AsyncStream.makeStream(of: Void.self)
    let watcher = Task {
      try await watching.watchRun(.with { $0.runID = gated.runID }) { response in
        var states: [Tollgate_V1_RunState] = []
        for try await event in response.messages {
          states.append(event.run.state)
          if states.count == 1 { watchStarted.yield() }
        }
        return states
      }
    }
    var firstState = started.makeAsyncIterator()
    _ = await firstState.next()
    _ = try await approving.approve(.with { $0.runID = gated.runID; $0.approverID = "ops-lead" })
    try await worker.completeNext(of: gated)
    return try await watcher.value
  }

  @Test func dispatchIsIdempotentValidatedAndListed() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let first = try await workflow.dispatch(.with {
          $0.type = "invoice-export"
          $0.payload = Data("inv-1".utf8)
          $0.idempotencyKey = "inv-1"
        })
        #expect(first.created)
        #expect(first.run.state == .queued)
        #expect(first.run.maxAttempts == 3)
        let again = try await workflow.dispatch(.with {
          $0.type = "invoice-export"
          $0.payload = Data("inv-1".utf8)
          $0.idempotencyKey = "inv-1"
        })
        #expect(!again.created)
        #expect(again.run.runID == first.run.runID)
        // The same key for a different request is refused rather than guessed at.
        #expect(await statusCode { try await Self.dispatch(workflow, "invoice-export", payload: "other", key: "inv-1") } == .alreadyExists)
        do {
          _ = try await workflow.dispatch(.with {
            $0.type = "bad type!"
            $0.priority = 500
            $0.maxAttempts = 101
            $0.approval = .with { $0.reason = "no approver named" }
          })
          Issue.record("an invalid dispatch was accepted")
        } catch let error as RPCError {
          #expect(error.code == .invalidArgument)
          let fields = try #require(try error.unpackGoogleRPCStatus()).details.compactMap(\.badRequest)
            .flatMap(\.violations).map(\.field)
          #expect(Set(fields) == ["type", "priority", "max_attempts", "approval.required_approver"])
        }
        #expect(await statusCode { try await workflow.getRun(.with { $0.runID = "nope" }) } == .invalidArgument)
        #expect(await statusCode { try await workflow.getRun(.with { $0.runID = UUID().uuidString }) } == .notFound)
        #expect(try await workflow.getRun(.with { $0.runID = first.run.runID }).run.payload == Data("inv-1".utf8))

        for i in 0..<4 { _ = try await Self.dispatch(workflow, "report", payload: "r\(i)") }
        let page1 = try await workflow.listRuns(.with { $0.pageSize = 3 })
        #expect(page1.runs.map { String(decoding: $0.payload, as: UTF8.self) } == ["r3", "r2", "r1"])
        let page2 = try await workflow.listRuns(.with { $0.pageSize = 3; $0.pageToken = page1.nextPageToken })
        #expect(page2.runs.map { String(decoding: $0.payload, as: UTF8.self) } == ["r0", "inv-1"])
        #expect(page2.nextPageToken.isEmpty)
        let reports = try await workflow.listRuns(.with { $0.type = "report"; $0.states = [.queued] })
        #expect(reports.runs.count == 4)
        #expect(try await workflow.listRuns(.with { $0.states = [.succeeded] }).runs.isEmpty)
        #expect(await statusCode { try await workflow.listRuns(.with { $0.pageToken = "bogus" }) } == .invalidArgument)
      }
      // Dispatch is a partner's; agents have no business here.
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        #expect(await statusCode { try await Self.dispatch(Workflow(wrapping: client)) } == .permissionDenied)
      }
      #expect(
        try await gw.count(
          "SELECT count(*) FROM \(TestGateway.committedAudit) WHERE tenant_id = 'acme' AND method = '/tollgate.v1.WorkflowService/Dispatch'"
        ) >= 3
      )
    }
  }

  @Test func aWorkerIsPushedTasksAndWatchersSeeEveryState() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
        try await TestWorker.with(workerClient, types: ["export"], capacity: 2) { worker in
          // Connected and idle before the dispatch: the task must reach it without polling.
          try await gw.withClient(partner) { client async throws in
            let workflow = Workflow(wrapping: client)
            let run = try await Self.dispatch(workflow, payload: "p1")
            let task = try await worker.nextTask()
            #expect(task.runID == run.runID)
            #expect(task.payload == Data("p1".utf8))
            #expect(task.attempt == 1)
            #expect(task.leaseTimeout.seconds == 30)
            worker.send(.with { $0.heartbeat = .init() })
            worker.send(.with { $0.completed = .with { $0.leaseID = task.leaseID; $0.result = Data("done".utf8) } })
            let ack = try await worker.nextAck()
            #expect(ack.accepted)
            // A second completion of the same lease is refused: the lease ended with the first.
            worker.send(.with { $0.completed = .with { $0.leaseID = task.leaseID; $0.result = Data("again".utf8) } })
            #expect(try await worker.nextAck().accepted == false)
            let stored = try await workflow.getRun(.with { $0.runID = run.runID }).run
            #expect(stored.state == .succeeded)
            #expect(stored.result == Data("done".utf8))

            let events = try await workflow.watchRun(.with { $0.runID = run.runID }) { response in
              var events: [Tollgate_V1_RunEvent] = []
              for try await event in response.messages { events.append(event) }
              return events
            }
            #expect(events.map(\.run.state) == [.queued, .running, .succeeded])
            #expect(events.map(\.previousState) == [.unspecified, .queued, .running])
            #expect(events.last?.run.result == Data("done".utf8))

            // A watcher that is there before the run moves sees each change as it happens,
            // including those that are announced only because someone watches (claim, completion).
            let gated = try await Self.dispatch(workflow, payload: "p2", approver: "ops")
            let states = try await Self.approveAndWatch(gated, approving: workflow, watching: workflow, worker: worker)
            #expect(states == [.pendingApproval, .queued, .running, .succeeded])
          }
        }
      }
    }
  }

  @Test func approvalGatesARunUntilApprovedAndRejectionIsFinal() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let gated = try await Self.dispatch(workflow, payload: "gated", priority: 100, approver: "finance-lead")
        #expect(gated.state == .pendingApproval)
        #expect(gated.approval.requiredApprover == "finance-lead")
        let plain = try await Self.dispatch(workflow, payload: "plain", priority: -100)
        let doomed = try await Self.dispatch(workflow, payload: "doomed", approver: "finance-lead")
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
            // The gated run has the higher priority, but only the plain one may start.
            try await worker.completeNext(of: plain)
            #expect(
              await statusCode { try await workflow.approve(.with { $0.runID = gated.runID }) } == .invalidArgument,
              "approver_id is required"
            )
            let approved = try await workflow.approve(.with {
              $0.runID = gated.runID
              $0.approverID = "jane@acme.example"
              $0.comment = "ok for Q3"
            })
            #expect(approved.run.state == .queued)
            try await worker.completeNext(of: gated)
          }
        }
        let rejected = try await workflow.reject(.with { $0.runID = doomed.runID; $0.approverID = "jane@acme.example" })
        #expect(rejected.run.state == .rejected)
        for id in [doomed.runID, gated.runID, plain.runID] {
          #expect(
            await statusCode { try await workflow.approve(.with { $0.runID = id; $0.approverID = "jane" }) } == .failedPrecondition
          )
        }
        #expect(await statusCode { try await workflow.cancelRun(.with { $0.runID = doomed.runID }) } == .failedPrecondition)
        // Who decided, and why, is stored with the run and in the audit log's request digest.
        let decided = try await gw.count(
          "SELECT count(*) FROM workflow_runs WHERE decided_by = 'jane@acme.example' AND decision_comment = 'ok for Q3'"
        )
        #expect(decided == 1)
        #expect(
          try await gw.count(
            "SELECT count(*) FROM \(TestGateway.committedAudit) WHERE method IN ('/tollgate.v1.WorkflowService/Approve', '/tollgate.v1.WorkflowService/Reject')"
          ) == 6
        )
      }
    }
  }

  @Test func failedAttemptsAreRetriedWithBackoffUntilDead() async throws {
    try await TestGateway.run(configure: { $0.workflowRetryBase = .milliseconds(20) }) { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let flaky = try await Self.dispatch(workflow, payload: "flaky", maxAttempts: 3)
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
            for attempt in 1...3 {
              let task = try await worker.nextTask()
              #expect(task.runID == flaky.runID)
              #expect(task.attempt == UInt32(attempt))
              worker.send(.with { $0.failed = .with { $0.leaseID = task.leaseID; $0.error = "boom \(attempt)"; $0.retryable = true } })
              #expect(try await worker.nextAck().accepted)
            }
            let dead = try await workflow.getRun(.with { $0.runID = flaky.runID }).run
            #expect(dead.state == .dead)
            #expect(dead.attempt == 3)
            #expect(dead.lastError == "boom 3")

            let fatal = try await Self.dispatch(workflow, payload: "fatal", maxAttempts: 5)
            let task = try await worker.nextTask()
            #expect(task.runID == fatal.runID)
            worker.send(.with { $0.failed = .with { $0.leaseID = task.leaseID; $0.error = "bad input"; $0.retryable = false } })
            #expect(try await worker.nextAck().accepted)
            let run = try await workflow.getRun(.with { $0.runID = fatal.runID }).run
            #expect((run.state, run.attempt, run.lastError) == (.dead, 1, "bad input"))
          }
        }
        let history = try await gw.strings(
          "SELECT state FROM workflow_run_events WHERE run_id = '\(flaky.runID)' ORDER BY event_seq"
        )
        #expect(history == ["queued", "running", "failed", "running", "failed", "running", "dead"])
        // What happened on the worker's stream is in the tenant's audit log, by the worker: the
        // Connect call itself, four leases and four failures, each in the transaction that made it.
        let onTheStream = try await gw.count(
          "SELECT count(*) FROM \(TestGateway.committedAudit) WHERE tenant_id = 'acme' AND method = '/tollgate.v1.WorkflowService/Connect' AND principal LIKE '%/worker/%'"
        )
        #expect(onTheStream == 9)
      }
    }
  }

  @Test func anExpiredLeaseIsOfferedAgainAndItsLateResultRefused() async throws {
    // Long enough that the second attempt's lease, heartbeated at once, outlives a loaded machine:
    // 1 s expired it before its heartbeat in full-suite runs on a slow host.
    try await TestGateway.run(configure: { $0.workflowLeaseTimeout = .seconds(3) }) { gw in
      try await Self.createTenants(gw, ["acme"])
      let workerCert = try gw.pki.issue(tenant: "acme", role: .worker)
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let run = try await Self.dispatch(workflow, payload: "slow")
        try await gw.withClient(workerCert) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { stalled in
            let first = try await stalled.nextTask()
            #expect(first.attempt == 1)
            // No heartbeat: the lease expires, this worker is told, and the run is offered again,
            // here to the same worker (the only one connected).
            let revoked = try await stalled.next()
            #expect(revoked.revoked.leaseID == first.leaseID)
            #expect(revoked.revoked.reason == "LEASE_EXPIRED")
            let second = try await stalled.nextTask()
            #expect(second.runID == run.runID)
            #expect(second.attempt == 2)
            #expect(second.leaseID != first.leaseID)
            stalled.send(.with { $0.heartbeat = .with { $0.leaseIds = [second.leaseID] } })
            // The first attempt's result arrives late and must not overwrite the second.
            stalled.send(.with { $0.completed = .with { $0.leaseID = first.leaseID; $0.result = Data("stale".utf8) } })
            let refused = try await stalled.nextAck()
            #expect(!refused.accepted)
            #expect(refused.message.contains("no longer held"))
            stalled.send(.with { $0.completed = .with { $0.leaseID = second.leaseID; $0.result = Data("fresh".utf8) } })
            #expect(try await stalled.nextAck().accepted)
          }
        }
        let done = try await workflow.getRun(.with { $0.runID = run.runID }).run
        #expect((done.state, done.result, done.attempt) == (.succeeded, Data("fresh".utf8), 2))
        // The expiry is the gateway's own act, recorded without a principal.
        let expiries = try await gw.strings(
          "SELECT principal FROM \(TestGateway.committedAudit) WHERE tenant_id = 'acme' AND method = 'tollgate.internal/LeaseExpired'"
        )
        #expect(expiries == [""])
      }
    }
  }

  @Test func cancellingARunningRunTellsItsWorker() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let run = try await Self.dispatch(workflow, payload: "long")
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
            let task = try await worker.nextTask()
            let cancelled = try await workflow.cancelRun(.with { $0.runID = run.runID; $0.reason = "customer withdrew" })
            #expect(cancelled.run.state == .cancelled)
            let revoked = try await worker.next()
            #expect(revoked.revoked.leaseID == task.leaseID)
            #expect(revoked.revoked.reason == "CANCELLED")
            worker.send(.with { $0.completed = .with { $0.leaseID = task.leaseID } })
            #expect(try await worker.nextAck().accepted == false)
          }
        }
        #expect(try await workflow.getRun(.with { $0.runID = run.runID }).run.state == .cancelled)
        #expect(await statusCode { try await workflow.cancelRun(.with { $0.runID = run.runID }) } == .failedPrecondition)
        // A queued run is cancelled without any worker involved.
        let queued = try await Self.dispatch(workflow, "nobody-runs-this")
        #expect(try await workflow.cancelRun(.with { $0.runID = queued.runID }).run.state == .cancelled)
      }
    }
  }

  @Test func scheduledRunsStartWhenDueAndPrioritiesAreHonoured() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let low = try await Self.dispatch(workflow, payload: "low", priority: -5)
        let high = try await Self.dispatch(workflow, payload: "high", priority: 50)
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
            try await worker.completeNext(of: high)
            try await worker.completeNext(of: low)
            // Nothing else is ready: a scheduled run reaches the idle worker at its due time, not
            // before, and starts within a second of it. The start is read where it is decided, as
            // the lease's time in the database: the delivery to this process after it is the
            // transport's, which the rest of the suite's load can stretch.
            let due = Date().addingTimeInterval(1)
            let later = try await Self.dispatch(workflow, payload: "later", runAfter: due)
            let third = try await worker.nextTask()
            let received = Date()
            #expect(third.runID == later.runID)
            #expect(received >= due.addingTimeInterval(-0.05))
            let late = try await gw.strings("""
              SELECT state || ' ' || extract(epoch FROM update_time - run_after) FROM workflow_runs
              WHERE run_id = '\(later.runID)'
              """)
            #expect(late.count == 1)
            #expect(late.allSatisfy { row in
              let parts = row.split(separator: " ")
              return parts.first == "running" && parts.count == 2 && Double(parts[1]).map { $0 >= 0 && $0 < 1 } == true
            }, "state and seconds after its run_after: \(late)")
            try await worker.complete(third)
          }
        }
      }
    }
  }

  @Test func workersOnlyEverSeeTheirOwnTenantsRuns() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme", "globex"])
      let acmeRun = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        try await Self.dispatch(Workflow(wrapping: client), payload: "acme-secret")
      }
      try await gw.withClient(try gw.pki.issue(tenant: "globex", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        #expect(await statusCode { try await workflow.getRun(.with { $0.runID = acmeRun.runID }) } == .notFound)
        #expect(await statusCode { try await workflow.cancelRun(.with { $0.runID = acmeRun.runID }) } == .notFound)
        #expect(try await workflow.listRuns(.init()).runs.isEmpty)
        let globexRun = try await Self.dispatch(workflow, payload: "globex-own")
        try await gw.withClient(try gw.pki.issue(tenant: "globex", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 4) { worker in
            let task = try await worker.nextTask()
            #expect(task.runID == globexRun.runID)
            // acme's lease ids mean nothing on globex's stream.
            try await worker.complete(task)
          }
        }
      }
      #expect(try await gw.strings("SELECT state FROM workflow_runs WHERE run_id = '\(acmeRun.runID)'") == ["queued"])
    }
  }

  @Test func drainEndsWorkerStreamsWithUnavailableAndLeavesTheirLeases() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      let run = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        try await Self.dispatch(Workflow(wrapping: client), payload: "held over a drain")
      }
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
        try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
          let task = try await worker.nextTask()
          #expect(task.runID == run.runID)
          await gw.beginShutdown()
          do {
            let message = try await worker.next()
            Issue.record("the worker stream went on during the drain: \(message)")
          } catch let error as RPCError {
            #expect(error.code == .unavailable)
            #expect(error.message.contains("reconnect"))
          }
        }
      }
      // The lease is the attempt's, not the stream's: still held, to be completed after a
      // reconnect or to expire.
      #expect(try await gw.strings("SELECT state FROM workflow_runs WHERE run_id = '\(run.runID)'") == ["running"])
    }
  }

  @Test func aReconnectedWorkerHoldsItsLeasesAgainstCapacityAndIsToldOfTheirEnd() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        var runs: [Tollgate_V1_Run] = []
        for i in 1...3 { runs.append(try await Self.dispatch(workflow, payload: "r\(i)")) }
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          // The first stream takes two tasks and goes away without a word about them.
          let taken = try await TestWorker.with(workerClient, types: ["export"], capacity: 2) { worker in
            [try await worker.nextTask(), try await worker.nextTask()]
          }
          #expect(taken.map(\.runID) == [runs[0].runID, runs[1].runID])
          let unknown = UUID().uuidString.lowercased()
          try await TestWorker.with(workerClient, types: ["export"], capacity: 2, held: taken.map(\.leaseID) + [unknown]) { worker in
            // A lease that is not live is revoked at once; the two live ones fill the capacity,
            // so the third run is not pushed while they are held.
            let expired = try await worker.next()
            #expect(expired.revoked.leaseID == unknown)
            #expect(expired.revoked.reason == "LEASE_EXPIRED")
            // A cancellation of an adopted lease reaches the new stream, and frees its place.
            _ = try await workflow.cancelRun(.with { $0.runID = runs[1].runID })
            let cancelled = try await worker.next()
            #expect(cancelled.revoked.leaseID == taken[1].leaseID)
            #expect(cancelled.revoked.reason == "CANCELLED")
            let third = try await worker.nextTask()
            #expect(third.runID == runs[2].runID)
            try await worker.complete(taken[0])
            try await worker.complete(third)
          }
        }
        var finals: [(Tollgate_V1_RunState, UInt32)] = []
        for run in runs {
          let now = try await workflow.getRun(.with { $0.runID = run.runID }).run
          finals.append((now.state, now.attempt))
        }
        // Completed on the new stream in their first attempt: never offered again.
        #expect(finals.map(\.0) == [.succeeded, .cancelled, .succeeded])
        #expect(finals.map(\.1) == [1, 1, 1])
      }
    }
  }

  @Test func aWatchOfAReadyRunWakesAWorkerWhoseClaimPassedItBy() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let watched = try await Self.dispatch(workflow, payload: "watched")
        let other = try await Self.dispatch(workflow, payload: "other")
        // The share lock a watch takes while it registers, held here for as long as the test
        // needs: claims skip the row meanwhile.
        let holder = try await TestDatabase.connect(gw.database.admin, database: gw.database.name)
        defer { Task { try? await holder.close() } }
        try await holder.query("BEGIN", logger: testLogger)
        try await holder.query(PostgresQuery(unsafeSQL: "SELECT 1 FROM workflow_runs WHERE run_id = '\(watched.runID)' FOR SHARE"), logger: testLogger)
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 2) { worker in
            // The one claim, on connecting, passes the locked run by though it came first, and
            // leaves room for it. Nothing changes after it, so no wake-up is pending.
            #expect(try await worker.nextTask().runID == other.runID)
            try await holder.query("COMMIT", logger: testLogger)
            // Nothing about the run changed when the lock went, so no change wakes the worker;
            // the watch's own announcement must.
            try await workflow.watchRun(.with { $0.runID = watched.runID }) { response in
              for try await _ in response.messages { break }
            }
            #expect(try await worker.nextTask().runID == watched.runID)
          }
        }
      }
    }
  }

  /// A worker that sends without reading its answers must not make the gateway queue without
  /// bound: the stream's reader waits while messages and unwritten answers fill the inbox's limit.
  @Test func aWorkerStreamIsReadNoFurtherWhileItsAnswersWait() async throws {
    let inbox = TollgateWorkflow.WorkerInbox(limit: 3)
    let heartbeat = Tollgate_V1_WorkerMessage.with { $0.heartbeat = .init() }
    inbox.put(heartbeat)
    inbox.answerQueued()
    #expect(inbox.hasRoom)
    inbox.answerQueued()
    #expect(!inbox.hasRoom)
    // An answer written makes room.
    let waiting = Task { try await inbox.waitForRoom() }
    inbox.answerWritten()
    try await waiting.value
    #expect(inbox.hasRoom)
    // So does a message taken.
    inbox.answerQueued()
    #expect(!inbox.hasRoom)
    let waitingAgain = Task { try await inbox.waitForRoom() }
    #expect(try await inbox.take()?.count == 1)
    try await waitingAgain.value
    #expect(inbox.hasRoom)
  }

  /// What a worker stream does with leases a claim took for it but which it never wrote (the
  /// stream ended as the claim committed): the store gives them back at once, the attempt not
  /// counted, and only while the run is still RUNNING under that lease.
  @Test func aLeaseGivenBackUnseenIsQueuedAgainWithItsAttemptUncounted() async throws {
    try await StoreIsolationTests().withStore { database, tenants in
      let acme = try TenantID(validating: "acme")
      _ = try await tenants.create(id: acme, displayName: "Acme", quota: .defaults, logger: testLogger)
      let runs = WorkflowRepository(database: database)
      let new = NewRun(
        type: "export", payload: [], idempotencyKey: "", priority: 0, runAfter: nil, maxAttempts: 1, requiredApprover: "",
        approvalReason: ""
      )
      let (run, _) = try await runs.dispatch(acme, new, logger: testLogger)
      func claim() async throws -> UUID {
        let claim = try await runs.claim(
          acme, types: ["export"], limit: 1, worker: "w", leaseTimeout: .seconds(60), audit: { _ in [] }, logger: testLogger
        )
        try #require(claim.leases.count == 1)
        return claim.leases[0].leaseID
      }
      let lease = try await claim()
      let given = try await runs.release(acme, leases: [lease, UUID()], audit: { _ in [] }, logger: testLogger)
      #expect(given.map(\.runID) == [run.id])
      #expect(given.map(\.attempt) == [1])
      // Its one attempt is still to come: claimed again, it is attempt 1 again, not DEAD.
      let again = try await claim()
      #expect(again != lease)
      // A lease no longer holding its run (given back, completed, expired) gives nothing back.
      #expect(try await runs.release(acme, leases: [lease], audit: { _ in [] }, logger: testLogger).isEmpty)
      _ = try await runs.complete(acme, results: [(again, Array("done".utf8))], audit: { _ in [] }, logger: testLogger)
      #expect(try await runs.release(acme, leases: [again], audit: { _ in [] }, logger: testLogger).isEmpty)
      let states = try await runs.history(acme, id: run.id, after: 0, logger: testLogger).map { ($0.run.state, $0.run.attempt) }
      #expect(states.map(\.0) == [.queued, .running, .queued, .running, .succeeded])
      #expect(states.map(\.1) == [0, 1, 0, 1, 1])
    }
  }

  @Test func aDrainingWorkerIsPushedNothingMoreButReportsWhatItHolds() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        let first = try await Self.dispatch(workflow, payload: "held while draining")
        let second = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "old")) { oldClient async throws in
          try await TestWorker.with(oldClient, types: ["export"], capacity: 2) { old in
            let task = try await old.nextTask()
            #expect(task.runID == first.runID)
            old.send(.with { $0.drain = .init() })
            // Messages are read in order: once this heartbeat is answered, the drain was read.
            let unknown = UUID().uuidString.lowercased()
            old.send(.with { $0.heartbeat = .with { $0.leaseIds = [unknown] } })
            #expect(try await old.next().revoked.leaseID == unknown)
            // The old worker has room for it, but is stopping: the run waits for another.
            let second = try await Self.dispatch(workflow, payload: "for the new worker")
            try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "new")) { newClient async throws in
              try await TestWorker.with(newClient, types: ["export"], capacity: 1) { new in
                try await new.completeNext(of: second)
              }
            }
            // The draining stream still takes the result of what it holds.
            try await old.complete(task)
            return second
          }
        }
        // A worker that reconnects while draining says so in its hello: it is pushed nothing,
        // though a run is ready and it has room.
        let third = try await Self.dispatch(workflow, payload: "not for a draining worker")
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "old")) { oldClient async throws in
          try await TestWorker.with(oldClient, types: ["export"], capacity: 2, draining: true) { old in
            let unknown = UUID().uuidString.lowercased()
            old.send(.with { $0.heartbeat = .with { $0.leaseIds = [unknown] } })
            #expect(try await old.next().revoked.leaseID == unknown)
            try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "new")) { newClient async throws in
              try await TestWorker.with(newClient, types: ["export"], capacity: 1) { new in
                try await new.completeNext(of: third)
              }
            }
          }
        }
        for run in [first, second] {
          #expect(try await workflow.getRun(.with { $0.runID = run.runID }).run.state == .succeeded)
        }
      }
    }
  }

  /// Partners and workers of one tenant routinely land on different replicas behind a load
  /// balancer: every wake-up, revocation and watch must cross between them through the database.
  @Test func runsChangedOnOneReplicaReachWorkersAndWatchersOnAnother() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      let workerCertificate = try gw.pki.issue(tenant: "acme", role: .worker)
      try await gw.withReplica { replica in
        try await replica.withClient(workerCertificate) { workerClient async throws in
          try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
            try await gw.withClient(partner) { client async throws in
              let workflow = Workflow(wrapping: client)
              let run = try await Self.dispatch(workflow, payload: "on-the-first")
              let task = try await worker.nextTask()
              #expect(task.runID == run.runID)
              _ = try await workflow.cancelRun(.with { $0.runID = run.runID; $0.reason = "withdrawn" })
              let revoked = try await worker.next()
              #expect(revoked.revoked.leaseID == task.leaseID)
              #expect(revoked.revoked.reason == "CANCELLED")

              // Watched on the replica, approved on the first gateway, run on the replica.
              let gated = try await Self.dispatch(workflow, payload: "gated", approver: "ops")
              try await replica.withClient(partner) { replicaClient async throws in
                let watching = Workflow(wrapping: replicaClient)
                let states = try await Self.approveAndWatch(gated, approving: workflow, watching: watching, worker: worker)
                #expect(states == [.pendingApproval, .queued, .running, .succeeded])
              }
            }
          }
        }
      }
    }
  }

  /// The notification listener's connection dies with the database's. Once the database is
  /// back, a worker that stayed connected through the outage must hear of new runs again.
  @Test func anIdleWorkerIsWokenAgainAfterADatabaseOutage() async throws {
    // Room for the calls after the outage on a machine the rest of the suite loads.
    try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(5) }) { gw in
      try await Self.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
        try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
          try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
            let workflow = Workflow(wrapping: client)
            // A first run shows the stream is up before the outage.
            _ = try await Self.dispatch(workflow, payload: "before")
            try await worker.complete(try await worker.nextTask())
            try await gw.takeDatabaseAway()
            try await gw.bringDatabaseBack()
            // The pool reconnects on demand; bounded retries, no sleeps.
            var after: Tollgate_V1_Run?
            for _ in 0..<20 where after == nil {
              after = try? await Self.dispatch(workflow, payload: "after")
            }
            let run = try #require(after)
            try await worker.completeNext(of: run)
          }
        }
      }
    }
  }

  /// A claim that loses its database connection is tried again: the worker keeps its stream
  /// (every worker reconnecting at once after a database blip is what a fleet should not see).
  @Test func aClaimCutOffFromTheDatabaseIsRetriedAndTheWorkerKeepsItsStream() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      // The lock holds the worker's first claim where the test can find its backend and end it.
      let holder = try await TestDatabase.connect(gw.database.admin, database: gw.database.name)
      defer { Task { try? await holder.close() } }
      try await holder.query("BEGIN", logger: testLogger)
      try await holder.query("LOCK TABLE workflow_runs IN ACCESS EXCLUSIVE MODE", logger: testLogger)
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
        try await TestWorker.with(workerClient, types: ["export"], capacity: 1) { worker in
          let blockedClaims = """
            FROM pg_stat_activity WHERE datname = '\(gw.database.name)' AND wait_event_type = 'Lock'
              AND query LIKE '%workflowTypeConcurrency%'
            """
          #expect(try await QuotaTests.eventually { try await gw.count("SELECT count(*) \(blockedClaims)") == 1 })
          #expect(try await gw.count("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \(blockedClaims)") == 1)
          try await holder.query("ROLLBACK", logger: testLogger)
          try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
            let run = try await Self.dispatch(Workflow(wrapping: client), payload: "after the cut")
            try await worker.completeNext(of: run)
          }
        }
      }
    }
  }

  /// A stream keeps no standing its caller has lost: a worker's Connect ends as soon as its
  /// certificate is revoked (here through another replica) or its tenant is suspended, and an
  /// auditor's follow as well.
  @Test func streamsEndWhenTheirCertificateIsRevokedOrTheirTenantSuspended() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      let leaked = try gw.pki.issue(tenant: "acme", role: .worker, name: "leaked")
      let kept = try gw.pki.issue(tenant: "acme", role: .worker, name: "kept")
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor)
      let admin = try gw.pki.issueOperator()
      func ended(_ worker: TestWorker) async -> RPCError? {
        do {
          let message = try await worker.next()
          Issue.record("the stream went on: \(message)")
          return nil
        } catch {
          return error as? RPCError
        }
      }
      try await gw.withReplica { replica in
        try await replica.withClient(leaked) { leakedClient async throws in
          try await TestWorker.with(leakedClient, types: ["export"], capacity: 1) { leakedWorker in
            try await replica.withClient(kept) { keptClient async throws in
              try await TestWorker.with(keptClient, types: ["export"], capacity: 1) { keptWorker in
                // Both streams are up: each answers a heartbeat.
                for worker in [leakedWorker, keptWorker] {
                  let unknown = UUID().uuidString.lowercased()
                  worker.send(.with { $0.heartbeat = .with { $0.leaseIds = [unknown] } })
                  #expect(try await worker.next().revoked.leaseID == unknown)
                }
                try await gw.withClient(admin) { client async throws in
                  _ = try await Tollgate_V1_TenantService.Client(wrapping: client).revokeCertificate(.with {
                    $0.sha256Fingerprint = try! CertificateIdentity.sha256Fingerprint(leaked.certificate)
                    $0.reason = "laptop stolen"
                  })
                }
                let revoked = await ended(leakedWorker)
                #expect(revoked?.code == .unauthenticated)
                #expect(revoked?.message.contains("revoked") == true)
                // The other worker of the tenant goes on, and is pushed the next run.
                let run = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
                  try await Self.dispatch(Workflow(wrapping: client), payload: "for the kept worker")
                }
                try await keptWorker.completeNext(of: run)

                let (following, followerUp) = AsyncStream.makeStream(of: Void.self)
                let follower = Task {
                  try await gw.withClient(auditor) { client async throws in
                    try await AuditReader(client: client).records(.with { $0.follow = true }) { _ in
                      followerUp.yield()
                      return true
                    }
                  }
                }
                var up = following.makeAsyncIterator()
                _ = await up.next()
                try await gw.withClient(admin) { client async throws in
                  _ = try await Tollgate_V1_TenantService.Client(wrapping: client).suspendTenant(.with {
                    $0.tenantID = "acme"
                    $0.reason = "unpaid invoices"
                  })
                }
                let suspended = await ended(keptWorker)
                #expect(suspended?.code == .permissionDenied)
                #expect(suspended?.message.contains("suspended") == true)
                let followed = await statusCode { try await follower.value }
                #expect(followed == .permissionDenied)
              }
            }
          }
        }
      }
      // The follow's record says why it ended. (A worker stream's record was committed with its
      // first change, as OK: one record per call, and the log is append-only.)
      await gw.gateway.auditBuffer.allCommitted()
      let followEnded = try await gw.count(
        "SELECT count(*) FROM audit_leaves WHERE method = '/tollgate.v1.AuditService/StreamEvents' AND outcome = 7"
      )
      #expect(followEnded == 1)
    }
  }

  /// A certificate's end is checked at every call, and a stream open at that moment ends with it.
  /// (This test waits for a certificate issued to expire three seconds after the test starts.)
  @Test func aStreamEndsWhenItsCertificateExpires() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"])
      // Issued five minutes back-dated, as every test certificate is.
      let shortLived = try gw.pki.issue(
        .principal(SPIFFEID(tenant: TenantID(validating: "acme"), role: .worker, name: "short", trustDomain: gw.pki.ca.trustDomain)),
        validity: 303
      )
      try await gw.withClient(shortLived) { client async throws in
        try await TestWorker.with(client, types: ["export"], capacity: 1) { worker in
          let unknown = UUID().uuidString.lowercased()
          worker.send(.with { $0.heartbeat = .with { $0.leaseIds = [unknown] } })
          #expect(try await worker.next().revoked.leaseID == unknown)
          do {
            let message = try await worker.next()
            Issue.record("the stream outlived its certificate: \(message)")
          } catch let error as RPCError {
            #expect(error.code == .unauthenticated)
            #expect(error.message.hasSuffix(CertificateExpiry.reconnectAdvice))
          }
        }
      }
    }
  }

  @Test func aPerTypeConcurrencyLimitHoldsAcrossWorkers() async throws {
    try await TestGateway.run { gw in
      try await Self.createTenants(gw, ["acme"], typeConcurrency: ["export": 1])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let workflow = Workflow(wrapping: client)
        for i in 0..<3 { _ = try await Self.dispatch(workflow, payload: "e\(i)") }
        _ = try await Self.dispatch(workflow, "report", payload: "unlimited")
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "w1")) { c1 async throws in
          try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker, name: "w2")) { c2 async throws in
            try await TestWorker.withWorkers([(c1, ["export", "report"], 4), (c2, ["export"], 4)]) { workers, inbox in
              // Each task is completed as soon as it arrives; while one export runs, no worker may
              // be handed another, though both have room. The report is not held up by the limit.
              var exports = 0
              var reports = 0
              var acks = 0
              while exports < 3 || reports < 1 || acks < 4 {
                let (who, message) = try await inbox.next()
                switch message.kind {
                case .task(let task):
                  if task.type == "export" {
                    exports += 1
                    #expect(try await gw.count("SELECT count(*) FROM workflow_runs WHERE type = 'export' AND state = 'running'") == 1)
                  } else {
                    reports += 1
                  }
                  workers[who].send(.with { $0.completed = .with { $0.leaseID = task.leaseID } })
                case .ack(let ack):
                  #expect(ack.accepted)
                  acks += 1
                default:
                  Issue.record("unexpected message \(message)")
                }
              }
            }
          }
        }
        #expect(try await gw.count("SELECT count(*) FROM workflow_runs WHERE state = 'succeeded'") == 4)
        let code = await statusCode {
          try await gw.withClient(try gw.pki.issueOperator()) { c in
            try await Tollgate_V1_TenantService.Client(wrapping: c).updateQuota(.with {
              $0.tenantID = "acme"
              $0.quota.workflowTypeConcurrency = ["export": 0, "bad type": 2]
            })
          }
        }
        #expect(code == .invalidArgument)
      }
    }
  }
}

/// Messages from one or more worker streams, tagged with the worker's position.
final class WorkerInbox {
  var iterator: AsyncThrowingStream<(Int, Tollgate_V1_ServerMessage), any Error>.AsyncIterator

  init(_ stream: AsyncThrowingStream<(Int, Tollgate_V1_ServerMessage), any Error>) {
    iterator = stream.makeAsyncIterator()
  }

  func next() async throws -> (Int, Tollgate_V1_ServerMessage) {
    guard let next = try await iterator.next() else { throw WorkerStreamEnded() }
    return next
  }
}

struct WorkerStreamEnded: Error {}

/// A worker's Connect stream driven by a test: messages go out with ``send(_:)``, answers come in
/// through the inbox.
final class TestWorker {
  let outbox: AsyncStream<Tollgate_V1_WorkerMessage>.Continuation
  let inbox: WorkerInbox?

  init(outbox: AsyncStream<Tollgate_V1_WorkerMessage>.Continuation, inbox: WorkerInbox?) {
    self.outbox = outbox
    self.inbox = inbox
  }

  func send(_ message: Tollgate_V1_WorkerMessage) { outbox.yield(message) }

  func next() async throws -> Tollgate_V1_ServerMessage { try await inbox!.next().1 }

  func nextTask() async throws -> Tollgate_V1_TaskAssignment {
    let message = try await next()
    guard case .task(let task) = message.kind else { throw UnexpectedMessage(message: message) }
    return task
  }

  func nextAck() async throws -> Tollgate_V1_ResultAck {
    let message = try await next()
    guard case .ack(let ack) = message.kind else { throw UnexpectedMessage(message: message) }
    return ack
  }

  /// Takes the next task, expects it to be `run`'s, and completes it.
  func completeNext(of run: Tollgate_V1_Run) async throws {
    let task = try await nextTask()
    #expect(task.runID == run.runID)
    try await complete(task)
  }

  /// Completes `task` and expects the completion to be recorded.
  func complete(_ task: Tollgate_V1_TaskAssignment) async throws {
    send(.with { $0.completed = .with { $0.leaseID = task.leaseID; $0.result = Data("ok".utf8) } })
    let ack = try await nextAck()
    #expect(ack.accepted && ack.leaseID == task.leaseID)
  }

  struct UnexpectedMessage: Error { let message: Tollgate_V1_ServerMessage }

  /// One worker stream with its own inbox, closed (half-close, then the server's end) after `body`.
  static func with<T: Sendable>(
    _ client: GRPCClient<HTTP2ClientTransport.Posix>,
    types: [String],
    capacity: UInt32,
    held: [String] = [],
    draining: Bool = false,
    _ body: (TestWorker) async throws -> T
  ) async throws -> T {
    try await withWorkers([(client, types, capacity)], held: [held], draining: [draining]) { workers, inbox in
      try await body(TestWorker(outbox: workers[0].outbox, inbox: inbox))
    }
  }

  /// Several worker streams sharing one inbox; `held[i]`, if given, are the leases worker `i`
  /// names in its hello as held from an earlier stream, and `draining[i]` whether it says it is
  /// stopping.
  static func withWorkers<T: Sendable>(
    _ specs: [(GRPCClient<HTTP2ClientTransport.Posix>, [String], UInt32)],
    held: [[String]] = [],
    draining: [Bool] = [],
    _ body: ([TestWorker], WorkerInbox) async throws -> T
  ) async throws -> T {
    let (messages, received) = AsyncThrowingStream.makeStream(of: (Int, Tollgate_V1_ServerMessage).self)
    var workers: [TestWorker] = []
    var outboxes: [AsyncStream<Tollgate_V1_WorkerMessage>] = []
    for (i, spec) in specs.enumerated() {
      let (requests, outbox) = AsyncStream.makeStream(of: Tollgate_V1_WorkerMessage.self)
      outbox.yield(.with {
        $0.hello = .with {
          $0.taskTypes = spec.1
          $0.capacity = spec.2
          $0.workerName = "test-worker-\(i)"
          $0.heldLeaseIds = i < held.count ? held[i] : []
          $0.draining = i < draining.count && draining[i]
        }
      })
      workers.append(TestWorker(outbox: outbox, inbox: nil))
      outboxes.append(requests)
    }
    return try await withThrowingTaskGroup(of: Void.self) { group in
      for (i, spec) in specs.enumerated() {
        let requests = outboxes[i]
        let client = spec.0
        group.addTask {
          do {
            try await Tollgate_V1_WorkflowService.Client(wrapping: client).connect(
              requestProducer: { writer in
                for await message in requests { try await writer.write(message) }
              },
              onResponse: { response in
                for try await message in response.messages { received.yield((i, message)) }
              }
            )
          } catch {
            received.finish(throwing: error)
          }
        }
      }
      let result: T
      do {
        result = try await body(workers, WorkerInbox(messages))
      } catch {
        for worker in workers { worker.outbox.finish() }
        group.cancelAll()
        throw error
      }
      for worker in workers { worker.outbox.finish() }
      try await group.waitForAll()
      return result
    }
  }
}
