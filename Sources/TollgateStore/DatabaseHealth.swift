import Foundation
import Synchronization

/// What the store knows of whether its database can be reached, kept up by every transaction and
/// by ``Database``'s watch after a failure.
///
/// - `up`: transactions run.
/// - `suspect`: a transaction failed for want of the database; the watch is finding out why, and
///   transactions still run (a database that is only slow keeps serving).
/// - `down`: the watch's own connection was refused at once (a connection that only got no answer
///   decides nothing). Transactions fail at once instead of each waiting out the operation
///   timeout, until the watch connects again.
final class DatabaseHealth: Sendable {
  enum Mode: UInt8 {
    case up, suspect, down
  }

  private struct Outage {
    var since: Date
    var error: String
  }

  private let mode = Atomic<UInt8>(Mode.up.rawValue)
  /// Connections the pool has handed to transactions, ever, and those transactions still hold:
  /// the watch tells a pool that hands out none and holds none (stuck backing off after an
  /// outage) from one that is only busy or slow.
  private let grants = Atomic<UInt64>(0)
  private let leased = Atomic<Int>(0)
  private let outage = Mutex<Outage?>(nil)
  private struct Waiter {
    let id: UUID
    let mode: Mode
    let continuation: CheckedContinuation<Void, Never>
  }
  private let changeWaiters = Mutex<[Waiter]>([])
  let failures: AsyncStream<Void>
  private let failuresContinuation: AsyncStream<Void>.Continuation

  init() {
    (failures, failuresContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
  }

  var current: Mode { Mode(rawValue: mode.load(ordering: .acquiring)) ?? .up }

  var grantCount: UInt64 { grants.load(ordering: .relaxed) }

  var leasedCount: Int { leased.load(ordering: .relaxed) }

  func granted() {
    grants.add(1, ordering: .relaxed)
    leased.add(1, ordering: .relaxed)
  }

  func released() { leased.subtract(1, ordering: .relaxed) }

  /// A transaction committed (or the pool answered the watch): the database is reachable.
  func succeeded() {
    guard current != .up else { return }
    transition(from: nil, to: .up)
  }

  /// A transaction failed for want of the database: wakes the watch.
  func failed() {
    transition(from: [.up], to: .suspect)
    failuresContinuation.yield()
  }

  /// The watch could not connect: down, unless a transaction has committed since the watch began
  /// its probe (success wins over a probe's stale answer). Returns true if this begins an outage.
  @discardableResult
  func wentDown(_ error: String) -> Bool {
    var begins = false
    // The outage is recorded before the mode says down: a transaction that sees down, or a
    // waiter resumed by it, must find the reason too. Recorded after, a loaded machine let a
    // waiter's transaction find down without one, and it waited out its timeout instead.
    let moved = transition(from: [.suspect, .down], to: .down) {
      begins = outage.withLock { outage -> Bool in
        if outage == nil {
          outage = Outage(since: Date(), error: error)
          return true
        }
        outage?.error = error
        return false
      }
    }
    return moved && begins
  }

  /// How long the last outage lasted, and forgets it; nil if there was none.
  func endOutage() -> TimeInterval? {
    outage.withLock { outage in
      defer { outage = nil }
      return outage.map { Date().timeIntervalSince($0.since) }
    }
  }

  /// The error a transaction gets while the database is down, nil while it is not.
  func failFast() -> StoreError? {
    guard current == .down else { return nil }
    guard let outage = outage.withLock({ $0 }) else { return nil }
    let since = outage.since.formatted(.iso8601)
    return .unavailable("database unreachable since \(since) (\(outage.error)); calls fail at once until it answers")
  }

  /// Returns once the mode is `mode` (at once if it is), or once the waiting task is cancelled.
  func waitUntil(_ mode: Mode) async {
    let id = UUID()
    await withTaskCancellationHandler {
      await withCheckedContinuation { continuation in
        let now = changeWaiters.withLock { waiters -> Bool in
          if current == mode || Task.isCancelled { return true }
          waiters.append(Waiter(id: id, mode: mode, continuation: continuation))
          return false
        }
        if now { continuation.resume() }
      }
    } onCancel: {
      let waiter = changeWaiters.withLock { waiters -> Waiter? in
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return nil }
        return waiters.remove(at: index)
      }
      waiter?.continuation.resume()
    }
  }

  /// Moves to `new` if the mode is one of `allowed` (any, if nil), running `before` first; false if
  /// it was not.
  @discardableResult
  private func transition(from allowed: [Mode]?, to new: Mode, before: () -> Void = {}) -> Bool {
    let ready = changeWaiters.withLock { waiters -> [CheckedContinuation<Void, Never>]? in
      if let allowed, !allowed.contains(current) { return nil }
      before()
      // Releasing, and read acquiring: what `before` wrote is seen by whoever sees the new mode.
      mode.store(new.rawValue, ordering: .releasing)
      let ready = waiters.filter { $0.mode == new }.map(\.continuation)
      waiters.removeAll { $0.mode == new }
      return ready
    }
    guard let ready else { return false }
    for waiter in ready { waiter.resume() }
    return true
  }
}
