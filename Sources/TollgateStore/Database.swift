import Foundation
import Synchronization
import Tracing
public import Logging
public import PostgresNIO
import NIOSSL
public import ServiceLifecycle
public import TollgateModel

/// The gateway's Postgres: one pooled `PostgresClient` and the only way to run SQL.
///
/// Every statement runs in a transaction that first drops privileges to a role that row-level
/// security applies to: ``withTenant(_:logger:_:)`` to `tollgate_tenant` with the tenant set
/// (`set_config(…, is_local => true)`, i.e. `SET LOCAL`, so it ends with the transaction and never
/// leaks to the next user of the pooled connection), ``withPlatform(logger:_:)`` to
/// `tollgate_platform` for operator-wide reads and writes. The configured login user never queries
/// tables as itself, so even when it owns them (or is a superuser) RLS is not bypassed.
///
/// Every operation is bounded by ``operationTimeout``: a database that is down or stuck surfaces
/// as ``StoreError/unavailable(_:)`` instead of a call that never ends.
public final class Database: Service, Sendable {
  public let client: PostgresClient
  public let operationTimeout: Duration
  /// The database URL without its password, for messages.
  public let redactedURL: String
  let logger: Logger
  let telemetry: Telemetry
  /// Signalled after a transaction commits audit events for the sequencer to index.
  public let auditQueued = AuditQueueSignal()

  public static let tenantRole = "tollgate_tenant"
  public static let platformRole = "tollgate_platform"

  public init(
    url: DatabaseURL,
    maximumConnections: Int = 20,
    operationTimeout: Duration = .seconds(5),
    logger: Logger,
    telemetry: Telemetry = .disabled
  ) {
    var config: PostgresClient.Configuration
    let tls: PostgresClient.Configuration.TLS
    switch url.tlsMode {
    case .disable: tls = .disable
    case .prefer: tls = .prefer(.makeClientConfiguration())
    case .require: tls = .require(.makeClientConfiguration())
    }
    config = PostgresClient.Configuration(
      host: url.host,
      port: url.port,
      username: url.username,
      password: url.password,
      database: url.database,
      tls: tls
    )
    config.options.maximumConnections = maximumConnections
    config.options.minimumConnections = 1
    config.options.connectTimeout = .seconds(3)
    config.options.connectionIdleTimeout = .seconds(60)
    // The driver logs every failed connection attempt at info; the store reports outages itself,
    // so the driver's background log only shows warnings unless debugging.
    var background = logger
    if background.logLevel > .debug { background.logLevel = max(background.logLevel, .warning) }
    self.client = PostgresClient(configuration: config, backgroundLogger: background)
    self.operationTimeout = operationTimeout
    self.redactedURL = url.redacted
    self.logger = logger
    self.telemetry = telemetry
  }

  /// Runs the pool until cancelled (graceful shutdown). Must run exactly once, before any query.
  public func run() async throws {
    await client.run()
  }

  /// Runs `body` in a transaction scoped to `tenant`: only that tenant's rows of tenant-owned
  /// tables are visible or writable, whatever the SQL says.
  ///
  /// A `mutation` transaction also commits the current call's ``PendingAudit`` event, if any.
  public func withTenant<Result: Sendable>(
    _ tenant: TenantID,
    mutation: Bool = false,
    logger: Logger,
    _ body: @escaping @Sendable (PostgresConnection) async throws -> Result
  ) async throws(StoreError) -> Result {
    try await transaction(mutation: mutation, logger: logger) { connection in
      try await connection.prepared(
        "SELECT set_config('role', \(Database.tenantRole), true), set_config('tollgate.tenant_id', \(tenant.rawValue), true)",
        logger: logger
      )
      return try await body(connection)
    }
  }

  /// Runs `body` in a transaction with platform (operator-wide) privileges.
  public func withPlatform<Result: Sendable>(
    mutation: Bool = false,
    logger: Logger,
    _ body: @escaping @Sendable (PostgresConnection) async throws -> Result
  ) async throws(StoreError) -> Result {
    try await transaction(mutation: mutation, logger: logger) { connection in
      try await connection.prepared("SELECT set_config('role', \(Database.platformRole), true)", logger: logger)
      return try await body(connection)
    }
  }

  /// True if a trivial query answers within the operation timeout.
  public func isReachable(logger: Logger) async -> Bool {
    do {
      _ = try await bounded {
        try await self.client.withConnection { connection in
          try await connection.query("SELECT 1", logger: logger)
        }
      }
      return true
    } catch {
      return false
    }
  }

