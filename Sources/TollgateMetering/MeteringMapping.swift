import Crypto
import Foundation
import SwiftProtobuf
import TollgateCore
import TollgateModel
import TollgateProtos
import TollgateServiceSupport

/// Conversions between meters and usage rows and their wire form, and request validation that
/// names the offending field.
enum MeteringMapping {
  static let maxGroupBy = 16
  static let maxSubjects = 100

  static func aggregation(_ wire: Tollgate_V1_Aggregation) -> Aggregation? {
    switch wire {
    case .sum: return .sum
    case .count: return .count
    case .max: return .max
    case .uniqueCount: return .uniqueCount
    case .latest: return .latest
    case .unspecified, .UNRECOGNIZED: return nil
    }
  }

  static func aggregation(_ value: Aggregation) -> Tollgate_V1_Aggregation {
    switch value {
    case .sum: return .sum
    case .count: return .count
    case .max: return .max
    case .uniqueCount: return .uniqueCount
    case .latest: return .latest
    }
  }

  static func meter(_ definition: MeterDefinition) -> Tollgate_V1_Meter {
    .with {
      $0.name = definition.name
      $0.aggregation = aggregation(definition.aggregation)
      $0.valueProperty = definition.valueProperty
      $0.groupBy = definition.groupBy
      $0.description_p = definition.description
      $0.createTime = Google_Protobuf_Timestamp(date: definition.createTime)
    }
  }

  /// A meter to define; every problem is reported at once.
  static func meterDefinition(_ request: Tollgate_V1_DefineMeterRequest) throws(TollgateError) -> MeterDefinition {
    guard request.hasMeter else { throw .invalidField("meter", "is required") }
    let wire = request.meter
    var violations: [TollgateError.FieldViolation] = []
    if !MeterDefinition.isValidName(wire.name) {
      violations.append(.init(field: "meter.name", description: "must be 1 to 64 of a-z 0-9 _ . -, got '\(UsageValidation.clip(wire.name))'"))
    }
    let kind = aggregation(wire.aggregation)
    if kind == nil {
      violations.append(.init(field: "meter.aggregation", description: "must be SUM, COUNT, MAX, UNIQUE_COUNT or LATEST"))
    }
    if kind == .uniqueCount {
      if !isPropertyKey(wire.valueProperty) {
        violations.append(.init(field: "meter.value_property", description: "UNIQUE_COUNT needs the property whose distinct values it counts (1 to 64 characters)"))
      }
    } else if !wire.valueProperty.isEmpty {
      violations.append(.init(field: "meter.value_property", description: "is only used by UNIQUE_COUNT meters; leave it empty"))
    }
    if wire.groupBy.count > maxGroupBy {
      violations.append(.init(field: "meter.group_by", description: "at most \(maxGroupBy) keys, got \(wire.groupBy.count)"))
    }
    for (i, key) in wire.groupBy.enumerated() {
      if !isPropertyKey(key) {
        violations.append(.init(field: "meter.group_by[\(i)]", description: "must be a property key of 1 to 64 characters"))
      } else if wire.groupBy.prefix(i).contains(key) {
        violations.append(.init(field: "meter.group_by[\(i)]", description: "'\(key)' is listed twice"))
      }
    }
    var description = ""
    do {
      description = try RequestFields.text(wire.description_p, field: "meter.description", max: 500)
    } catch {
      if case .invalidArgument(_, let found) = error { violations += found }
    }
    guard violations.isEmpty, let kind else {
      throw .invalidArgument(
        "invalid meter: " + violations.map { "\($0.field) \($0.description)" }.joined(separator: "; "),
        violations
      )
    }
    return MeterDefinition(
      name: wire.name,
      aggregation: kind,
      valueProperty: wire.valueProperty,
      groupBy: wire.groupBy,
      description: description
    )
  }

  static func isPropertyKey(_ key: String) -> Bool {
    !key.isEmpty && key.unicodeScalars.count <= UsageValidation.maxPropertyKeyLength && !key.utf8.contains(0)
  }

  /// A usage query checked as far as it can be without its meter.
  struct ParsedQuery {
    var meterName: String
    var from: Date
    var until: Date
    var window: UsageWindow?
    var subjects: [String]
    var groupBySubject: Bool
    var groupByProperties: [String]
    var after: UsageRowKey?
    var resumeAt: Date?
    var limit: Int
    /// Identifies the request apart from paging, so a token is only honoured by the query that made it.
    var fingerprint: String

    func resolve(_ meter: MeterDefinition) throws(TollgateError) -> UsageQuery {
      for (i, key) in groupByProperties.enumerated() where !meter.groupBy.contains(key) {
        throw .invalidField(
          "group_by_properties[\(i)]",
          "meter '\(meter.name)' does not allow grouping by '\(key)'; allowed: \(meter.groupBy.isEmpty ? "none" : meter.groupBy.joined(separator: ", ")) (redefine the meter to add keys)"
        )
      }
      return UsageQuery(
        meter: meter,
        from: from,
        until: until,
        window: window,
        subjects: subjects,
        groupBySubject: groupBySubject,
        groupByProperties: groupByProperties,
        after: after,
        resumeAt: resumeAt,
        limit: limit
      )
    }

