import ArgumentParser
import Foundation
import GRPCCore
import GRPCProtobuf
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import PostgresNIO
import ServiceLifecycle
import Synchronization
import SwiftProtobuf
import TollgateAudit
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateMerkle
import TollgateModel
import TollgateProtos
import TollgateStore

/// Benchmarks run by `tools/bench`. Figures are ratios against a baseline measured in the same
/// run, on the same machine and database, since absolute times on shared machines drift.
@main
struct TollgateBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "tollgate-bench",
    abstract: "Tollgate benchmarks (run through tools/bench, which starts PostgreSQL).",
    subcommands: [AuditBench.self, AuditCostBench.self, IngestBench.self, QueryBench.self, WorkflowBench.self, QuotaBench.self]
  )
}

let benchLogger: Logger = {
  var logger = Logger(label: "tollgate-bench")
  logger.logLevel = .error
  return logger
}()

/// Certificates, keys and a gateway configuration in a temporary folder.
struct BenchSetup {
  let directory: URL
  let ca: CertificateAuthority
  var config: GatewayConfig

  init(databaseURL: String) throws {
    directory = FileManager.default.temporaryDirectory.appendingPathComponent("tollgate-bench-\(UUID().uuidString)")
    ca = try CertificateAuthority.create(trustDomain: "bench.tollgate.local")
    try PEMFiles.saveAuthority(ca, to: directory.appendingPathComponent("ca").path)
    let server = try ca.issue(.server(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
    try PEMFiles.saveIssued(server, ca: ca, to: directory.appendingPathComponent("server").path)
    let key = try AuditSigningKey(name: "bench-audit")
    let keyPath = directory.appendingPathComponent("audit.key").path
    try PEMFiles.write(key.signerText + "\n", to: keyPath, secret: true)
    config = GatewayConfig(
      listen: .init(host: "127.0.0.1", port: 0),
      tlsCertificatePath: directory.appendingPathComponent("server/cert.pem").path,
      tlsKeyPath: directory.appendingPathComponent("server/key.pem").path,
      clientCAPath: directory.appendingPathComponent("ca/ca.pem").path,
      trustDomain: ca.trustDomain,
      database: try DatabaseURL(parsing: databaseURL),
      databaseMaxConnections: 20,
      auditSigningKeyPath: keyPath
    )
  }

  /// `timeout` is every call's deadline; nil for streams that must outlive any phase (workers).
  func connection(port: Int, _ subject: CertificateAuthority.Subject, timeout: Duration? = .seconds(600)) throws -> GatewayConnection {
    let issued = try ca.issue(subject)
    return GatewayConnection(
      host: "127.0.0.1",
      port: port,
      certificatePEM: Array(try PEMFiles.certificatePEM(issued.certificate).utf8),
      privateKeyPEM: Array(try PEMFiles.privateKeyPEM(issued.privateKey).utf8),
      serverCAPEM: Array(try PEMFiles.certificatePEM(ca.certificate).utf8),
      defaultTimeout: timeout
    )
  }

  var `operator`: CertificateAuthority.Subject { .principal(SPIFFEID(operatorNamed: "bench", trustDomain: ca.trustDomain)) }

  func partner(_ tenant: TenantID) -> CertificateAuthority.Subject {
    .principal(SPIFFEID(tenant: tenant, role: .partner, name: "bench", trustDomain: ca.trustDomain))
  }
}

/// Runs `gateway` in a service group while `body` runs; returns `body`'s result after a drain.
func withRunningGateway<T: Sendable>(_ gateway: Gateway, _ body: (Int) async throws -> T) async throws -> T {
  let group = ServiceGroup(configuration: .init(services: gateway.services, gracefulShutdownSignals: [], logger: benchLogger))
  return try await withThrowingTaskGroup(of: Void.self) { tasks in
    tasks.addTask { try await group.run() }
    defer { tasks.cancelAll() }
    guard let port = try await gateway.listeningAddress.ipv4?.port else { throw CancellationError() }
    let result = try await body(port)
    await group.triggerGracefulShutdown()
    try await tasks.next()
    return result
  }
}

func median(_ values: [Double]) -> Double {
  let sorted = values.sorted()
  return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
  guard !sorted.isEmpty else { return 0 }
  return sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)]
}

