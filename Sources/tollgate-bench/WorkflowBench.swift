import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import PostgresNIO
import Synchronization
import SwiftProtobuf
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos
import TollgateStore

struct WorkflowBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "workflow",
    abstract: "Runs dispatched by N callers and completed by worker streams, vs a plain SQL SKIP LOCKED queue on the same table; pickup latency at low load."
  )
  @OptionGroup var database: BenchDatabaseOptions
  @Option(help: "Runs per throughput phase") var runs: Int = 100_000
  @Option(help: "Concurrent dispatching callers") var callers: Int = 8
  @Option(help: "Worker connections") var workers: Int = 4
  @Option(help: "Capacity of each worker") var capacity: Int = 16
  @Option(help: "Runs dispatched one at a time to an idle worker, for pickup latency") var pickups: Int = 300
  @Option(help: "JSON results file") var out: String = "bench-results/workflow.json"
  @Flag(help: "Only the pickup-latency phase") var pickupOnly = false
  @Flag(help: "Also measure the gateway assembled without the audit interceptor (benchmark-only), to show what auditing each Dispatch costs")
  var compareWithoutAudit = false

  static let tenant = try! TenantID(validating: "bench-workflow")

  struct Throughput: Codable {
    var runs: Int
    var seconds: Double
    var runsPerSecond: Double
  }

  /// Commit happens inside the Dispatch call, so commit-to-arrival lies between arrival minus
  /// the call's end (lower bound, 0 if the task came first) and arrival minus the call's start.
  struct Pickup: Codable {
    var samples: Int
    /// From the dispatch's notification reaching the benchmark's own listener (its commit).
    var afterCommitP50Ms: Double
    var afterCommitP99Ms: Double
    var p50Ms: Double
    var p99Ms: Double
    var afterReplyP50Ms: Double
    var afterReplyP99Ms: Double
    var dispatchP50Ms: Double
  }

  struct Results: Codable {
    var cores: Int
    var date: String
    var callers: Int
    var workers: Int
    var capacity: Int
    var gateway: Throughput
    var gatewayWithoutAudit: Throughput?
    var sql: Throughput
    var ratio: Double
    var pickup: Pickup
  }

  func run() async throws {
    let setup = try BenchSetup(databaseURL: database.databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
    var config = setup.config
    config.databaseMaxConnections = max(20, callers + workers + 4)
    let gateway = try Gateway(config: config, logger: benchLogger)
    let results = try await withRunningGateway(gateway) { port in
      try await setup.connection(port: port, setup.operator).withClient { client in
        try await createBenchTenant(Self.tenant, through: client)
      }
      return try await withAdminClient(database.adminDatabaseURL, connections: callers + workers + 1) { admin in
        try await admin.query("TRUNCATE workflow_runs, workflow_run_events", logger: benchLogger)
        if pickupOnly {
          let pickup = try await pickupPhase(setup, port: port, admin: admin)
          let none = Throughput(runs: 0, seconds: 0, runsPerSecond: 0)
          return Results(
            cores: ProcessInfo.processInfo.activeProcessorCount, date: ISO8601DateFormatter().string(from: Date()),
            callers: callers, workers: workers, capacity: capacity, gateway: none, sql: none, ratio: 0, pickup: pickup
          )
        }
        let sql = try await sqlPhase(admin)
        FileHandle.standardError.write(Data(String(format: "plain SQL: %d runs in %.1f s\n", sql.runs, sql.seconds).utf8))
        try await admin.query("TRUNCATE workflow_runs, workflow_run_events", logger: benchLogger)
        try await admin.query("CHECKPOINT", logger: benchLogger)
        let through = try await gatewayPhase(setup, port: port)
        FileHandle.standardError.write(Data(String(format: "gateway: %d runs in %.1f s\n", through.runs, through.seconds).utf8))
        let stored = try await adminCount(admin, "SELECT count(*)::bigint FROM workflow_runs WHERE state = 'succeeded'")
        guard stored == runs else { throw ValidationError("\(stored) runs succeeded in the database, expected \(runs)") }
        let pickup = try await pickupPhase(setup, port: port, admin: admin)
        var bare: Throughput?
        if compareWithoutAudit {
          try await admin.query("TRUNCATE workflow_runs, workflow_run_events", logger: benchLogger)
          try await admin.query("CHECKPOINT", logger: benchLogger)
          bare = try await withRunningGateway(try Gateway(config: config, logger: benchLogger, withoutAudit: true)) { barePort in
            try await gatewayPhase(setup, port: barePort)
          }
        }
        return Results(
          cores: ProcessInfo.processInfo.activeProcessorCount,
          date: ISO8601DateFormatter().string(from: Date()),
          callers: callers,
          workers: workers,
          capacity: capacity,
          gateway: through,
          gatewayWithoutAudit: bare,
          sql: sql,
          ratio: through.runsPerSecond / sql.runsPerSecond,
          pickup: pickup
        )
      }
    }
    print("tollgate-bench workflow on \(results.cores) cores (server, client and PostgreSQL share them)")
    if !pickupOnly {
      printThroughput(results)
    }
    print(String(
      format: "  pickup at low load, %d samples: commit (seen as its notification) to task received p50 %.2f ms, p99 %.2f ms (target p99 <= 10 ms); bounds: from the Dispatch call's start p50 %.2f / p99 %.2f ms, from its reply p50 %.2f / p99 %.2f ms; Dispatch call p50 %.2f ms",
      results.pickup.samples, results.pickup.afterCommitP50Ms, results.pickup.afterCommitP99Ms,
      results.pickup.p50Ms, results.pickup.p99Ms, results.pickup.afterReplyP50Ms,
      results.pickup.afterReplyP99Ms, results.pickup.dispatchP50Ms
    ))
    try writeResults(results, to: out)
  }

  func printThroughput(_ results: Results) {
    print(String(
      format: "  gateway: %d runs, %d callers, %d workers x %d: %.0f runs/s dispatch to committed completion",
      runs, callers, workers, capacity, results.gateway.runsPerSecond
    ))
    if let bare = results.gatewayWithoutAudit {
      print(String(format: "  the same gateway without the audit interceptor (benchmark-only assembly): %.0f runs/s", bare.runsPerSecond))
    }
    print(String(format: "  plain SQL queue (insert; SKIP LOCKED batch claim; complete), same table: %.0f runs/s", results.sql.runsPerSecond))
    print(String(format: "  ratio %.2f (target >= 5000 runs/s and >= 0.50)", results.ratio))
  }

  var worker: (BenchSetup) -> CertificateAuthority.Subject {
    { setup in .principal(SPIFFEID(tenant: Self.tenant, role: .worker, name: "bench", trustDomain: setup.ca.trustDomain)) }
  }

  /// 8 callers dispatch while the workers complete every task at once; the clock stops when the
  /// last completion's ack (sent after its commit) arrives.
  func gatewayPhase(_ setup: BenchSetup, port: Int) async throws -> Throughput {
    let total = runs
    let completed = BenchCounter()
    let (allDone, finish) = AsyncStream.makeStream(of: Void.self)
    let workerConnections = try (0..<workers).map { _ in try setup.connection(port: port, worker(setup), timeout: nil) }
    let partner = try setup.connection(port: port, setup.partner(Self.tenant))
    let capacity = UInt32(capacity)
    return try await withThrowingTaskGroup(of: Void.self) { group in
      let (ready, readied) = AsyncStream.makeStream(of: Void.self)
      for connection in workerConnections {
        group.addTask {
          try await connection.withClient { client in
            try await Self.work(Tollgate_V1_WorkflowService.Client(wrapping: client), capacity: capacity, ready: readied) {
              if completed.value.add(1, ordering: .relaxed).newValue == total { finish.yield() }
            } until: { completed.value.load(ordering: .relaxed) >= total }
          }
        }
      }
      var readyWorkers = 0
      for await _ in ready {
        readyWorkers += 1
        if readyWorkers == workers { break }
      }
      let start = ContinuousClock.now
      try await partner.withClient { client in
        let workflow = Tollgate_V1_WorkflowService.Client(wrapping: client)
        try await withThrowingTaskGroup(of: Void.self) { callers in
          for c in 0..<self.callers {
            let share = total / self.callers + (c < total % self.callers ? 1 : 0)
            callers.addTask {
              for i in 0..<share {
                _ = try await workflow.dispatch(.with {
                  $0.type = "noop"
                  $0.payload = Data("run \(c)-\(i)".utf8)
                })
              }
            }
          }
          try await callers.waitForAll()
        }
      }
      FileHandle.standardError.write(Data(String(
        format: "  (dispatching took %.1f s; completions trailed by %d runs)\n",
        elapsedSeconds(ContinuousClock.now - start), total - completed.value.load(ordering: .relaxed)
      ).utf8))
      var done = allDone.makeAsyncIterator()
      _ = await done.next()
      let elapsed = elapsedSeconds(ContinuousClock.now - start)
      group.cancelAll()
      return Throughput(runs: total, seconds: elapsed, runsPerSecond: Double(total) / elapsed)
    }
  }

  /// A worker that completes each task as soon as it arrives; `onAck` runs per accepted completion.
  static func work(
    _ workflow: Tollgate_V1_WorkflowService.Client<HTTP2ClientTransport.Posix>,
    capacity: UInt32,
    ready: AsyncStream<Void>.Continuation,
    onTask: @escaping @Sendable (Tollgate_V1_TaskAssignment) -> Void = { _ in },
    onAck: @escaping @Sendable () -> Void,
    until stop: @escaping @Sendable () -> Bool
  ) async throws {
    let (outbound, send) = AsyncStream.makeStream(of: Tollgate_V1_WorkerMessage.self)
    send.yield(.with {
      $0.hello = .with {
        $0.taskTypes = ["noop"]
        $0.capacity = capacity
        $0.workerName = "bench"
      }
    })
    try await workflow.connect(
      requestProducer: { writer in
        for await message in outbound { try await writer.write(message) }
      },
      onResponse: { response in
        // The hello is processed before any claim, so by the first read the worker is known.
        ready.yield()
        for try await message in response.messages {
          switch message.kind {
          case .task(let task):
            onTask(task)
            send.yield(.with { $0.completed = .with { $0.leaseID = task.leaseID } })
          case .ack(let ack):
            guard ack.accepted else { throw ValidationError("a completion was refused: \(ack.message)") }
            onAck()
            if stop() { send.finish() }
          default:
            continue
          }
        }
      }
    )
  }

  /// One idle worker; runs dispatched one at a time; time from the Dispatch call's start to the
  /// task's arrival (an upper bound on commit-to-arrival, which cannot be observed from outside).
  func pickupPhase(_ setup: BenchSetup, port: Int, admin: PostgresClient) async throws -> Pickup {
    let (tasks, arrived) = AsyncStream.makeStream(of: ContinuousClock.Instant.self)
    // The dispatch's commit, as this process sees it: the run's notification reaches a listener
    // of our own once the transaction has committed, as it reaches the gateway's.
    let (commits, committed) = AsyncStream.makeStream(of: ContinuousClock.Instant.self)
    let (listening, listened) = AsyncStream.makeStream(of: Void.self)
    let samples = pickups
    let workerConnection = try setup.connection(port: port, worker(setup), timeout: nil)
    let partner = try setup.connection(port: port, setup.partner(Self.tenant))
    let stopFlag = BenchCounter()
    return try await withThrowingTaskGroup(of: Void.self) { group in
      let (ready, readied) = AsyncStream.makeStream(of: Void.self)
      group.addTask {
        try await workerConnection.withClient { client in
          try await Self.work(
            Tollgate_V1_WorkflowService.Client(wrapping: client),
            capacity: 1,
            ready: readied,
            onTask: { _ in arrived.yield(.now) },
            onAck: {},
            until: { stopFlag.value.load(ordering: .relaxed) > 0 }
          )
        }
      }
      group.addTask {
        try await admin.withConnection { connection in
          try await connection.listen(on: WorkflowRepository.channel) { notifications in
            listened.yield()
            for try await notification in notifications
            where notification.payload.hasPrefix("t \(Self.tenant.rawValue) queued -") {
              committed.yield(.now)
            }
          }
        }
      }
      var started = ready.makeAsyncIterator()
      _ = await started.next()
      var listenerUp = listening.makeAsyncIterator()
      _ = await listenerUp.next()
      var commitTimes = commits.makeAsyncIterator()
      var pickup: [Double] = []
      var afterCommit: [Double] = []
      var afterReply: [Double] = []
      var dispatch: [Double] = []
      var arrivals = tasks.makeAsyncIterator()
      try await partner.withClient { client in
        let workflow = Tollgate_V1_WorkflowService.Client(wrapping: client)
        for i in 0..<(samples + 20) {
          let t0 = ContinuousClock.now
          _ = try await workflow.dispatch(.with { $0.type = "noop"; $0.payload = Data("pickup \(i)".utf8) })
          let t1 = ContinuousClock.now
          guard let t2 = await arrivals.next() else { throw ValidationError("the worker stream ended") }
          guard let tc = await commitTimes.next() else { throw ValidationError("the listener ended") }
          // The first few warm the connection and the pool.
          if i >= 20 {
            afterCommit.append(elapsedSeconds(t2 - tc) * 1000)
            pickup.append(elapsedSeconds(t2 - t0) * 1000)
            afterReply.append(max(0, elapsedSeconds(t2 - t1) * 1000))
            dispatch.append(elapsedSeconds(t1 - t0) * 1000)
          }
          // Low load: the next run is dispatched once this one is done and the worker is idle.
          try await Task.sleep(for: .milliseconds(5))
        }
      }
      stopFlag.value.store(1, ordering: .relaxed)
      group.cancelAll()
      pickup.sort()
      afterReply.sort()
      afterCommit.sort()
      dispatch.sort()
      return Pickup(
        samples: pickup.count,
        afterCommitP50Ms: percentile(afterCommit, 0.5),
        afterCommitP99Ms: percentile(afterCommit, 0.99),
        p50Ms: percentile(pickup, 0.5),
        p99Ms: percentile(pickup, 0.99),
        afterReplyP50Ms: percentile(afterReply, 0.5),
        afterReplyP99Ms: percentile(afterReply, 0.99),
        dispatchP50Ms: percentile(dispatch, 0.5)
      )
    }
  }

  /// The best plain SQL queue on the same table, from this process: callers insert one run per
  /// statement, workers claim up to their capacity with FOR UPDATE SKIP LOCKED and complete the
  /// batch in one statement.
  func sqlPhase(_ admin: PostgresClient) async throws -> Throughput {
    let total = runs
    let tenant = Self.tenant.rawValue
    let capacity = capacity
    let completed = BenchCounter()
    let start = ContinuousClock.now
    try await withThrowingTaskGroup(of: Void.self) { group in
      for c in 0..<callers {
        let share = total / callers + (c < total % callers ? 1 : 0)
        group.addTask {
          for i in 0..<share {
            let payload = ByteBuffer(string: "run \(c)-\(i)")
            try await admin.query(
              """
              INSERT INTO workflow_runs (tenant_id, run_id, type, payload, priority, run_after, max_attempts, state)
              VALUES (\(tenant), \(UUID()), 'noop', \(payload), 0, now(), 3, 'queued')
              """,
              logger: benchLogger
            )
          }
        }
      }
      for _ in 0..<workers {
        group.addTask {
          while completed.value.load(ordering: .relaxed) < total {
            var ids: [UUID] = []
            let claimed = try await admin.query(
              """
              UPDATE workflow_runs r
              SET state = 'running', attempt = r.attempt + 1, lease_id = gen_random_uuid(),
                  lease_expires = now() + interval '30 seconds', update_time = now()
              FROM (SELECT tenant_id, run_id FROM workflow_runs
                    WHERE tenant_id = \(tenant) AND state IN ('queued', 'failed') AND type = 'noop' AND run_after <= now()
                    ORDER BY priority DESC, run_after, seq LIMIT \(capacity) FOR UPDATE SKIP LOCKED) c
              WHERE r.tenant_id = c.tenant_id AND r.run_id = c.run_id
              RETURNING r.run_id
              """,
              logger: benchLogger
            )
            for try await id in claimed.decode(UUID.self) { ids.append(id) }
            if ids.isEmpty {
              // Nothing queued yet: a plain loop has no notification to wait for.
              try await Task.sleep(for: .milliseconds(1))
              continue
            }
            try await admin.query(
              """
              UPDATE workflow_runs SET state = 'succeeded', lease_id = NULL, lease_expires = NULL, update_time = now()
              WHERE tenant_id = \(tenant) AND run_id = ANY(\(ids)::uuid[])
              """,
              logger: benchLogger
            )
            completed.value.add(ids.count, ordering: .relaxed)
          }
        }
      }
      try await group.waitForAll()
    }
    let elapsed = elapsedSeconds(ContinuousClock.now - start)
    return Throughput(runs: total, seconds: elapsed, runsPerSecond: Double(total) / elapsed)
  }
}

/// A counter shared by a benchmark's tasks.
final class BenchCounter: Sendable {
  let value = Atomic<Int>(0)
}
