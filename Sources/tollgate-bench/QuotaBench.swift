import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

/// `tools/bench quota`: (a) what the quota check costs a call, (b) whether a noisy tenant hurts a
/// quiet one, and (c) whether two replicas hold one tenant to one limit.
struct QuotaBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "quota",
    abstract: "(a) unary calls with and without the quota interceptor; (b) noisy neighbour; (c) two replicas, one limit."
  )
  @Option(help: "URL the gateway connects with (the database owner, not a superuser)") var databaseURL: String
  @Option(help: "Superuser URL (unused; accepted for tools/bench)") var adminDatabaseURL: String?
  @Option(help: "Seconds per load phase of (a)") var seconds: Double = 10
  @Option(help: "Concurrent calls in (a)") var concurrency: Int = 64
  @Option(help: "Alternating rounds of (a) and (b)") var rounds: Int = 3
  @Option(help: "Query rate limit per second of the tenants in (b) and (c)") var limit: Double = 100
  @Option(help: "Seconds per phase of (b)") var noisySeconds: Double = 20
  @Option(help: "Seconds of (c), measured in 10-second windows") var fleetSeconds: Double = 30
  @Option(help: "Which parts to run, e.g. \"b\" or \"ac\"") var parts: String = "abc"
  @Option(help: "JSON results file") var out: String = "bench-results/quota.json"

  struct Results: Codable {
    var cores: Int
    var date: String
    var cost: CostResult?
    var noisy: NoisyResult?
    var fleet: FleetResult?
  }

  struct CostResult: Codable {
    var concurrency: Int
    var secondsPerPhase: Double
    var withQuotaCallsPerSecond: Double
    var withoutQuotaCallsPerSecond: Double
    var withQuotaP99Ms: Double
    var withoutQuotaP99Ms: Double
    var ratio: Double
    var admissionNanosecondsPerCall: Double
  }

  struct NoisyResult: Codable {
    var limitPerSecond: Double
    var noisyOfferedPerSecond: Double
    var quietOfferedPerSecond: Double
    var quietAloneP99Ms: Double
    var quietWithNoisyP99Ms: Double
    var p99Ratio: Double
    var noisyAdmittedPerSecond: Double
    var noisyAdmittedOverLimit: Double
  }

  struct FleetResult: Codable {
    var replicas: Int
    var limitPerSecond: Double
    var offeredPerSecond: Double
    var admittedPerWindow: [Int]
    var windowRatios: [Double]
  }

  static let costTenant = try! TenantID(validating: "bench-quota-cost")
  static let noisyTenant = try! TenantID(validating: "bench-noisy")
  static let quietTenant = try! TenantID(validating: "bench-quiet")
  static let fleetTenant = try! TenantID(validating: "bench-fleet")

  func run() async throws {
    let setup = try BenchSetup(databaseURL: databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
    let cores = ProcessInfo.processInfo.activeProcessorCount
    let full = try Gateway(config: setup.config, logger: benchLogger)
    let results = try await withRunningGateway(full) { port in
      try await setup.connection(port: port, setup.operator).withClient { client in
        try await createBenchTenant(Self.costTenant, through: client)
        for tenant in [Self.noisyTenant, Self.quietTenant, Self.fleetTenant] {
          try await createBenchTenant(tenant, through: client) { quota in
            quota.rateLimits = quota.rateLimits.map { limit in
              var limit = limit
              if limit.quotaClass == .query {
                limit.ratePerSecond = self.limit
                limit.burst = UInt32(max(1, self.limit / 10))
              }
              return limit
            }
          }
        }
      }
      let cost = parts.contains("a") ? try await costBench(setup, fullPort: port) : nil
      let noisy = parts.contains("b") ? try await noisyBench(setup, port: port) : nil
      let fleet = parts.contains("c") ? try await fleetBench(setup, port: port) : nil
      return Results(cores: cores, date: ISO8601DateFormatter().string(from: Date()), cost: cost, noisy: noisy, fleet: fleet)
    }
    print("tollgate-bench quota on \(cores) cores (server, client and PostgreSQL share them)")
    if let c = results.cost {
      print(String(
        format: "  (a) GetTenant x%d: with quota %.0f calls/s (p99 %.2f ms), without %.0f calls/s (p99 %.2f ms), ratio %.3f (target >= 0.95); admission alone %.0f ns/call",
        c.concurrency, c.withQuotaCallsPerSecond, c.withQuotaP99Ms, c.withoutQuotaCallsPerSecond, c.withoutQuotaP99Ms, c.ratio,
        c.admissionNanosecondsPerCall
      ))
    }
    if let n = results.noisy {
      print(String(
        format: "  (b) noisy neighbour, limit %.0f/s each: quiet tenant at %.0f/s p99 %.2f ms alone, %.2f ms beside a tenant offering %.0f/s: ratio %.2f (target <= 1.5); noisy admitted %.1f/s = %.3f x its limit (target 0.9-1.1)",
        n.limitPerSecond, n.quietOfferedPerSecond, n.quietAloneP99Ms, n.quietWithNoisyP99Ms, n.noisyOfferedPerSecond, n.p99Ratio,
        n.noisyAdmittedPerSecond, n.noisyAdmittedOverLimit
      ))
    }
    if let f = results.fleet {
      print(String(
        format: "  (c) %d replicas, limit %.0f/s, offered %.0f/s through both: admitted per 10 s window %@ = %@ x the limit (target 0.9-1.1)",
        f.replicas, f.limitPerSecond, f.offeredPerSecond, "\(f.admittedPerWindow)",
        f.windowRatios.map { String(format: "%.3f", $0) }.joined(separator: ", ")
      ))
    }
    try writeResults(results, to: out)
  }

  // MARK: (a) cost of the quota check

  func costBench(_ setup: BenchSetup, fullPort: Int) async throws -> CostResult {
    let bare = try Gateway(config: setup.config, logger: benchLogger, withoutQuota: true)
    return try await withRunningGateway(bare) { barePort in
      var with: [CallLoad] = []
      var without: [CallLoad] = []
      let load = { (port: Int) in
        try await getTenantLoad(
          try setup.connection(port: port, setup.partner(Self.costTenant)), seconds: seconds, concurrency: concurrency)
      }
      try await alternating(rounds: rounds, without: { try await load(barePort) }, with: { try await load(fullPort) }) {
        round, b, f in
        without.append(b)
        with.append(f)
        FileHandle.standardError.write(Data(String(
          format: "(a) round %d: without quota %.0f calls/s p99 %.2f ms; with quota %.0f calls/s p99 %.2f ms\n",
          round, b.callsPerSecond, b.p99, f.callsPerSecond, f.p99
        ).utf8))
      }
      let withRate = median(with.map(\.callsPerSecond))
      let withoutRate = median(without.map(\.callsPerSecond))
      return CostResult(
        concurrency: concurrency,
        secondsPerPhase: seconds,
        withQuotaCallsPerSecond: withRate,
        withoutQuotaCallsPerSecond: withoutRate,
        withQuotaP99Ms: median(with.map(\.p99)),
        withoutQuotaP99Ms: median(without.map(\.p99)),
        ratio: withRate / withoutRate,
        admissionNanosecondsPerCall: admissionCost()
      )
    }
  }

  /// The limiter's own work per call (admission and the concurrency slot), in process.
  func admissionCost() -> Double {
    let limiter = QuotaLimiter()
    let key = QuotaKey(tenant: Self.costTenant, quotaClass: .query)
    let limit = RateLimit(ratePerSecond: 1e9, burst: 10_000_000)
    let n = 2_000_000
    let start = ContinuousClock.now
    for _ in 0..<n {
      _ = limiter.admit(key, limit: limit)
      _ = limiter.enter(Self.costTenant, limit: 100_000)
      limiter.leave(Self.costTenant)
    }
    return elapsedSeconds(ContinuousClock.now - start) * 1e9 / Double(n)
  }

  // MARK: (b) noisy neighbour

  /// Admitted latencies (ms) and refusals of GetTenant calls sent at `rate` per second on a fixed
  /// schedule (open loop: a slow answer does not slow the sender) until `end`.
  struct OpenLoad {
    var admittedLatencies: [Double]
    var refused: Int
  }

  func openLoad(_ client: GRPCClient<HTTP2ClientTransport.Posix>, rate: Double, until end: ContinuousClock.Instant)
    async throws -> OpenLoad
  {
    let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
    // Enough senders that each has time for its call before its next slot.
    let senders = max(1, min(64, Int(rate / 20)))
    let start = ContinuousClock.now
    let interval = 1.0 / rate
    return try await withThrowingTaskGroup(of: OpenLoad.self) { group in
      for sender in 0..<senders {
        group.addTask {
          var result = OpenLoad(admittedLatencies: [], refused: 0)
          var k = 0
          while true {
            let slot = start + .nanoseconds(Int64((Double(k * senders + sender) * interval) * 1e9))
            guard slot < end else { break }
            k += 1
            if slot > ContinuousClock.now { try await Task.sleep(until: slot, clock: .continuous) }
            let t0 = ContinuousClock.now
            do {
              _ = try await tenants.getTenant(.init())
              result.admittedLatencies.append(elapsedSeconds(ContinuousClock.now - t0) * 1000)
            } catch let error as RPCError where error.code == .resourceExhausted {
              result.refused += 1
            }
          }
          return result
        }
      }
      var all = OpenLoad(admittedLatencies: [], refused: 0)
      for try await part in group {
        all.admittedLatencies += part.admittedLatencies
        all.refused += part.refused
      }
      all.admittedLatencies.sort()
      return all
    }
  }

  func noisyBench(_ setup: BenchSetup, port: Int) async throws -> NoisyResult {
    let quietRate = limit / 2
    let noisyRate = limit * 10
    let phase = Duration.milliseconds(Int(noisySeconds * 1000))
    let quiet = try setup.connection(port: port, setup.partner(Self.quietTenant))
    let noisy = try setup.connection(port: port, setup.partner(Self.noisyTenant))
    return try await quiet.withClient { quietClient in
      try await noisy.withClient { noisyClient in
        var alone: [Double] = []
        var beside: [Double] = []
        var noisyAdmitted: [Double] = []
        for round in 1...rounds {
          let a = try await openLoad(quietClient, rate: quietRate, until: ContinuousClock.now + phase)
          FileHandle.standardError.write(Data("(b) round \(round): noisy phase begins\n".utf8))
          let end = ContinuousClock.now + phase
          async let quietLoad = openLoad(quietClient, rate: quietRate, until: end)
          async let noisyLoad = openLoad(noisyClient, rate: noisyRate, until: end)
          let (q, n) = try await (quietLoad, noisyLoad)
          alone.append(percentile(a.admittedLatencies, 0.99))
          beside.append(percentile(q.admittedLatencies, 0.99))
          noisyAdmitted.append(Double(n.admittedLatencies.count) / noisySeconds)
          FileHandle.standardError.write(Data(String(
            format: "(b) round %d: quiet p50 %.2f ms alone, %.2f ms beside noisy; quiet alone p99 %.2f ms (%d ok, %d refused); beside noisy p99 %.2f ms (%d ok, %d refused); noisy admitted %d, refused %d\n",
            round, percentile(a.admittedLatencies, 0.5), percentile(q.admittedLatencies, 0.5), alone.last!, a.admittedLatencies.count, a.refused, beside.last!, q.admittedLatencies.count, q.refused,
            n.admittedLatencies.count, n.refused
          ).utf8))
        }
        let aloneP99 = median(alone)
        let besideP99 = median(beside)
        let admitted = median(noisyAdmitted)
        return NoisyResult(
          limitPerSecond: limit,
          noisyOfferedPerSecond: noisyRate,
          quietOfferedPerSecond: quietRate,
          quietAloneP99Ms: aloneP99,
          quietWithNoisyP99Ms: besideP99,
          p99Ratio: besideP99 / aloneP99,
          noisyAdmittedPerSecond: admitted,
          noisyAdmittedOverLimit: admitted / limit
        )
      }
    }
  }

  // MARK: (c) two replicas

  /// A tenant offering 10x its limit through two replicas at once; admissions counted per
  /// 10-second window after a warm-up in which the replicas learn of each other's demand.
  func fleetBench(_ setup: BenchSetup, port: Int) async throws -> FleetResult {
    let second = try Gateway(config: setup.config, logger: benchLogger)
    return try await withRunningGateway(second) { secondPort in
      let offered = limit * 10
      let windows = max(1, Int(fleetSeconds / 10))
      let clients = [
        try setup.connection(port: port, setup.partner(Self.fleetTenant)),
        try setup.connection(port: secondPort, setup.partner(Self.fleetTenant)),
      ]
      let counts = WindowCounts(windows: windows)
      try await withThrowingTaskGroup(of: Void.self) { group in
        let warmup = Duration.seconds(3)
        let start = ContinuousClock.now + warmup
        let end = start + .seconds(10 * windows)
        for connection in clients {
          group.addTask {
            try await connection.withClient { client in
              let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
              let senders = 32
              let interval = 2.0 / offered
              let begin = ContinuousClock.now
              try await withThrowingTaskGroup(of: Void.self) { senders_ in
                for sender in 0..<senders {
                  senders_.addTask {
                    var k = 0
                    while true {
                      let slot = begin + .nanoseconds(Int64(Double(k * senders + sender) * interval * 1e9))
                      guard slot < end else { break }
                      k += 1
                      if slot > ContinuousClock.now { try await Task.sleep(until: slot, clock: .continuous) }
                      do {
                        _ = try await tenants.getTenant(.init())
                        let now = ContinuousClock.now
                        if now >= start && now < end {
                          let window = Int(elapsedSeconds(now - start) / 10)
                          counts.add(window: window)
                        }
                      } catch let error as RPCError where error.code == .resourceExhausted {}
                    }
                  }
                }
                try await senders_.waitForAll()
              }
            }
          }
        }
        try await group.waitForAll()
      }
      let admitted = counts.values
      FileHandle.standardError.write(Data("(c) admitted per 10 s window: \(admitted)\n".utf8))
      return FleetResult(
        replicas: 2,
        limitPerSecond: limit,
        offeredPerSecond: offered,
        admittedPerWindow: admitted,
        windowRatios: admitted.map { Double($0) / (limit * 10) }
      )
    }
  }
}

/// Admissions per measurement window, shared by the sending tasks.
final class WindowCounts: Sendable {
  private let counts: Mutex<[Int]>

  init(windows: Int) { counts = Mutex([Int](repeating: 0, count: windows)) }

  func add(window: Int) { counts.withLock { $0[min(window, $0.count - 1)] += 1 } }

  var values: [Int] { counts.withLock { $0 } }
}
