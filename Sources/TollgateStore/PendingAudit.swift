import Synchronization

/// The audit event of a mutating call, waiting for the transaction that commits the call's change.
///
/// The audit interceptor binds one to ``current`` around the handler. A transaction opened with
/// `mutation: true` appends the event just before it commits, so the change and its record commit
/// together or not at all; the interceptor then knows the call is recorded. If no such
/// transaction commits (the call failed, or changed nothing), the interceptor records the event
/// itself before the reply.
public final class PendingAudit: Sendable {
  @TaskLocal public static var current: PendingAudit?

  enum State {
    case waiting
    case inTransaction
    case committed
  }

  private let state = Mutex(State.waiting)
  /// Builds the event as of the moment it is appended (outcome OK: the transaction is about to commit).
  let makeEntry: @Sendable () -> AuditEntry?

  public init(makeEntry: @escaping @Sendable () -> AuditEntry?) {
    self.makeEntry = makeEntry
  }

  /// True once a transaction carrying the event has committed.
  public var isCommitted: Bool { state.withLock { $0 == .committed } }

  /// The entry to append, if no other transaction of this call carries it already.
  func claim() -> AuditEntry? {
    let claimed = state.withLock { state -> Bool in
      guard state == .waiting else { return false }
      state = .inTransaction
      return true
    }
    guard claimed else { return nil }
    guard let entry = makeEntry() else {
      settle(committed: false)
      return nil
    }
    return entry
  }

  /// The carrying transaction committed (`true`) or did not (`false`, the event is waiting again).
  func settle(committed: Bool) {
    state.withLock { state in
      if state == .inTransaction { state = committed ? .committed : .waiting }
    }
  }
}

/// Wakes the audit sequencer of this process after a transaction commits pending audit events.
/// Wake-ups that arrive while it works coalesce into one more pass.
public final class AuditQueueSignal: Sendable {
  public let wakes: AsyncStream<Void>
  private let continuation: AsyncStream<Void>.Continuation

  public init() {
    (wakes, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
  }

  public func signal() { continuation.yield() }

  /// Ends ``wakes`` (at shutdown).
  public func finish() { continuation.finish() }
}
