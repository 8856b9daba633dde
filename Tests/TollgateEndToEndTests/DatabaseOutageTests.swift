import Foundation
import Logging
import PostgresNIO
import Testing
import TollgateModel
@testable import TollgateStore

/// What the store does when its database goes away and comes back: fail at once while it is
/// known to be down, and serve again as soon as it answers, whatever state the pool is in.
@Suite(.timeLimit(.minutes(2))) struct DatabaseOutageTests {
  func selectOne(_ database: Database) async throws(StoreError) {
    try await database.withPlatform(logger: testLogger) { connection in
      _ = try await connection.query("SELECT 1", logger: testLogger)
    }
  }

  @Test func whileTheDatabaseIsDownTransactionsFailAtOnceAndServeAgainWhenItIsBack() async throws {
    try await TestDatabase.withDatabase { db in
      let database = Database(url: db.app, maximumConnections: 4, operationTimeout: .seconds(2), logger: testLogger)
      try await database.running {
        try await selectOne(database)
        try await db.refuseConnections()
        // The first transaction finds out the hard way: its connection is cut, or it waits out
        // the timeout for a new one. The watch then finds the database down.
        await #expect(throws: StoreError.self) { try await selectOne(database) }
        await database.health.waitUntil(.down)
        do {
          try await selectOne(database)
          Issue.record("a transaction ran while the database was down")
        } catch StoreError.unavailable(let message) {
          // This message only comes from the check made before a connection is asked for.
          #expect(message.contains("database unreachable since"), "\(message)")
          // With PostgreSQL's reason: "database … is not currently accepting connections".
          #expect(message.contains("SQLSTATE 55000"), "\(message)")
        }
        #expect(await database.isReachable(logger: testLogger) == false)

        try await db.allowConnections()
        await database.health.waitUntil(.up)
        try await selectOne(database)
        #expect(await database.isReachable(logger: testLogger))
      }
    }
  }

  /// After a long outage PostgresNIO's pool waits up to a minute between attempts to reconnect,
  /// and nothing can make it try sooner. A first pool that can never connect (it names a database
  /// that does not exist) behaves the same, deterministically: the watch, which reaches the
  /// database on its own, must replace it.
  @Test func aPoolThatHandsOutNoConnectionWhileTheDatabaseAnswersIsReplaced() async throws {
    try await TestDatabase.withDatabase { db in
      var nowhere = db.app
      nowhere.database = db.name + "_missing"
      let database = Database(
        url: db.app,
        maximumConnections: 4,
        operationTimeout: .seconds(1),
        logger: testLogger,
        telemetry: .disabled,
        firstPoolURL: nowhere
      )
      try await database.running(migrate: false) {
        do {
          try await selectOne(database)
          Issue.record("a pool without connections ran a transaction")
        } catch StoreError.unavailable {}
        #expect(database.health.current != .up)
        await database.health.waitUntil(.up)
        #expect(database.poolRenewals == 1)
        try await Migrator.migrate(database, logger: testLogger)
        try await selectOne(database)
      }
    }
  }
}
