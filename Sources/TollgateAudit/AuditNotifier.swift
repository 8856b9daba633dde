import Synchronization
public import TollgateModel

/// Wakes followers of a log when another transaction (on any replica) has committed records to
/// it: fed by the `tollgate_audit` LISTEN connection, whose payload names the log.
public final class AuditNotifier: Sendable {
  private struct State {
    var next = 0
    var subscribers: [AuditLogID: [Int: AsyncStream<Void>.Continuation]] = [:]
  }
  private let state = Mutex(State())

  public init() {}

  /// A stream that yields after each commit to `log` (coalesced: one pending wake-up at most).
  /// Subscribe before reading the log, so a commit between the read and the wait is not missed.
  /// Finishing the continuation ends the subscription.
  public func subscribe(_ log: AuditLogID) -> (AsyncStream<Void>, AsyncStream<Void>.Continuation) {
    let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    let id = state.withLock { state -> Int in
      state.next += 1
      state.subscribers[log, default: [:]][state.next] = continuation
      return state.next
    }
    continuation.onTermination = { [weak self] _ in
      self?.state.withLock { state in
        state.subscribers[log]?[id] = nil
        if state.subscribers[log]?.isEmpty == true { state.subscribers[log] = nil }
      }
    }
    return (stream, continuation)
  }

  /// A notification's payload, or nil after the listener (re)connected (anything may have changed).
  public func notify(payload: String?) {
    let targets = state.withLock { state -> [AsyncStream<Void>.Continuation] in
      guard let payload else { return state.subscribers.values.flatMap(\.values) }
      guard let log = AuditLogID(rawValue: payload) else { return [] }
      return Array(state.subscribers[log]?.values ?? [:].values)
    }
    for continuation in targets { continuation.yield() }
  }
}
