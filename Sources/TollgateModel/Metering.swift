public import Foundation

/// How a meter aggregates its events' values.
public enum Aggregation: String, CaseIterable, Codable, Hashable, Sendable {
  case sum
  case count
  case max
  case uniqueCount = "unique_count"
  case latest
}

/// A meter as stored: which event `meter` type it aggregates and how.
public struct MeterDefinition: Hashable, Sendable {
  public var name: String
  public var aggregation: Aggregation
  /// For ``Aggregation/uniqueCount``: the property whose distinct values are counted; else empty.
  public var valueProperty: String
  /// Property keys queries may group by.
  public var groupBy: [String]
  public var description: String
  public var createTime: Date

  public init(
    name: String,
    aggregation: Aggregation,
    valueProperty: String,
    groupBy: [String],
    description: String,
    createTime: Date = Date(timeIntervalSince1970: 0)
  ) {
    self.name = name
    self.aggregation = aggregation
    self.valueProperty = valueProperty
    self.groupBy = groupBy
    self.description = description
    self.createTime = createTime
  }

  /// Meter names (and event `meter` types): 1 to 64 of `[a-z0-9_.-]`.
  public static func isValidName(_ name: String) -> Bool {
    (1...64).contains(name.utf8.count)
      && name.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5f || $0 == 0x2e || $0 == 0x2d }
  }
}

/// A validated usage event, ready to store. `propertiesJSON` is the properties as a JSON object.
public struct UsageEventRow: Sendable {
  public var source: String
  public var id: String
  public var meter: String
  public var subject: String
  public var time: Date
  public var value: Double
  public var propertiesJSON: String

  public init(source: String, id: String, meter: String, subject: String, time: Date, value: Double, propertiesJSON: String) {
    self.source = source
    self.id = id
    self.meter = meter
    self.subject = subject
    self.time = time
    self.value = value
    self.propertiesJSON = propertiesJSON
  }
}

/// Time bucket size of a usage query.
public enum UsageWindow: Sendable, Hashable {
  case minute
  case hour
  case day

  public var seconds: Int64 {
    switch self {
    case .minute: return 60
    case .hour: return 3_600
    case .day: return 86_400
    }
  }
}

/// The identity of one usage row, in result order; also what a page token resumes after.
public struct UsageRowKey: Sendable, Hashable, Codable {
  /// Start of the row's window (aligned bucket start, or the range start when unwindowed).
  public var window: Date
  public var subject: String
  public var group: [String]

  public init(window: Date, subject: String, group: [String]) {
    self.window = window
    self.subject = subject
    self.group = group
  }
}

/// One aggregated row of a usage query.
public struct UsageRow: Sendable, Hashable {
  public var key: UsageRowKey
  public var value: Double

  public init(key: UsageRowKey, value: Double) {
    self.key = key
    self.value = value
  }
}

/// A validated usage query.
public struct UsageQuery: Sendable {
  public var meter: MeterDefinition
  public var from: Date
  public var until: Date
  public var window: UsageWindow?
  public var subjects: [String]
  public var groupBySubject: Bool
  public var groupByProperties: [String]
  public var after: UsageRowKey?
  /// Where to start reading (the window of the first row the previous page left out).
  public var resumeAt: Date?
  public var limit: Int

  public init(
    meter: MeterDefinition,
    from: Date,
    until: Date,
    window: UsageWindow?,
    subjects: [String],
    groupBySubject: Bool,
    groupByProperties: [String],
    after: UsageRowKey?,
    resumeAt: Date? = nil,
    limit: Int
  ) {
    self.meter = meter
    self.from = from
    self.until = until
    self.window = window
    self.subjects = subjects
    self.groupBySubject = groupBySubject
    self.groupByProperties = groupByProperties
    self.after = after
    self.resumeAt = resumeAt
    self.limit = limit
  }
}

/// What the store did with one batch of validated, in-batch-unique events.
public struct IngestOutcome: Sendable, Hashable {
  /// Events committed now.
  public var accepted: Int
  /// Events already stored earlier.
  public var duplicates: Int
  /// Positions (into the rows given) refused because the monthly quota ran out.
  public var overQuota: [Int]
  /// The monthly limit that applied (0 = unlimited).
  public var monthlyLimit: UInt64

  public init(accepted: Int, duplicates: Int, overQuota: [Int], monthlyLimit: UInt64) {
    self.accepted = accepted
    self.duplicates = duplicates
    self.overQuota = overQuota
    self.monthlyLimit = monthlyLimit
  }
}