func elapsedSeconds(_ duration: Duration) -> Double {
  let (s, atto) = duration.components
  return Double(s) + Double(atto) / 1e18
}

struct AuditBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "audit",
    abstract: "(a) StreamEvents of stored records vs psql COPY of the same leaves; (b) no-op unary calls with and without the audit interceptor."
  )
  @Option(help: "URL the gateway connects with (the database owner, not a superuser)") var databaseURL: String
  @Option(help: "psql command line prefix for the COPY baseline, e.g. 'psql -h 127.0.0.1 -p 5432 -U tollgate_admin -d tollgate'")
  var psql: String
  @Option(help: "Stored records to stream") var records: Int = 1_000_000
  @Option(help: "Seconds per load phase of (b) with --only-arm") var seconds: Double = 10
  @Option(help: "Pairs of alternating slices in (b), one slice with audit and one without") var slices: Int = 60
  @Option(help: "Seconds per slice of (b)") var sliceSeconds: Double = 1
  @Option(help: "The gateway's --audit-flush-linger-ms for this run (default: the gateway's own)") var auditFlushLingerMs: Int?
  @Option(help: "Concurrent calls in (b)") var concurrency: Int = 64
  @Option(help: "Rounds of (a), each a COPY then a stream; phases of (b) with --only-arm") var rounds: Int = 3
  @Option(help: "JSON results file") var out: String = "bench-results/audit.json"
  @Flag(help: "Only part (a)") var streamOnly = false
  @Flag(help: "In (a), decode every event with SwiftProtobuf instead of reading index and leaf bytes") var decodeEvents = false
  @Flag(help: "Only part (b)") var callsOnly = false
  @Option(help: "In (b), load only this arm ('with' or 'without' audit) for --rounds phases, to profile it; no ratio")
  var onlyArm: String?
  @Option(
    help: ArgumentHelp(
      "In (b), make the baseline ('without') arm the audited gateway with this flush linger, instead of the unaudited gateway",
      discussion: "Compares two lingers in one run; the host's drift between runs is larger than their difference."
    )
  )
  var baselineLingerMs: Int?

  func validate() throws {
    if let onlyArm, onlyArm != "with", onlyArm != "without" {
      throw ValidationError("--only-arm takes 'with' or 'without'")
    }
    guard slices >= 1, sliceSeconds > 0 else { throw ValidationError("--slices must be at least 1 and --slice-seconds above 0") }
  }

  func run() async throws {
    var setup = try BenchSetup(databaseURL: databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
    if let auditFlushLingerMs { setup.config.auditFlushLinger = .milliseconds(auditFlushLingerMs) }
    let full = try Gateway(config: setup.config, logger: benchLogger)
    var results = Results(cores: ProcessInfo.processInfo.activeProcessorCount, date: ISO8601DateFormatter().string(from: Date()))
    var table: [String] = []
    if !callsOnly {
      let stream = try await streamBench(setup, full)
      results.stream = stream
      table.append(String(
        format: "stream %d records: gateway %.0f rec/s, COPY %.0f rec/s, ratio %.2f (target >= 200000 rec/s and >= 0.50)",
        records, stream.gatewayRecordsPerSecond, stream.copyRecordsPerSecond, stream.ratio
      ))
    }
    if !streamOnly {
      let calls = try await callsBench(setup, try Gateway(config: setup.config, logger: benchLogger))
      results.calls = calls
      if let arm = calls.onlyArm {
        let (rate, p50, p99) =
          arm == "with"
          ? (calls.withAuditCallsPerSecond, calls.withAuditP50Ms, calls.withAuditP99Ms)
          : (calls.withoutAuditCallsPerSecond, calls.withoutAuditP50Ms, calls.withoutAuditP99Ms)
        table.append(String(
          format: "GetTenant x%d, only \(arm) audit: %.0f calls/s (p50 %.2f ms, p99 %.2f ms); a profiling run, no ratio",
          concurrency, rate, p50, p99
        ))
      } else {
        table.append(String(
          format: "GetTenant x%d: with audit %.0f calls/s (p50 %.2f ms, p99 %.2f ms), without %.0f calls/s (p50 %.2f ms, p99 %.2f ms), ratio %.2f, p99 added %.2f ms (target >= 0.85, <= 1 ms)",
          concurrency,
          calls.withAuditCallsPerSecond, calls.withAuditP50Ms, calls.withAuditP99Ms,
          calls.withoutAuditCallsPerSecond, calls.withoutAuditP50Ms, calls.withoutAuditP99Ms,
          calls.ratio, calls.p99AddedMs
        ))
        table.append(String(
          format: "  per round (median of %d pairs): ratio %.2f, p99 added %.2f ms",
          calls.roundRatios.count, calls.pairedRatio, calls.pairedP99AddedMs
        ))
        table.append(String(
          format: "  machine time per call: with audit %.0f µs, without %.0f µs; auditing adds %.1f µs (median of pairs %.1f µs)",
          calls.withAuditMachineMicrosPerCall, calls.withoutAuditMachineMicrosPerCall, calls.auditMachineMicrosPerCall,
          median(calls.roundAuditMachineMicrosPerCall)
        ))
        table.append(String(
          format: "  of which in this process (gateways and client): with audit %.0f µs, without %.0f µs; context switches per call %.2f / %.2f",
          calls.withAuditProcessMicrosPerCall, calls.withoutAuditProcessMicrosPerCall,
          calls.withAuditContextSwitchesPerCall, calls.withoutAuditContextSwitchesPerCall
        ))
      }
    }
    print("tollgate-bench audit on \(ProcessInfo.processInfo.activeProcessorCount) cores (server, client and PostgreSQL share them)")
    if let baselineLingerMs, !streamOnly {
      print("  (b)'s 'without audit' arm is the audited gateway with a \(baselineLingerMs) ms flush linger")
    }
    for line in table { print("  " + line) }
    try writeResults(results, to: out)
  }

  struct Results: Codable {
    var cores: Int
    var date: String
    var stream: StreamResult?
    var calls: CallsResult?
  }

  struct StreamResult: Codable {
    var records: Int
    var gatewayRecordsPerSecond: Double
    var copyRecordsPerSecond: Double
    var ratio: Double
    var gatewayRounds: [Double]
    var copyRounds: [Double]
  }

  struct CallsResult: Codable {
    var concurrency: Int
    var secondsPerPhase: Double
    var withAuditCallsPerSecond: Double
    var withAuditP50Ms: Double
    var withAuditP99Ms: Double
    var withoutAuditCallsPerSecond: Double
    var withoutAuditP50Ms: Double
    var withoutAuditP99Ms: Double
    var ratio: Double
    var p99AddedMs: Double
    /// Per round, with audit against the without phase beside it; the medians of those.
    var pairedRatio: Double = 0
    var pairedP99AddedMs: Double = 0
    var roundRatios: [Double] = []
    var roundP99AddedMs: [Double] = []
    /// Busy machine time per call (gateway, client and PostgreSQL together) of each arm's pooled
    /// slices, what auditing adds (their difference), and that difference pair by pair.
    var withAuditMachineMicrosPerCall: Double = 0
    var withoutAuditMachineMicrosPerCall: Double = 0
    var auditMachineMicrosPerCall: Double = 0
    var roundAuditMachineMicrosPerCall: [Double] = []
    /// The part of the machine time spent in this process (both gateways and the client).
    var withAuditProcessMicrosPerCall: Double = 0
    var withoutAuditProcessMicrosPerCall: Double = 0
    var withAuditContextSwitchesPerCall: Double = 0
    var withoutAuditContextSwitchesPerCall: Double = 0
    /// Set by `--only-arm`: only that arm was loaded, and the ratio fields mean nothing.
    var onlyArm: String? = nil
  }

  // MARK: (a) streaming

  static let streamTenant = try! TenantID(validating: "bench-stream")

  /// Appends realistic events until the log holds `records`.
  func seed(_ gateway: Gateway) async throws {
    let repository = AuditLogRepository(database: gateway.database)
    let log = AuditLogID.tenant(Self.streamTenant)
    var size = Int(try await repository.head(log, logger: benchLogger).size)
    if size >= records { return }
    FileHandle.standardError.write(Data("seeding \(records - size) audit records...\n".utf8))
    let start = ContinuousClock.now
    while size < records {
      let batch = (size..<min(records, size + 5_000)).map { i -> AuditEntry in
        var event = Tollgate_V1_AuditEvent()
        event.time = Google_Protobuf_Timestamp(date: Date())
        event.principal = .with {
          $0.spiffeID = "spiffe://bench.tollgate.local/tenant/bench-stream/partner/p\(i % 50)"
          $0.role = .partner
          $0.tenantID = "bench-stream"
          $0.name = "p\(i % 50)"
          $0.certificateSha256 = String(repeating: "ab", count: 32)
        }
        event.tenantID = "bench-stream"
        event.method = "/tollgate.v1.TenantService/GetTenant"
        event.resource = "tenants/bench-stream"
        event.latency = .init(seconds: 0, nanos: Int32(100_000 + i % 1000))
        event.requestSha256 = Data(repeating: UInt8(i % 251), count: 32)
        let bytes: [UInt8] = try! event.serializedBytes()
        return AuditEntry(
          log: log,
          leaf: ByteBuffer(bytes: bytes),
          time: Date(),
          method: event.method,
          principal: event.principal.spiffeID,
          outcome: 0
        )
      }
      try await repository.append(batch, logger: benchLogger)
      size += batch.count
    }
    try await gateway.database.withPlatform(logger: benchLogger) { connection in
      try await connection.query("ANALYZE audit_leaves", logger: benchLogger)
      try await connection.query("ANALYZE audit_nodes", logger: benchLogger)
    }
    FileHandle.standardError.write(Data("seeded in \(ContinuousClock.now - start)\n".utf8))
  }

  func streamBench(_ setup: BenchSetup, _ gateway: Gateway) async throws -> StreamResult {
    try await withRunningGateway(gateway) { port in
      try await seed(gateway)
      let connection = try setup.connection(port: port, setup.operator)
      var metadata: Metadata = [:]
      metadata.addString(Self.streamTenant.rawValue, forKey: CallScope.tenantMetadataKey)
      var gatewayRates: [Double] = []
      var copyRates: [Double] = []
      for round in 1...rounds {
        let copy = try copyBaseline()
        copyRates.append(Double(records) / copy)
        let received = Mutex(0)
        let start = ContinuousClock.now
        try await connection.withClient { client in
          var options = CallOptions.defaults
          options.timeout = nil
          if !decodeEvents {
            // What an exporter or verifier does: index and exact leaf bytes per record.
            try await AuditReader(client: client, metadata: metadata).leaves(.init(), options: options) { batch in
              let count = received.withLock { $0 += batch.count; return $0 }
              return count < records
            }
            return
          }
          try await AuditReader(client: client, metadata: metadata).records(.init(), options: options) { record in
            let count = received.withLock { $0 += 1; return $0 }
            return count < records && record.index + 1 < UInt64(records)
          }
        }
        let elapsed = elapsedSeconds(ContinuousClock.now - start)
        gatewayRates.append(Double(received.withLock { $0 }) / elapsed)
        FileHandle.standardError.write(Data(String(
          format: "round %d: COPY %.2f s, StreamEvents %.2f s (%d records)\n", round, copy, elapsed, received.withLock { $0 }
        ).utf8))
      }
      let gatewayRate = median(gatewayRates)
      let copyRate = median(copyRates)
      return StreamResult(
        records: records,
        gatewayRecordsPerSecond: gatewayRate,
        copyRecordsPerSecond: copyRate,
        ratio: gatewayRate / copyRate,
        gatewayRounds: gatewayRates,
        copyRounds: copyRates
      )
    }
  }

  /// Seconds for psql to COPY the same leaves (binary format) to /dev/null.
  func copyBaseline() throws -> Double {
    let sql = """
      COPY (SELECT leaf_index, leaf FROM audit_leaves WHERE tenant_id = '\(Self.streamTenant)' AND leaf_index < \(records) \
      ORDER BY leaf_index) TO STDOUT WITH (FORMAT binary)
      """
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", "\(psql) -X -q -v ON_ERROR_STOP=1 -c \"\(sql)\" > /dev/null"]
    let start = ContinuousClock.now
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw ValidationError("psql COPY failed (exit \(process.terminationStatus))") }
    return elapsedSeconds(ContinuousClock.now - start)
  }

  // MARK: (b) cost of auditing

  static let callsTenant = try! TenantID(validating: "bench-calls")

  func load(_ connection: GatewayConnection) async throws -> CallLoad {
    try await getTenantLoad(connection, seconds: seconds, concurrency: concurrency)
  }

  func callsBench(_ setup: BenchSetup, _ full: Gateway) async throws -> CallsResult {
    var bareConfig = setup.config
    if let baselineLingerMs { bareConfig.auditFlushLinger = .milliseconds(baselineLingerMs) }
    let bare = try Gateway(config: bareConfig, logger: benchLogger, withoutAudit: baselineLingerMs == nil)
    return try await withRunningGateway(full) { fullPort in
      try await withRunningGateway(bare) { barePort in
        let op = try setup.connection(port: fullPort, setup.operator)
        try await op.withClient { client in try await createBenchTenant(Self.callsTenant, through: client) }
        if let onlyArm {
          // Profiling aid: one arm only, so a profiler sees nothing of the other.
          let port = onlyArm == "with" ? fullPort : barePort
          var loads: [CallLoad] = []
          for round in 1...rounds {
            FileHandle.standardError.write(Data("round \(round): \(onlyArm) audit starts\n".utf8))
            let l = try await load(try setup.connection(port: port, setup.partner(Self.callsTenant)))
            FileHandle.standardError.write(Data(
              "round \(round): \(onlyArm) audit \(Int(l.callsPerSecond)) calls/s p50 \(l.p50) ms p99 \(l.p99) ms \(Int(l.machineMicrosPerCall)) µs/call\n".utf8))
            loads.append(l)
          }
          let rate = median(loads.map(\.callsPerSecond))
          let p50 = median(loads.map(\.p50))
          let p99 = median(loads.map(\.p99))
          return CallsResult(
            concurrency: concurrency, secondsPerPhase: seconds,
            withAuditCallsPerSecond: onlyArm == "with" ? rate : 0, withAuditP50Ms: onlyArm == "with" ? p50 : 0,
            withAuditP99Ms: onlyArm == "with" ? p99 : 0,
            withoutAuditCallsPerSecond: onlyArm == "without" ? rate : 0, withoutAuditP50Ms: onlyArm == "without" ? p50 : 0,
            withoutAuditP99Ms: onlyArm == "without" ? p99 : 0,
            ratio: 0, p99AddedMs: 0, onlyArm: onlyArm
          )
        }
        // Short slices, alternating ABBA over one connection per arm kept open throughout: the
        // host's speed drifts by tens of percent within a minute, by more than auditing costs, so
        // both arms must sample the same moments. Phases of several seconds each did not.
        let (without, with) = try await interleavedGetTenantLoad(
          without: try setup.connection(port: barePort, setup.partner(Self.callsTenant)),
          with: try setup.connection(port: fullPort, setup.partner(Self.callsTenant)),
          pairs: slices,
          sliceSeconds: sliceSeconds,
          concurrency: concurrency,
          settle: { [buffer = full.auditBuffer] in await buffer.allCommitted() },
          // Idle unless the baseline audits too (--baseline-linger-ms).
          bareSettle: { [buffer = bare.auditBuffer] in await buffer.allCommitted() }
        )
        let withAll = CallSlice(pooling: with)
        let withoutAll = CallSlice(pooling: without)
        let withRate = withAll.callsPerSecond
        let withoutRate = withoutAll.callsPerSecond
        let withP99 = withAll.percentile(0.99)
        let withoutP99 = withoutAll.percentile(0.99)
        // Each pair of neighbouring slices compared on its own too.
        let roundRatios = zip(with, without).map { $0.callsPerSecond / $1.callsPerSecond }
        let roundAdded = zip(with, without).map { $0.percentile(0.99) - $1.percentile(0.99) }
        let roundCost = zip(with, without).map { $0.machineMicrosPerCall - $1.machineMicrosPerCall }
        return CallsResult(
          concurrency: concurrency,
          secondsPerPhase: sliceSeconds,
          withAuditCallsPerSecond: withRate,
          withAuditP50Ms: withAll.percentile(0.5),
          withAuditP99Ms: withP99,
          withoutAuditCallsPerSecond: withoutRate,
          withoutAuditP50Ms: withoutAll.percentile(0.5),
          withoutAuditP99Ms: withoutP99,
          ratio: withRate / withoutRate,
          p99AddedMs: withP99 - withoutP99,
          pairedRatio: median(roundRatios),
          pairedP99AddedMs: median(roundAdded),
          roundRatios: roundRatios,
          roundP99AddedMs: roundAdded,
          withAuditMachineMicrosPerCall: withAll.machineMicrosPerCall,
          withoutAuditMachineMicrosPerCall: withoutAll.machineMicrosPerCall,
          auditMachineMicrosPerCall: withAll.machineMicrosPerCall - withoutAll.machineMicrosPerCall,
          roundAuditMachineMicrosPerCall: roundCost,
          withAuditProcessMicrosPerCall: withAll.processMicrosPerCall,
          withoutAuditProcessMicrosPerCall: withoutAll.processMicrosPerCall,
          withAuditContextSwitchesPerCall: withAll.contextSwitchesPerCall,
          withoutAuditContextSwitchesPerCall: withoutAll.contextSwitchesPerCall
        )
      }
    }
  }
}

