import Foundation
public import GRPCCore
public import Logging
import ServiceLifecycle
import SwiftProtobuf
import TollgateCore
public import TollgateModel
public import TollgateProtos
public import TollgateStore
import TollgateServiceSupport

/// MeteringService: idempotent usage ingestion, meters and usage queries.
///
/// Ingest and IngestStream answer a batch only after its transaction commits, so an
/// acknowledged event is a stored event. One bad event is rejected with a reason and never fails
/// its batch; a batch fails as a whole only for what is wrong with the batch itself (empty, over
/// the size limit) or when the tenant's monthly quota has no room left.
public struct MeteringService: Sendable {
  let repository: UsageRepository
  let validation: UsageValidation
  let maxBatch: Int
  let logger: Logger
  let telemetry: Telemetry

  public init(
    repository: UsageRepository,
    maxBatch: Int,
    lateArrival: Duration,
    logger: Logger,
    telemetry: Telemetry = .disabled
  ) {
    self.repository = repository
    self.validation = UsageValidation(lateArrival: TimeInterval(lateArrival.components.seconds))
    self.maxBatch = maxBatch
    self.logger = logger
    self.telemetry = telemetry
  }

  func handling<T: Sendable>(_ method: String, _ body: () async throws -> T) async throws -> T {
    try await handlingStoreFailures(method, logger: logger, body)
  }

  /// Validates, de-duplicates and stores one batch; returns the counts and rejections.
  func ingest(_ request: Tollgate_V1_IngestRequest, tenant: TenantID) async throws -> Tollgate_V1_IngestResponse {
    guard !request.events.isEmpty else {
      throw TollgateError.invalidField("events", "a batch needs at least one event")
    }
    guard request.events.count <= maxBatch else {
      throw TollgateError.invalidField(
        "events",
        "\(request.events.count) events in one batch; at most \(maxBatch) allowed, split the batch"
      )
    }
    let now = Date()
    var rows: [UsageEventRow] = []
    var positions: [Int] = []
    rows.reserveCapacity(request.events.count)
    positions.reserveCapacity(request.events.count)
    var rejections: [Tollgate_V1_EventRejection] = []
    var seen = Set<EventKey>(minimumCapacity: request.events.count)
    var duplicates = 0
    for (index, event) in request.events.enumerated() {
      switch validation.validate(event, now: now) {
      case .failure(let rejection):
        rejections.append(Self.rejection(index, event, rejection.reason, rejection.message))
      case .success(let row):
        // The same event twice in one batch counts once, like a re-sent one.
        if seen.insert(EventKey(source: row.source, id: row.id)).inserted {
          rows.append(row)
          positions.append(index)
        } else {
          duplicates += 1
        }
      }
    }
    var accepted = 0
    if !rows.isEmpty {
      let result: UsageRepository.IngestResult
      do {
        result = try await repository.ingest(tenant, events: rows, logger: logger)
      } catch {
        // (A `catch .quotaExhausted` pattern crashes the Swift 6.3 compiler.)
        if case .quotaExhausted = error { throw Self.monthlyQuotaExhausted(tenant: tenant, now: now) }
        throw error
      }
      accepted = result.outcome.accepted
      duplicates += result.outcome.duplicates
      for i in result.unknownMeter {
        let event = request.events[positions[i]]
        rejections.append(
          Self.rejection(
            positions[i],
            event,
            "UNKNOWN_METER",
            "meter '\(event.meter)' is not defined for this tenant; define it with DefineMeter first"
          )
        )
      }
      for i in result.outcome.overQuota {
        rejections.append(
          Self.rejection(
            positions[i],
            request.events[positions[i]],
            "QUOTA_EXCEEDED",
            "the tenant's monthly quota of \(result.outcome.monthlyLimit) usage events is used up"
          )
        )
      }
      rejections.sort { $0.index < $1.index }
    }
    let tenantLabel = ("tenant", telemetry.tenantLabel(tenant))
    telemetry.count("tollgate_usage_events_total", [tenantLabel, ("result", "accepted")], by: accepted)
    telemetry.count("tollgate_usage_events_total", [tenantLabel, ("result", "duplicate")], by: duplicates)
    telemetry.count("tollgate_usage_events_total", [tenantLabel, ("result", "rejected")], by: rejections.count)
    return .with {
      $0.sequence = request.sequence
      $0.accepted = UInt32(accepted)
      $0.duplicates = UInt32(duplicates)
      $0.rejected = UInt32(rejections.count)
      $0.rejections = rejections
    }
  }

