import Synchronization
public import TollgateModel

/// What a rate limit is kept for: one tenant's calls of one quota class.
public struct QuotaKey: Hashable, Sendable, CustomStringConvertible {
  public var tenant: TenantID
  public var quotaClass: QuotaClass

  public init(tenant: TenantID, quotaClass: QuotaClass) {
    self.tenant = tenant
    self.quotaClass = quotaClass
  }

  public var description: String { "\(tenant)/\(quotaClass.rawValue)" }
}

/// This replica's quota state: a GCRA bucket per (tenant, class), each tenant's calls in flight,
/// and the shares of every fleet-wide limit this replica holds.
///
/// GCRA keeps one number per bucket, the theoretical arrival time (TAT) of the next call at the
/// sustained rate. A call is admitted when the TAT is no further ahead of now than the burst
/// tolerance allows, which admits exactly `burst` calls at once after idling and then one per
/// emission interval; the refusal says to the nanosecond when the next call would be admitted.
///
/// A limit is one limit across the fleet: each replica enforces its share of the rate and burst
/// (``Shares``), which a ``QuotaCoordinator`` leases from PostgreSQL in proportion to where the
/// tenant's calls arrive. Alone, a replica's share is the whole limit.
public final class QuotaLimiter: Sendable {
  /// Nanoseconds on a monotonic clock; injectable so tests control time.
  public typealias Clock = @Sendable () -> Int64

  /// What this replica may use of fleet-wide limits, as set by the last lease round.
  public struct Shares: Sendable {
    /// Fraction (0...1] of a key's rate and burst this replica enforces; a key no replica
    /// leases is wholly this replica's until the next round says otherwise.
    public var rate: [QuotaKey: Double]
    /// Calls of a tenant in flight on the other replicas, as they last reported.
    public var othersInFlight: [TenantID: Int]

    public init(rate: [QuotaKey: Double] = [:], othersInFlight: [TenantID: Int] = [:]) {
      self.rate = rate
      self.othersInFlight = othersInFlight
    }
  }

  /// What this replica saw since the last ``takeDemand()``: the basis of its next lease.
  public struct Demand: Sendable, Equatable {
    /// Calls and stream messages that asked for admission, admitted or not, per key.
    public var attempts: [QuotaKey: Int]
    /// Calls in flight now, per tenant with any.
    public var inFlight: [TenantID: Int]
  }

  public enum Decision: Sendable, Equatable {
    case admitted
    /// Over the rate: the call would be admitted `retryAfter` from now. `limit` is this replica's
    /// part of the tenant's limit.
    case refused(retryAfter: Duration, ratePerSecond: Double, burst: Double)
  }

  /// A key's theoretical arrival time and the emission interval it was computed with.
  struct Bucket {
    var tat: Int64
    var interval: Double
  }

  struct State {
    var buckets: [QuotaKey: Bucket] = [:]
    var attempts: [QuotaKey: Int] = [:]
    var inFlight: [TenantID: Int] = [:]
    var shares = Shares()
  }

  private let state = Mutex(State())
  private let now: Clock

  public init(clock: @escaping Clock = QuotaLimiter.monotonicNanoseconds) {
    self.now = clock
  }

  public static let monotonicNanoseconds: Clock = {
    let elapsed = ContinuousClock.now - start
    return elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000
  }
  private static let start = ContinuousClock.now

  /// This replica's part of `limit`: rate and burst scaled by its share, the burst never below
  /// one call so a small share still admits.
  static func local(_ limit: RateLimit, share: Double) -> (interval: Double, tolerance: Double, rate: Double, burst: Double) {
    let rate = limit.ratePerSecond * share
    let burst = max(1, Double(limit.burst) * share)
    // Bounded so the bucket's Int64 nanoseconds cannot overflow, which would trap and take the
    // gateway down, whatever limit was stored and however small a share the fleet leaves this
    // replica: an interval of at most 11.6 days, a tolerance of at most 31.7 years.
    let interval = rate.isFinite && rate > 0 ? min(1e9 / rate, maxInterval) : maxInterval
    return (interval, min((burst - 1) * interval, maxTolerance), rate, burst)
  }