/// Creates `tenant` if it does not exist and sets its quota: `quota` laid over limits no
/// benchmark reaches, so a throughput benchmark measures the gateway, not its tenant's quota.
func createBenchTenant(
  _ tenant: TenantID,
  through client: GRPCClient<HTTP2ClientTransport.Posix>,
  quota: (inout Tollgate_V1_Quota) -> Void = { _ in }
) async throws {
  let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
  _ = try? await tenants.createTenant(.with { $0.tenantID = tenant.rawValue })
  _ = try await tenants.updateQuota(
    .with {
      $0.tenantID = tenant.rawValue
      $0.quota.rateLimits = [Tollgate_V1_QuotaClass.ingest, .query, .admin, .workflow, .audit].map { quotaClass in
        .with {
          $0.quotaClass = quotaClass
          $0.ratePerSecond = 1_000_000
          $0.burst = 10_000_000
        }
      }
      $0.quota.maxConcurrentCalls = 100_000
      quota(&$0.quota)
    }
  )
}

/// Measures `without` and `with` once per round, alternating, and swaps which goes first every
/// round (without, with; with, without; ...): the phase that opens a run meets a quiet machine, and
/// a phase that follows another meets its leftovers (audit flushes, autovacuum), so a fixed order
/// favoured one side. `each` gets every round's pair in round order.
func alternating<Load>(
  rounds: Int,
  without: () async throws -> Load,
  with: () async throws -> Load,
  each: (Int, Load, Load) -> Void
) async throws {
  for round in 1...rounds {
    if round % 2 == 1 {
      let b = try await without()
      each(round, b, try await with())
    } else {
      let f = try await with()
      each(round, try await without(), f)
    }
  }
}

