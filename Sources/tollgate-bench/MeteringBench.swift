import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import PostgresNIO
import Synchronization
import SwiftProtobuf
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

/// Writes `results` as JSON to `path` (creating its folder) and says so.
func writeResults(_ results: some Encodable, to path: String) throws {
  try FileManager.default.createDirectory(at: URL(fileURLWithPath: path).deletingLastPathComponent(), withIntermediateDirectories: true)
  let encoder = JSONEncoder()
  encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
  encoder.keyEncodingStrategy = .convertToSnakeCase
  try encoder.encode(results).write(to: URL(fileURLWithPath: path))
  print("results written to \(path)")
}

/// The two ways into the bench database: as the gateway (owner, under row-level security) and as
/// a superuser for seeding and plain-SQL baselines.
struct BenchDatabaseOptions: ParsableArguments {
  @Option(help: "URL the gateway connects with (the database owner, not a superuser)") var databaseURL: String
  @Option(help: "Superuser URL for seeding and the plain-SQL baseline") var adminDatabaseURL: String
}

/// A superuser connection pool for baselines and seeding: plain SQL, no gateway, no RLS.
func withAdminClient<T: Sendable>(_ url: String, connections: Int, _ body: (PostgresClient) async throws -> T) async throws -> T {
  let parsed = try DatabaseURL(parsing: url)
  var config = PostgresClient.Configuration(
    host: parsed.host,
    port: parsed.port,
    username: parsed.username,
    password: parsed.password,
    database: parsed.database,
    tls: .disable
  )
  config.options.maximumConnections = connections
  let client = PostgresClient(configuration: config, backgroundLogger: benchLogger)
  return try await withThrowingTaskGroup(of: Void.self) { group in
    group.addTask { await client.run() }
    defer { group.cancelAll() }
    return try await body(client)
  }
}

/// The events both sides of the ingest benchmark send: the same shapes and sizes, made on the fly
/// in the same process, so generating them costs both sides alike.
struct EventGenerator {
  let prefix: String
  var next = 0
  let now = Date()

  mutating func batch(_ size: Int) -> [Tollgate_V1_UsageEvent] {
    (0..<size).map { _ in
      defer { next += 1 }
      let n = next
      return .with {
        $0.id = "\(prefix)-\(n)"
        $0.source = prefix
        $0.meter = "api_calls"
        $0.subject = "cust-\(n % 1000)"
        $0.time = Google_Protobuf_Timestamp(date: now.addingTimeInterval(-Double(n % 3_600)))
        $0.value = Double(n % 100)
        $0.properties = ["region": "eu-\(n % 4)", "plan": n % 3 == 0 ? "pro" : "free"]
      }
    }
  }
}