  struct EventKey: Hashable {
    var source: String
    var id: String
  }

  static func rejection(_ index: Int, _ event: Tollgate_V1_UsageEvent, _ reason: String, _ message: String)
    -> Tollgate_V1_EventRejection
  {
    .with {
      $0.index = UInt32(index)
      $0.eventID = UsageValidation.clip(event.id)
      $0.reason = reason
      $0.message = message
    }
  }

  /// RESOURCE_EXHAUSTED naming the quota, with the time left until the next UTC month opens it.
  static func monthlyQuotaExhausted(tenant: TenantID, now: Date) -> TollgateError {
    var calendar = Calendar(identifier: .gregorian)
    calendar.timeZone = TimeZone(identifier: "UTC")!
    let month = calendar.dateInterval(of: .month, for: now)
    let retry = month.map { Duration.seconds(Int64(ceil($0.end.timeIntervalSince(now)))) }
    return .resourceExhausted(
      "the tenant's monthly usage-event quota is used up; no event of this batch was stored. Raise it with UpdateQuota or wait for the next month (UTC)",
      subject: "tenant:\(tenant.rawValue)",
      description: "monthly_usage_events: events accepted per calendar month (UTC)",
      retryAfter: retry
    )
  }
}

extension MeteringService: Tollgate_V1_MeteringService.SimpleServiceProtocol {
  public func ingest(request: Tollgate_V1_IngestRequest, context: ServerContext) async throws -> Tollgate_V1_IngestResponse {
    try await handling("Ingest") {
      try await ingest(request, tenant: try actingTenant())
    }
  }

  public func ingestStream(
    request: RPCAsyncSequence<Tollgate_V1_IngestRequest, any Error>,
    response: RPCWriter<Tollgate_V1_IngestAck>,
    context: ServerContext
  ) async throws {
    try await handling("IngestStream") {
      let tenant = try actingTenant()
      // One batch at a time, in order: each ack follows its batch's commit, so acks arrive in
      // sequence, every acknowledged event is stored, and an event sent twice is credited to the
      // earlier batch. (Overlapping batches' transactions measured no faster; the database is
      // the limit.)
      // A drain ends the stream between batches (a batch in progress is committed and acked
      // first) with UNAVAILABLE, so the agent reconnects, to another replica if there is one.
      for try await batch in request.cancelOnGracefulShutdown() {
        let result = try await ingest(batch, tenant: tenant)
        try await response.write(
          .with {
            $0.sequence = result.sequence
            $0.accepted = result.accepted
            $0.duplicates = result.duplicates
            $0.rejected = result.rejected
            $0.rejections = result.rejections
          }
        )
      }
      if Task.isShuttingDownGracefully {
        throw TollgateError.unavailable(
          "the gateway is shutting down; every acknowledged batch is stored: send the rest on a new stream"
        )
      }
    }
  }

  public func defineMeter(
    request: Tollgate_V1_DefineMeterRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_DefineMeterResponse {
    try await handling("DefineMeter") {
      let tenant = try actingTenant()
      let meter = try MeteringMapping.meterDefinition(request)
      let stored = try await repository.define(tenant, meter: meter, logger: logger)
      return .with { $0.meter = MeteringMapping.meter(stored) }
    }
  }

  public func listMeters(
    request: Tollgate_V1_ListMetersRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_ListMetersResponse {
    try await handling("ListMeters") {
      let tenant = try actingTenant()
      let size = try RequestFields.pageSize(request.pageSize)
      let after = try RequestFields.decodeToken(request.pageToken, kind: "meters")
      let page = try await repository.meters(tenant, after: after, limit: size, logger: logger)
      return .with {
        $0.meters = page.items.map(MeteringMapping.meter)
        $0.nextPageToken = page.nextKey.map { RequestFields.encodeToken(kind: "meters", key: $0) } ?? ""
      }
    }
  }

  public func queryUsage(
    request: Tollgate_V1_QueryUsageRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_QueryUsageResponse {
    try await handling("QueryUsage") {
      let tenant = try actingTenant()
      let parsed = try MeteringMapping.usageQuery(request, now: Date())
      let (query, page) = try await repository.query(tenant, meterName: parsed.meterName, logger: logger) { meter in
        try parsed.resolve(meter)
      }
      let rows = page.rows
      var next = ""
      if let resume = page.resumeAt, let last = rows.last {
        next = parsed.token(after: last.key, resumeAt: resume)
      }
      return .with {
        $0.rows = rows.map { MeteringMapping.row($0, query) }
        $0.nextPageToken = next
      }
    }
  }
}