/// Closed-loop unary load: `concurrency` callers each send GetTenant back to back for `seconds`,
/// after 200 warm-up calls; calls per second and latency percentiles (ms).
struct CallLoad {
  var callsPerSecond: Double
  var p50: Double
  var p99: Double
  /// Busy CPU time of the whole machine (gateway, client and PostgreSQL) per call, in µs.
  var machineMicrosPerCall: Double = 0
}

/// One slice of closed-loop load: every call's latency (ms, sorted), its length and the CPU time
/// spent during it.
struct CallSlice {
  var latencies: [Double]
  var seconds: Double
  var cpu: CPUTime

  var callsPerSecond: Double { Double(latencies.count) / seconds }
  var machineMicrosPerCall: Double { perCall(cpu.machineSeconds * 1_000_000) }
  /// The part of the machine time that is this process's (gateways and client); the rest is
  /// PostgreSQL's and the kernel's work for others.
  var processMicrosPerCall: Double { perCall(cpu.processSeconds * 1_000_000) }
  var contextSwitchesPerCall: Double { perCall(cpu.contextSwitches) }
  func percentile(_ p: Double) -> Double { latencies.isEmpty ? 0 : tollgate_bench.percentile(latencies, p) }

  func perCall(_ total: Double) -> Double { total / Double(max(latencies.count, 1)) }
}

