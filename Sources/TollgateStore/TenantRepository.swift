import Foundation
public import Logging
import PostgresNIO
import Synchronization
public import TollgateModel

/// Tenants and certificate revocations. Plain values in, plain values out: no row sequence or
/// connection ever leaves this type.
///
/// Every write that changes who may call (tenant state, revocations) sends a `tollgate_identity`
/// notification in the same transaction, so every replica reloads its identity directory when
/// (and only when) the change has committed.
public struct TenantRepository: Sendable {
  public static let identityChannel = "tollgate_identity"

  let database: Database

  public init(database: Database) {
    self.database = database
  }

  /// A page of results and the key to continue after, if there is more.
  public struct Page<Item: Sendable>: Sendable {
    public var items: [Item]
    public var nextKey: String?
  }

  static let tenantColumns = """
    tenant_id, display_name, state, suspend_reason, quota::text, create_time, update_time
    """

  typealias TenantRow = (String, String, String, String, String, Date, Date)

  /// Quota documents already decoded, by their text (`jsonb` prints equal documents equally).
  /// Foundation's decoder took about 100 µs per document, a tenth of a whole GetTenant call's CPU
  /// under load (perf), while a tenant's quota rarely changes. Emptied when it holds 1,024 texts.
  static let decodedQuotas = Mutex<[String: QuotaSettings]>([:])

  static func decodeQuota(_ text: String) throws -> QuotaSettings {
    if let known = decodedQuotas.withLock({ $0[text] }) { return known }
    let quota = try JSONDecoder().decode(QuotaSettings.self, from: Data(text.utf8))
    decodedQuotas.withLock { cache in
      if cache.count >= 1_024 { cache.removeAll(keepingCapacity: true) }
      cache[text] = quota
    }
    return quota
  }

  static func decodeTenant(_ row: TenantRow) throws -> TenantRecord {
    let quota = try decodeQuota(row.4)
    return TenantRecord(
      id: try TenantID(validating: row.0),
      displayName: row.1,
      state: TenantState(rawValue: row.2) ?? .suspended,
      suspendReason: row.3,
      quota: quota,
      createTime: row.5,
      updateTime: row.6
    )
  }

