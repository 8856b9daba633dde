public import Foundation
public import Logging
import PostgresNIO
public import TollgateModel

/// Meters and usage events. Events are stored raw, once per (tenant, source, id); queries
/// aggregate them directly, so every answer is exact, late events included, for every
/// aggregation. Queries stay fast by reading only the windows a page needs (see ``query(_:_:logger:)``).
public struct UsageRepository: Sendable {
  let database: Database

  public init(database: Database) {
    self.database = database
  }

  // MARK: Meters

  static let meterColumns = "name, aggregation, value_property, group_by, description, create_time"
  typealias MeterRow = (String, String, String, [String], String, Date)

  static func decodeMeter(_ row: MeterRow) throws -> MeterDefinition {
    guard let aggregation = Aggregation(rawValue: row.1) else {
      throw StoreError.unexpected("meter \(row.0) has unknown aggregation \(row.1)")
    }
    return MeterDefinition(
      name: row.0,
      aggregation: aggregation,
      valueProperty: row.2,
      groupBy: row.3,
      description: row.4,
      createTime: row.5
    )
  }

  /// Stores `meter`, or updates the description and group-by keys of an existing meter with the
  /// same aggregation. A meter of that name that aggregates differently is `.alreadyExists`:
  /// changing how stored usage adds up would silently change every bill computed from it.
  public func define(_ tenant: TenantID, meter: MeterDefinition, logger: Logger) async throws(StoreError) -> MeterDefinition {
    try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      let rows = try await connection.query(
        """
        INSERT INTO meters (tenant_id, name, aggregation, value_property, group_by, description)
        VALUES (\(tenant.rawValue), \(meter.name), \(meter.aggregation.rawValue), \(meter.valueProperty),
                \(meter.groupBy), \(meter.description))
        ON CONFLICT (tenant_id, name) DO UPDATE
          SET description = excluded.description, group_by = excluded.group_by
          WHERE meters.aggregation = excluded.aggregation AND meters.value_property = excluded.value_property
        RETURNING \(unescaped: Self.meterColumns)
        """,
        logger: logger
      )
      for try await row in rows.decode(MeterRow.self) { return try Self.decodeMeter(row) }
      throw StoreError.alreadyExists(
        "meter '\(meter.name)' already exists with a different aggregation or value_property; define a meter with a new name"
      )
    }
  }

  /// Meters in name order after `after`, at most `limit`.
  public func meters(
    _ tenant: TenantID,
    after: String?,
    limit: Int,
    logger: Logger
  ) async throws(StoreError) -> TenantRepository.Page<MeterDefinition> {
    try await database.withTenant(tenant, logger: logger) { connection in
      let rows = try await connection.query(
        """
        SELECT \(unescaped: Self.meterColumns) FROM meters
        WHERE name > \(after ?? "") ORDER BY name LIMIT \(limit + 1)
        """,
        logger: logger
      )
      var items: [MeterDefinition] = []
      for try await row in rows.decode(MeterRow.self) { items.append(try Self.decodeMeter(row)) }
      var next: String?
      if items.count > limit {
        items.removeLast()
        next = items.last?.name
      }
      return .init(items: items, nextKey: next)
    }
  }

  // MARK: Ingestion

  /// What one batch came to.
  public struct IngestResult: Sendable {
    /// Positions of events whose meter is not defined (nothing else was decided about them).
    public var unknownMeter: [Int]
    public var outcome: IngestOutcome
  }

  /// Stores a batch of validated events, unique within the batch by (source, id), in one
  /// transaction: events of undefined meters are left out, events already stored are counted as
  /// duplicates, and with a monthly quota only as many new events as it has room for are stored
  /// (the rest are reported by position). Fails with ``StoreError/quotaExhausted(_:)`` (inside
  /// the transaction, which then rolls back) when new events came and the quota had no room.
  public func ingest(
    _ tenant: TenantID,
    events: [UsageEventRow],
    logger: Logger
  ) async throws(StoreError) -> IngestResult {
    let meterNames = Array(Set(events.map(\.meter)))
    return try await database.withTenant(tenant, mutation: true, logger: logger) { connection in
      // The common case in one statement: no monthly limit, so every event of a defined meter
      // goes in. With a limit the statement stores nothing and the batch takes the slower path.
      let first = try await Self.insert(
        tenant,
        events,
        positions: Array(events.indices),
        gate: meterNames,
        connection: connection,
        logger: logger
      )
      let knownSet = Set(first.knownMeters)
      var unknown: [Int] = []
      var candidates: [Int] = []
      for (i, event) in events.enumerated() {
        if knownSet.contains(event.meter) { candidates.append(i) } else { unknown.append(i) }
      }
      let limit = first.limit
      if limit == 0 || candidates.isEmpty {
        return IngestResult(
          unknownMeter: unknown,
          outcome: IngestOutcome(
            accepted: first.inserted,
            duplicates: candidates.count - first.inserted,
            overQuota: [],
            monthlyLimit: limit
          )
        )
      }
      return try await Self.ingestWithinQuota(
        tenant,
        events,
        candidates: candidates,
        unknown: unknown,
        limit: limit,
        connection: connection,
        logger: logger
      )
    }
  }

  /// With a monthly quota: one batch of the tenant at a time (an advisory lock per tenant), so the
  /// used count and which events are new cannot change underneath; then only the first new events
  /// that fit are stored.
  static func ingestWithinQuota(
    _ tenant: TenantID,
    _ events: [UsageEventRow],
    candidates: [Int],
    unknown: [Int],
    limit: UInt64,
    connection: PostgresConnection,
    logger: Logger
  ) async throws -> IngestResult {
    try await connection.query(
      "SELECT pg_advisory_xact_lock(hashtextextended('tollgate.usage.' || \(tenant.rawValue), 0))",
      logger: logger
    )
    var used: Int64 = 0
    for try await n in try await connection.query(
      """
      SELECT coalesce(sum(events), 0)::bigint FROM usage_monthly
      WHERE month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
      """,
      logger: logger
    ).decode(Int64.self) {
      used = n
    }
    var existing: Set<Int> = []
    for try await ordinal in try await connection.query(
      """
      SELECT u.ord::bigint FROM unnest(\(candidates.map { events[$0].source }), \(candidates.map { events[$0].id }))
        WITH ORDINALITY AS u(source, event_id, ord)
      JOIN usage_events e ON e.source = u.source AND e.event_id = u.event_id
      """,
      logger: logger
    ).decode(Int64.self) {
      existing.insert(candidates[Int(ordinal) - 1])
    }
    let fresh = candidates.filter { !existing.contains($0) }
    let room = used >= Int64(clamping: limit) ? 0 : Int(clamping: Int64(clamping: limit) - used)
    if room == 0 && !fresh.isEmpty {
      // Thrown inside the transaction so it rolls back: the call's audit event must not commit
      // as a success.
      throw StoreError.quotaExhausted("the monthly usage-event quota of \(limit) events is used up")
    }
    let admitted = Array(fresh.prefix(room))
    let inserted = admitted.isEmpty
      ? 0 : try await insert(tenant, events, positions: admitted, connection: connection, logger: logger).inserted
    return IngestResult(
      unknownMeter: unknown,
      outcome: IngestOutcome(
        accepted: inserted,
        duplicates: candidates.count - fresh.count + (admitted.count - inserted),
        overQuota: Array(fresh.dropFirst(room)),
        monthlyLimit: limit
      )
    )
  }

  struct Inserted {
    var inserted: Int
    var knownMeters: [String]
    var limit: UInt64
  }

  /// Inserts the events at `positions` (skipping any already stored) and adds the number stored
  /// to this month's count, in one statement.
  ///
  /// With `gate` (the batch's meter names), the statement also reads which of them are defined
  /// and the tenant's monthly limit, and stores only events of defined meters, and only if there
  /// is no limit. Without, it stores every event given.
  ///
  /// Rows go in (source, id) order, so two batches carrying the same events wait on each other in
  /// one order and cannot deadlock. The month's count is spread over 16 rows picked by backend,
  /// so concurrent batches of one tenant do not queue on one counter row until they commit.
  static func insert(
    _ tenant: TenantID,
    _ events: [UsageEventRow],
    positions: [Int],
    gate: [String]? = nil,
    connection: PostgresConnection,
    logger: Logger
  ) async throws -> Inserted {
    let ordered = positions.sorted { a, b in
      let x = events[a], y = events[b]
      return x.source != y.source ? x.source < y.source : x.id < y.id
    }
    // One array per column, in row order, for unnest.
    let rows = ordered.map { events[$0] }
    let sources = rows.map(\.source), ids = rows.map(\.id), meters = rows.map(\.meter)
    let subjects = rows.map(\.subject), times = rows.map(\.time), values = rows.map(\.value)
    let properties = rows.map(\.propertiesJSON)
    let gated = gate != nil
    let result = try await connection.prepared(
      """
      WITH gate AS (
        SELECT (SELECT coalesce(array_agg(name), '{}') FROM meters WHERE name = ANY(\(gate ?? []))) AS known,
               (SELECT coalesce(quota->>'monthlyUsageEvents', '0') FROM tenants WHERE tenant_id = \(tenant.rawValue)) AS lim
      ), ins AS (
        INSERT INTO usage_events (tenant_id, source, event_id, meter, subject, event_time, value, properties)
        SELECT \(tenant.rawValue), u.s, u.i, u.m, u.sub, u.t, u.v, u.p::jsonb
        FROM unnest(\(sources)::text[], \(ids)::text[], \(meters)::text[], \(subjects)::text[],
                    \(times)::timestamptz[], \(values)::float8[], \(properties)::text[]) AS u(s, i, m, sub, t, v, p), gate
        WHERE NOT \(gated) OR (gate.lim = '0' AND u.m = ANY(gate.known))
        ON CONFLICT DO NOTHING
        RETURNING 1
      ), counted AS (SELECT count(*)::bigint AS n FROM ins),
      bump AS (
        INSERT INTO usage_monthly (tenant_id, month, shard, events)
        SELECT \(tenant.rawValue), date_trunc('month', now() AT TIME ZONE 'UTC')::date, pg_backend_pid() % 16, n
        FROM counted WHERE n > 0
        ON CONFLICT (tenant_id, month, shard) DO UPDATE SET events = usage_monthly.events + excluded.events
      )
      SELECT counted.n, gate.known, gate.lim FROM counted, gate
      """,
      logger: logger
    )
    for try await (n, known, limit) in result.decode((Int64, [String], String?).self) {
      return Inserted(inserted: Int(n), knownMeters: known, limit: limit.flatMap { UInt64($0) } ?? 0)
    }
    return Inserted(inserted: 0, knownMeters: [], limit: 0)
  }

  // MARK: Queries

  /// One page of a usage query: its rows and, if more follow, where the next page's scan starts.
  public struct UsagePage: Sendable {
    public var rows: [UsageRow]
    /// The window the next page starts reading from; nil on the last page.
    public var resumeAt: Date?
  }

  /// Reads the meter `meterName` and one page of the query `build` makes of it, in one
  /// transaction: rows in (window, subject, group) order, after `after`, at most `limit`.
  ///
  /// Rows come in window order, so a page needs only the events of the windows it shows. The
  /// range is read in window-aligned slices from the resume point: one slice of about an hour
  /// first, doubling while the page is not full (a subject filter reads the whole range at once,
  /// since its events are few and indexed by subject). A page of a dense 30-day range therefore
  /// reads an hour or two of events, not 30 days. The next page resumes at the window of the
  /// first row not returned, so it never re-reads a window this page finished. Every slice
  /// aggregates the stored events, so rows are exact for every aggregation.
  public func query(
    _ tenant: TenantID,
    meterName: String,
    logger: Logger,
    _ build: @escaping @Sendable (MeterDefinition) throws -> UsageQuery
  ) async throws -> (UsageQuery, UsagePage) {
    // A refusal by `build` (a bad request) is carried out of the transaction as a value, so it
    // reaches the caller as itself rather than as a store failure.
    let outcome: Result<(UsageQuery, UsagePage), any Error> = try await database.withTenant(tenant, logger: logger) { connection in
      var meter: MeterDefinition?
      for try await row in try await connection.prepared(
        "SELECT \(unescaped: Self.meterColumns) FROM meters WHERE name = \(meterName)",
        logger: logger
      ).decode(MeterRow.self) {
        meter = try Self.decodeMeter(row)
      }
      guard let meter else { throw StoreError.notFound("meter '\(meterName)' is not defined; define it with DefineMeter") }
      let query: UsageQuery
      do { query = try build(meter) } catch { return .failure(error) }
      return .success((query, try await Self.page(query, connection: connection, logger: logger)))
    }
    return try outcome.get()
  }

  static func page(_ query: UsageQuery, connection: PostgresConnection, logger: Logger) async throws -> UsagePage {
    let want = query.limit + 1
    var rows: [UsageRow] = []
    guard let window = query.window else {
      rows = try await slice(query, from: query.from, until: query.until, limit: want, connection: connection, logger: logger)
      return finish(rows, limit: query.limit, resumeAt: nil)
    }
    let stride = window.seconds
    var sliceStart = query.from
    if let after = query.after, after.window > sliceStart { sliceStart = after.window }
    if let resume = query.resumeAt, resume > sliceStart { sliceStart = resume }
    var span = query.subjects.isEmpty ? max(1, 3_600 / stride) : Int64.max / 2
    // A slice may return one row past the page (the next page then resumes at its window); a
    // slice that ends with the page exactly full is not followed by another just to find that row.
    while rows.count < query.limit && sliceStart < query.until {
      let alignedStart = align(sliceStart, stride: stride)
      let spanSeconds = span > (Int64.max / 2) / stride ? Int64.max / 4 : span * stride
      var sliceEnd = alignedStart.addingTimeInterval(TimeInterval(spanSeconds))
      if sliceEnd > query.until { sliceEnd = query.until }
      rows += try await slice(query, from: sliceStart, until: sliceEnd, limit: want - rows.count, connection: connection, logger: logger)
      sliceStart = sliceEnd
      span = min(span * 2, Int64.max / 2)
    }
    if rows.count == query.limit && sliceStart < query.until {
      // The page filled exactly at a slice's end: an index probe tells whether anything follows.
      let more = try await connection.query(
        """
        SELECT EXISTS (SELECT 1 FROM usage_events WHERE meter = \(query.meter.name)
          AND event_time >= \(sliceStart) AND event_time < \(query.until)
          AND (cardinality(\(query.subjects)::text[]) = 0 OR subject = ANY(\(query.subjects))))
        """,
        logger: logger
      ).decode(Bool.self)
      for try await exists in more where exists { return UsagePage(rows: rows, resumeAt: sliceStart) }
    }
    return finish(rows, limit: query.limit, resumeAt: nil)
  }

  /// The page of `rows` (at most `limit`), resuming at the first row left out, if any.
  static func finish(_ rows: [UsageRow], limit: Int, resumeAt: Date?) -> UsagePage {
    guard rows.count > limit else { return UsagePage(rows: rows, resumeAt: resumeAt) }
    return UsagePage(rows: Array(rows.prefix(limit)), resumeAt: rows[limit].key.window)
  }

  /// The start of the UTC-aligned window of `stride` seconds holding `date`.
  static func align(_ date: Date, stride: Int64) -> Date {
    let seconds = Int64(floor(date.timeIntervalSince1970))
    let start = seconds - ((seconds % stride) + stride) % stride
    return Date(timeIntervalSince1970: TimeInterval(start))
  }

  /// Aggregated rows of events in [from, until), after `query.after`, at most `limit`.
  static func slice(
    _ query: UsageQuery,
    from: Date,
    until: Date,
    limit: Int,
    connection: PostgresConnection,
    logger: Logger
  ) async throws -> [UsageRow] {
    var binds = PostgresBindings()
    func bind<T: PostgresDynamicTypeEncodable>(_ value: T) -> String {
      binds.append(value)
      return "$\(binds.count)"
    }
    let bucket: String
    if let window = query.window {
      bucket = "date_bin(\(bind("\(window.seconds) seconds"))::interval, event_time, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
    } else {
      bucket = "\(bind(query.from))::timestamptz"
    }
    let subject = query.groupBySubject ? "subject" : "''::text"
    let group = query.groupByProperties.isEmpty
      ? "'{}'::text[]"
      : "ARRAY[" + query.groupByProperties.map { "coalesce(properties->>\(bind($0)), '')" }.joined(separator: ", ") + "]::text[]"
    let value: String
    switch query.meter.aggregation {
    case .sum: value = "sum(value)"
    case .count: value = "count(*)::float8"
    case .max: value = "max(value)"
    case .uniqueCount: value = "count(DISTINCT properties->>\(bind(query.meter.valueProperty)))::float8"
    case .latest: value = "(array_agg(value ORDER BY event_time DESC, ingest_seq DESC))[1]"
    }
    var sql = """
      SELECT w, subj, grp, v FROM (
        SELECT \(bucket) AS w, \(subject) COLLATE "C" AS subj, \(group) COLLATE "C" AS grp, \(value) AS v
        FROM usage_events
        WHERE meter = \(bind(query.meter.name)) AND event_time >= \(bind(from)) AND event_time < \(bind(until))
      """
    if !query.subjects.isEmpty { sql += " AND subject = ANY(\(bind(query.subjects)))" }
    // Only real keys are grouped on: grouping (and so sorting) by a constant costs a comparison
    // per row for nothing. With no key at all, HAVING keeps an empty range from yielding a row.
    let keys = (query.window != nil ? ["1"] : []) + (query.groupBySubject ? ["2"] : [])
      + (query.groupByProperties.isEmpty ? [] : ["3"])
    sql += keys.isEmpty ? " HAVING count(*) > 0) g" : " GROUP BY \(keys.joined(separator: ", "))) g"
    if let after = query.after {
      // Unwindowed rows all carry the range start; binding that same value again keeps the
      // comparison exact rather than trusting a round trip through the page token.
      let window = query.window == nil ? query.from : after.window
      sql += " WHERE (w, subj, grp) > (\(bind(window))::timestamptz, \(bind(after.subject))::text, \(bind(after.group))::text[])"
    }
    sql += " ORDER BY w, subj, grp LIMIT \(bind(limit))"
    var rows: [UsageRow] = []
    for try await (w, s, g, v) in try await connection.query(PostgresQuery(unsafeSQL: sql, binds: binds), logger: logger)
      .decode((Date, String, [String], Double?).self)
    {
      rows.append(UsageRow(key: UsageRowKey(window: w, subject: s, group: g), value: v ?? 0))
    }
    return rows
  }
}
