/// The classes quotas are enforced per; every RPC method belongs to exactly one.
public enum QuotaClass: String, CaseIterable, Codable, Hashable, Sendable {
  case ingest
  case query
  case admin
  case workflow
  case audit
}

/// A sustained rate with a burst allowance for one quota class.
public struct RateLimit: Codable, Hashable, Sendable {
  /// Sustained admissions per second; finite and > 0.
  public var ratePerSecond: Double
  /// Admissions allowed at once after idling; >= 1.
  public var burst: UInt32

  public init(ratePerSecond: Double, burst: UInt32) {
    self.ratePerSecond = ratePerSecond
    self.burst = burst
  }
}

/// A tenant's limits. Every class always has a limit: classes a caller does not set take
/// ``QuotaSettings/defaults``' values, so enforcement never meets a hole.
public struct QuotaSettings: Codable, Hashable, Sendable {
  /// One limit per class.
  public var rateLimits: [QuotaClass: RateLimit]
  /// Concurrent calls across the fleet (open streams count).
  public var maxConcurrentCalls: UInt32
  /// Usage events accepted per calendar month (UTC); 0 means unlimited.
  public var monthlyUsageEvents: UInt64
  /// Workflow task type -> most runs of it RUNNING at once across the fleet. Unlisted types are
  /// bounded only by their workers' capacity. Stored under this JSON key, which the claim query
  /// reads.
  public var workflowTypeConcurrency: [String: UInt32]

  public init(
    rateLimits: [QuotaClass: RateLimit],
    maxConcurrentCalls: UInt32,
    monthlyUsageEvents: UInt64,
    workflowTypeConcurrency: [String: UInt32] = [:]
  ) {
    self.rateLimits = rateLimits
    self.maxConcurrentCalls = maxConcurrentCalls
    self.monthlyUsageEvents = monthlyUsageEvents
    self.workflowTypeConcurrency = workflowTypeConcurrency
  }

  enum CodingKeys: String, CodingKey {
    case rateLimits, maxConcurrentCalls, monthlyUsageEvents, workflowTypeConcurrency
  }

  // Quotas stored before workflow limits existed have no such key.
  public init(from decoder: any Decoder) throws {
    let container = try decoder.container(keyedBy: CodingKeys.self)
    rateLimits = try container.decode([QuotaClass: RateLimit].self, forKey: .rateLimits)
    maxConcurrentCalls = try container.decode(UInt32.self, forKey: .maxConcurrentCalls)
    monthlyUsageEvents = try container.decode(UInt64.self, forKey: .monthlyUsageEvents)
    workflowTypeConcurrency =
      try container.decodeIfPresent([String: UInt32].self, forKey: .workflowTypeConcurrency) ?? [:]
  }

  /// What a new tenant gets: generous enough for a real partner, small enough that one tenant
  /// cannot take a 2-core gateway for itself.
  public static let defaults = QuotaSettings(
    rateLimits: [
      .ingest: RateLimit(ratePerSecond: 2_000, burst: 4_000),
      .query: RateLimit(ratePerSecond: 100, burst: 200),
      .admin: RateLimit(ratePerSecond: 20, burst: 40),
      .workflow: RateLimit(ratePerSecond: 200, burst: 400),
      .audit: RateLimit(ratePerSecond: 50, burst: 100),
    ],
    maxConcurrentCalls: 256,
    monthlyUsageEvents: 0
  )

  /// Why a quota cannot be stored; `field` is the request path of the offending value.
  public struct Violation: Error, Hashable, Sendable {
    public var field: String
    public var description: String
    public init(field: String, description: String) {
      self.field = field
      self.description = description
    }
  }

  /// Every problem with these settings (empty when valid).
  public func violations(fieldPrefix: String = "quota") -> [Violation] {
    var out: [Violation] = []
    for cls in QuotaClass.allCases {
      guard let limit = rateLimits[cls] else {
        out.append(Violation(field: "\(fieldPrefix).rate_limits", description: "no limit for class \(cls.rawValue)"))
        continue
      }
      // Below one call per 1,000 s a rate limit means "none": suspend the tenant instead.
      if !(0.001...1_000_000).contains(limit.ratePerSecond) {
        out.append(
          Violation(
            field: "\(fieldPrefix).rate_limits[\(cls.rawValue)].rate_per_second",
            description: "must be from 0.001 to 1000000 calls per second, got \(limit.ratePerSecond)"
          )
        )
      }
      if limit.burst < 1 || limit.burst > 10_000_000 {
        out.append(
          Violation(
            field: "\(fieldPrefix).rate_limits[\(cls.rawValue)].burst",
            description: "must be between 1 and 10000000, got \(limit.burst)"
          )
        )
      }
    }
    if maxConcurrentCalls < 1 || maxConcurrentCalls > 100_000 {
      out.append(
        Violation(
          field: "\(fieldPrefix).max_concurrent_calls",
          description: "must be between 1 and 100000, got \(maxConcurrentCalls)"
        )
      )
    }
    for (type, limit) in workflowTypeConcurrency.sorted(by: { $0.key < $1.key }) {
      if !WorkflowTaskType.isValid(type) {
        out.append(
          Violation(
            field: "\(fieldPrefix).workflow_type_concurrency[\(type)]",
            description: "is not a task type: \(WorkflowTaskType.rule)"
          )
        )
      }
      if limit < 1 || limit > 10_000 {
        out.append(
          Violation(
            field: "\(fieldPrefix).workflow_type_concurrency[\(type)]",
            description: "must be between 1 and 10000, got \(limit)"
          )
        )
      }
    }
    return out
  }
}
extension QuotaClass: CodingKeyRepresentable {}