  static func encode(_ quota: QuotaSettings) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = .sortedKeys
    return String(decoding: try encoder.encode(quota), as: UTF8.self)
  }

  public func create(
    id: TenantID,
    displayName: String,
    quota: QuotaSettings,
    logger: Logger
  ) async throws(StoreError) -> TenantRecord {
    let quotaJSON: String
    do { quotaJSON = try Self.encode(quota) } catch { throw .unexpected("quota encoding: \(error)") }
    return try await database.withPlatform(mutation: true, logger: logger) { connection in
      let rows = try await connection.query(
        """
        INSERT INTO tenants (tenant_id, display_name, state, quota)
        VALUES (\(id.rawValue), \(displayName), 'active', \(quotaJSON)::jsonb)
        ON CONFLICT (tenant_id) DO NOTHING
        RETURNING \(unescaped: Self.tenantColumns)
        """,
        logger: logger
      )
      for try await row in rows.decode(TenantRow.self) {
        try await Self.notifyIdentityChange(connection, logger: logger)
        return try Self.decodeTenant(row)
      }
      throw StoreError.alreadyExists("tenant '\(id)' already exists")
    }
  }

  /// Reads one tenant inside that tenant's own scope (as a tenant principal's call does).
  public func get(_ id: TenantID, logger: Logger) async throws(StoreError) -> TenantRecord {
    try await database.withTenant(id, logger: logger) { connection in
      // No WHERE clause is needed: row-level security limits this transaction to `id`'s row.
      // The filter is kept anyway so the intent reads in the SQL.
      let rows = try await connection.prepared(
        "SELECT \(unescaped: Self.tenantColumns) FROM tenants WHERE tenant_id = \(id.rawValue)",
        logger: logger
      )
      for try await row in rows.decode(TenantRow.self) { return try Self.decodeTenant(row) }
      throw StoreError.notFound("tenant '\(id)' does not exist")
    }
  }

  /// Tenants in id order after `afterID`, at most `limit`.
  public func list(
    after afterID: String?,
    limit: Int,
    state: TenantState?,
    logger: Logger
  ) async throws(StoreError) -> Page<TenantRecord> {
    try await database.withPlatform(logger: logger) { connection in
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.tenantColumns) FROM tenants
        WHERE tenant_id > \(afterID ?? "") AND (\(state?.rawValue)::text IS NULL OR state = \(state?.rawValue))
        ORDER BY tenant_id
        LIMIT \(limit + 1)
        """,
        logger: logger
      )
      var items: [TenantRecord] = []
      for try await row in rows.decode(TenantRow.self) { items.append(try Self.decodeTenant(row)) }
      var next: String?
      if items.count > limit {
        items.removeLast()
        next = items.last?.id.rawValue
      }
      return Page(items: items, nextKey: next)
    }
  }

  public func updateQuota(_ id: TenantID, quota: QuotaSettings, logger: Logger) async throws(StoreError) -> TenantRecord {
    let quotaJSON: String
    do { quotaJSON = try Self.encode(quota) } catch { throw .unexpected("quota encoding: \(error)") }
    return try await updateReturning(
      id,
      logger: logger,
      // Every replica enforces quotas from its identity snapshot, so a change is news to all.
      notify: true,
      "UPDATE tenants SET quota = \(quotaJSON)::jsonb, update_time = now() WHERE tenant_id = \(id.rawValue)"
    )
  }

  /// Sets the tenant's state; a no-op (but not an error) if it is already in that state.
  public func setState(
    _ id: TenantID,
    state: TenantState,
    reason: String,
    logger: Logger
  ) async throws(StoreError) -> TenantRecord {
    let storedReason = state == .suspended ? reason : ""
    return try await updateReturning(
      id,
      logger: logger,
      notify: true,
      """
      UPDATE tenants
      SET update_time = CASE WHEN state = \(state.rawValue) THEN update_time ELSE now() END,
          suspend_reason = CASE WHEN state = \(state.rawValue) THEN suspend_reason ELSE \(storedReason) END,
          state = \(state.rawValue)
      WHERE tenant_id = \(id.rawValue)
      """
    )
  }

  private func updateReturning(
    _ id: TenantID,
    logger: Logger,
    notify: Bool,
    _ update: PostgresQuery
  ) async throws(StoreError) -> TenantRecord {
    try await database.withPlatform(mutation: true, logger: logger) { connection in
      var query = update
      query.sql += " RETURNING \(Self.tenantColumns)"
      let rows = try await connection.query(query, logger: logger)
      for try await row in rows.decode(TenantRow.self) {
        if notify { try await Self.notifyIdentityChange(connection, logger: logger) }
        return try Self.decodeTenant(row)
      }
      throw StoreError.notFound("tenant '\(id)' does not exist")
    }
  }

  static func notifyIdentityChange(_ connection: PostgresConnection, logger: Logger) async throws {
    try await connection.query("SELECT pg_notify(\(identityChannel), '')", logger: logger)
  }

  // MARK: Revocations

  /// Records a revocation scoped to `tenant` (nil = every tenant). Revoking the same certificate
  /// in the same scope again returns the existing entry unchanged.
  public func revoke(
    _ target: RevocationTarget,
    tenant: TenantID?,
    reason: String,
    revokedBy: String,
    logger: Logger
  ) async throws(StoreError) -> RevocationRecord {
    let (kind, value) = Self.columns(target)
    let body: @Sendable (PostgresConnection) async throws -> RevocationRecord = { connection in
      try await connection.query(
        """
        INSERT INTO certificate_revocations (kind, value, tenant_id, reason, revoked_by)
        VALUES (\(kind), \(value), \(tenant?.rawValue), \(reason), \(revokedBy))
        ON CONFLICT (kind, value, (coalesce(tenant_id, ''))) DO NOTHING
        """,
        logger: logger
      )
      try await Self.notifyIdentityChange(connection, logger: logger)
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.revocationColumns) FROM certificate_revocations
        WHERE kind = \(kind) AND value = \(value) AND coalesce(tenant_id, '') = \(tenant?.rawValue ?? "")
        """,
        logger: logger
      )
      for try await row in rows.decode(RevocationRow.self) { return try Self.decodeRevocation(row) }
      throw StoreError.unexpected("revocation vanished after insert")
    }
    if let tenant {
      return try await database.withTenant(tenant, mutation: true, logger: logger, body)
    }
    return try await database.withPlatform(mutation: true, logger: logger, body)
  }

  /// Revocations newest first, after revocation id `before` if given. With a tenant, only that
  /// tenant's (enforced by row-level security); without, all.
  public func listRevocations(
    tenant: TenantID?,
    before: Int64?,
    limit: Int,
    logger: Logger
  ) async throws(StoreError) -> Page<RevocationRecord> {
    let body: @Sendable (PostgresConnection) async throws -> Page<RevocationRecord> = { connection in
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.revocationColumns) FROM certificate_revocations
        WHERE revocation_id < \(before ?? Int64.max)
          AND (\(tenant?.rawValue)::text IS NULL OR tenant_id = \(tenant?.rawValue))
        ORDER BY revocation_id DESC
        LIMIT \(limit + 1)
        """,
        logger: logger
      )
      var items: [RevocationRecord] = []
      for try await row in rows.decode(RevocationRow.self) { items.append(try Self.decodeRevocation(row)) }
      var next: String?
      if items.count > limit {
        items.removeLast()
        next = items.last.map { String($0.id) }
      }
      return Page(items: items, nextKey: next)
    }
    if let tenant {
      return try await database.withTenant(tenant, logger: logger, body)
    }
    return try await database.withPlatform(logger: logger, body)
  }

  /// Everything identity checks need, in one consistent read.
  public func identitySnapshot(logger: Logger) async throws(StoreError) -> IdentitySnapshot {
    try await database.withPlatform(logger: logger) { connection in
      var snapshot = IdentitySnapshot()
      for try await (id, state, quota) in try await connection.query(
        "SELECT tenant_id, state, quota::text FROM tenants",
        logger: logger
      ).decode((String, String, String).self) {
        let tenant = try TenantID(validating: id)
        snapshot.tenantStates[tenant] = TenantState(rawValue: state) ?? .suspended
        snapshot.quotas[tenant] = try Self.decodeQuota(quota)
      }
      for try await (kind, value, tenant) in try await connection.query(
        "SELECT kind, value, tenant_id FROM certificate_revocations",
        logger: logger
      ).decode((String, String, String?).self) {
        let target: RevocationTarget = kind == "serial" ? .serial(value) : .fingerprint(value)
        snapshot.revocations[target, default: []].append(try tenant.map { try TenantID(validating: $0) })
      }
      return snapshot
    }
  }

  static let revocationColumns = "revocation_id, kind, value, tenant_id, reason, revoked_by, create_time"
  typealias RevocationRow = (Int64, String, String, String?, String, String, Date)

  static func columns(_ target: RevocationTarget) -> (String, String) {
    switch target {
    case .serial(let s): return ("serial", s)
    case .fingerprint(let f): return ("fingerprint", f)
    }
  }

  static func decodeRevocation(_ row: RevocationRow) throws -> RevocationRecord {
    RevocationRecord(
      id: row.0,
      target: row.1 == "serial" ? .serial(row.2) : .fingerprint(row.2),
      tenant: try row.3.map { try TenantID(validating: $0) },
      reason: row.4,
      revokedBy: row.5,
      createTime: row.6
    )
  }
}
