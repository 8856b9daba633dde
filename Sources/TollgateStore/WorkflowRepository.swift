public import Foundation
public import Logging
import NIOCore
import PostgresNIO
public import TollgateModel

/// Workflow runs: dispatch, reads, decisions, and the worker side (claims, heartbeats, results,
/// lease expiry). Every state change goes through an UPDATE of `state`, which the table's trigger
/// records in `workflow_run_events` and, when someone needs to hear it, announces on ``channel``
/// (migration 4 says when); revocations of a lease are announced as `r <tenant> <lease> <reason>`
/// in the transaction that ends it.
public struct WorkflowRepository: Sendable {
  public static let channel = "tollgate_workflow"

  let database: Database

  public init(database: Database) {
    self.database = database
  }

  /// A state change made outside a partner's call (a lease, a worker's result, an expiry), for
  /// the audit log.
  public struct RunChange: Sendable {
    public var tenant: TenantID
    public var runID: UUID
    public var lease: UUID
    public var attempt: Int
    public var state: RunState
  }

  /// Audit events for changes, appended in the transaction that makes them.
  public typealias AuditRecords = @Sendable ([RunChange]) -> [AuditEntry]

  static let runColumns = """
    run_id, type, payload, coalesce(idempotency_key, '') AS idempotency_key, priority::integer AS priority, run_after,
    max_attempts, attempt, state, required_approver, approval_reason, result, last_error, create_time,
    update_time, seq
    """

  /// The same columns from an `UPDATE workflow_runs r ... FROM` whose other source also has a
  /// `run_id`.
  static let updatedRunColumns = runColumns.replacingOccurrences(of: "run_id,", with: "r.run_id,")

  static func decodeRun(_ row: PostgresRow) throws -> RunRecord {
    let r = row.makeRandomAccess()
    let stateText = try r["state"].decode(String.self)
    guard let state = RunState(rawValue: stateText) else { throw StoreError.unexpected("run has unknown state \(stateText)") }
    return RunRecord(
      id: try r["run_id"].decode(UUID.self),
      type: try r["type"].decode(String.self),
      payload: Array(buffer: try r["payload"].decode(ByteBuffer.self)),
      idempotencyKey: try r["idempotency_key"].decode(String.self),
      priority: try r["priority"].decode(Int.self),
      runAfter: try r["run_after"].decode(Date.self),
      maxAttempts: try r["max_attempts"].decode(Int.self),
      attempt: try r["attempt"].decode(Int.self),
      state: state,
      requiredApprover: try r["required_approver"].decode(String.self),
      approvalReason: try r["approval_reason"].decode(String.self),
      result: Array(buffer: try r["result"].decode(ByteBuffer.self)),
      lastError: try r["last_error"].decode(String.self),
      createTime: try r["create_time"].decode(Date.self),
      updateTime: try r["update_time"].decode(Date.self)
    )
  }

  static func runs(_ rows: some AsyncSequence<PostgresRow, any Error>) async throws -> [RunRecord] {
    var out: [RunRecord] = []
    for try await row in rows { out.append(try decodeRun(row)) }
    return out
  }

  // MARK: Partner side

