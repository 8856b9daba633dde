public import Logging
public import PostgresNIO
import Synchronization

extension PostgresConnection {
  /// Runs `query` as a named statement that this connection prepares the first time it sees the
  /// SQL and reuses afterwards.
  ///
  /// `query(_:)` sends every statement unnamed, so PostgreSQL parses, analyses and plans it again
  /// on every call; for the statements every call runs (the tenant scope, the audit append, the
  /// workflow queue's inserts and claims) that was a third of the database's CPU under load. Use
  /// this only for SQL drawn from a fixed set of texts (no text built from request data), since
  /// every distinct text stays prepared on every pooled connection for the connection's life, and
  /// only where one plan suits every parameter value: after five executions PostgreSQL may switch
  /// to a generic plan.
  ///
  /// The driver remembers a failed preparation for the connection's life and fails every later
  /// use of that statement with the same error. Preparation can fail for reasons that pass: a
  /// table that a migration has not created yet, an aborted transaction, a lock or statement
  /// timeout, a column type changed under a cached plan. On such an error the connection is
  /// closed so that the pool replaces it instead of keeping a poisoned one: by the transaction
  /// that ran the statement once it has rolled back (``TransactionMarks``), or at once outside
  /// one.
  @discardableResult
  public func prepared(
    _ query: PostgresQuery,
    logger: Logger,
    file: String = #fileID,
    line: Int = #line
  ) async throws -> AsyncThrowingMapSequence<PostgresRowSequence, PostgresRow> {
    let name = PreparedStatementNames.shared.name(for: query.sql)
    do {
      return try await NamedStatement.$current.withValue((name, query.sql)) {
        try await execute(NamedStatement(bindings: query.binds), logger: logger, file: file, line: line)
      }
    } catch let error as PSQLError {
      if error.poisonsPreparedStatement {
        logger.warning(
          "closing a database connection after a prepared statement failed",
          metadata: ["statement": "\(name)", "sqlstate": "\(error.serverInfo?[.sqlState] ?? "")"]
        )
        if let transaction = TransactionMarks.current {
          transaction.markConnectionPoisoned()
        } else {
          try? await self.close()
        }
      }
      throw error
    }
  }
}

/// The driver's prepared statements are types whose name and SQL are static; this one reads
/// them from the task, so that one type serves every statement text. `execute` reads both
/// synchronously, and again on failure, inside the `withValue` scope of
/// ``PostgresConnection/prepared(_:logger:file:line:)``.
struct NamedStatement: PostgresPreparedStatement {
  typealias Row = PostgresRow
  @TaskLocal static var current: (name: String, sql: String) = ("", "")
  static var name: String { current.name }
  static var sql: String { current.sql }

  let bindings: PostgresBindings
  func makeBindings() throws -> PostgresBindings { bindings }
  func decodeRow(_ row: PostgresRow) throws -> PostgresRow { row }
}

/// One short name per statement text, the same on every connection of the process.
final class PreparedStatementNames: Sendable {
  static let shared = PreparedStatementNames()
  private let names = Mutex<[String: String]>([:])

  func name(for sql: String) -> String {
    names.withLock { names in
      if let name = names[sql] { return name }
      let name = "tollgate_\(names.count + 1)"
      names[sql] = name
      return name
    }
  }
}

extension PSQLError {
  /// True for the server errors a statement's preparation can end with that leave the driver's
  /// record of the statement failed on this connection although the SQL is sound.
  var poisonsPreparedStatement: Bool {
    guard code == .server, let state = serverInfo?[.sqlState] else { return false }
    switch state {
    case "25P02",  // in a failed transaction
      "26000",  // the statement is gone (e.g. DISCARD ALL)
      "0A000",  // cached plan must not change result type (a migration altered a table)
      "55P03",  // lock not available
      "57014":  // statement timeout or cancel
      return true
    default:
      // Class 42: undefined table or column, e.g. a statement prepared before the migration
      // that creates its table has run.
      return state.hasPrefix("42")
    }
  }
}
