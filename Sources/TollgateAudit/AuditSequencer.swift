public import Logging
public import ServiceLifecycle
import Synchronization
public import TollgateStore

/// Gives the audit events that mutations committed to `audit_pending` their places in their
/// logs, many per transaction, soon after they commit.
///
/// A mutation commits its event with its change but does not append it: an append holds the
/// log's head row until commit, so one tenant's mutations would commit strictly one at a time.
/// This service is woken by this process's commits (``Database/auditQueued``) and, every
/// `sweepInterval`, looks for events another replica committed but did not index before it
/// stopped. Readers of a log index that log's pending events first (``Checkpointer/current(_:)``,
/// `StreamEvents`), so a record is readable as soon as its call has been answered.
public final class AuditSequencer: Service, Sendable {
  let repository: AuditLogRepository
  let signal: AuditQueueSignal
  let sweepInterval: Duration
  /// How long a wake-up waits before its pass, gathering the events committed meanwhile.
  let linger: Duration
  let logger: Logger
  let waitUntilReady: @Sendable () async -> Void
  /// Per log and pass; a pass that moves this many of one log runs again at once.
  let batchLimit = 10_000
  private let moved = Atomic<Int>(0)

  public init(
    repository: AuditLogRepository,
    signal: AuditQueueSignal,
    sweepInterval: Duration = .seconds(1),
    linger: Duration = .milliseconds(50),
    logger: Logger,
    waitUntilReady: @escaping @Sendable () async -> Void = {}
  ) {
    self.repository = repository
    self.signal = signal
    self.sweepInterval = sweepInterval
    self.linger = linger
    self.logger = logger
    self.waitUntilReady = waitUntilReady
  }

  /// Events this process has moved into their logs since it started.
  public var eventsSequenced: Int { moved.load(ordering: .relaxed) }

  public func run() async throws {
    await cancelWhenGracefulShutdown { await self.waitUntilReady() }
    // Stopped before the schema was ready (or as it became so): this process can have committed
    // nothing to index, and a last pass would only retry against a database that is not there.
    // Anything pending from elsewhere stays committed for the next replica's sweep.
    guard !Task.isShuttingDownGracefully else { return }
    await withGracefulShutdownHandler {
      await withTaskGroup(of: Void.self) { group in
        group.addTask { [signal, sweepInterval] in
          // Events left behind by a replica that stopped between its commit and its pass.
          while (try? await Task.sleep(for: sweepInterval)) != nil { signal.signal() }
        }
        for await _ in signal.wakes {
          // Not at once: a pass right behind each commit would compete with the work that commit
          // set off (a dispatched run's lease, above all) and index one event at a time.
          try? await Task.sleep(for: linger)
          await sequenceAll(giveUpAfter: nil)
        }
        group.cancelAll()
      }
    } onGracefulShutdown: {
      self.signal.finish()
    }
    // Stops after the server has drained: index what its last calls committed. Briefly: the
    // events are committed already and wait for the next sweep, and the audit buffer's final
    // flush, whose events are not, waits its turn behind this pass (with the database down, an
    // idle gateway took 24-27 s to stop with a 10 s patience here, 18 s with this one).
    await sequenceAll(giveUpAfter: .seconds(2))
  }

  /// Moves every committed pending event into its log. Waits and retries while the database
  /// fails: until shutdown begins (`giveUpAfter` nil), or while failures last less than that
  /// (the final pass).
  /// Nothing is lost by giving up: the events stay committed in `audit_pending` for the next
  /// replica's sweep.
  public func sequenceAll(giveUpAfter patience: Duration? = nil) async {
    var backoff = RetryBackoff()
    while true {
      do {
        let count = try await repository.sequencePending(limit: batchLimit, logger: logger)
        moved.add(count, ordering: .relaxed)
        if count < batchLimit { return }
        backoff.succeeded()
      } catch {
        logger.warning(
          "pending audit events not indexed yet; retrying",
          metadata: ["error": "\(error)", "backoff": "\(backoff.delay)"]
        )
        guard await backoff.failed(patience: patience) else { return }
      }
    }
  }
}