    func token(after key: UsageRowKey, resumeAt: Date) -> String {
      let state = PageState(query: fingerprint, until: until.timeIntervalSince1970, after: key, resume: resumeAt.timeIntervalSince1970)
      let json = (try? JSONEncoder().encode(state)).map { String(decoding: $0, as: UTF8.self) } ?? ""
      return RequestFields.encodeToken(kind: "usage", key: json)
    }
  }

  /// What a usage page token carries: the query it belongs to, the end of its range (fixed at the
  /// first page when the request leaves it open, so pages agree), the last row returned, and the
  /// window the next page starts reading from.
  struct PageState: Codable {
    var query: String
    var until: Double
    var after: UsageRowKey
    var resume: Double
  }

  static func usageQuery(_ request: Tollgate_V1_QueryUsageRequest, now: Date) throws(TollgateError) -> ParsedQuery {
    if request.meter.isEmpty { throw .invalidField("meter", "is required") }
    guard MeterDefinition.isValidName(request.meter) else {
      throw .invalidField("meter", "'\(UsageValidation.clip(request.meter))' is not a meter name (1 to 64 of a-z 0-9 _ . -)")
    }
    guard request.hasRange, request.range.hasStartTime else {
      throw .invalidField("range.start_time", "is required")
    }
    let start = request.range.startTime
    guard let from = RequestFields.date(seconds: start.seconds, nanos: start.nanos) else {
      throw .invalidField("range.start_time", RequestFields.timestampRange)
    }
    var until = now
    if request.range.hasEndTime {
      let end = request.range.endTime
      guard let date = RequestFields.date(seconds: end.seconds, nanos: end.nanos) else {
        throw .invalidField("range.end_time", RequestFields.timestampRange)
      }
      until = date
    }
    let window: UsageWindow?
    switch request.windowSize {
    case .unspecified: window = nil
    case .minute: window = .minute
    case .hour: window = .hour
    case .day: window = .day
    case .UNRECOGNIZED(let n): throw .invalidField("window_size", "unknown value \(n)")
    }
    if request.subjects.count > maxSubjects {
      throw .invalidField("subjects", "at most \(maxSubjects) subjects, got \(request.subjects.count)")
    }
    for (i, subject) in request.subjects.enumerated() where subject.isEmpty || subject.unicodeScalars.count > 256 || subject.utf8.contains(0) {
      throw .invalidField("subjects[\(i)]", "must be 1 to 256 characters without NUL")
    }
    if request.groupByProperties.count > maxGroupBy {
      throw .invalidField("group_by_properties", "at most \(maxGroupBy) keys, got \(request.groupByProperties.count)")
    }
    for (i, key) in request.groupByProperties.enumerated() where request.groupByProperties.prefix(i).contains(key) {
      throw .invalidField("group_by_properties[\(i)]", "'\(key)' is listed twice")
    }
    let limit = try RequestFields.pageSize(request.pageSize, default: 1_000, max: 10_000)

    var identity = request
    identity.pageToken = ""
    identity.pageSize = 0
    var options = BinaryEncodingOptions()
    options.useDeterministicOrdering = true
    let bytes: [UInt8] = (try? identity.serializedBytes(options: options)) ?? []
    let fingerprint = SHA256.hash(data: bytes).prefix(12).map { String(format: "%02x", $0) }.joined()

    var after: UsageRowKey?
    var resumeAt: Date?
    if let text = try RequestFields.decodeToken(request.pageToken, kind: "usage") {
      guard let state = try? JSONDecoder().decode(PageState.self, from: Data(text.utf8)), state.query == fingerprint else {
        throw .invalidField("page_token", "belongs to a different query; pass next_page_token with the same request")
      }
      // Tokens are not signed, and anyone can compute a query's fingerprint: its dates are checked
      // like a request's before they reach the database.
      let dates = [Date(timeIntervalSince1970: state.resume), Date(timeIntervalSince1970: state.until), state.after.window]
      guard dates.allSatisfy(RequestFields.isTimestamp) else {
        throw .invalidField("page_token", "is not a token this query returned; pass next_page_token unchanged")
      }
      after = state.after
      resumeAt = dates[0]
      until = dates[1]
    }
    guard until > from else {
      throw .invalidField("range", "end_time must be after start_time")
    }
    return ParsedQuery(
      meterName: request.meter,
      from: from,
      until: until,
      window: window,
      subjects: request.subjects,
      groupBySubject: request.groupBySubject,
      groupByProperties: request.groupByProperties,
      after: after,
      resumeAt: resumeAt,
      limit: limit,
      fingerprint: fingerprint
    )
  }

  /// A row on the wire: its window clipped to the query's range, so the times say exactly which
  /// events it covers.
  static func row(_ row: TollgateModel.UsageRow, _ query: UsageQuery) -> Tollgate_V1_UsageRow {
    let start = max(row.key.window, query.from)
    let end = query.window.map { min(row.key.window.addingTimeInterval(TimeInterval($0.seconds)), query.until) } ?? query.until
    return .with {
      $0.windowStart = Google_Protobuf_Timestamp(date: start)
      $0.windowEnd = Google_Protobuf_Timestamp(date: end)
      $0.subject = row.key.subject
      for (key, value) in zip(query.groupByProperties, row.key.group) { $0.group[key] = value }
      $0.value = row.value
    }
  }
}
