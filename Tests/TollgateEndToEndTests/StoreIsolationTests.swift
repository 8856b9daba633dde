import Foundation
import Logging
import PostgresNIO
import Testing
import TollgateModel
import TollgateStore

/// Row-level security holds even when the SQL forgets its tenant filter, and even though the
/// gateway's login user owns the tables.
@Suite(.timeLimit(.minutes(2))) struct StoreIsolationTests {
  func withStore<T: Sendable>(
    connections: Int = 4,
    _ body: (Database, TenantRepository) async throws -> T
  ) async throws -> T {
    try await TestDatabase.withDatabase { db in
      try await withStore(on: db, connections: connections, body)
    }
  }

  /// A migrated store on `db`, running until `body` returns.
  func withStore<T: Sendable>(
    on db: TestDatabase,
    connections: Int = 4,
    operationTimeout: Duration? = nil,
    _ body: (Database, TenantRepository) async throws -> T
  ) async throws -> T {
    let database =
      if let operationTimeout {
        Database(url: db.app, maximumConnections: connections, operationTimeout: operationTimeout, logger: testLogger)
      } else {
        Database(url: db.app, maximumConnections: connections, logger: testLogger)
      }
    return try await database.running { try await body(database, TenantRepository(database: database)) }
  }

  /// No PostgreSQL text can hold NUL. A request value with one that a service did not check is
  /// the client's error (INVALID_ARGUMENT once mapped), not an unexpected failure of the store.
  @Test func textWithANulIsInvalidInputNotAnUnexpectedFailure() async throws {
    try await withStore { database, _ in
      let audit = AuditLogRepository(database: database)
      do {
        _ = try await audit.records(.platform, from: 0, below: 10, filter: AuditFilter(principal: "spiffe://a\u{0}b"), logger: testLogger)
        Issue.record("a NUL reached PostgreSQL and was accepted")
      } catch StoreError.invalidInput(let message) {
        #expect(message.contains("NUL"))
      }
    }
  }

  @Test func queryWithoutTenantFilterSeesOnlyCurrentTenant() async throws {
    try await withStore { database, repository in
      let acme = try TenantID(validating: "acme")
      let globex = try TenantID(validating: "globex")
      for id in [acme, globex] {
        _ = try await repository.create(id: id, displayName: id.rawValue, quota: .defaults, logger: testLogger)
        _ = try await repository.revoke(.serial("ab"), tenant: id, reason: "r", revokedBy: "test", logger: testLogger)
      }
      // A "buggy" handler query with no WHERE clause at all.
      let seen = try await database.withTenant(acme, logger: testLogger) { connection in
        var ids: [String] = []
        for try await id in try await connection.query("SELECT tenant_id FROM tenants", logger: testLogger).decode(String.self) {
          ids.append(id)
        }
        for try await id in try await connection.query(
          "SELECT tenant_id FROM certificate_revocations",
          logger: testLogger
        ).decode(String.self) {
          ids.append(id)
        }
        return ids
      }
      #expect(seen == ["acme", "acme"])

      // Writing another tenant's row is refused by the policy's WITH CHECK, and rolls back whole.
      await #expect(throws: StoreError.self) {
        try await database.withTenant(acme, logger: testLogger) { connection in
          try await connection.query(
            "INSERT INTO certificate_revocations (kind, value, tenant_id, reason, revoked_by) VALUES ('serial', 'cd', 'globex', 'x', 'x')",
            logger: testLogger
          )
        }
      }
      let platformCount = try await database.withPlatform(logger: testLogger) { connection in
        try await connection.query("SELECT count(*) FROM certificate_revocations", logger: testLogger)
          .decode(Int.self).reduce(0, +)
      }
      #expect(platformCount == 2)
    }
  }

  @Test func ownerWithoutRoleSwitchSeesNothing() async throws {
    try await withStore { database, repository in
      _ = try await repository.create(id: try TenantID(validating: "acme"), displayName: "a", quota: .defaults, logger: testLogger)
      // The login user owns the tables; FORCE ROW LEVEL SECURITY applies the policies to it,
      // and none of them names it, so a query that skipped withTenant/withPlatform reads nothing.
      let (owner, count) = try await database.client.withConnection { connection in
        var owner = ""
        for try await name in try await connection.query(
          "SELECT tableowner FROM pg_tables WHERE tablename = 'tenants'",
          logger: testLogger
        ).decode(String.self) {
          owner = name
        }
        let count = try await connection.query("SELECT count(*) FROM tenants", logger: testLogger)
          .decode(Int.self).reduce(0, +)
        return (owner, count)
      }
      #expect(owner == "tollgate")
      #expect(count == 0)
    }
  }

  @Test func tenantSettingDoesNotLeakToTheNextTransaction() async throws {
    // One connection: the next lease is the very connection the tenant transaction used.
    try await withStore(connections: 1) { database, repository in
      let acme = try TenantID(validating: "acme")
      _ = try await repository.create(id: acme, displayName: "a", quota: .defaults, logger: testLogger)
      _ = try await database.withTenant(acme, logger: testLogger) { _ in () }
      let leftover = try await database.client.withConnection { connection in
        var values: [String] = []
        for try await (setting, user) in try await connection.query(
          "SELECT coalesce(current_setting('tollgate.tenant_id', true), ''), current_user::text",
          logger: testLogger
        ).decode((String, String).self) {
          values = [setting, user]
        }
        return values
      }
      #expect(leftover == ["", "tollgate"])
    }
  }

  /// A prepared statement is planned once and, after five runs, may keep a generic plan: row-level
  /// security must still follow the tenant of each transaction, not the one it was planned under.
  /// One connection, so every run reuses the same prepared statement.
  @Test func preparedStatementsFollowEachTransactionsTenant() async throws {
    try await withStore(connections: 1) { database, repository in
      let acme = try TenantID(validating: "acme")
      let globex = try TenantID(validating: "globex")
      for id in [acme, globex] {
        _ = try await repository.create(id: id, displayName: id.rawValue, quota: .defaults, logger: testLogger)
      }
      // No WHERE clause: only the policy decides which rows are seen.
      let everyTenant: PostgresQuery = "SELECT tenant_id FROM tenants"
      func seen(as tenant: TenantID) async throws -> [String] {
        try await database.withTenant(tenant, logger: testLogger) { connection in
          var ids: [String] = []
          for try await id in try await connection.prepared(everyTenant, logger: testLogger).decode(String.self) {
            ids.append(id)
          }
          return ids
        }
      }
      for _ in 0..<8 { #expect(try await seen(as: acme) == ["acme"]) }
      for _ in 0..<8 { #expect(try await seen(as: globex) == ["globex"]) }
      #expect(try await seen(as: acme) == ["acme"])
    }
  }

  /// The driver remembers a statement whose preparation failed for its connection's life; a
  /// statement prepared before its table existed must work once the table does, not fail on that
  /// connection for good. One connection, so the second attempt cannot dodge onto another.
  @Test func aStatementThatFailedToPrepareWorksOnceItsTableExists() async throws {
    try await withStore(connections: 1) { database, _ in
      let probe: PostgresQuery = "SELECT count(*)::bigint FROM prepare_probe"
      // The database's own error, at once: not the operation timeout's UNAVAILABLE.
      let failure = await #expect(throws: StoreError.self) {
        try await database.withPlatform(logger: testLogger) { connection in
          _ = try await connection.prepared(probe, logger: testLogger)
        }
      }
      #expect(failure.map { "\($0)".contains("42P01") } == true)
      try await database.client.withConnection { connection in
        try await connection.query("CREATE TABLE prepare_probe (n integer)", logger: testLogger)
        try await connection.query("GRANT SELECT ON prepare_probe TO \(unescaped: Database.platformRole)", logger: testLogger)
      }
      let count = try await database.withPlatform(logger: testLogger) { connection in
        var count: Int64 = -1
        for try await n in try await connection.prepared(probe, logger: testLogger).decode(Int64.self) { count = n }
        return count
      }
      #expect(count == 0)
    }
  }

  @Test func concurrentMigrationsApplyOnce() async throws {
    try await TestDatabase.withDatabase { db in
      let databases = (0..<3).map { _ in Database(url: db.app, maximumConnections: 2, logger: testLogger) }
      let applied = try await withThrowingTaskGroup(of: [Int].self) { group in
        for database in databases { group.addTask { try await database.run(); return [] } }
        defer { group.cancelAll() }
        return try await withThrowingTaskGroup(of: [Int].self) { migrations in
          for database in databases {
            migrations.addTask { try await Migrator.migrate(database, logger: testLogger) }
          }
          var all: [Int] = []
          for try await versions in migrations { all += versions }
          return all
        }
      }
      #expect(applied.sorted() == Migrator.all.map(\.version))
    }
  }

  /// A client told UNAVAILABLE may retry a write: a transaction its deadline overtook rolls back,
  /// even when it could go on to commit afterwards. (It used to commit, and a retried CreateTenant
  /// then found its tenant already there.)
  @Test func aWriteOvertakenByItsDeadlineRollsBackInsteadOfCommittingLater() async throws {
    try await TestDatabase.withDatabase { db in
      try await withStore(on: db) { _, _ in }  // migrations, with the default timeout
      try await withStore(on: db, connections: 1, operationTimeout: .seconds(1)) { database, _ in
        // Open the one connection first, so the deadline finds the transaction running, not waiting.
        var warm = false
        for _ in 0..<5 where !warm {
          warm = (try? await database.withPlatform(logger: testLogger) { try await $0.query("SELECT 1", logger: testLogger) }) != nil
        }
        try #require(warm)

        let holder = try await TestDatabase.connect(db.admin, database: db.name)
        defer { Task { try? await holder.close() } }
        try await holder.query("SELECT pg_advisory_lock(4242)", logger: testLogger)
        do {
          try await database.withPlatform(mutation: true, logger: testLogger) { connection in
            try await connection.query(
              "INSERT INTO tenants (tenant_id, display_name, state, quota) VALUES ('acme', 'Acme', 'active', '{}')",
              logger: testLogger
            )
            // Blocks until the holder lets go, well past the deadline.
            try await connection.query("SELECT pg_advisory_xact_lock(4242)", logger: testLogger)
          }
          Issue.record("the write finished although the lock it waits for was held past its deadline")
        } catch StoreError.unavailable {}

        // Let the overtaken transaction take the lock and end; the holder gets the lock back only
        // once that transaction has released it by committing or rolling back.
        try await holder.query("SELECT pg_advisory_unlock(4242)", logger: testLogger)
        try await holder.query("SELECT pg_advisory_lock(4242)", logger: testLogger)
        var count = -1
        for try await n in try await holder.query("SELECT count(*)::int FROM tenants", logger: testLogger).decode(Int.self) {
          count = n
        }
        #expect(count == 0, "a write whose caller was told it failed was committed")

        // The connection it ran on serves the next write.
        try await database.withPlatform(mutation: true, logger: testLogger) { connection in
          try await connection.query(
            "INSERT INTO tenants (tenant_id, display_name, state, quota) VALUES ('acme', 'Acme', 'active', '{}')",
            logger: testLogger
          )
        }
      }
    }
  }
}
