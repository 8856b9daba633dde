public import Foundation
public import Logging
public import ServiceLifecycle
import Synchronization
public import TollgateStore

/// The bounded queue through which read-only calls are audited, in batches, within a second.
///
/// A read-only call may start only while fewer than `capacity` events are waiting to be committed
/// (``admitsCalls``); otherwise it is refused instead of running unaudited. A call queues its
/// event when it ends (``submit(time:_:)``), always, so the queue can exceed `capacity` by the
/// calls already running, never more. Long streams therefore hold no place while they run. The
/// flusher puts the events together and serializes them, a batch at a time, off the calls' path.
/// It lets events gather for `linger` after a wake-up, then appends what is queued as one
/// transaction (several of `batchLimit` events only while full batches wait); while the
/// database is down or slow it keeps the events and retries, and the queue fills. On shutdown it
/// runs after the server has drained and flushes every remaining event before it returns.
public final class AuditBuffer: Service, Sendable {
  public let capacity: Int
  let repository: AuditLogRepository
  let logger: Logger
  let batchLimit = 2_000
  /// How long the flusher lets events gather after a wake-up (`--audit-flush-linger-ms`). A
  /// flush is a transaction of five round trips and a WAL flush whatever its size, so its cost per
  /// event falls with the batch; flushing at once, 1,000 calls/s made batches of two or three
  /// events (a 20 s benchmark round: 4,906 append statements, 1,219 with a 20 ms linger).
  let linger: Duration

  /// A queued event: built when its batch is flushed (``submit(time:_:)``), or already built.
  struct Queued: Sendable {
    let time: Date
    let build: @Sendable (AuditLeafEncoder) -> AuditEntry

    static func built(_ entry: AuditEntry) -> Queued { Queued(time: entry.time) { _ in entry } }
  }

  private struct State {
    /// Events queued or being appended, not yet committed.
    var outstanding = 0
    var queued: [Queued] = []
    /// Time of the oldest event of the batch being appended, if one is.
    var appendingSince: Date?
    /// Callers of ``allCommitted()``, resumed when `outstanding` reaches zero.
    var committedWaiters: [CheckedContinuation<Void, Never>] = []
  }
  private let state = Mutex(State())
  /// The batch being appended, until it is known to have committed: a retry after an unanswered
  /// COMMIT must not record the batch twice.
  private let attempt = AuditAppendAttempt()
  private let wake: AsyncStream<Void>
  private let wakeContinuation: AsyncStream<Void>.Continuation

  public init(capacity: Int, repository: AuditLogRepository, logger: Logger, linger: Duration) {
    self.capacity = capacity
    self.linger = linger
    self.repository = repository
    self.logger = logger
    (wake, wakeContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
  }

  /// False while `capacity` events are waiting for their commit: new read-only calls are refused.
  public var admitsCalls: Bool { state.withLock { $0.outstanding < capacity } }

  /// Queues the event of a finished call.
  public func submit(_ entry: AuditEntry) {
    enqueue(.built(entry))
  }

  /// Queues an event of `time` that `build` puts together when its batch is flushed, with the
  /// batch's encoder. `build` runs once, off the caller's task, and must capture everything it
  /// needs.
  func submit(time: Date, _ build: @escaping @Sendable (AuditLeafEncoder) -> AuditEntry) {
    enqueue(Queued(time: time, build: build))
  }

  func enqueue(_ event: Queued) {
    state.withLock { state in
      state.queued.append(event)
      state.outstanding += 1
    }
    wakeContinuation.yield()
  }

  /// Events queued or being appended and not yet committed.
  public var outstanding: Int { state.withLock { $0.outstanding } }

  /// Returns once no event is waiting for its commit (at once if none is), or once the buffer has
  /// stopped. Calls that keep arriving can keep it waiting, and cancelling the waiting task does
  /// not end the wait: it is for callers that have stopped calling, such as a test that must know
  /// the reads it made are in the log, or a benchmark that charges a phase with its flushes.
  public func allCommitted() async {
    await withCheckedContinuation { continuation in
      let idle = state.withLock { state -> Bool in
        guard state.outstanding > 0 else { return true }
        state.committedWaiters.append(continuation)
        return false
      }
      if idle { continuation.resume() }
    }
  }

  /// How long the oldest event not yet committed has waited (zero when none waits): the audit
  /// append lag operators watch.
  public func lag(now: Date = Date()) -> TimeInterval {
    state.withLock { state in
      guard let oldest = state.appendingSince ?? state.queued.first?.time else { return 0 }
      return max(0, now.timeIntervalSince(oldest))
    }
  }

  public func run() async throws {
    await withGracefulShutdownHandler {
      for await _ in wake {
        if linger > .zero && state.withLock({ $0.queued.count < batchLimit }) {
          // Cut short by shutdown, which then waits for nothing but the flushes themselves.
          try? await cancelWhenGracefulShutdown { try await Task.sleep(for: self.linger) }
        }
        await flushQueued(giveUpAfter: nil, untilEmpty: false)
      }
    } onGracefulShutdown: {
      self.wakeContinuation.finish()
    }
    // The server has drained (it shuts down before this service): everything is queued now.
    await flushQueued(giveUpAfter: .seconds(10), untilEmpty: true)
    let lost = state.withLock { $0.queued.count }
    if lost > 0 {
      logger.critical("audit events could not be committed before exit", metadata: ["events": "\(lost)"])
    }
    let waiters = state.withLock { state in
      defer { state.committedWaiters = [] }
      return state.committedWaiters
    }
    for waiter in waiters { waiter.resume() }
  }

  /// Appends queued events batch by batch, retrying failures with backoff: until shutdown begins
  /// (`giveUpAfter` nil), or for at most that long in a row (the final flush). Unless `untilEmpty`,
  /// it stops once less than a full batch is left: those events queued during the flush, and
  /// their wake-up is waiting, so the next flush lingers first instead of appending them in
  /// dribbles.
  func flushQueued(giveUpAfter patience: Duration?, untilEmpty: Bool) async {
    var backoff = RetryBackoff()
    while true {
      let queued = state.withLock { state -> [Queued] in
        let batch = Array(state.queued.prefix(batchLimit))
        state.queued.removeFirst(batch.count)
        state.appendingSince = batch.first?.time
        return batch
      }
      if queued.isEmpty { return }
      let encoder = AuditLeafEncoder()
      let batch = queued.map { $0.build(encoder) }
      do {
        try await repository.append(batch, attempt: attempt, logger: logger)
        attempt.settled()
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
          state.outstanding -= batch.count
          state.appendingSince = nil
          guard state.outstanding == 0 else { return [] }
          defer { state.committedWaiters = [] }
          return state.committedWaiters
        }
        for waiter in waiters { waiter.resume() }
        backoff.succeeded()
        if !untilEmpty && state.withLock({ $0.queued.count < batchLimit }) { return }
      } catch {
        // Put the batch back in front, in order, and wait before retrying.
        state.withLock {
          $0.queued.insert(contentsOf: batch.map(Queued.built), at: 0)
          $0.appendingSince = nil
        }
        logger.warning(
          "audit events not committed yet; retrying",
          metadata: ["events": "\(batch.count)", "error": "\(error)", "backoff": "\(backoff.delay)"]
        )
        guard await backoff.failed(patience: patience) else { return }
      }
    }
  }
}