extension CallSlice {
  /// All of `slices` as one: their calls over their summed time.
  init(pooling slices: [CallSlice]) {
    self.init(
      latencies: slices.flatMap(\.latencies).sorted(),
      seconds: slices.map(\.seconds).reduce(0, +),
      cpu: slices.map(\.cpu).reduce(CPUTime(), +)
    )
  }
}

/// Closed-loop GetTenant load on two gateways in alternating slices of `sliceSeconds`: `pairs`
/// pairs in ABBA order (without, with, with, without, …), so a drift of the machine's speed
/// weighs on both arms alike. Each arm keeps one connection open throughout; between slices the
/// callers stop, so no slice has calls of the other arm in flight. After each slice of the
/// audited arm, `settle` waits until that slice's queued events are committed, so its flush work
/// is counted in its own busy time and does not run into the next slice; `bareSettle` does the
/// same after the baseline arm's slices, for a baseline that audits too. Returns the slices of
/// each arm, pair by pair.
func interleavedGetTenantLoad(
  without: GatewayConnection,
  with: GatewayConnection,
  pairs: Int,
  sliceSeconds: Double,
  concurrency: Int,
  settle: @escaping () async throws -> Void,
  bareSettle: @escaping () async throws -> Void = {}
) async throws -> (without: [CallSlice], with: [CallSlice]) {
  try await without.withClient { bareClient in
    try await with.withClient { fullClient in
      let bare = Tollgate_V1_TenantService.Client(wrapping: bareClient)
      let full = Tollgate_V1_TenantService.Client(wrapping: fullClient)
      // Warm both connections and pools.
      for _ in 0..<200 {
        _ = try await bare.getTenant(.init())
        _ = try await full.getTenant(.init())
      }
      var withSlices: [CallSlice] = []
      var withoutSlices: [CallSlice] = []
      for pair in 0..<pairs {
        let order = pair % 2 == 0 ? [false, true] : [true, false]
        for audited in order {
          let slice = try await getTenantSlice(
            audited ? full : bare, seconds: sliceSeconds, concurrency: concurrency, settle: audited ? settle : bareSettle)
          if audited { withSlices.append(slice) } else { withoutSlices.append(slice) }
        }
        let (b, f) = (withoutSlices[pair], withSlices[pair])
        FileHandle.standardError.write(Data(String(
          format: "pair %d: without audit %.0f calls/s p99 %.2f ms %.0f µs/call; with audit %.0f calls/s p99 %.2f ms %.0f µs/call\n",
          pair + 1, b.callsPerSecond, b.percentile(0.99), b.machineMicrosPerCall,
          f.callsPerSecond, f.percentile(0.99), f.machineMicrosPerCall
        ).utf8))
        FileHandle.standardError.write(Data(String(
          format: "        process µs/call %.0f / %.0f, others %.0f / %.0f, switches/call %.2f / %.2f\n",
          b.processMicrosPerCall, f.processMicrosPerCall,
          b.machineMicrosPerCall - b.processMicrosPerCall, f.machineMicrosPerCall - f.processMicrosPerCall,
          b.contextSwitchesPerCall, f.contextSwitchesPerCall
        ).utf8))
      }
      return (withoutSlices, withSlices)
    }
  }
}

