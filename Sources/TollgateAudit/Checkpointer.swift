import Foundation
import Synchronization
public import Logging
public import ServiceLifecycle
public import TollgateMerkle
public import TollgateModel
public import TollgateStore

/// Signs checkpoints: every second for each log that grew since its last checkpoint, and on
/// demand when a reader needs one covering everything committed.
///
/// Replicas sharing the database all run one; whichever signs a size first stores it and the
/// others keep that one (the roots are equal: the log cannot fork).
public final class Checkpointer: Service, Sendable {
  let repository: AuditLogRepository
  public let key: AuditSigningKey
  let trustDomain: String
  let interval: Duration
  /// When the last round that found every grown log signed ended.
  let lastRound = Mutex<ContinuousClock.Instant?>(nil)

  /// Time since the last successful signing round (nil before the first): with a round every
  /// `interval`, anything much above it means checkpoints are falling behind.
  public var checkpointAge: Duration? { lastRound.withLock { $0.map { .now - $0 } } }
  let logger: Logger
  let waitUntilReady: @Sendable () async -> Void

  public init(
    repository: AuditLogRepository,
    key: AuditSigningKey,
    trustDomain: String,
    interval: Duration = .seconds(1),
    logger: Logger,
    waitUntilReady: @escaping @Sendable () async -> Void = {}
  ) {
    self.repository = repository
    self.key = key
    self.trustDomain = trustDomain
    self.interval = interval
    self.logger = logger
    self.waitUntilReady = waitUntilReady
  }

  /// `tollgate/<trust domain>/<tenant or _platform>`.
  public func origin(_ log: AuditLogID) -> String {
    "tollgate/\(trustDomain)/\(log.rawValue)"
  }

  func signed(_ log: AuditLogID, head: CompactRange) throws(StoreError) -> StoredCheckpoint {
    let checkpoint = Checkpoint(origin: origin(log), treeSize: head.size, rootHash: head.root)
    let note: String
    do { note = try key.sign(checkpoint) } catch { throw .unexpected("signing a checkpoint: \(error)") }
    return StoredCheckpoint(
      log: log,
      treeSize: head.size,
      rootHash: checkpoint.rootHash,
      keyName: key.name,
      publicKey: key.publicKey,
      signedNote: note,
      createTime: Date()
    )
  }

  /// A checkpoint covering every record committed when this was called.
  public func current(_ log: AuditLogID) async throws(StoreError) -> StoredCheckpoint {
    try await repository.sequencePending(only: log, logger: logger)
    let head = try await repository.head(log, logger: logger)
    if let latest = try await repository.checkpoint(log, logger: logger), latest.treeSize >= head.size {
      return latest
    }
    return try await repository.saveCheckpoint(try signed(log, head: head), logger: logger)
  }

  /// Signs a checkpoint for every log that grew; returns how many were signed.
  @discardableResult
  public func checkpointGrownLogs() async throws(StoreError) -> Int {
    let behind = try await repository.logsBehindCheckpoint(logger: logger)
    for (log, head) in behind {
      _ = try await repository.saveCheckpoint(try signed(log, head: head), logger: logger)
    }
    return behind.count
  }

  public func run() async throws {
    // The tables exist only once migrations ran.
    await cancelWhenGracefulShutdown { await self.waitUntilReady() }
    while !Task.isShuttingDownGracefully {
      do {
        try await checkpointGrownLogs()
        lastRound.withLock { $0 = .now }
      } catch {
        logger.warning("could not sign audit checkpoints; retrying", metadata: ["error": "\(error)"])
      }
      // A fixed period is the contract ("at least every second while the log grows"), not a poll
      // for work another component could signal.
      do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: self.interval) } } catch { break }
    }
  }
}