  static let maxInterval = 1e15
  static let maxTolerance = 1e18

  /// The bucket's TAT under `interval`, not before now. When the limit or share has changed
  /// since, the backlog ahead of now is rescaled to the new interval: it keeps the same number of
  /// calls, so a raised quota admits at once and a cut one does not forgive what was used.
  static func current(_ bucket: Bucket?, interval: Double, now: Int64) -> Int64 {
    guard let bucket, bucket.tat > now else { return now }
    guard bucket.interval != interval else { return bucket.tat }
    // A backlog never exceeds a tolerance and an interval, so neither does its rescaled form.
    return now + Int64(min(Double(bucket.tat - now) * interval / bucket.interval, maxTolerance + interval).rounded())
  }

  /// Admits one call of `key` under `limit` or says when it could be admitted.
  public func admit(_ key: QuotaKey, limit: RateLimit) -> Decision {
    let now = now()
    return state.withLock { state in
      state.attempts[key, default: 0] += 1
      let local = Self.local(limit, share: state.shares.rate[key] ?? 1)
      let tat = Self.current(state.buckets[key], interval: local.interval, now: now)
      let ahead = Double(tat - now)
      if ahead > local.tolerance {
        // Keep the rescaled backlog, so the next call is measured from it, not from the old one.
        state.buckets[key] = Bucket(tat: tat, interval: local.interval)
        let wait = Int64((ahead - local.tolerance).rounded(.up))
        return .refused(retryAfter: .nanoseconds(wait), ratePerSecond: local.rate, burst: local.burst)
      }
      state.buckets[key] = Bucket(tat: tat + Int64(local.interval.rounded()), interval: local.interval)
      return .admitted
    }
  }

  /// Takes the next admission of `key` whenever it comes and returns how long to wait for it:
  /// a stream that is over its rate is slowed, not refused.
  public func reserve(_ key: QuotaKey, limit: RateLimit) -> Duration {
    let now = now()
    return state.withLock { state in
      state.attempts[key, default: 0] += 1
      let local = Self.local(limit, share: state.shares.rate[key] ?? 1)
      let tat = Self.current(state.buckets[key], interval: local.interval, now: now)
      state.buckets[key] = Bucket(tat: tat + Int64(local.interval.rounded()), interval: local.interval)
      let ahead = Double(tat - now)
      return ahead > local.tolerance ? .nanoseconds(Int64((ahead - local.tolerance).rounded(.up))) : .zero
    }
  }

  /// Counts a call of `tenant` in flight if the tenant has fewer than `limit` across the fleet
  /// (this replica's count plus the others' last reports).
  public func enter(_ tenant: TenantID, limit: UInt32) -> Bool {
    state.withLock { state in
      let mine = state.inFlight[tenant, default: 0]
      guard mine + state.shares.othersInFlight[tenant, default: 0] < Int(limit) else { return false }
      state.inFlight[tenant] = mine + 1
      return true
    }
  }

  /// Ends a call counted by ``enter(_:limit:)``.
  public func leave(_ tenant: TenantID) {
    state.withLock { state in
      let left = state.inFlight[tenant, default: 1] - 1
      state.inFlight[tenant] = left > 0 ? left : nil
    }
  }

  /// Calls of `tenant` in flight on this replica.
  public func inFlight(_ tenant: TenantID) -> Int {
    state.withLock { $0.inFlight[tenant, default: 0] }
  }

  /// Returns and resets the attempts counted since the last call, with the calls in flight now.
  public func takeDemand() -> Demand {
    state.withLock { state in
      defer { state.attempts.removeAll(keepingCapacity: true) }
      return Demand(attempts: state.attempts, inFlight: state.inFlight)
    }
  }

  /// Installs the shares of the latest lease round.
  public func apply(_ shares: Shares) {
    state.withLock { $0.shares = shares }
  }

  public var shares: Shares { state.withLock { $0.shares } }
}