/// `concurrency` callers sending GetTenant back to back for `seconds`; the busy time is read
/// once `settle` returns after them.
func getTenantSlice(
  _ tenants: Tollgate_V1_TenantService.Client<HTTP2ClientTransport.Posix>,
  seconds: Double,
  concurrency: Int,
  settle: () async throws -> Void
) async throws -> CallSlice {
  let before = CPUTime.now()
  let start = ContinuousClock.now
  let deadline = start + .milliseconds(Int(seconds * 1000))
  let latencies = try await withThrowingTaskGroup(of: [Double].self) { group in
    for _ in 0..<concurrency {
      group.addTask {
        var mine: [Double] = []
        mine.reserveCapacity(Int(seconds * 2_000))
        while ContinuousClock.now < deadline {
          let t0 = ContinuousClock.now
          _ = try await tenants.getTenant(.init())
          mine.append(elapsedSeconds(ContinuousClock.now - t0) * 1000)
        }
        return mine
      }
    }
    var all: [Double] = []
    for try await part in group { all += part }
    return all.sorted()
  }
  let elapsed = elapsedSeconds(ContinuousClock.now - start)
  try await settle()
  return CallSlice(latencies: latencies, seconds: elapsed, cpu: CPUTime.now() - before)
}

/// CPU counters: the machine's busy time from `/proc/stat` (user, nice, system, irq and softirq of
/// every core), this process's user and system time, and the machine's context switches. Read at
/// two moments, their difference is what a phase cost; what a phase costs in CPU is steadier than
/// its latencies on a shared host, whose speed drifts from phase to phase.
struct CPUTime {
  var machineSeconds: Double = 0
  var processSeconds: Double = 0
  var contextSwitches: Double = 0

