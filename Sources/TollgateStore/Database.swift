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
///
/// After a transaction fails for want of the database, a watch finds out whether the database can
/// be reached (``DatabaseHealth``). While it cannot, transactions fail at once rather than each
/// waiting out the timeout. Once it can, the watch makes sure the pool serves again: PostgresNIO's
/// pool backs off its reconnects up to a minute apart and cannot be told to try now, so after a
/// long outage it would go on refusing for that long; the watch then replaces it with a new pool.
public final class Database: Service, Sendable {
  /// The pool in use; a new one after the watch replaced a pool stuck backing off.
  public var client: PostgresClient { pools.withLock { $0.current.client } }
  public let operationTimeout: Duration
  /// The database URL without its password, for messages.
  public let redactedURL: String
  let logger: Logger
  let telemetry: Telemetry
  /// Signalled after a transaction commits audit events for the sequencer to index.
  public let auditQueued = AuditQueueSignal()
  let health = DatabaseHealth()
  private let poolConfiguration: PostgresClient.Configuration
  private let probeConfiguration: PostgresConnection.Configuration
  private let backgroundLogger: Logger
  private let pools: Mutex<Pools>
  private let newPools: AsyncStream<RunningPool>
  private let newPoolsContinuation: AsyncStream<RunningPool>.Continuation
  /// How long the watch gives the pool to hand out a connection before it looks further.
  static let poolTestTimeout: Duration = .seconds(1)
  /// A stuck pool is replaced at most this often.
  static let poolRenewalInterval: Duration = .seconds(10)

  private struct Pools {
    var current: RunningPool
    var renewals = 0
    var lastRenewal: ContinuousClock.Instant?
  }

  public static let tenantRole = "tollgate_tenant"
  public static let platformRole = "tollgate_platform"

  public convenience init(
    url: DatabaseURL,
    maximumConnections: Int = 20,
    operationTimeout: Duration = .seconds(5),
    logger: Logger,
    telemetry: Telemetry = .disabled
  ) {
    self.init(url: url, maximumConnections: maximumConnections, operationTimeout: operationTimeout, logger: logger, telemetry: telemetry, firstPoolURL: nil)
  }

  /// `firstPoolURL`, for tests only, points the first pool somewhere other than `url` (where
  /// nothing answers, say), as a pool stuck backing off would behave.
  init(
    url: DatabaseURL,
    maximumConnections: Int,
    operationTimeout: Duration,
    logger: Logger,
    telemetry: Telemetry,
    firstPoolURL: DatabaseURL?
  ) {
    let config = Self.poolConfiguration(url, maximumConnections: maximumConnections)
    // The driver logs every failed connection attempt at info; the store reports outages itself,
    // so the driver's background log only shows warnings unless debugging.
    var background = logger
    if background.logLevel > .debug { background.logLevel = max(background.logLevel, .warning) }
    var probe = PostgresConnection.Configuration(
      host: url.host,
      port: url.port,
      username: url.username,
      password: url.password,
      database: url.database,
      tls: .disable
    )
    // The probe asks for TLS as the pool does. A context that cannot be made (it is the default
    // client configuration, so it should not happen) leaves the probe without TLS: it then still
    // tells whether the server answers.
    switch url.tlsMode {
    case .disable: break
    case .prefer: probe.tls = (try? NIOSSLContext(configuration: .makeClientConfiguration())).map { .prefer($0) } ?? .disable
    case .require: probe.tls = (try? NIOSSLContext(configuration: .makeClientConfiguration())).map { .require($0) } ?? .disable
    }
    probe.options.connectTimeout = .seconds(3)
    self.probeConfiguration = probe
    self.poolConfiguration = config
    self.backgroundLogger = background
    let first = firstPoolURL.map { Self.poolConfiguration($0, maximumConnections: maximumConnections) } ?? config
    self.pools = Mutex(Pools(current: RunningPool(PostgresClient(configuration: first, backgroundLogger: background))))
    (newPools, newPoolsContinuation) = AsyncStream.makeStream(of: RunningPool.self)
    self.operationTimeout = operationTimeout
    telemetry.set("tollgate_db_reachable", [], 1)
    self.redactedURL = url.redacted
    self.logger = logger
    self.telemetry = telemetry
  }

