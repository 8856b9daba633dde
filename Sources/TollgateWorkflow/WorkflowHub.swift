public import Foundation
import Synchronization
public import TollgateModel

/// Fans the workflow notification channel out to this replica's worker streams and watchers.
///
/// `t <tenant> <state> <previous> <type>`: a run of the tenant changed state. Watchers re-read. A
/// run that became QUEUED or FAILED (ready now or later) wakes one worker for its type with room,
/// so one dispatch costs at most one claim here rather than one per connected worker: a worker
/// whose claim is in flight if there is one (its next claim then leases, together, every run that
/// became ready meanwhile), otherwise the next in turn. A worker whose claim filled its room
/// passes the turn on, since more may be ready. A run that
/// left RUNNING frees a slot of its type's concurrency limit, so it wakes the workers a limit
/// held back.
/// `w <tenant> <type>`: a watch share-locked a ready run of the type, which a claim skips; one
/// worker with room looks again.
/// `r <tenant> <lease> <reason>`: a lease ended (cancelled, expired); whichever stream holds it
/// tells its worker. A nil payload (the listener reconnected and may have missed some) wakes all.
public final class WorkflowHub: Sendable {
  public enum Kind: Sendable {
    case watcher
    /// `wantsWork` says whether the worker has room for a run of the type (nil: any of its
    /// types); `heldBackByLimit` whether its last claim left ready runs behind because of a
    /// per-type limit; `claiming` whether a claim of its is in flight.
    case worker(
      wantsWork: @Sendable (String?) -> Bool,
      heldBackByLimit: @Sendable () -> Bool,
      claiming: @Sendable () -> Bool
    )
  }

  private struct Subscriber {
    let kind: Kind
    let wake: AsyncStream<Void>.Continuation
    let revoke: AsyncStream<Revocation>.Continuation
  }
  private struct State {
    var next = 0
    var subscribers: [TenantID: [Int: Subscriber]] = [:]
    /// Per tenant, the worker id that was woken last (the turn passes in id order).
    var lastWoken: [TenantID: Int] = [:]
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
    let id: Int
    public let wakes: AsyncStream<Void>
    public let revocations: AsyncStream<Revocation>
    let wakeContinuation: AsyncStream<Void>.Continuation
    let revokeContinuation: AsyncStream<Revocation>.Continuation

    init(id: Int) {
      self.id = id
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

  public func subscribe(_ tenant: TenantID, as kind: Kind) -> Subscription {
    let id = state.withLock { state -> Int in
      state.next += 1
      return state.next
    }
    let subscription = Subscription(id: id)
    state.withLock { state in
      state.subscribers[tenant, default: [:]][id] = Subscriber(
        kind: kind,
        wake: subscription.wakeContinuation,
        revoke: subscription.revokeContinuation
      )
    }
    subscription.wakeContinuation.onTermination = { [weak self] _ in
      self?.state.withLock { state in
        state.subscribers[tenant]?[id] = nil
        if state.subscribers[tenant]?.isEmpty == true {
          state.subscribers[tenant] = nil
          state.lastWoken[tenant] = nil
        }
      }
    }
    return subscription
  }

  /// Wakes one of `tenant`'s workers, other than `except`, that has room for a run of `type`
  /// (nil: of any type): one whose claim is in flight, else the next in turn. True if one was
  /// woken.
  ///
  /// Under load this batches: wake-ups that reach a claiming worker coalesce into one more claim
  /// of its, which leases everything that became ready meanwhile, where taking turns gave each of
  /// several workers a claim of its own for a run or two. An idle worker is still woken at once.
  @discardableResult
  public func wakeNextWorker(_ tenant: TenantID, type: String?, except: Subscription? = nil) -> Bool {
    let target = state.withLock { state -> AsyncStream<Void>.Continuation? in
      guard let subscribers = state.subscribers[tenant] else { return nil }
      let workers = subscribers.filter { if case .worker = $0.value.kind { return true } else { return false } }
        .sorted { $0.key < $1.key }
      guard !workers.isEmpty else { return nil }
      for (id, subscriber) in workers where id != except?.id {
        if case .worker(let wantsWork, _, let claiming) = subscriber.kind, claiming(), wantsWork(type) {
          return subscriber.wake
        }
      }
      let last = state.lastWoken[tenant] ?? 0
      let start = workers.firstIndex { $0.key > last } ?? 0
      for offset in 0..<workers.count {
        let (id, subscriber) = workers[(start + offset) % workers.count]
        if id == except?.id { continue }
        if case .worker(let wantsWork, _, _) = subscriber.kind, wantsWork(type) {
          state.lastWoken[tenant] = id
          return subscriber.wake
        }
      }
      return nil
    }
    target?.yield()
    return target != nil
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
      let newState = parts.count > 2 ? RunState(rawValue: String(parts[2])) : nil
      let previous = parts.count > 3 ? RunState(rawValue: String(parts[3])) : nil
      for subscriber in targets {
        switch subscriber.kind {
        case .watcher:
          subscriber.wake.yield()
        case .worker(_, let heldBackByLimit, _):
          if previous == .running && heldBackByLimit() { subscriber.wake.yield() }
        }
      }
      if newState == .queued || newState == .failed || newState == nil {
        wakeNextWorker(tenant, type: parts.count > 4 ? String(parts[4]) : nil)
      }
    case "w":
      // A watch share-locked a ready run, which a claim may have skipped.
      wakeNextWorker(tenant, type: parts.count > 2 ? String(parts[2]) : nil)
    case "r":
      guard parts.count >= 4, let lease = UUID(uuidString: String(parts[2])) else { return }
      let revocation = Revocation(lease: lease, reason: String(parts[3]))
      for subscriber in targets { subscriber.revoke.yield(revocation) }
    default:
      return
    }
  }
}
