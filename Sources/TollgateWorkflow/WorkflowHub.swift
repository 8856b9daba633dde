public import Foundation
import Synchronization
public import TollgateModel

/// Fans the workflow notification channel out to this replica's worker streams and watchers.
///
/// `t <tenant>`: a run of the tenant changed state (dispatched, approved, finished, re-queued),
/// so its idle workers should try a claim and its watchers re-read. `r <tenant> <lease> <reason>`:
/// a lease ended (cancelled, expired), so whichever stream holds it tells its worker. A nil
/// payload (the listener reconnected and may have missed some) wakes everyone.
public final class WorkflowHub: Sendable {
  private struct Subscriber {
    let tenant: TenantID
    let wake: AsyncStream<Void>.Continuation
    let revoke: AsyncStream<Revocation>.Continuation
  }
  private struct State {
    var next = 0
    var subscribers: [TenantID: [Int: Subscriber]] = [:]
  }
  private let state = Mutex(State())

  public init() {}

  /// A lease that ended elsewhere: the id and the reason to give the worker.
  public struct Revocation: Sendable {
    public var lease: UUID
    public var reason: String
  }

  /// One stream's view of the channel. Wake-ups are coalesced (one pending at most); revocations
  /// are all kept. Subscribe before the first read, so a change between a read and the wait
  /// still wakes.
  public final class Subscription: Sendable {
    public let wakes: AsyncStream<Void>
    public let revocations: AsyncStream<Revocation>
    let wakeContinuation: AsyncStream<Void>.Continuation
    let revokeContinuation: AsyncStream<Revocation>.Continuation

    init() {
      (wakes, wakeContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
      (revocations, revokeContinuation) = AsyncStream.makeStream(of: Revocation.self)
    }

    /// Wakes this subscriber alone (its own worker freed capacity).
    public func wake() { wakeContinuation.yield() }

    /// Ends both streams and the subscription.
    public func cancel() {
      wakeContinuation.finish()
      revokeContinuation.finish()
    }
  }

  public func subscribe(_ tenant: TenantID) -> Subscription {
    let subscription = Subscription()
    let id = state.withLock { state -> Int in
      state.next += 1
      state.subscribers[tenant, default: [:]][state.next] = Subscriber(
        tenant: tenant,
        wake: subscription.wakeContinuation,
        revoke: subscription.revokeContinuation
      )
      return state.next
    }
    subscription.wakeContinuation.onTermination = { [weak self] _ in
      self?.state.withLock { state in
        state.subscribers[tenant]?[id] = nil
        if state.subscribers[tenant]?.isEmpty == true { state.subscribers[tenant] = nil }
      }
    }
    return subscription
  }

  public func notify(payload: String?) {
    guard let payload else {
      for subscriber in state.withLock({ $0.subscribers.values.flatMap(\.values) }) { subscriber.wake.yield() }
      return
    }
    let parts = payload.split(separator: " ")
    guard parts.count >= 2, let tenant = try? TenantID(validating: String(parts[1])) else { return }
    let targets = state.withLock { Array(($0.subscribers[tenant] ?? [:]).values) }
    switch parts[0] {
    case "t":
      for subscriber in targets { subscriber.wake.yield() }
    case "r":
      guard parts.count >= 4, let lease = UUID(uuidString: String(parts[2])) else { return }
      let revocation = Revocation(lease: lease, reason: String(parts[3]))
      for subscriber in targets { subscriber.revoke.yield(revocation) }
    default:
      return
    }
  }
}
