import Foundation
import GRPCCore
import PostgresNIO
import Synchronization
import SwiftProtobuf
import Testing
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

/// Graceful shutdown with calls in flight: unary calls finish, endless streams are told to
/// reconnect, and the drain timeout bounds how long a stuck call can hold the process.
@Suite(.timeLimit(.minutes(2))) struct DrainTests {
  /// Holds tenant globex's row locked (as a stuck transaction would), so an UpdateQuota of globex
  /// waits inside its handler until `release` commits. Nothing else the gateway does touches that
  /// row, so only that call waits.
  static func withGlobexLocked(
    _ gw: TestGateway,
    _ body: (_ release: @Sendable () async throws -> Void) async throws -> Void
  ) async throws {
    let connection = try await TestDatabase.connect(gw.database.admin, database: gw.database.name)
    let released = ReleaseOnce()
    let release: @Sendable () async throws -> Void = {
      guard released.first() else { return }
      try? await connection.query("COMMIT", logger: testLogger)
      try await connection.close()
    }
    do {
      try await connection.query("BEGIN", logger: testLogger)
      try await connection.query("SELECT 1 FROM tenants WHERE tenant_id = 'globex' FOR UPDATE", logger: testLogger)
      try await body(release)
    } catch {
      // A connection dropped unclosed trips PostgresNIO's assertion and takes the suite down.
      try? await release()
      throw error
    }
    try await release()
  }

  final class Statuses: Sendable {
    private let list = Mutex<[String]>([])
    func append(_ status: String) { list.withLock { $0.append(status) } }
    var all: [String] { list.withLock { $0 } }
  }

  final class ReleaseOnce: Sendable {
    private let done = Mutex(false)
    func first() -> Bool { done.withLock { was in defer { was = true }; return !was } }
  }

  /// An operator's UpdateQuota of globex, which waits while globex's row is locked.
  static func updateGlobex(_ gw: TestGateway) async -> RPCError.Code? {
    await statusCode {
      try await gw.withClient(try gw.pki.issueOperator()) { client in
        try await Tollgate_V1_TenantService.Client(wrapping: client).updateQuota(.with {
          $0.tenantID = "globex"
          $0.quota.maxConcurrentCalls = 7
        })
      }
    }
  }

  /// True once a statement of the gateway waits for a row lock.
  static func waitingForLock(_ gw: TestGateway) async throws -> Bool {
    try await TestDatabase.adminCount(
      gw.database.admin,
      "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
      database: gw.database.name
    ) > 0
  }

  @Test func aUnaryCallInFlightFinishesAndAFollowingStreamIsToldToReconnect() async throws {
    try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(20) }) { gw in
      try await QuotaTests.setQuota(gw, tenant: "acme", [])
      try await QuotaTests.setQuota(gw, tenant: "globex", [])
      let acme = try TenantID(validating: "acme")
      let auditor = try gw.pki.issue(tenant: "acme", role: .auditor)
      let (watchingUpdates, watching) = AsyncStream.makeStream(of: Void.self)
      try await Self.withGlobexLocked(gw) { release in try await withThrowingTaskGroup(of: (String, RPCError.Code?).self) { calls in
        calls.addTask { ("unary", await Self.updateGlobex(gw)) }
        calls.addTask {
          // A health watcher learns NOT_SERVING when the drain begins, and its stream ends.
          let seen = Statuses()
          let code = await statusCode {
            try await gw.withClient(auditor) { client in
              try await Grpc_Health_V1_Health.Client(wrapping: client).watch(.init()) {
                for try await update in $0.messages {
                  seen.append("\(update.status)")
                  watching.yield()
                }
              }
            }
          }
          return ("health \(seen.all.joined(separator: ","))", code)
        }
        calls.addTask {
          ("stream", await statusCode {
            try await gw.withClient(auditor) { client in
              try await Tollgate_V1_AuditService.Client(wrapping: client).streamEvents(.with { $0.follow = true }) {
                for try await _ in $0.messages {}
              }
            }
          })
        }
        var watched = watchingUpdates.makeAsyncIterator()
        await watched.next()
        #expect(try await QuotaTests.eventually { gw.gateway.quotaLimiter.inFlight(acme) == 2 })
        #expect(try await QuotaTests.eventually { try await Self.waitingForLock(gw) })
        await gw.beginShutdown()
        // The streams end first, while the unary call still waits for the lock.
        var ended: [String: RPCError.Code?] = [:]
        for _ in 0..<2 {
          if let (name, code) = try await calls.next() { ended[name] = code }
        }
        #expect(ended["stream"] == .some(.unavailable))
        #expect(ended["health serving,notServing"] == .some(.unavailable), "\(ended)")
        try await release()
        let second = try await calls.next()
        #expect(second?.0 == "unary" && second?.1 == nil)
      } }
      // The call that finished during the drain committed.
      #expect(try await gw.count("SELECT count(*) FROM tenants WHERE quota->>'maxConcurrentCalls' = '7'") == 1)
    }
  }

  @Test func theDrainTimeoutCancelsACallThatWouldNotFinish() async throws {
    try await TestGateway.run(configure: {
      $0.databaseTimeout = .seconds(20)
      $0.drainTimeout = .milliseconds(300)
    }) { gw in
      try await QuotaTests.setQuota(gw, tenant: "globex", [])
      try await Self.withGlobexLocked(gw) { _ in
        async let stuck = Self.updateGlobex(gw)
        let waiting = try await QuotaTests.eventually { try await Self.waitingForLock(gw) }
        #expect(waiting)
        let clock = ContinuousClock()
        let start = clock.now
        await gw.stop()
        // Stopped by the drain timeout, long before the lock or the database timeout would end it.
        #expect(clock.now - start < .seconds(10))
        #expect(await stuck != nil)
      }
    }
  }

  @Test func anIngestStreamIsEndedBetweenBatchesWithItsAcknowledgedBatchesStored() async throws {
    try await TestGateway.run { gw in
      try await MeteringTests.setUp(gw, tenants: ["acme"], meters: [MeteringTests.meter("api_calls", .count)])
      let (acked, ack) = AsyncStream.makeStream(of: Void.self)
      let (hold, release) = AsyncStream.makeStream(of: Void.self)
      async let ended = statusCode {
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client in
          try await MeteringTests.Metering(wrapping: client).ingestStream(
            requestProducer: { writer in
              try await writer.write(MeteringTests.batch(1, [MeteringTests.event("e1"), MeteringTests.event("e2")]))
              // The agent keeps its stream open, as a real one does between batches.
              for await _ in hold {}
            },
            onResponse: { response in
              defer { release.finish() }
              for try await _ in response.messages { ack.yield() }
            }
          )
        }
      }
      var iterator = acked.makeAsyncIterator()
      await iterator.next()
      await gw.beginShutdown()
      #expect(await ended == .unavailable)
      #expect(try await gw.count("SELECT count(*) FROM usage_events") == 2)
    }
  }
}
