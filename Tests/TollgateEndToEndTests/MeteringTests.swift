import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import SwiftProtobuf
import Synchronization
import Testing
import TollgateCertificates
import TollgateCore
import TollgateModel
import TollgateProtos

/// MeteringService over real mTLS against real Postgres.
@Suite(.timeLimit(.minutes(2))) struct MeteringTests {
  typealias Metering = Tollgate_V1_MeteringService.Client<HTTP2ClientTransport.Posix>

  /// Creates the tenants and, for each, the meters, as an operator.
  static func setUp(_ gw: TestGateway, tenants: [String], meters: [Tollgate_V1_Meter]) async throws {
    try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
      let admin = Tollgate_V1_TenantService.Client(wrapping: client)
      let metering = Metering(wrapping: client)
      for tenant in tenants {
        _ = try await admin.createTenant(.with { $0.tenantID = tenant })
        for meter in meters {
          _ = try await metering.defineMeter(.with { $0.meter = meter }, metadata: actingOn(tenant))
        }
      }
    }
  }

  static func meter(_ name: String, _ aggregation: Tollgate_V1_Aggregation, property: String = "", groupBy: [String] = [])
    -> Tollgate_V1_Meter
  {
    .with {
      $0.name = name
      $0.aggregation = aggregation
      $0.valueProperty = property
      $0.groupBy = groupBy
    }
  }

  static func event(
    _ id: String,
    meter: String = "api_calls",
    subject: String = "cust-1",
    value: Double = 1,
    time: Date = Date(),
    source: String = "agent-1",
    properties: [String: String] = [:]
  ) -> Tollgate_V1_UsageEvent {
    .with {
      $0.id = id
      $0.source = source
      $0.meter = meter
      $0.subject = subject
      $0.value = value
      $0.time = Google_Protobuf_Timestamp(date: time)
      $0.properties = properties
    }
  }

  static func batch(_ sequence: UInt64, _ events: [Tollgate_V1_UsageEvent]) -> Tollgate_V1_IngestRequest {
    .with {
      $0.sequence = sequence
      $0.events = events
    }
  }

  /// Sends `batches` on one IngestStream and returns the acks.
  static func stream(_ metering: Metering, _ batches: [Tollgate_V1_IngestRequest]) async throws -> [Tollgate_V1_IngestAck] {
    try await metering.ingestStream(
      requestProducer: { writer in
        for batch in batches { try await writer.write(batch) }
      },
      onResponse: { response in
        var acks: [Tollgate_V1_IngestAck] = []
        for try await ack in response.messages { acks.append(ack) }
        return acks
      }
    )
  }

  /// All rows of a query, following page tokens.
  static func allRows(_ metering: Metering, _ request: Tollgate_V1_QueryUsageRequest) async throws -> [Tollgate_V1_UsageRow] {
    var request = request
    var rows: [Tollgate_V1_UsageRow] = []
    while true {
      let page = try await metering.queryUsage(request)
      rows += page.rows
      if page.nextPageToken.isEmpty { return rows }
      request.pageToken = page.nextPageToken
    }
  }

  /// An agent's stream that stays open (a batch sent, the next not yet) ends when its tenant is
  /// suspended, with what it sent before kept.
  @Test func anOpenIngestStreamEndsWhenItsTenantIsSuspended() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [Self.meter("api_calls", .count)])
      let (acked, ack) = AsyncStream.makeStream(of: Void.self)
      let (finished, finish) = AsyncStream.makeStream(of: Void.self)
      let agent = Task {
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
          try await Metering(wrapping: client).ingestStream(
            requestProducer: { writer in
              try await writer.write(Self.batch(1, [Self.event("before")]))
              // Held open until the test is done, as a live agent's stream is.
              for await _ in finished {}
            },
            onResponse: { response in
              for try await _ in response.messages { ack.yield() }
            }
          )
        }
      }
      var acks = acked.makeAsyncIterator()
      _ = await acks.next()
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        _ = try await Tollgate_V1_TenantService.Client(wrapping: client).suspendTenant(.with {
          $0.tenantID = "acme"
          $0.reason = "unpaid invoices"
        })
      }
      let ended = await statusCode { try await agent.value }
      finish.finish()
      #expect(ended == .permissionDenied)
      #expect(try await gw.count("SELECT count(*) FROM usage_events WHERE tenant_id = 'acme'") == 1)
    }
  }

  @Test func metersAreDefinedValidatedAndListed() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let metering = Metering(wrapping: client)
        let defined = try await metering.defineMeter(
          .with { $0.meter = Self.meter("users", .uniqueCount, property: "user", groupBy: ["region"]) }
        )
        #expect(defined.meter.name == "users")
        #expect(defined.meter.hasCreateTime)
        // Same aggregation: the description and group-by keys may change.
        var redefined = Self.meter("users", .uniqueCount, property: "user", groupBy: ["region", "plan"])
        redefined.description_p = "monthly active users"
        let again = try await metering.defineMeter(.with { $0.meter = redefined })
        #expect(again.meter.groupBy == ["region", "plan"])
        #expect(again.meter.description_p == "monthly active users")
        #expect(
          await statusCode { try await metering.defineMeter(.with { $0.meter = Self.meter("users", .sum) }) } == .alreadyExists
        )
        do {
          _ = try await metering.defineMeter(
            .with { $0.meter = Self.meter("Bad Name", .unspecified, property: "x", groupBy: ["a", "a"]) }
          )
          Issue.record("an invalid meter was accepted")
        } catch let error as RPCError {
          #expect(error.code == .invalidArgument)
          let fields = try #require(try error.unpackGoogleRPCStatus()).details.compactMap(\.badRequest)
            .flatMap(\.violations).map(\.field)
          #expect(Set(fields) == ["meter.name", "meter.aggregation", "meter.value_property", "meter.group_by[1]"])
        }
        for name in ["a1", "a2", "a3"] { _ = try await metering.defineMeter(.with { $0.meter = Self.meter(name, .sum) }) }
        let first = try await metering.listMeters(.with { $0.pageSize = 2 })
        #expect(first.meters.map(\.name) == ["a1", "a2"])
        let second = try await metering.listMeters(.with { $0.pageToken = first.nextPageToken })
        #expect(second.meters.map(\.name) == ["a3", "users"])
        #expect(second.nextPageToken.isEmpty)
      }
      // Agents ingest; they may list meters but not define them.
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        let metering = Metering(wrapping: client)
        #expect(try await metering.listMeters(.init()).meters.count == 4)
        #expect(await statusCode { try await metering.defineMeter(.with { $0.meter = Self.meter("x", .sum) }) } == .permissionDenied)
        #expect(await statusCode { try await metering.queryUsage(.init()) } == .permissionDenied)
      }
    }
  }

  @Test func reSentEventsCountOnceAcrossBatchesStreamsAndReconnects() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [Self.meter("api_calls", .count)])
      let agent = try gw.pki.issue(tenant: "acme", role: .agent)
      try await gw.withClient(agent) { client async throws in
        let metering = Metering(wrapping: client)
        // The same event twice in one batch.
        let unary = try await metering.ingest(Self.batch(7, [Self.event("e1"), Self.event("e1"), Self.event("e2")]))
        #expect((unary.sequence, unary.accepted, unary.duplicates, unary.rejected) == (7, 2, 1, 0))
        // Later batches on a stream, overlapping earlier ones and each other.
        let acks = try await Self.stream(
          metering,
          [
            Self.batch(1, [Self.event("e2"), Self.event("e3")]),
            Self.batch(2, [Self.event("e3"), Self.event("e4"), Self.event("e4", source: "agent-2")]),
          ]
        )
        #expect(acks.map(\.sequence) == [1, 2])
        #expect(acks.map(\.accepted) == [1, 2])
        #expect(acks.map(\.duplicates) == [1, 1])
      }
      // A reconnect (new connection, new stream) re-sending everything.
      try await gw.withClient(agent) { client async throws in
        let acks = try await Self.stream(
          Metering(wrapping: client),
          [Self.batch(1, ["e1", "e2", "e3", "e4"].map { Self.event($0) } + [Self.event("e4", source: "agent-2")])]
        )
        #expect(acks.map(\.accepted) == [0])
        #expect(acks.map(\.duplicates) == [5])
      }
      let stored = try await gw.count("SELECT count(*) FROM usage_events")
      #expect(stored == 5)
      // Ingestion is mutating: each call's audit event committed with (or before) its first answer.
      let audited = try await gw.count(
        "SELECT count(*) FROM \(TestGateway.committedAudit) WHERE tenant_id = 'acme' AND method LIKE '/tollgate.v1.MeteringService/Ingest%'"
      )
      #expect(audited == 3)
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let rows = try await Self.allRows(
          Metering(wrapping: client),
          .with {
            $0.meter = "api_calls"
            $0.range.startTime = Google_Protobuf_Timestamp(date: Date().addingTimeInterval(-3_600))
            $0.range.endTime = Google_Protobuf_Timestamp(date: Date().addingTimeInterval(600))
          }
        )
        #expect(rows.map(\.value) == [5])
      }
    }
  }

  @Test func badEventsAreRejectedOneByOneWithReasons() async throws {
    try await TestGateway.run(configure: {
      $0.ingestMaxBatch = 10
      $0.maxRequestMessageBytes = 16 * 1024
    }) { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [Self.meter("api_calls", .sum)])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        let metering = Metering(wrapping: client)
        var noTime = Self.event("no-time")
        noTime.clearTime()
        let manyProperties = Dictionary(uniqueKeysWithValues: (0..<40).map { ("k\($0)", "v") })
        let events = [
          Self.event("good-1"),
          Self.event("", subject: "x"),
          Self.event("nan", value: .nan),
          Self.event("future", time: Date().addingTimeInterval(3_600)),
          Self.event("old", time: Date().addingTimeInterval(-8 * 86_400)),
          Self.event("unknown", meter: "nope"),
          Self.event("props", properties: manyProperties),
          noTime,
          Self.event("nul", subject: "a\u{0}b"),
          Self.event("good-2", value: 2.5),
        ]
        let reply = try await metering.ingest(Self.batch(1, events))
        #expect((reply.accepted, reply.duplicates, reply.rejected) == (2, 0, 8))
        #expect(reply.rejections.map(\.index) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(
          reply.rejections.map(\.reason) == [
            "MISSING_FIELD", "NON_FINITE_VALUE", "TIME_IN_FUTURE", "TIME_TOO_OLD", "UNKNOWN_METER",
            "PROPERTIES_TOO_LARGE", "MISSING_FIELD", "INVALID_FIELD",
          ]
        )
        #expect(reply.rejections.allSatisfy { !$0.message.isEmpty })
        #expect(reply.rejections[4].message.contains("DefineMeter"))

        // Whole-batch problems fail the call and store nothing.
        #expect(await statusCode { try await metering.ingest(Self.batch(2, [])) } == .invalidArgument)
        let tooMany = (0..<11).map { Self.event("big-\($0)") }
        #expect(await statusCode { try await metering.ingest(Self.batch(3, tooMany)) } == .invalidArgument)
        let bigProperties = Dictionary(uniqueKeysWithValues: (0..<15).map { ("k\($0)", String(repeating: "x", count: 250)) })
        let huge = Self.batch(4, (0..<10).map { Self.event("huge-\($0)", properties: bigProperties) })
        #expect(await statusCode { try await metering.ingest(huge) } == .resourceExhausted)
      }
      #expect(try await gw.count("SELECT count(*) FROM usage_events") == 2)
    }
  }

  @Test func everyAggregationMatchesAHandComputedAnswer() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(
        gw,
        tenants: ["acme"],
        meters: [
          Self.meter("tokens", .sum, groupBy: ["model"]),
          Self.meter("calls", .count),
          Self.meter("peak", .max),
          Self.meter("users", .uniqueCount, property: "user"),
          Self.meter("balance", .latest),
        ]
      )
      // Two whole hours, yesterday, and a late event five days before them (inside the 7-day window).
      let calendar = Calendar(identifier: .gregorian)
      let hour0 = calendar.dateInterval(of: .hour, for: Date().addingTimeInterval(-86_400))!.start
      let hour1 = hour0.addingTimeInterval(3_600)
      let late = hour0.addingTimeInterval(-5 * 86_400)
      func at(_ base: Date, _ minutes: Double) -> Date { base.addingTimeInterval(minutes * 60) }
      var events: [Tollgate_V1_UsageEvent] = []
      func add(_ meter: String, _ subject: String, _ value: Double, _ time: Date, _ properties: [String: String] = [:]) {
        events.append(Self.event("\(meter)-\(events.count)", meter: meter, subject: subject, value: value, time: time, properties: properties))
      }
      add("tokens", "a", 10, at(hour0, 1), ["model": "big"])
      add("tokens", "a", 5, at(hour0, 30), ["model": "small"])
      add("tokens", "b", 7, at(hour0, 59), ["model": "big"])
      add("tokens", "a", 1, at(hour1, 0), ["model": "big"])
      add("tokens", "b", 100, late)
      for (subject, minute) in [("a", 1.0), ("a", 2), ("b", 3), ("a", 61)] { add("calls", subject, 0, at(hour0, minute)) }
      add("peak", "a", 3, at(hour0, 5))
      add("peak", "a", 9, at(hour0, 6))
      add("peak", "a", -2, at(hour1, 6))
      for (user, minute) in [("u1", 1.0), ("u2", 2), ("u1", 3), ("u3", 70)] {
        add("users", "a", 0, at(hour0, minute), ["user": user])
      }
      add("users", "a", 0, at(hour0, 4))  // no `user` property: not a distinct value
      add("balance", "a", 50, at(hour0, 10))
      add("balance", "a", 20, at(hour0, 40))
      add("balance", "a", 80, at(hour0, 20))
      add("balance", "a", 99, at(hour1, 10))

      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        let reply = try await Metering(wrapping: client).ingest(Self.batch(1, events))
        #expect(reply.accepted == UInt32(events.count))
      }
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let metering = Metering(wrapping: client)
        func query(
          _ meter: String,
          from: Date = hour0,
          to: Date = hour1.addingTimeInterval(3_600),
          window: Tollgate_V1_WindowSize = .unspecified,
          bySubject: Bool = false,
          byProperties: [String] = [],
          subjects: [String] = [],
          pageSize: Int32 = 0
        ) async throws -> [Tollgate_V1_UsageRow] {
          try await Self.allRows(
            metering,
            .with {
              $0.meter = meter
              $0.range.startTime = Google_Protobuf_Timestamp(date: from)
              $0.range.endTime = Google_Protobuf_Timestamp(date: to)
              $0.windowSize = window
              $0.groupBySubject = bySubject
              $0.groupByProperties = byProperties
              $0.subjects = subjects
              $0.pageSize = pageSize
            }
          )
        }
        #expect(try await query("tokens").map(\.value) == [23])
        #expect(try await query("tokens", from: late.addingTimeInterval(-60)).map(\.value) == [123])
        let hourly = try await query("tokens", window: .hour, bySubject: true)
        #expect(hourly.map { "\($0.windowStart.date.timeIntervalSince(hour0))/\($0.subject)/\($0.value)" } == ["0.0/a/15.0", "0.0/b/7.0", "3600.0/a/1.0"])
        #expect(hourly[0].windowEnd.date == hour1)
        let byModel = try await query("tokens", byProperties: ["model"])
        #expect(byModel.map { "\($0.group["model"]!)=\($0.value)" } == ["big=18.0", "small=5.0"])
        #expect(try await query("tokens", subjects: ["b"]).map(\.value) == [7])
        #expect(try await query("calls", bySubject: true).map { "\($0.subject)=\($0.value)" } == ["a=3.0", "b=1.0"])
        #expect(try await query("calls", window: .hour).map(\.value) == [3, 1])
        #expect(try await query("peak").map(\.value) == [9])
        #expect(try await query("peak", window: .hour).map(\.value) == [9, -2])
        #expect(try await query("users").map(\.value) == [3])
        #expect(try await query("users", window: .hour).map(\.value) == [2, 1])
        #expect(try await query("balance").map(\.value) == [99])
        #expect(try await query("balance", to: hour1).map(\.value) == [20])
        // Minute windows, one row per page, walked by tokens, give the same rows as one page.
        let whole = try await query("calls", window: .minute)
        let paged = try await query("calls", window: .minute, pageSize: 1)
        #expect(whole.count == 4)
        #expect(paged == whole)
        // A range that starts mid-window reports the window clipped to it.
        let clipped = try await query("tokens", from: at(hour0, 15), window: .hour)
        #expect(clipped.first?.windowStart.date == at(hour0, 15))
        #expect(clipped.map(\.value) == [12, 1])
        // Grouping by a key the meter does not allow, and a token from another query, are refused.
        #expect(await statusCode { try await query("calls", byProperties: ["model"]) } == .invalidArgument)
        let page = try await metering.queryUsage(
          .with {
            $0.meter = "calls"
            $0.range.startTime = Google_Protobuf_Timestamp(date: hour0)
            $0.windowSize = .minute
            $0.pageSize = 1
          }
        )
        let otherQuery = await statusCode {
          try await metering.queryUsage(
            .with {
              $0.meter = "peak"
              $0.range.startTime = Google_Protobuf_Timestamp(date: hour0)
              $0.pageToken = page.nextPageToken
            }
          )
        }
        #expect(otherQuery == .invalidArgument)
        #expect(await statusCode { try await query("nope") } == .notFound)
      }
    }
  }

  @Test func monthlyQuotaRejectsNewEventsButNotDuplicates() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [Self.meter("api_calls", .count)])
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        _ = try await Tollgate_V1_TenantService.Client(wrapping: client).updateQuota(
          .with {
            $0.tenantID = "acme"
            $0.quota.monthlyUsageEvents = 5
          }
        )
      }
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        let metering = Metering(wrapping: client)
        let first = try await metering.ingest(Self.batch(1, (1...3).map { Self.event("e\($0)") }))
        #expect(first.accepted == 3)
        // Room for two: a duplicate does not use any, the last new event does not fit.
        let second = try await metering.ingest(Self.batch(2, ["e1", "e4", "e5", "e6"].map { Self.event($0) }))
        #expect((second.accepted, second.duplicates, second.rejected) == (2, 1, 1))
        #expect(second.rejections.map(\.reason) == ["QUOTA_EXCEEDED"])
        #expect(second.rejections.map(\.index) == [3])
        // Nothing left: new events fail the call, with the quota named and when to retry.
        do {
          _ = try await metering.ingest(Self.batch(3, [Self.event("e6"), Self.event("e2")]))
          Issue.record("an over-quota batch was accepted")
        } catch let error as RPCError {
          #expect(error.code == .resourceExhausted)
          let status = try #require(try error.unpackGoogleRPCStatus())
          let violation = try #require(status.details.compactMap(\.quotaFailure).first?.violations.first)
          #expect(violation.subject == "tenant:acme")
          #expect(violation.violationDescription.contains("monthly_usage_events"))
          #expect(status.details.compactMap(\.retryInfo).first != nil)
          #expect(Int(error.metadata[stringValues: "grpc-retry-pushback-ms"].first(where: { _ in true }) ?? "") ?? 0 > 0)
        }
        // Re-sending what was stored is still answered as duplicates.
        let resent = try await metering.ingest(Self.batch(4, ["e1", "e5"].map { Self.event($0) }))
        #expect((resent.accepted, resent.duplicates) == (0, 2))
      }
      #expect(try await gw.count("SELECT count(*) FROM usage_events") == 5)
    }
  }

  @Test func aBadBatchEndsItsStreamAfterTheEarlierAcks() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme"], meters: [Self.meter("api_calls", .sum, groupBy: ["region"])])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .agent)) { client async throws in
        let metering = Metering(wrapping: client)
        let acked = Mutex<[UInt64]>([])
        let batches = [Self.batch(1, [Self.event("s1")]), Self.batch(2, []), Self.batch(3, [Self.event("s3")])]
        let code = await statusCode {
          try await metering.ingestStream(
            requestProducer: { writer in
              for batch in batches { try await writer.write(batch) }
            },
            onResponse: { response in
              for try await ack in response.messages { acked.withLock { $0.append(ack.sequence) } }
            }
          )
        }
        #expect(code == .invalidArgument)
        #expect(acked.withLock { $0 } == [1])
        // Properties are stored as sent, whatever characters they hold, and group exactly.
        let awkward = "quote\" back\\ new\nline tab\t \u{1} ünï"
        let reply = try await metering.ingest(Self.batch(4, [Self.event("p1", value: 2, properties: ["region": awkward])]))
        #expect(reply.accepted == 1)
      }
      #expect(try await gw.count("SELECT count(*) FROM usage_events WHERE event_id = 's1'") == 1)
      #expect(try await gw.count("SELECT count(*) FROM usage_events WHERE event_id = 's3'") == 0)
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let rows = try await Self.allRows(
          Metering(wrapping: client),
          .with {
            $0.meter = "api_calls"
            $0.range.startTime = Google_Protobuf_Timestamp(date: Date().addingTimeInterval(-3_600))
            $0.groupByProperties = ["region"]
          }
        )
        #expect(rows.map { $0.group["region"] ?? "-" } == ["", "quote\" back\\ new\nline tab\t \u{1} ünï"])
      }
    }
  }

  @Test func oneTenantsQueriesNeverSeeAnotherTenantsEvents() async throws {
    try await TestGateway.run { gw in
      try await Self.setUp(gw, tenants: ["acme", "globex"], meters: [Self.meter("api_calls", .sum)])
      for (tenant, value) in [("acme", 1.0), ("globex", 1000.0)] {
        try await gw.withClient(try gw.pki.issue(tenant: tenant, role: .agent)) { client async throws in
          // The same source and id in both tenants: two different events.
          let reply = try await Metering(wrapping: client).ingest(Self.batch(1, [Self.event("same", value: value)]))
          #expect(reply.accepted == 1)
        }
      }
      let request = Tollgate_V1_QueryUsageRequest.with {
        $0.meter = "api_calls"
        $0.range.startTime = Google_Protobuf_Timestamp(date: Date().addingTimeInterval(-3_600))
        $0.groupBySubject = true
      }
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let metering = Metering(wrapping: client)
        #expect(try await Self.allRows(metering, request).map(\.value) == [1])
        #expect(await statusCode { try await metering.queryUsage(request, metadata: actingOn("globex")) } == .permissionDenied)
      }
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let metering = Metering(wrapping: client)
        #expect(try await metering.queryUsage(request, metadata: actingOn("globex")).rows.map(\.value) == [1000])
        #expect(await statusCode { try await metering.queryUsage(request) } == .invalidArgument)
      }
    }
  }
}

extension TestGateway {
  /// A count from this test's database, read as the superuser (past row-level security).
  func count(_ sql: String) async throws -> Int64 {
    try await TestDatabase.adminCount(database.admin, sql, database: database.name)
  }

  /// Every committed audit event, for SQL checks (`FROM \(TestGateway.committedAudit)`): those in
  /// their logs and those a mutation committed that the sequencer has not indexed yet.
  static let committedAudit = """
    (SELECT tenant_id, method, principal FROM audit_leaves
     UNION ALL SELECT tenant_id, method, principal FROM audit_pending) AS committed_audit
    """

  /// The text column of every row, read as the superuser (past row-level security).
  func strings(_ sql: String) async throws -> [String] {
    try await TestDatabase.adminStrings(database.admin, sql, database: database.name)
  }
}
