import Foundation
public import Logging
public import ServiceLifecycle
public import TollgateCore
public import TollgateStore
import TollgateModel

/// Makes each tenant's limits one limit across the replicas on one database, Doorman-style:
/// every `interval` this replica leases, in PostgreSQL, the (tenant, class) rates and tenants'
/// call slots it is using, with its demand, and reads the other live replicas' demands. Its share
/// of a rate is its demand over the total, and its concurrency allowance is the limit less the
/// calls in flight elsewhere.
///
/// Leases live for a few intervals. A replica that dies stops renewing, and its share returns to
/// the others when its leases expire; one that stops cleanly gives them back at once. When the
/// database cannot be reached the last shares stay in force.
public struct QuotaCoordinator: Service {
  let limiter: QuotaLimiter
  let repository: QuotaLeaseRepository
  public let replicaID: String
  let interval: Duration
  let logger: Logger
  let waitUntilReady: @Sendable () async -> Void

  /// How much of the past a demand estimate keeps per round: enough smoothing that round-to-round
  /// noise in arrivals does not swing shares, little enough to follow a shift within a few rounds.
  static let smoothing = 0.5

  public init(
    limiter: QuotaLimiter,
    repository: QuotaLeaseRepository,
    interval: Duration,
    logger: Logger,
    waitUntilReady: @escaping @Sendable () async -> Void
  ) {
    self.limiter = limiter
    self.repository = repository
    self.replicaID = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(UUID().uuidString.prefix(8).lowercased())"
    self.interval = interval
    self.logger = logger
    self.waitUntilReady = waitUntilReady
  }

  /// Leases outlive a few missed renewals, and at least a second.
  var ttl: Duration { max(.seconds(1), interval * 4) }

  public func run() async throws {
    await cancelWhenGracefulShutdown { await waitUntilReady() }
    var rates: [QuotaLeaseRepository.ResourceKey: Double] = [:]
    let clock = ContinuousClock()
    var last = clock.now
    var heldAny = true
    var lastRenewal: ContinuousClock.Instant?
    while !Task.isCancelled && !Task.isShuttingDownGracefully {
      let now = clock.now
      let elapsed = max(1e-3, (now - last).seconds)
      last = now
      let demand = limiter.takeDemand()
      rates = Self.smoothed(rates, attempts: demand.attempts, elapsedSeconds: elapsed)
      let leases =
        rates.map { QuotaLeaseRepository.Lease(key: $0.key, demand: $0.value) }
        + demand.inFlight.map {
          QuotaLeaseRepository.Lease(
            key: .init(tenant: $0.key, resource: QuotaLeaseRepository.callsResource),
            demand: Double($0.value)
          )
        }
      // An idle replica holds nothing and has nothing to learn in a hurry: it reads the others'
      // leases once per lease lifetime instead of every interval, which keeps idle replicas off
      // the database.
      let idle = leases.isEmpty && !heldAny
      heldAny = !leases.isEmpty
      if idle, let lastRenewal, clock.now - lastRenewal < ttl {
        try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
        continue
      }
      lastRenewal = clock.now
      do {
        let others = try await repository.renew(
          replica: replicaID,
          leases: leases,
          ttlMilliseconds: Int(ttl.wholeMilliseconds),
          logger: logger
        )
        limiter.apply(Self.shares(mine: rates, others: others))
      } catch {
        logger.warning("could not renew quota leases; keeping the last shares", metadata: ["error": "\(error)"])
      }
      try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
    }
    do {
      try await repository.release(replica: replicaID, logger: logger)
    } catch {
      logger.info("quota leases not given back; they expire on their own", metadata: ["error": "\(error)"])
    }
  }

  /// The new demand estimate per key, in admission attempts per second; keys idle long enough to
  /// fall under one attempt a minute are dropped, which gives their lease back.
  static func smoothed(
    _ rates: [QuotaLeaseRepository.ResourceKey: Double],
    attempts: [QuotaKey: Int],
    elapsedSeconds: Double
  ) -> [QuotaLeaseRepository.ResourceKey: Double] {
    var next: [QuotaLeaseRepository.ResourceKey: Double] = [:]
    var observed: [QuotaLeaseRepository.ResourceKey: Double] = [:]
    for (key, count) in attempts {
      observed[.init(tenant: key.tenant, resource: key.quotaClass.rawValue)] = Double(count) / elapsedSeconds
    }
    for key in Set(rates.keys).union(observed.keys) {
      let old = rates[key]
      let seen = observed[key] ?? 0
      // A key seen for the first time starts at what was seen, not half of it.
      let rate = old.map { smoothing * $0 + (1 - smoothing) * seen } ?? seen
      if rate >= 1.0 / 60 { next[key] = rate }
    }
    return next
  }

  /// This replica's shares, given its own demand and what the others hold: in proportion to
  /// demand for a key it uses, an equal split for one only others use (so its first calls get a
  /// fair part), and whole for one nobody else uses.
  static func shares(
    mine: [QuotaLeaseRepository.ResourceKey: Double],
    others: [QuotaLeaseRepository.ResourceKey: QuotaLeaseRepository.Held]
  ) -> QuotaLimiter.Shares {
    var shares = QuotaLimiter.Shares()
    for (key, held) in others {
      if key.resource == QuotaLeaseRepository.callsResource {
        shares.othersInFlight[key.tenant] = Int(held.demand)
      } else if let quotaClass = QuotaClass(rawValue: key.resource) {
        let demand = mine[key] ?? 0
        shares.rate[QuotaKey(tenant: key.tenant, quotaClass: quotaClass)] =
          demand > 0 ? demand / (demand + held.demand) : 1 / Double(held.replicas + 1)
      }
    }
    return shares
  }
}
