import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import PostgresNIO
import SwiftProtobuf
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

struct QueryBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "query",
    abstract: "QueryUsage over 10M stored events (30 days, 1000 subjects): all subjects by hour, and one subject by day, vs the same aggregation in plain SQL."
  )
  @OptionGroup var database: BenchDatabaseOptions
  @Option(help: "Events to store") var events: Int = 10_000_000
  @Option(help: "Subjects the events are spread over") var subjects: Int = 1_000
  @Option(help: "Days the events cover") var days: Int = 30
  @Option(help: "Timed calls per query shape") var iterations: Int = 200
  @Option(help: "JSON results file") var out: String = "bench-results/query.json"

  static let tenant = try! TenantID(validating: "bench-query")
  /// A fixed range, so a kept cluster's seeded data matches the next run's queries.
  static let rangeStart = Date(timeIntervalSince1970: 1_767_225_600)  // 2026-01-01T00:00:00Z

  struct Shape: Codable {
    var name: String
    var calls: Int
    var rowsPerCall: Double
    var gatewayP50Ms: Double
    var gatewayP99Ms: Double
    var sqlP50Ms: Double
    var sqlP99Ms: Double
    var targetP99Ms: Double?

    /// Percentiles of both sides' latencies (ms, any order).
    init(name: String, gateway: [Double], sql: [Double], rows: Int, target: Double?) {
      let gateway = gateway.sorted()
      let sql = sql.sorted()
      self.name = name
      calls = gateway.count
      rowsPerCall = Double(rows) / Double(max(1, gateway.count))
      gatewayP50Ms = percentile(gateway, 0.5)
      gatewayP99Ms = percentile(gateway, 0.99)
      sqlP50Ms = percentile(sql, 0.5)
      sqlP99Ms = percentile(sql, 0.99)
      targetP99Ms = target
    }
  }

  struct Results: Codable {
    var cores: Int
    var date: String
    var events: Int
    var subjects: Int
    var days: Int
    var shapes: [Shape]
  }

  func run() async throws {
    let setup = try BenchSetup(databaseURL: database.databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
    var config = setup.config
    // Seeded events are months old; the late-arrival window only governs ingestion.
    config.usageLateArrival = .seconds(3_600)
    let gateway = try Gateway(config: config, logger: benchLogger)
    let shapes = try await withRunningGateway(gateway) { port in
      try await withAdminClient(database.adminDatabaseURL, connections: 2) { admin in
        try await prepare(setup, port: port)
        try await seed(admin)
        let partner = try setup.connection(port: port, setup.partner(Self.tenant))
        return try await partner.withClient { client in
          let metering = Tollgate_V1_MeteringService.Client(wrapping: client)
          return [
            try await hourlyBySubject(metering, admin, pageSize: 1_000, target: 200),
            try await hourlyBySubject(metering, admin, pageSize: 10_000, target: nil),
            try await dailyForOneSubject(metering, admin),
          ]
        }
      }
    }
    let results = Results(
      cores: ProcessInfo.processInfo.activeProcessorCount,
      date: ISO8601DateFormatter().string(from: Date()),
      events: events,
      subjects: subjects,
      days: days,
      shapes: shapes
    )
    print("tollgate-bench query on \(results.cores) cores, \(events) events over \(days) days, \(subjects) subjects")
    for shape in shapes {
      print(String(
        format: "  %@: %d calls, %.0f rows each: gateway p50 %.1f ms, p99 %.1f ms; SQL p50 %.1f ms, p99 %.1f ms; ratio (p99) %.2f%@",
        shape.name, shape.calls, shape.rowsPerCall, shape.gatewayP50Ms, shape.gatewayP99Ms, shape.sqlP50Ms, shape.sqlP99Ms,
        shape.gatewayP99Ms / max(shape.sqlP99Ms, 0.001),
        shape.targetP99Ms.map { String(format: " (target p99 <= %.0f ms)", $0) } ?? ""
      ))
    }
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
          $0.meter.groupBy = ["region"]
        },
        metadata: metadata
      )
    }
  }

  /// Stores `events` events evenly over the range, in time order as agents would send them,
  /// unless a kept cluster already holds them.
  func seed(_ admin: PostgresClient) async throws {
    let tenant = Self.tenant.rawValue
    var stored = 0
    for try await n in try await admin.query(
      "SELECT count(*)::bigint FROM usage_events WHERE tenant_id = \(tenant)",
      logger: benchLogger
    ).decode(Int64.self) {
      stored = Int(n)
    }
    if stored == events { return }
    FileHandle.standardError.write(Data("seeding \(events) usage events...\n".utf8))
    let start = ContinuousClock.now
    try await admin.query("DELETE FROM usage_events WHERE tenant_id = \(tenant)", logger: benchLogger)
    let step = Double(days) * 86_400 / Double(events)
    let chunk = 1_000_000
    for from in stride(from: 0, to: events, by: chunk) {
      let to = min(events, from + chunk) - 1
      try await admin.query(
        """
        INSERT INTO usage_events (tenant_id, source, event_id, meter, subject, event_time, value, properties)
        SELECT \(tenant), 'seed', g::text, 'api_calls', 'cust-' || lpad((g % \(subjects))::text, 4, '0'),
               \(Self.rangeStart)::timestamptz + make_interval(secs => g * \(step)::float8),
               (g % 100)::float8, jsonb_build_object('region', 'r' || (g % 4))
        FROM generate_series(\(from), \(to)) AS g
        """,
        logger: benchLogger
      )
      FileHandle.standardError.write(Data("  \(to + 1) events\n".utf8))
    }
    try await admin.query("VACUUM ANALYZE usage_events", logger: benchLogger)
    FileHandle.standardError.write(Data("seeded in \(ContinuousClock.now - start)\n".utf8))
  }

  var rangeEnd: Date { Self.rangeStart.addingTimeInterval(Double(days) * 86_400) }

  /// The 30-day all-subjects hourly query, page after page (each page is one call).
  func hourlyBySubject(
    _ metering: Tollgate_V1_MeteringService.Client<HTTP2ClientTransport.Posix>,
    _ admin: PostgresClient,
    pageSize: Int,
    target: Double?
  ) async throws -> Shape {
    var request = Tollgate_V1_QueryUsageRequest.with {
      $0.meter = "api_calls"
      $0.range.startTime = Google_Protobuf_Timestamp(date: Self.rangeStart)
      $0.range.endTime = Google_Protobuf_Timestamp(date: rangeEnd)
      $0.windowSize = .hour
      $0.groupBySubject = true
      $0.pageSize = Int32(pageSize)
    }
    var gateway: [Double] = []
    var rows = 0
    // A warm-up pass over the same pages and hours, untimed, for both sides, so each timed pass
    // reads from PostgreSQL's buffers rather than whichever side ran first paying the first read.
    let first = request
    for _ in 0..<iterations {
      let page = try await metering.queryUsage(request)
      guard !page.nextPageToken.isEmpty else { break }
      request.pageToken = page.nextPageToken
    }
    request = first
    for _ in 0..<iterations {
      let t0 = ContinuousClock.now
      let page = try await metering.queryUsage(request)
      gateway.append(elapsedSeconds(ContinuousClock.now - t0) * 1000)
      rows += page.rows.count
      guard !page.nextPageToken.isEmpty else { break }
      request.pageToken = page.nextPageToken
    }
    // The SQL baseline: the same hours' rows, aggregated and ordered in one plain statement.
    let hoursPerPage = max(1, pageSize / subjects)
    var sql: [Double] = []
    for i in 0..<gateway.count {
      let from = Self.rangeStart.addingTimeInterval(Double(i * hoursPerPage) * 3_600)
      let to = from.addingTimeInterval(Double(hoursPerPage) * 3_600)
      let t0 = ContinuousClock.now
      var n = 0
      for try await _ in try await admin.query(
        """
        SELECT date_bin('1 hour', event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS w, subject, sum(value)
        FROM usage_events
        WHERE tenant_id = \(Self.tenant.rawValue) AND meter = 'api_calls' AND event_time >= \(from) AND event_time < \(to)
        GROUP BY 1, 2 ORDER BY 1, 2 LIMIT \(pageSize + 1)
        """,
        logger: benchLogger
      ) {
        n += 1
      }
      sql.append(elapsedSeconds(ContinuousClock.now - t0) * 1000)
      _ = n
    }
    return Shape(name: "all subjects, 30 days, HOUR windows, pages of \(pageSize)", gateway: gateway, sql: sql, rows: rows, target: target)
  }

  /// One subject's 30 days by day: 30 rows in one call.
  func dailyForOneSubject(
    _ metering: Tollgate_V1_MeteringService.Client<HTTP2ClientTransport.Posix>,
    _ admin: PostgresClient
  ) async throws -> Shape {
    var gateway: [Double] = []
    var sql: [Double] = []
    var rows = 0
    for pass in 0..<2 {
      for i in 0..<iterations {
        let subject = "cust-" + String(format: "%04d", (i * 7_919) % subjects)
        let t0 = ContinuousClock.now
        let reply = try await metering.queryUsage(
          .with {
            $0.meter = "api_calls"
            $0.range.startTime = Google_Protobuf_Timestamp(date: Self.rangeStart)
            $0.range.endTime = Google_Protobuf_Timestamp(date: rangeEnd)
            $0.windowSize = .day
            $0.subjects = [subject]
          }
        )
        let t1 = ContinuousClock.now
        for try await _ in try await admin.query(
          """
          SELECT date_bin('1 day', event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00'), sum(value)
          FROM usage_events
          WHERE tenant_id = \(Self.tenant.rawValue) AND meter = 'api_calls' AND subject = \(subject)
            AND event_time >= \(Self.rangeStart) AND event_time < \(rangeEnd)
          GROUP BY 1 ORDER BY 1
          """,
          logger: benchLogger
        ) {}
        let t2 = ContinuousClock.now
        if pass == 0 { continue }  // the warm-up pass, as above
        gateway.append(elapsedSeconds(t1 - t0) * 1000)
        sql.append(elapsedSeconds(t2 - t1) * 1000)
        rows += reply.rows.count
      }
    }
    return Shape(name: "one subject, 30 days, DAY windows", gateway: gateway, sql: sql, rows: rows, target: 20)
  }
}