  /// Stores a new run, or returns the run already stored under the same idempotency key
  /// (`created` false). A key reused for a different type or payload is `.alreadyExists`: the
  /// caller is confused about what the key stands for, and running either would be a guess.
  public func dispatch(_ tenant: TenantID, _ new: NewRun, logger: Logger) async throws(StoreError) -> (RunRecord, created: Bool) {
    try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      let key: String? = new.idempotencyKey.isEmpty ? nil : new.idempotencyKey
      let state: RunState = new.requiredApprover.isEmpty ? .queued : .pendingApproval
      let inserted = try await Self.runs(
        try await connection.prepared(
          """
          INSERT INTO workflow_runs (tenant_id, run_id, type, payload, idempotency_key, priority, run_after,
                                     max_attempts, state, required_approver, approval_reason)
          VALUES (\(tenant.rawValue), \(UUID()), \(new.type), \(ByteBuffer(bytes: new.payload)), \(key), \(new.priority),
                  coalesce(\(new.runAfter), now()), \(new.maxAttempts), \(state.rawValue), \(new.requiredApprover),
                  \(new.approvalReason))
          ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
          RETURNING \(unescaped: Self.runColumns)
          """,
          logger: logger
        )
      )
      if let run = inserted.first { return (run, true) }
      // The key's run committed before this statement's conflict check; it is visible now.
      let existing = try await Self.runs(
        try await connection.prepared(
          "SELECT \(unescaped: Self.runColumns) FROM workflow_runs WHERE idempotency_key = \(key)",
          logger: logger
        )
      )
      guard let run = existing.first else { throw StoreError.unexpected("idempotency conflict without a stored run") }
      guard run.type == new.type, run.payload == new.payload else {
        throw StoreError.alreadyExists(
          "idempotency key '\(new.idempotencyKey)' already names run \(run.id.uuidString.lowercased()) with a different type or payload; use a new key for a different request"
        )
      }
      return (run, false)
    }
  }

  public func run(_ tenant: TenantID, id: UUID, logger: Logger) async throws(StoreError) -> RunRecord {
    try await database.withTenant(tenant, logger: logger) { connection in
      try await Self.run(id, connection: connection, logger: logger)
    }
  }

  static func run(_ id: UUID, connection: PostgresConnection, logger: Logger) async throws -> RunRecord {
    let rows = try await connection.prepared(
      "SELECT \(unescaped: runColumns) FROM workflow_runs WHERE run_id = \(id)",
      logger: logger
    )
    guard let run = try await runs(rows).first else { throw StoreError.notFound("run \(id.uuidString.lowercased()) does not exist") }
    return run
  }

  /// Runs newest first, after the run with dispatch sequence `before` (exclusive).
  public func list(
    _ tenant: TenantID,
    states: [RunState],
    type: String,
    before: Int64?,
    limit: Int,
    logger: Logger
  ) async throws(StoreError) -> TenantRepository.Page<RunRecord> {
    try await database.withTenant(tenant, logger: logger) { connection in
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.runColumns) FROM workflow_runs
        WHERE (cardinality(\(states.map(\.rawValue))::text[]) = 0 OR state = ANY(\(states.map(\.rawValue))::text[]))
          AND (\(type) = '' OR type = \(type))
          AND seq < \(before ?? Int64.max)
        ORDER BY seq DESC LIMIT \(limit + 1)
        """,
        logger: logger
      )
      var items: [RunRecord] = []
      var seqs: [Int64] = []
      for try await row in rows {
        items.append(try Self.decodeRun(row))
        seqs.append(try row.makeRandomAccess()["seq"].decode(Int64.self))
      }
      guard items.count > limit else { return .init(items: items, nextKey: nil) }
      items.removeLast()
      return .init(items: items, nextKey: String(seqs[limit - 1]))
    }
  }

  /// Cancels a run that has not reached a final state. A running attempt's lease ends with it,
  /// and its worker is told (on whichever replica it is connected to) once this commits.
  public func cancel(_ tenant: TenantID, id: UUID, reason: String, logger: Logger) async throws(StoreError) -> RunRecord {
    try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      let rows = try await connection.query(
        """
        WITH target AS (
          SELECT run_id, lease_id FROM workflow_runs
          WHERE run_id = \(id) AND state IN ('pending_approval', 'queued', 'running', 'failed') FOR UPDATE
        )
        UPDATE workflow_runs r
        SET state = 'cancelled', lease_id = NULL, lease_expires = NULL, update_time = now(),
            decision_comment = \(reason)
        FROM target WHERE r.run_id = target.run_id
        RETURNING \(unescaped: Self.updatedRunColumns), target.lease_id AS revoked
        """,
        logger: logger
      )
      var cancelled: (RunRecord, UUID?)?
      for try await row in rows {
        cancelled = (try Self.decodeRun(row), try row.makeRandomAccess()["revoked"].decode(UUID?.self))
      }
      if let (run, lease) = cancelled {
        if let lease {
          try await connection.query(
            "SELECT pg_notify(\(Self.channel), \("r \(tenant.rawValue) \(lease.uuidString.lowercased()) CANCELLED"))",
            logger: logger
          )
        }
        return run
      }
      let current = try await Self.run(id, connection: connection, logger: logger)
      throw StoreError.failedPrecondition(
        "run \(id.uuidString.lowercased()) is \(current.state.rawValue.uppercased()), a final state; only runs not yet finished can be cancelled"
      )
    }
  }

  /// Approves (to QUEUED) or rejects (to REJECTED) a PENDING_APPROVAL run, recording who and why.
  public func decide(
    _ tenant: TenantID,
    id: UUID,
    approve: Bool,
    approver: String,
    comment: String,
    logger: Logger
  ) async throws(StoreError) -> RunRecord {
    try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      let target: RunState = approve ? .queued : .rejected
      let rows = try await connection.query(
        """
        UPDATE workflow_runs
        SET state = \(target.rawValue), decided_by = \(approver), decision_comment = \(comment), update_time = now()
        WHERE run_id = \(id) AND state = 'pending_approval'
        RETURNING \(unescaped: Self.runColumns)
        """,
        logger: logger
      )
      if let run = try await Self.runs(rows).first { return run }
      let current = try await Self.run(id, connection: connection, logger: logger)
      throw StoreError.failedPrecondition(
        "run \(id.uuidString.lowercased()) is \(current.state.rawValue.uppercased()); only a PENDING_APPROVAL run can be \(approve ? "approved" : "rejected")"
      )
    }
  }

  /// Registers a watcher of run `id`, so its state changes are announced. The run's row is
  /// share-locked first: a change in flight commits before the watch does (and the watcher's first
  /// read sees it), or starts after and sees the watch (and announces itself).
  ///
  /// A claim meanwhile skips the locked row (`SKIP LOCKED`), and a worker that found nothing else
  /// would wait for a wake-up that never came: so a watch of a queued or failed run announces
  /// (`w <tenant> <type>`, sent on commit, once the lock is gone) that its type may have work.
  public func watch(_ tenant: TenantID, id: UUID, logger: Logger) async throws(StoreError) -> UUID {
    let watch = UUID()
    try await database.withTenant(tenant, logger: logger) { connection in
      var exists = false
      for try await _ in try await connection.query(
        """
        SELECT CASE WHEN state IN ('queued', 'failed')
                    THEN pg_notify(\(Self.channel), 'w ' || tenant_id || ' ' || type) END
        FROM workflow_runs WHERE run_id = \(id) FOR SHARE
        """,
        logger: logger
      ) {
        exists = true
      }
      guard exists else { throw StoreError.notFound("run \(id.uuidString.lowercased()) does not exist") }
      try await connection.query(
        "INSERT INTO workflow_watches (tenant_id, run_id, watch_id) VALUES (\(tenant.rawValue), \(id), \(watch))",
        logger: logger
      )
    }
    return watch
  }

  public func unwatch(_ tenant: TenantID, id: UUID, watch: UUID, logger: Logger) async throws(StoreError) {
    try await database.withTenant(tenant, logger: logger) { connection in
      _ = try await connection.query("DELETE FROM workflow_watches WHERE run_id = \(id) AND watch_id = \(watch)", logger: logger)
    }
  }

  /// The run's recorded state changes after `after` (0: all), oldest first, each with the run as
  /// it was then.
  public func history(
    _ tenant: TenantID,
    id: UUID,
    after: Int64,
    logger: Logger
  ) async throws(StoreError) -> [RunTransition] {
    try await database.withTenant(tenant, logger: logger) { connection in
      let run = try await Self.run(id, connection: connection, logger: logger)
      let rows = try await connection.query(
        """
        SELECT event_seq, previous_state, state, attempt, last_error, event_time FROM workflow_run_events
        WHERE run_id = \(id) AND event_seq > \(after) ORDER BY event_seq
        """,
        logger: logger
      )
      var out: [RunTransition] = []
      for try await (seq, previous, state, attempt, error, time) in rows.decode((Int64, String?, String, Int, String, Date).self) {
        var snapshot = run
        snapshot.state = RunState(rawValue: state) ?? run.state
        snapshot.attempt = attempt
        snapshot.lastError = error
        snapshot.updateTime = time
        if snapshot.state != .succeeded { snapshot.result = [] }
        out.append(RunTransition(sequence: seq, previous: previous.flatMap(RunState.init(rawValue:)), time: time, run: snapshot))
      }
      return out
    }
  }

  // MARK: Worker side

  /// What one claim came to.
  public struct Claim: Sendable {
    public var leases: [Lease]
    /// When the next run of these types becomes ready (scheduled or backing off), if the claim
    /// came up short and one is waiting.
    public var nextDue: Date?
    /// A per-type concurrency limit kept this claim from taking runs of some type.
    public var heldBackByLimit: Bool
  }

  static let readyRuns = """
    FROM workflow_runs
    WHERE state IN ('queued', 'failed') AND run_after <= now()
    """
  static let bestFirst = "ORDER BY priority DESC, run_after, seq"

  /// Leases up to `limit` ready runs of `types`, best first (priority, then due time, then
  /// dispatch order), skipping rows other claimers hold. Types with a per-type concurrency limit
  /// in the tenant's quota are claimed under a per-(tenant, type) advisory lock, so the limit
  /// holds across every worker and replica.
  ///
  /// The common case (none of the worker's types is limited) is one statement to pick and one to
  /// lease: the pick also reads the tenant's limits, and only if one applies does the claim take
  /// the locks and pick again.
  public func claim(
    _ tenant: TenantID,
    types: [String],
    limit: Int,
    worker: String,
    leaseTimeout: Duration,
    audit: @escaping AuditRecords,
    logger: Logger
  ) async throws(StoreError) -> Claim {
    let leaseMillis = leaseTimeout.wholeMilliseconds
    return try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      var picked: [UUID] = []
      var limitsText = "{}"
      for try await (id, limits) in try await connection.prepared(
        """
        SELECT run_id, (SELECT coalesce(quota->'workflowTypeConcurrency', '{}'::jsonb)::text FROM tenants)
        \(unescaped: Self.readyRuns) AND type = ANY(\(types)::text[])
        \(unescaped: Self.bestFirst) LIMIT \(limit) FOR UPDATE SKIP LOCKED
        """,
        logger: logger
      ).decode((UUID, String).self) {
        picked.append(id)
        limitsText = limits
      }
      let allLimits = (try? JSONDecoder().decode([String: Int].self, from: Data(limitsText.utf8))) ?? [:]
      let limits = allLimits.filter { types.contains($0.key) }
      var heldBack = false
      if !limits.isEmpty {
        (picked, heldBack) = try await Self.pickWithinLimits(
          tenant,
          types: types,
          limits: limits,
          limit: limit,
          connection: connection,
          logger: logger
        )
      }
      var leases: [Lease] = []
      if !picked.isEmpty {
        let leaseIDs = picked.map { _ in UUID() }
        let rows = try await connection.prepared(
          """
          UPDATE workflow_runs r
          SET state = 'running', attempt = r.attempt + 1, lease_id = l.lease,
              lease_expires = now() + \(leaseMillis) * interval '1 millisecond', worker = \(worker), update_time = now()
          FROM unnest(\(picked)::uuid[], \(leaseIDs)::uuid[]) AS l(run_id, lease)
          WHERE r.tenant_id = \(tenant.rawValue) AND r.run_id = ANY(\(picked)::uuid[]) AND r.run_id = l.run_id
          RETURNING \(unescaped: Self.updatedRunColumns), l.lease
          """,
          logger: logger
        )
        for try await row in rows {
          leases.append(Lease(leaseID: try row.makeRandomAccess()["lease"].decode(UUID.self), run: try Self.decodeRun(row)))
        }
        // Best first, as picked (UPDATE ... RETURNING has no order).
        let order = Dictionary(uniqueKeysWithValues: picked.enumerated().map { ($1, $0) })
        leases.sort { order[$0.run.id]! < order[$1.run.id]! }
      }
      var nextDue: Date?
      if leases.count < limit {
        // `run_after > update_time` follows from `run_after > now()` (no write sets update_time
        // later than now()); stated, it lets the planner read the small index of scheduled runs.
        for try await due in try await connection.prepared(
          """
          SELECT min(run_after) FROM workflow_runs
          WHERE state IN ('queued', 'failed') AND type = ANY(\(types)::text[]) AND run_after > now()
            AND run_after > update_time
          """,
          logger: logger
        ).decode(Date?.self) {
          nextDue = due
        }
      }
      try await AuditLogRepository.recordWithPlatformRights(
        audit(leases.map { RunChange(tenant: tenant, runID: $0.run.id, lease: $0.leaseID, attempt: $0.run.attempt, state: .running) }),
        on: connection,
        logger: logger
      )
      return Claim(leases: leases, nextDue: nextDue, heldBackByLimit: heldBack)
    }
  }

  /// Picks again, honouring per-type limits: under each limited type's advisory lock (taken in
  /// name order, so two claimers never wait on each other in opposite orders), a type takes at
  /// most its limit minus the runs of it already RUNNING.
  static func pickWithinLimits(
    _ tenant: TenantID,
    types: [String],
    limits: [String: Int],
    limit: Int,
    connection: PostgresConnection,
    logger: Logger
  ) async throws -> (picked: [UUID], heldBack: Bool) {
    var room: [String: Int] = [:]
    for type in limits.keys.sorted() {
      try await connection.query(
        "SELECT pg_advisory_xact_lock(hashtextextended(\(tenant.rawValue + "/" + type), 7707))",
        logger: logger
      )
      var running = 0
      for try await n in try await connection.query(
        "SELECT count(*)::integer FROM workflow_runs WHERE state = 'running' AND type = \(type)",
        logger: logger
      ).decode(Int.self) {
        running = n
      }
      room[type] = max(0, limits[type]! - running)
    }
    var heldBack = room.values.contains(0)
    var eligible = types.filter { room[$0] ?? 1 > 0 }
    var picked: [UUID] = []
    while picked.count < limit && !eligible.isEmpty {
      // Rows this transaction already locked are not skipped by its own SKIP LOCKED.
      let rows = try await connection.query(
        """
        SELECT run_id, type \(unescaped: readyRuns)
          AND type = ANY(\(eligible)::text[]) AND NOT (run_id = ANY(\(picked)::uuid[]))
        \(unescaped: bestFirst) LIMIT \(limit - picked.count) FOR UPDATE SKIP LOCKED
        """,
        logger: logger
      )
      var filled = false
      var sawAny = false
      for try await (id, type) in rows.decode((UUID, String).self) {
        sawAny = true
        if let left = room[type] {
          guard left > 0 else { continue }
          room[type] = left - 1
          if left == 1 { filled = true }
        }
        picked.append(id)
      }
      // Another round only helps when a limited type filled up and left room for the others.
      guard sawAny, filled else { break }
      heldBack = true
      eligible = eligible.filter { room[$0] ?? 1 > 0 }
    }
    return (picked, heldBack)
  }

  /// Gives back leases that a claim took for a worker stream which ended before the tasks were
  /// written to it: no worker saw them, so the runs are QUEUED again at once and the attempt is
  /// not counted (a run allowed one attempt must not die unrun). Returns the changes, each with
  /// the attempt that was given back.
  public func release(
    _ tenant: TenantID,
    leases: [UUID],
    audit: @escaping AuditRecords,
    logger: Logger
  ) async throws(StoreError) -> [RunChange] {
    guard !leases.isEmpty else { return [] }
    return try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      let rows = try await connection.prepared(
        """
        WITH unseen AS (
          SELECT run_id, lease_id FROM workflow_runs
          WHERE lease_id = ANY(\(leases)::uuid[]) AND state = 'running' FOR UPDATE
        )
        UPDATE workflow_runs r
        SET state = 'queued', attempt = r.attempt - 1, lease_id = NULL, lease_expires = NULL, update_time = now()
        FROM unseen
        WHERE r.tenant_id = \(tenant.rawValue) AND r.run_id = unseen.run_id
        RETURNING r.run_id, unseen.lease_id, r.attempt + 1
        """,
        logger: logger
      )
      var changes: [RunChange] = []
      for try await (run, lease, attempt) in rows.decode((UUID, UUID, Int).self) {
        changes.append(RunChange(tenant: tenant, runID: run, lease: lease, attempt: attempt, state: .queued))
      }
      try await AuditLogRepository.recordWithPlatformRights(audit(changes), on: connection, logger: logger)
      return changes
    }
  }

  /// Extends the listed leases; returns those still live (the rest expired or were revoked).
  public func heartbeat(
    _ tenant: TenantID,
    leases: [UUID],
    leaseTimeout: Duration,
    logger: Logger
  ) async throws(StoreError) -> Set<UUID> {
    guard !leases.isEmpty else { return [] }
    let leaseMillis = leaseTimeout.wholeMilliseconds
    return try await database.withTenant(tenant, logger: logger) { connection in
      let rows = try await connection.prepared(
        """
        UPDATE workflow_runs SET lease_expires = now() + \(leaseMillis) * interval '1 millisecond'
        WHERE lease_id = ANY(\(leases)::uuid[]) AND state = 'running'
        RETURNING lease_id
        """,
        logger: logger
      )
      var live = Set<UUID>()
      for try await id in rows.decode(UUID.self) { live.insert(id) }
      return live
    }
  }

  /// Records successful attempts, in one transaction. Returns the leases that were live; a lease
  /// that is not (expired, cancelled) changes nothing, so a late result never overwrites a newer
  /// attempt.
  public func complete(
    _ tenant: TenantID,
    results: [(lease: UUID, result: [UInt8])],
    audit: @escaping AuditRecords,
    logger: Logger
  ) async throws(StoreError) -> Set<UUID> {
    guard !results.isEmpty else { return [] }
    let leases = results.map(\.lease)
    let bytes = results.map { ByteBuffer(bytes: $0.result) }
    return try await database.withTenant(tenant, logger: logger) { connection in
      let rows = try await connection.prepared(
        """
        UPDATE workflow_runs r
        SET state = 'succeeded', result = c.result, lease_id = NULL, lease_expires = NULL, update_time = now()
        FROM unnest(\(leases)::uuid[], \(bytes)::bytea[]) AS c(lease, result)
        WHERE r.tenant_id = \(tenant.rawValue) AND r.lease_id = ANY(\(leases)::uuid[]) AND r.lease_id = c.lease
          AND r.state = 'running'
        RETURNING c.lease, r.run_id, r.attempt
        """,
        logger: logger
      )
      var changes: [RunChange] = []
      for try await (lease, run, attempt) in rows.decode((UUID, UUID, Int).self) {
        changes.append(RunChange(tenant: tenant, runID: run, lease: lease, attempt: attempt, state: .succeeded))
      }
      try await AuditLogRepository.recordWithPlatformRights(audit(changes), on: connection, logger: logger)
      return Set(changes.map(\.lease))
    }
  }

  /// Records a failed attempt: FAILED with a backoff of `retryBase` · 2^(attempt−1) (capped at an
  /// hour, ±20% jitter) while attempts remain and the failure is retryable, DEAD otherwise.
  /// Nil when the lease is no longer live.
  public func fail(
    _ tenant: TenantID,
    lease: UUID,
    error: String,
    retryable: Bool,
    retryBase: Duration,
    audit: @escaping AuditRecords,
    logger: Logger
  ) async throws(StoreError) -> RunState? {
    let baseMillis = retryBase.wholeMilliseconds
    return try await database.withTenant(tenant, logger: logger) { connection in
      let rows = try await connection.prepared(
        """
        UPDATE workflow_runs
        SET state = CASE WHEN \(retryable) AND attempt < max_attempts THEN 'failed' ELSE 'dead' END,
            run_after = CASE WHEN \(retryable) AND attempt < max_attempts
              THEN now() + least(\(baseMillis) * power(2, least(attempt - 1, 30)), 3600000) * (0.8 + 0.4 * random())
                           * interval '1 millisecond'
              ELSE run_after END,
            last_error = \(error), lease_id = NULL, lease_expires = NULL, update_time = now()
        WHERE lease_id = \(lease) AND state = 'running'
        RETURNING state, run_id, attempt
        """,
        logger: logger
      )
      var changes: [RunChange] = []
      for try await (text, run, attempt) in rows.decode((String, UUID, Int).self) {
        if let state = RunState(rawValue: text) {
          changes.append(RunChange(tenant: tenant, runID: run, lease: lease, attempt: attempt, state: state))
        }
      }
      try await AuditLogRepository.recordWithPlatformRights(audit(changes), on: connection, logger: logger)
      return changes.first?.state
    }
  }

  /// Runs per state across all tenants, for the queue-depth metric.
  public func runCountsByState(logger: Logger) async throws(StoreError) -> [RunState: Int] {
    try await database.withPlatform(logger: logger) { connection in
      var counts: [RunState: Int] = [:]
      let rows = try await connection.query(
        "SELECT state, count(*)::integer FROM workflow_runs GROUP BY state",
        logger: logger
      )
      for try await (state, count) in rows.decode((String, Int).self) {
        if let state = RunState(rawValue: state) { counts[state] = count }
      }
      return counts
    }
  }

  /// Ends leases whose worker stopped heartbeating, across all tenants: the run is offered again
  /// at once while attempts remain, and is DEAD otherwise. The lease's holder, if still
  /// connected, is told. Returns how many expired. Also drops watches a crashed replica left on
  /// finished runs.
  public func expireLeases(batch: Int = 500, audit: @escaping AuditRecords, logger: Logger) async throws(StoreError) -> Int {
    try await database.withPlatform(logger: logger) { connection in
      let rows = try await connection.query(
        """
        WITH expired AS (
          SELECT tenant_id, run_id, lease_id FROM workflow_runs
          WHERE state = 'running' AND lease_expires < now()
          ORDER BY lease_expires LIMIT \(batch) FOR UPDATE SKIP LOCKED
        )
        UPDATE workflow_runs r
        SET state = CASE WHEN r.attempt >= r.max_attempts THEN 'dead' ELSE 'queued' END,
            last_error = 'attempt ' || r.attempt || ': the lease expired (no heartbeat within the lease timeout)',
            run_after = now(), lease_id = NULL, lease_expires = NULL, update_time = now()
        FROM expired
        WHERE r.tenant_id = expired.tenant_id AND r.run_id = expired.run_id
        RETURNING expired.tenant_id, r.run_id, expired.lease_id, r.attempt, r.state,
          pg_notify(\(Self.channel), 'r ' || expired.tenant_id || ' ' || expired.lease_id::text || ' LEASE_EXPIRED')
        """,
        logger: logger
      )
      var changes: [RunChange] = []
      for try await (tenant, run, lease, attempt, state, _) in rows.decode((String, UUID, UUID, Int, String, String).self) {
        guard let tenant = try? TenantID(validating: tenant), let state = RunState(rawValue: state) else { continue }
        changes.append(RunChange(tenant: tenant, runID: run, lease: lease, attempt: attempt, state: state))
      }
      let count = changes.count
      // Watches a crashed replica left behind, once their run has finished.
      try await connection.query(
        """
        DELETE FROM workflow_watches w USING workflow_runs r
        WHERE r.tenant_id = w.tenant_id AND r.run_id = w.run_id
          AND r.state IN ('succeeded', 'dead', 'cancelled', 'rejected') AND w.create_time < now() - interval '1 minute'
        """,
        logger: logger
      )
      try await AuditLogRepository.recordWithPlatformRights(audit(changes), on: connection, logger: logger)
      return count
    }
  }
}
