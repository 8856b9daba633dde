import Synchronization
import Testing
import TollgateCore
import TollgateModel

/// A clock the test moves by hand.
final class ManualClock: Sendable {
  private let nanoseconds = Atomic<Int64>(0)
  var now: Int64 { nanoseconds.load(ordering: .relaxed) }
  func advance(_ duration: Duration) { nanoseconds.wrappingAdd(Self.nanos(duration), ordering: .relaxed) }
  static func nanos(_ d: Duration) -> Int64 { d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000 }
}

@Suite struct QuotaLimiterTests {
  let clock = ManualClock()
  let key = QuotaKey(tenant: try! TenantID(validating: "acme"), quotaClass: .query)

  func limiter() -> QuotaLimiter {
    let clock = self.clock
    return QuotaLimiter(clock: { clock.now })
  }

  @Test func aBurstIsAdmittedWholeThenOneCallPerInterval() {
    let limiter = limiter()
    let limit = RateLimit(ratePerSecond: 10, burst: 5)
    for _ in 0..<5 { #expect(limiter.admit(key, limit: limit) == .admitted) }
    // The sixth waits exactly one emission interval (100 ms), and says so.
    #expect(limiter.admit(key, limit: limit) == .refused(retryAfter: .milliseconds(100), ratePerSecond: 10, burst: 5))
    clock.advance(.milliseconds(99))
    #expect(limiter.admit(key, limit: limit) == .refused(retryAfter: .milliseconds(1), ratePerSecond: 10, burst: 5))
    clock.advance(.milliseconds(1))
    #expect(limiter.admit(key, limit: limit) == .admitted)
    #expect(limiter.admit(key, limit: limit) != .admitted)
    // Idling refills the burst but never beyond it.
    clock.advance(.seconds(60))
    var admitted = 0
    for _ in 0..<20 where limiter.admit(key, limit: limit) == .admitted { admitted += 1 }
    #expect(admitted == 5)
  }

  /// Limits no validation would pass, and a share as small as a busy fleet can leave, still
  /// answer: slowly, never by trapping on an Int64 overflow of the bucket.
  @Test func extremeLimitsAndSharesNeverOverflowTheBucket() {
    let limiter = limiter()
    for rate in [5e-324, 0, -1, .nan, .infinity, 1e-9, 1_000_000] {
      let limit = RateLimit(ratePerSecond: rate, burst: 10_000_000)
      for _ in 0..<1_000 { _ = limiter.admit(key, limit: limit) }
      _ = limiter.reserve(key, limit: limit)
      clock.advance(.seconds(1))
    }
    // From the fastest rate with a backlog to the slowest: the backlog is rescaled, and bounded.
    let fast = RateLimit(ratePerSecond: 1_000_000, burst: 10_000_000)
    for _ in 0..<1_000 { _ = limiter.admit(key, limit: fast) }
    limiter.apply(QuotaLimiter.Shares(rate: [key: 1e-12]))
    let slow = RateLimit(ratePerSecond: 0.001, burst: 10_000_000)
    guard case .refused(let retryAfter, _, _) = limiter.admit(key, limit: slow) else {
      Issue.record("a rate of 1e-15 calls per second admitted a call straight after a backlog")
      return
    }
    #expect(retryAfter > .seconds(86_400))
  }

  @Test func aFloodIsHeldToBurstPlusRateTimesTime() {
    let limiter = limiter()
    let limit = RateLimit(ratePerSecond: 10, burst: 5)
    var admitted = 0
    // One attempt per millisecond for ten seconds: 100x the rate.
    for _ in 0..<10_000 {
      if limiter.admit(key, limit: limit) == .admitted { admitted += 1 }
      clock.advance(.milliseconds(1))
    }
    // 5 at once, then one every 100 ms from 100 ms to 9.9 s.
    #expect(admitted == 5 + 99)
  }

  @Test func aHalfShareAdmitsHalf() {
    let limiter = limiter()
    limiter.apply(QuotaLimiter.Shares(rate: [key: 0.5]))
    let limit = RateLimit(ratePerSecond: 100, burst: 10)
    var admitted = 0
    for _ in 0..<10_000 {
      if limiter.admit(key, limit: limit) == .admitted { admitted += 1 }
      clock.advance(.milliseconds(1))
    }
    // Rate 50/s, burst 5: 5 at once, then one every 20 ms.
    #expect(admitted == 5 + 499)
    // A quarter share: a quarter of the burst.
    let other = QuotaKey(tenant: key.tenant, quotaClass: .admin)
    limiter.apply(QuotaLimiter.Shares(rate: [other: 0.25]))
    var burst = 0
    for _ in 0..<100 where limiter.admit(other, limit: RateLimit(ratePerSecond: 100, burst: 40)) == .admitted { burst += 1 }
    #expect(burst == 10)
  }

  @Test func aRaisedLimitAdmitsAtOnceAndACutOneKeepsTheDebt() {
    let limiter = limiter()
    let slow = RateLimit(ratePerSecond: 0.1, burst: 1)
    #expect(limiter.admit(key, limit: slow) == .admitted)
    #expect(limiter.admit(key, limit: slow) == .refused(retryAfter: .seconds(10), ratePerSecond: 0.1, burst: 1))
    // One call used of 1000/s: the next is 1 ms away, not 10 s.
    let fast = RateLimit(ratePerSecond: 1000, burst: 1)
    #expect(limiter.admit(key, limit: fast) == .refused(retryAfter: .milliseconds(1), ratePerSecond: 1000, burst: 1))
    clock.advance(.milliseconds(1))
    #expect(limiter.admit(key, limit: fast) == .admitted)
    // Cut back: the call just admitted is owed at the slow rate.
    #expect(limiter.admit(key, limit: slow) == .refused(retryAfter: .seconds(10), ratePerSecond: 0.1, burst: 1))
  }

  @Test func aStreamOverItsRateIsPacedNotRefused() {
    let limiter = limiter()
    let limit = RateLimit(ratePerSecond: 10, burst: 2)
    #expect(limiter.reserve(key, limit: limit) == .zero)
    #expect(limiter.reserve(key, limit: limit) == .zero)
    #expect(limiter.reserve(key, limit: limit) == .milliseconds(100))
    #expect(limiter.reserve(key, limit: limit) == .milliseconds(200))
    // Calls meanwhile are refused until the paced messages have had their turn.
    #expect(limiter.admit(key, limit: limit) == .refused(retryAfter: .milliseconds(300), ratePerSecond: 10, burst: 2))
    let demand = limiter.takeDemand()
    #expect(demand.attempts[key] == 5)
    #expect(limiter.takeDemand().attempts.isEmpty)
  }

  @Test func concurrentCallsCountAcrossTheFleet() {
    let limiter = limiter()
    let tenant = key.tenant
    #expect(limiter.enter(tenant, limit: 3))
    #expect(limiter.enter(tenant, limit: 3))
    limiter.apply(QuotaLimiter.Shares(othersInFlight: [tenant: 1]))
    #expect(!limiter.enter(tenant, limit: 3))
    limiter.leave(tenant)
    #expect(limiter.enter(tenant, limit: 3))
    #expect(limiter.takeDemand().inFlight == [tenant: 2])
    limiter.leave(tenant)
    limiter.leave(tenant)
    #expect(limiter.inFlight(tenant) == 0)
    #expect(limiter.takeDemand().inFlight.isEmpty)
  }
}