  static func poolConfiguration(_ url: DatabaseURL, maximumConnections: Int) -> PostgresClient.Configuration {
    let tls: PostgresClient.Configuration.TLS
    switch url.tlsMode {
    case .disable: tls = .disable
    case .prefer: tls = .prefer(.makeClientConfiguration())
    case .require: tls = .require(.makeClientConfiguration())
    }
    var config = PostgresClient.Configuration(
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
    return config
  }

  /// Runs the pool, and the pools that replace it, and the watch, until cancelled (graceful
  /// shutdown). Must run exactly once, before any query.
  public func run() async throws {
    let first = pools.withLock { $0.current }
    await withGracefulShutdownHandler {
      await withDiscardingTaskGroup { group in
        group.addTask { await first.run() }
        group.addTask { await cancelWhenGracefulShutdown { await self.watch() } }
        for await pool in newPools {
          group.addTask { await pool.run() }
        }
        group.cancelAll()
      }
    } onGracefulShutdown: {
      self.newPoolsContinuation.finish()
    }
  }

  /// How many times the watch has replaced a stuck pool.
  public var poolRenewals: Int { pools.withLock { $0.renewals } }

  /// After each failure of a transaction for want of the database, finds out what is wrong and
  /// stays until the database serves again: a pool that hands out a connection means all is well;
  /// failing that, a connection of its own tells down (refused at once: transactions then fail at
  /// once too) from reachable, and a reachable database whose pool has handed out nothing since
  /// the failure gets a new pool. A probe that gets no answer in time decides nothing.
  func watch() async {
    for await _ in health.failures {
      let grantsAtFailure = health.grantCount
      var pause: Duration = .milliseconds(100)
      while !Task.isCancelled && health.current != .up {
        if await poolAnswers(within: Self.poolTestTimeout, logger: logger) {
          health.succeeded()
          break
        }
        switch await probe() {
        case .undecided:
          break
        case .refused(let reason):
          if health.wentDown(reason) {
            telemetry.set("tollgate_db_reachable", [], 0)
            logger.error(
              "database unreachable; calls needing it fail at once until it answers",
              metadata: ["database": "\(redactedURL)", "error": "\(reason)"]
            )
          }
        case .answered:
          // A pool that handed out a connection since the failure, or still has one out (to a
          // slow transaction), works: it is only busy. A new pool is asked at once.
          if health.grantCount == grantsAtFailure && health.leasedCount == 0 && renewPool() { continue }
        }
        try? await Task.sleep(for: pause)
        pause = min(pause * 2, .seconds(1))
      }
      // Not when the watch was cut short by shutdown: the database may still be down.
      if health.current == .up, let outage = health.endOutage() {
        telemetry.set("tollgate_db_reachable", [], 1)
        logger.notice(
          "database reachable again",
          metadata: ["database": "\(redactedURL)", "outage_seconds": "\(String(format: "%.1f", outage))"]
        )
      }
    }
  }

  /// What a connection of the watch's own, made outside the pool, found.
  enum ProbeResult {
    /// It connected and a trivial query answered.
    case answered
    /// The server or the network refused it at once (nothing listening, the database not
    /// accepting connections, shutting down): the database is down.
    case refused(String)
    /// It could not tell: no answer in time (a partition, or a database too loaded to accept a
    /// connection quickly), or the server is only out of connection slots.
    case undecided
  }

  /// Connects outside the pool and runs a trivial query: whether the database can be reached now.
  private func probe() async -> ProbeResult {
    do {
      let configuration = probeConfiguration
      let logger = backgroundLogger
      try await bounded(timeout: poolConfiguration.options.connectTimeout + Self.poolTestTimeout) {
        let connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
        defer { Task { try? await connection.close() } }
        _ = try await connection.query("SELECT 1", logger: logger)
      }
      return .answered
    } catch {
      // A database that is only slow must not be taken for down, or every call would be refused
      // while it could still have been served: only a prompt refusal counts. Nor is a probe cut
      // short by the watch's own cancellation.
      if Task.isCancelled || error is StoreError || StoreError.isConnectTimeout(error) || StoreError.isTooManyConnections(error) {
        return .undecided
      }
      return .refused(StoreError.describeConnectionFailure(error))
    }
  }

  /// Puts a new pool in place of one that has handed out no connection although the database
  /// answers: after a long outage PostgresNIO's pool waits up to a minute between reconnects.
  /// Returns false if it did not (one was replaced less than ``poolRenewalInterval`` ago, or
  /// shutdown has begun).
  private func renewPool() -> Bool {
    let now = ContinuousClock.now
    let due = pools.withLock { pools in pools.lastRenewal.map { now - $0 >= Self.poolRenewalInterval } ?? true }
    guard due else { return false }
    let new = RunningPool(PostgresClient(configuration: poolConfiguration, backgroundLogger: backgroundLogger))
    // Started before it is used; not at all once shutdown has begun, when the old pool stays.
    guard case .enqueued = newPoolsContinuation.yield(new) else { return false }
    let old = pools.withLock { pools in
      defer {
        pools.current = new
        pools.renewals += 1
        pools.lastRenewal = now
      }
      return pools.current
    }
    logger.warning(
      "database answers but the connection pool is still backing off from the outage; replacing the pool",
      metadata: ["database": "\(redactedURL)"]
    )
    telemetry.count("tollgate_db_pool_renewals_total")
    old.retire()
    return true
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

  /// True if a trivial query answers within the operation timeout; false at once while the
  /// database is known to be down.
  public func isReachable(logger: Logger) async -> Bool {
    if health.current == .down { return false }
    return await poolAnswers(within: operationTimeout, logger: logger)
  }

  /// True if the pool hands out a connection on which a trivial query answers within `timeout`.
  private func poolAnswers(within timeout: Duration, logger: Logger) async -> Bool {
    do {
      _ = try await bounded(timeout: timeout) {
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
    if let down = health.failFast() {
      pending?.settle(committed: false)
      throw down
    }
    let health = self.health
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
          health.granted()
          defer { health.released() }
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
      health.succeeded()
      if marks.auditQueued { auditQueued.signal() }
      telemetry.record("tollgate_db_transaction_duration_seconds", [("outcome", "committed")], .now - start)
      return result
    } catch {
      pending?.settle(committed: false)
      telemetry.record("tollgate_db_transaction_duration_seconds", [("outcome", "failed")], .now - start)
      let failure = StoreError.classify(error)
      // A caller that went away says nothing about the database.
      if !Task.isCancelled, failure.isUnavailable { health.failed() }
      throw failure
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
    timeout: Duration? = nil,
    _ operation: @Sendable @escaping () async throws -> Result
  ) async throws -> Result {
    let timeout = timeout ?? operationTimeout
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

/// A pool and the means to stop it once a newer one has taken its place.
final class RunningPool: Sendable {
  let client: PostgresClient
  private let retirement: AsyncStream<Void>
  private let retirementContinuation: AsyncStream<Void>.Continuation

  init(_ client: PostgresClient) {
    self.client = client
    (retirement, retirementContinuation) = AsyncStream.makeStream(of: Void.self)
  }

  /// Runs the pool until graceful shutdown, cancellation or ``retire()``. Retiring closes its
  /// connections: it is only retired when it has none that work.
  func run() async {
    await withTaskGroup(of: Void.self) { group in
      group.addTask { await self.client.run() }
      group.addTask { for await _ in self.retirement {} }
      await group.next()
      group.cancelAll()
    }
  }

  func retire() { retirementContinuation.finish() }
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