  /// The counters now; the machine's are 0 where `/proc/stat` cannot be read.
  static func now() -> CPUTime {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    var reading = CPUTime(
      processSeconds: Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
        + Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
    )
    guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return reading }
    // Only the first line (all CPUs) and `ctxt` are parsed. Splitting every line into fields
    // cost about 110 µs a reading, mostly on the `intr` line's thousands of counters (now about
    // 25 µs, most of it the kernel writing the file), and a reading taken around a flush of a few
    // events counted part of that as the flush's.
    for line in text.utf8.split(separator: UInt8(ascii: "\n")) {
      if line.starts(with: "cpu ".utf8) {
        let ticks = line.split(separator: UInt8(ascii: " ")).dropFirst().compactMap { Double(Substring($0)) }
        // user nice system idle iowait irq softirq …; guest time is counted in user already.
        if ticks.count >= 7 {
          reading.machineSeconds = (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / Double(sysconf(Int32(_SC_CLK_TCK)))
        }
      } else if line.starts(with: "ctxt ".utf8) {
        reading.contextSwitches = Double(Substring(line.dropFirst(5))) ?? 0
      }
    }
    return reading
  }

  static func + (a: CPUTime, b: CPUTime) -> CPUTime {
    CPUTime(
      machineSeconds: a.machineSeconds + b.machineSeconds,
      processSeconds: a.processSeconds + b.processSeconds,
      contextSwitches: a.contextSwitches + b.contextSwitches
    )
  }

  static func - (a: CPUTime, b: CPUTime) -> CPUTime {
    CPUTime(
      machineSeconds: a.machineSeconds - b.machineSeconds,
      processSeconds: a.processSeconds - b.processSeconds,
      contextSwitches: a.contextSwitches - b.contextSwitches
    )
  }
}

func getTenantLoad(_ connection: GatewayConnection, seconds: Double, concurrency: Int) async throws -> CallLoad {
  try await connection.withClient { client in
    let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
    // Warm the connection and the pool.
    for _ in 0..<200 { _ = try await tenants.getTenant(.init()) }
    let slice = try await getTenantSlice(tenants, seconds: seconds, concurrency: concurrency, settle: {})
    return CallLoad(
      callsPerSecond: slice.callsPerSecond,
      p50: slice.percentile(0.5),
      p99: slice.percentile(0.99),
      machineMicrosPerCall: slice.machineMicrosPerCall
    )
  }
}