  private func transaction<Result: Sendable>(
    mutation: Bool,
    logger: Logger,
    _ body: @Sendable @escaping (PostgresConnection) async throws -> Result
  ) async throws(StoreError) -> Result {
    // A client span under the call's server span (the task's ServiceContext), so the caller's
    // trace shows where its time went in the database.
    do {
      return try await withSpan("db.transaction", ofKind: .client) { span in
        span.attributes["db.system"] = "postgresql"
        span.attributes["db.operation"] = mutation ? "write" : "read"
        return try await self.timedTransaction(mutation: mutation, logger: logger, body)
      }
    } catch let error as StoreError {
      throw error
    } catch {
      throw StoreError.classify(error)
    }
  }

  private func timedTransaction<Result: Sendable>(
    mutation: Bool,
    logger: Logger,
    _ body: @Sendable @escaping (PostgresConnection) async throws -> Result
  ) async throws(StoreError) -> Result {
    let pending = mutation ? PendingAudit.current : nil
    let marks = TransactionMarks()
    let auditQueued = self.auditQueued
    let telemetry = self.telemetry
    let start = ContinuousClock.now
    let wait = PoolWait(telemetry: telemetry)
    defer { wait.end() }
    let phase = TransactionPhase()
    do {
      let result = try await bounded(phase: phase) {
        try await self.client.withConnection { connection in
          wait.end()
          telemetry.adjust("tollgate_db_connections_in_use", by: 1)
          defer { telemetry.adjust("tollgate_db_connections_in_use", by: -1) }
          // A request that timed out (or was given up) while waiting for a connection must not
          // run afterwards.
          guard phase.begin() else { throw CancellationError() }
          do {
            return try await TransactionMarks.$current.withValue(marks) {
              try await connection.withTransaction(logger: logger) { connection in
                let result = try await body(connection)
                if let entry = pending?.claim() {
                  try await AuditLogRepository.recordWithPlatformRights([entry], on: connection, logger: logger)
                }
                // The caller was already told this transaction failed: it must roll back, or a
                // client retrying an "unavailable" write would apply it twice.
                guard phase.commit() else { throw CancellationError() }
                return result
              }
            }
          } catch {
            if marks.connectionPoisoned { try? await connection.close() }
            throw error
          }
        }
      }
      pending?.settle(committed: true)
      if marks.auditQueued { auditQueued.signal() }
      telemetry.record("tollgate_db_transaction_duration_seconds", [("outcome", "committed")], .now - start)
      return result
    } catch {
      pending?.settle(committed: false)
      telemetry.record("tollgate_db_transaction_duration_seconds", [("outcome", "failed")], .now - start)
      throw StoreError.classify(error)
    }
  }

  /// Runs `operation`, failing with `.unavailable` if it takes longer than the operation timeout.
  ///
  /// The caller gets its answer at the deadline even if `operation` ignores cancellation (a pool
  /// lease waiting on a database that is down may): the operation is cancelled and left to wind
  /// down on its own instead of being awaited.
  ///
  /// A transaction passes its `phase`, so that `.unavailable` always means "not applied": one the
  /// deadline (or the caller's cancellation) overtakes while it waits for a connection never
  /// starts, and one overtaken before its COMMIT rolls back. One overtaken while its COMMIT is on the wire is waited for, up to the timeout once
  /// more; if the database still has not answered, the caller gets `.outcomeUnknown`.
  func bounded<Result: Sendable>(
    phase: TransactionPhase? = nil,
    _ operation: @Sendable @escaping () async throws -> Result
  ) async throws -> Result {
    let timeout = operationTimeout
    let race = DeadlineRace<Result>()
    return try await withTaskCancellationHandler {
      try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Result, any Error>) in
        race.start(continuation)
        race.track(Task {
          do { race.finish(.success(try await operation())) } catch { race.finish(.failure(error)) }
        })
        race.track(Task {
          try? await Task.sleep(for: timeout)
          if phase?.abandon() ?? true {
            race.finish(.failure(StoreError.unavailable("database did not answer within \(timeout)")))
            return
          }
          try? await Task.sleep(for: timeout)
          race.finish(
            .failure(StoreError.outcomeUnknown("database did not answer a COMMIT within \(timeout) (after \(timeout) of work)"))
          )
        })
      }
    } onCancel: {
      if phase?.abandon() ?? true { race.finish(.failure(CancellationError())) }
    }
  }
}

