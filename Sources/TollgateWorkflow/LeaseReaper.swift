import Foundation
public import Logging
public import ServiceLifecycle
public import TollgateStore
import TollgateAudit
public import TollgateModel

/// Expires leases whose worker stopped heartbeating, so their runs are offered again. Every
/// replica runs one; they skip each other's rows, so running several is safe. The period is a
/// quarter of the lease timeout (at most a second), so a run is re-offered within about 1.25×
/// the timeout of its last heartbeat.
public struct LeaseReaper: Service {
  let repository: WorkflowRepository
  let period: Duration
  let logger: Logger
  let telemetry: Telemetry
  let waitUntilReady: @Sendable () async -> Void

  /// How often the reaper also counts runs per state for `tollgate_workflow_runs`: a scan of the
  /// runs table, so not every round.
  static let depthPeriod: Duration = .seconds(10)

  public init(
    repository: WorkflowRepository,
    leaseTimeout: Duration,
    logger: Logger,
    telemetry: Telemetry = .disabled,
    waitUntilReady: @escaping @Sendable () async -> Void
  ) {
    self.repository = repository
    self.period = max(.milliseconds(50), min(leaseTimeout / 4, .seconds(1)))
    self.logger = logger
    self.telemetry = telemetry
    self.waitUntilReady = waitUntilReady
  }

  /// The gateway's own events (no principal): which attempt's lease ran out, and what became of
  /// the run.
  static let audit: WorkflowRepository.AuditRecords = { changes in
    changes.map { change in
      AuditEventBuilder.entry(
        scope: nil,
        tenant: change.tenant,
        method: "tollgate.internal/LeaseExpired",
        resource: "runs/\(change.runID.uuidString.lowercased())/attempts/\(change.attempt)",
        code: 0,
        message: change.state == .dead
          ? "lease expired (no heartbeat); DEAD, attempts used up" : "lease expired (no heartbeat); offered again"
      )
    }
  }

  public func run() async throws {
    await cancelWhenGracefulShutdown { await waitUntilReady() }
    let batch = 500
    var lastDepth: ContinuousClock.Instant?
    while !Task.isCancelled && !Task.isShuttingDownGracefully {
      do {
        var expired = batch
        while expired == batch {
          expired = try await repository.expireLeases(batch: batch, audit: Self.audit, logger: logger)
          if expired > 0 { logger.info("workflow leases expired", metadata: ["count": "\(expired)"]) }
          telemetry.count("tollgate_workflow_lease_expiries_total", by: expired)
        }
        if lastDepth.map({ .now - $0 >= Self.depthPeriod }) ?? true {
          lastDepth = .now
          let counts = try await repository.runCountsByState(logger: logger)
          for state in RunState.allCases {
            telemetry.set("tollgate_workflow_runs", [("state", state.rawValue)], Double(counts[state] ?? 0))
          }
        }
      } catch {
        logger.warning("could not expire workflow leases; retrying", metadata: ["error": "\(error)"])
      }
      try? await cancelWhenGracefulShutdown { try await Task.sleep(for: period) }
    }
  }
}