struct IngestBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "ingest",
    abstract: "IngestStream over mTLS (N connections, batches of 500) vs a raw PostgreSQL unnest insert of the same events."
  )
  @OptionGroup var database: BenchDatabaseOptions
  @Option(help: "Concurrent connections (streams) on each side") var connections: Int = 8
  @Option(help: "Events per batch") var batchSize: Int = 500
  @Option(help: "Seconds per phase") var seconds: Double = 30
  @Option(help: "Batches a stream may have awaiting their ack") var window: Int = 3
  @Option(help: "Alternating rounds of each phase") var rounds: Int = 1
  @Option(help: "JSON results file") var out: String = "bench-results/ingest.json"

  static let tenant = try! TenantID(validating: "bench-ingest")

  struct Phase: Codable {
    var events: Int
    var eventsPerSecond: Double
    var batches: Int
    var p50Ms: Double
    var p99Ms: Double
  }

  struct Results: Codable {
    var cores: Int
    var date: String
    var connections: Int
    var batchSize: Int
    var secondsPerPhase: Double
    var gateway: [Phase]
    var raw: [Phase]
    var ratio: Double
  }

  func run() async throws {
    let setup = try BenchSetup(databaseURL: database.databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
    var config = setup.config
    config.databaseMaxConnections = max(20, connections + 4)
    config.ingestMaxBatch = max(1_000, batchSize)
    let gateway = try Gateway(config: config, logger: benchLogger)
    let (gatewayPhases, rawPhases) = try await withRunningGateway(gateway) { port in
      try await prepare(setup, port: port)
      return try await withAdminClient(database.adminDatabaseURL, connections: connections + 1) { admin in
        var g: [Phase] = [], r: [Phase] = []
        for round in 1...rounds {
          // Alternate, each from an empty table, so neither side inherits the other's bigger indexes.
          try await truncate(admin)
          r.append(try await rawPhase(admin))
          try await truncate(admin)
          g.append(try await gatewayPhase(setup, port: port, admin: admin))
          FileHandle.standardError.write(Data(String(
            format: "round %d: raw %.0f events/s (p99 %.1f ms), gateway %.0f events/s (ack p99 %.1f ms)\n",
            round, r.last!.eventsPerSecond, r.last!.p99Ms, g.last!.eventsPerSecond, g.last!.p99Ms
          ).utf8))
        }
        return (g, r)
      }
    }
    let gatewayRate = median(gatewayPhases.map(\.eventsPerSecond))
    let rawRate = median(rawPhases.map(\.eventsPerSecond))
    let results = Results(
      cores: ProcessInfo.processInfo.activeProcessorCount,
      date: ISO8601DateFormatter().string(from: Date()),
      connections: connections,
      batchSize: batchSize,
      secondsPerPhase: seconds,
      gateway: gatewayPhases,
      raw: rawPhases,
      ratio: gatewayRate / rawRate
    )
    print("tollgate-bench ingest on \(results.cores) cores (server, client and PostgreSQL share them)")
    print(String(
      format: "  gateway IngestStream x%d, batches of %d: %.0f events/s committed, ack p50 %.1f ms, p99 %.1f ms",
      connections, batchSize, gatewayRate, median(gatewayPhases.map(\.p50Ms)), median(gatewayPhases.map(\.p99Ms))
    ))
    print(String(
      format: "  raw SQL unnest insert x%d, same events: %.0f events/s, statement p50 %.1f ms, p99 %.1f ms",
      connections, rawRate, median(rawPhases.map(\.p50Ms)), median(rawPhases.map(\.p99Ms))
    ))
    print(String(format: "  ratio %.2f (target >= 50000 events/s and >= 0.60)", results.ratio))
    try writeResults(results, to: out)
  }

  func prepare(_ setup: BenchSetup, port: Int) async throws {
    try await setup.connection(port: port, setup.operator).withClient { client in
      var metadata: Metadata = [:]
      metadata.addString(Self.tenant.rawValue, forKey: CallScope.tenantMetadataKey)
      try await createBenchTenant(Self.tenant, through: client)
      _ = try await Tollgate_V1_MeteringService.Client(wrapping: client).defineMeter(
        .with {
          $0.meter.name = "api_calls"
          $0.meter.aggregation = .sum
          $0.meter.groupBy = ["region", "plan"]
        },
        metadata: metadata
      )
    }
  }

  func truncate(_ admin: PostgresClient) async throws {
    try await admin.query("TRUNCATE usage_events, usage_monthly", logger: benchLogger)
    try await admin.query("CHECKPOINT", logger: benchLogger)
  }

  func gatewayPhase(_ setup: BenchSetup, port: Int, admin: PostgresClient) async throws -> Phase {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    let agent = CertificateAuthority.Subject.principal(
      SPIFFEID(tenant: Self.tenant, role: .agent, name: "bench", trustDomain: setup.ca.trustDomain)
    )
    let agents = try (0..<connections).map { _ in try setup.connection(port: port, agent) }
    let phase = try await measure { c in
      try await agents[c].withClient { client in
        try await stream(Tollgate_V1_MeteringService.Client(wrapping: client), connection: c, until: deadline)
      }
    }
    let stored = try await adminCount(admin, "SELECT count(*)::bigint FROM usage_events")
    guard stored == phase.events else {
      throw ValidationError("acks counted \(phase.events) accepted events but the table holds \(stored)")
    }
    return phase
  }

  /// Runs `work` for every connection at once; each returns its events and per-batch latencies
  /// (ms). Events per second are over the wall time of the whole phase.
  func measure(_ work: @escaping @Sendable (Int) async throws -> (Int, [Double])) async throws -> Phase {
    let start = ContinuousClock.now
    var events = 0
    var latencies: [Double] = []
    try await withThrowingTaskGroup(of: (Int, [Double]).self) { group in
      for c in 0..<connections { group.addTask { try await work(c) } }
      for try await (n, part) in group {
        events += n
        latencies += part
      }
    }
    let elapsed = elapsedSeconds(ContinuousClock.now - start)
    latencies.sort()
    return Phase(
      events: events,
      eventsPerSecond: Double(events) / elapsed,
      batches: latencies.count,
      p50Ms: percentile(latencies, 0.5),
      p99Ms: percentile(latencies, 0.99)
    )
  }

  /// One agent: batches written while fewer than `window` await their ack; returns the events
  /// accepted and each batch's write-to-ack time.
  func stream(
    _ metering: Tollgate_V1_MeteringService.Client<HTTP2ClientTransport.Posix>,
    connection: Int,
    until deadline: ContinuousClock.Instant
  ) async throws -> (Int, [Double]) {
    let (credits, creditor) = AsyncStream.makeStream(of: Void.self)
    for _ in 0..<window { creditor.yield() }
    let sent = Mutex<[UInt64: ContinuousClock.Instant]>([:])
    let batchSize = batchSize
    var options = CallOptions.defaults
    options.timeout = nil
    return try await metering.ingestStream(
      options: options,
      requestProducer: { writer in
        var generator = EventGenerator(prefix: "gw-\(connection)")
        var sequence: UInt64 = 0
        for await _ in credits {
          if ContinuousClock.now >= deadline { break }
          sequence += 1
          let request = Tollgate_V1_IngestRequest.with {
            $0.sequence = sequence
            $0.events = generator.batch(batchSize)
          }
          let now = ContinuousClock.now
          sent.withLock { $0[request.sequence] = now }
          try await writer.write(request)
        }
      },
      onResponse: { response in
        var accepted = 0
        var latencies: [Double] = []
        for try await ack in response.messages {
          let now = ContinuousClock.now
          if let t0 = sent.withLock({ $0.removeValue(forKey: ack.sequence) }) {
            latencies.append(elapsedSeconds(now - t0) * 1000)
          }
          guard ack.rejected == 0 else { throw ValidationError("the gateway rejected \(ack.rejected) bench events: \(ack.rejections.first?.message ?? "")") }
          accepted += Int(ack.accepted)
          creditor.yield()
        }
        creditor.finish()
        return (accepted, latencies)
      }
    )
  }

  func rawPhase(_ admin: PostgresClient) async throws -> Phase {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    let tenant = Self.tenant.rawValue
    let batchSize = batchSize
    return try await measure { c in
      var generator = EventGenerator(prefix: "raw-\(c)")
      var inserted = 0
      var latencies: [Double] = []
      while ContinuousClock.now < deadline {
        let t0 = ContinuousClock.now
        // The same work from the wire form: take the protobuf events apart into columns.
        let events = generator.batch(batchSize)
        var sources: [String] = [], ids: [String] = [], meters: [String] = [], subjects: [String] = []
        var times: [Date] = [], values: [Double] = [], properties: [String] = []
        for event in events {
          sources.append(event.source)
          ids.append(event.id)
          meters.append(event.meter)
          subjects.append(event.subject)
          times.append(event.time.date)
          values.append(event.value)
          properties.append("{\"plan\":\"\(event.properties["plan"]!)\",\"region\":\"\(event.properties["region"]!)\"}")
        }
        let rows = try await admin.query(
          """
          WITH ins AS (
            INSERT INTO usage_events (tenant_id, source, event_id, meter, subject, event_time, value, properties)
            SELECT \(tenant), u.s, u.i, u.m, u.sub, u.t, u.v, u.p::jsonb
            FROM unnest(\(sources)::text[], \(ids)::text[], \(meters)::text[], \(subjects)::text[],
                        \(times)::timestamptz[], \(values)::float8[], \(properties)::text[]) AS u(s, i, m, sub, t, v, p)
            ON CONFLICT DO NOTHING
            RETURNING 1
          )
          SELECT count(*)::bigint FROM ins
          """,
          logger: benchLogger
        )
        for try await n in rows.decode(Int64.self) { inserted += Int(n) }
        latencies.append(elapsedSeconds(ContinuousClock.now - t0) * 1000)
      }
      return (inserted, latencies)
    }
  }

}

/// The single count `sql` returns, read as the superuser.
func adminCount(_ admin: PostgresClient, _ sql: String) async throws -> Int {
  for try await n in try await admin.query(PostgresQuery(unsafeSQL: sql), logger: benchLogger).decode(Int64.self) {
    return Int(n)
  }
  return 0
}
