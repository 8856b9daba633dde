import NIOCore
import PostgresNIO

/// Failures of the store that a caller can act on. Anything else is `.unexpected`, which callers
/// log and report as an internal error.
public enum StoreError: Error, Sendable {
  case notFound(String)
  case alreadyExists(String)
  /// The database could not be reached or the connection failed mid-call; retrying may succeed.
  case unavailable(String)
  /// A tenant's quota has no room for what was asked; nothing was written.
  case quotaExhausted(String)
  /// The record is not in a state that allows the change (e.g. approving a run that is not pending).
  case failedPrecondition(String)
  /// The database did not answer a COMMIT in time: the change may or may not have been applied.
  case outcomeUnknown(String)
  /// Rows a read needs are missing or malformed: the store was damaged or altered outside the
  /// gateway (an audit log's leaves, say). The message names what is missing, not how it is stored.
  case damaged(String)
  /// A value sent by the client cannot be stored or compared at all (text holding NUL, which no
  /// PostgreSQL text can). Services check their fields first; this names what one missed.
  case invalidInput(String)
  /// A computation over stored values left the range PostgreSQL computes in (22003, an aggregate
  /// that overflowed): no retry helps, and the query as asked cannot be answered.
  case outOfRange(String)
  case unexpected(String)

  /// The database could not be reached or did not answer (``unavailable(_:)``, ``outcomeUnknown(_:)``).
  var isUnavailable: Bool {
    switch self {
    case .unavailable, .outcomeUnknown: return true
    default: return false
    }
  }

  /// Why a connection could not be made or used, in words for an operator's log: the server's
  /// own message where there is one (PSQLError's description hides it), never a password.
  static func describeConnectionFailure(_ error: any Error) -> String {
    guard let psql = error as? PSQLError else { return "\(error)" }
    if let message = psql.serverInfo?[.message] {
      return "\(message) (SQLSTATE \(psql.serverInfo?[.sqlState] ?? "?"))"
    }
    if let underlying = psql.underlying { return "\(psql.code): \(underlying)" }
    return "\(psql.code)"
  }

  /// A connection attempt that got no answer within its connect timeout.
  static func isConnectTimeout(_ error: any Error) -> Bool {
    if let channel = error as? ChannelError, case .connectTimeout = channel { return true }
    if let psql = error as? PSQLError, let underlying = psql.underlying { return isConnectTimeout(underlying) }
    return false
  }

  /// The server refused a new connection for want of slots (53300 too_many_connections).
  static func isTooManyConnections(_ error: any Error) -> Bool {
    (error as? PSQLError)?.serverInfo?[.sqlState] == "53300"
  }

  /// Classifies any error thrown by postgres-nio (unwrapping transaction errors first).
  static func classify(_ error: any Error) -> StoreError {
    if let error = error as? StoreError { return error }
    if let tx = error as? PostgresTransactionError {
      if let commit = tx.commitError, tx.closureError == nil {
        // A connection lost during COMMIT says nothing about whether the COMMIT took effect.
        let inner = classify(commit)
        if case .unavailable(let m) = inner { return .outcomeUnknown("COMMIT unanswered: \(m)") }
        return inner
      }
      if let inner = tx.closureError ?? tx.beginError { return classify(inner) }
      return .unexpected(String(reflecting: tx))
    }
    if let psql = error as? PSQLError {
      switch psql.code {
      case .server:
        let state = psql.serverInfo?[.sqlState] ?? ""
        // Repositories report expected conflicts in their own words; Postgres's text names
        // constraints and columns, which must not reach a client.
        if state == "23505" { return .alreadyExists("a record with the same identity already exists") }
        // 08xxx connection exceptions, 57P01-57P03 admin shutdown / cannot connect now.
        if state.hasPrefix("08") || state.hasPrefix("57P") { return .unavailable("database: \(state)") }
        // 22003 numeric_value_out_of_range: every parameter is range-checked before it is sent,
        // so this is a computation over stored values, an aggregate that overflowed.
        if state == "22003" {
          return .outOfRange("a result is out of the range the database computes in (a sum or average overflowed); query a narrower range")
        }
        // 22021 character_not_in_repertoire: a NUL in a text parameter.
        if state == "22021" {
          return .invalidInput("a text field holds a NUL character (or bytes that are not UTF-8), which cannot be stored or searched; remove it")
        }
        return .unexpected("sqlstate \(state): \(psql.serverInfo?[.message] ?? "")")
      case .connectionError, .serverClosedConnection, .clientClosedConnection, .poolClosed, .uncleanShutdown,
        .queryCancelled:
        return .unavailable("database connection: \(psql.code)")
      default:
        return .unexpected(String(reflecting: psql))
      }
    }
    if error is CancellationError { return .unavailable("cancelled") }
    // The pool's own failures (connection creation tripping its circuit breaker, a cancelled
    // lease) mean the database cannot be reached right now.
    if String(reflecting: type(of: error)).contains("ConnectionPool") {
      return .unavailable("database connection pool: \(error)")
    }
    return .unexpected(String(reflecting: error))
  }
}