/// How far one transaction has got, decided once between the transaction and its deadline: either
/// it reaches COMMIT first, and its outcome is the database's answer, or the deadline abandons it
/// first, and it rolls back.
final class TransactionPhase: Sendable {
  private static let waiting: UInt8 = 0
  private static let running: UInt8 = 1
  private static let committing: UInt8 = 2
  private static let abandoned: UInt8 = 3
  private let value = Atomic<UInt8>(TransactionPhase.waiting)

  /// The transaction got a connection; false if it was abandoned while it waited.
  func begin() -> Bool {
    value.compareExchange(expected: Self.waiting, desired: Self.running, ordering: .acquiringAndReleasing).exchanged
  }

  /// The transaction is about to COMMIT; false if it was abandoned and must roll back.
  func commit() -> Bool {
    value.compareExchange(expected: Self.running, desired: Self.committing, ordering: .acquiringAndReleasing).exchanged
  }

  /// The deadline passed or the caller went away; false if COMMIT is already on its way.
  func abandon() -> Bool {
    while true {
      let current = value.load(ordering: .acquiring)
      if current == Self.committing { return false }
      if current == Self.abandoned { return true }
      if value.compareExchange(expected: current, desired: Self.abandoned, ordering: .acquiringAndReleasing).exchanged {
        return true
      }
    }
  }
}

/// What the statements of one transaction report for the transaction to act on when it ends.
final class TransactionMarks: Sendable {
  @TaskLocal static var current: TransactionMarks?
  private let queued = Atomic<Bool>(false)
  private let poisoned = Atomic<Bool>(false)

  /// Events went to `audit_pending`: the sequencer is woken once the transaction has committed
  /// (not before: it would find nothing yet).
  func markAuditQueued() { queued.store(true, ordering: .relaxed) }
  var auditQueued: Bool { queued.load(ordering: .relaxed) }

  /// A statement's failed preparation left the connection unfit for reuse: the transaction closes
  /// it after its rollback (closing it under the transaction left the rollback waiting for the
  /// operation timeout).
  func markConnectionPoisoned() { poisoned.store(true, ordering: .relaxed) }
  var connectionPoisoned: Bool { poisoned.load(ordering: .relaxed) }
}

/// The first of an operation and its deadline to finish wins; the loser is cancelled, not awaited.
final class DeadlineRace<Result: Sendable>: Sendable {
  private struct State {
    var continuation: CheckedContinuation<Result, any Error>?
    var outcome: Swift.Result<Result, any Error>?
    var tasks: [Task<Void, Never>] = []
  }
  private let state = Mutex(State())

  func start(_ continuation: CheckedContinuation<Result, any Error>) {
    let early = state.withLock { s -> Swift.Result<Result, any Error>? in
      if let outcome = s.outcome { return outcome }
      s.continuation = continuation
      return nil
    }
    if let early { continuation.resume(with: early) }
  }

  func track(_ task: Task<Void, Never>) {
    let finished = state.withLock { s -> Bool in
      if s.outcome != nil { return true }
      s.tasks.append(task)
      return false
    }
    if finished { task.cancel() }
  }

  func finish(_ outcome: Swift.Result<Result, any Error>) {
    let (continuation, tasks) = state.withLock { s -> (CheckedContinuation<Result, any Error>?, [Task<Void, Never>]) in
      guard s.outcome == nil else { return (nil, []) }
      s.outcome = outcome
      defer {
        s.continuation = nil
        s.tasks = []
      }
      return (s.continuation, s.tasks)
    }
    for task in tasks { task.cancel() }
    continuation?.resume(with: outcome)
  }
}

/// One transaction's place in the queue for a pool connection, counted in
/// `tollgate_db_connections_waiting` until it gets a connection or gives up, whichever is first
/// (a transaction that timed out may still be handed a connection later).
final class PoolWait: Sendable {
  private let done = Atomic<Bool>(false)
  let telemetry: Telemetry

  init(telemetry: Telemetry) {
    self.telemetry = telemetry
    telemetry.adjust("tollgate_db_connections_waiting", by: 1)
  }

  func end() {
    guard !done.exchange(true, ordering: .relaxed) else { return }
    telemetry.adjust("tollgate_db_connections_waiting", by: -1)
  }
}
