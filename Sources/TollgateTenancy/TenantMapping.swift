import Foundation
import SwiftProtobuf
import TollgateCore
import TollgateModel
import TollgateProtos

/// Conversions between stored tenant values and their wire form, and request validation that
/// names the offending field.
enum TenantMapping {
  static func tenant(_ record: TenantRecord) -> Tollgate_V1_Tenant {
    .with {
      $0.tenantID = record.id.rawValue
      $0.displayName = record.displayName
      $0.state = record.state == .active ? .active : .suspended
      $0.quota = quota(record.quota)
      $0.createTime = Google_Protobuf_Timestamp(date: record.createTime)
      $0.updateTime = Google_Protobuf_Timestamp(date: record.updateTime)
      $0.suspendReason = record.suspendReason
    }
  }

  static func quota(_ settings: QuotaSettings) -> Tollgate_V1_Quota {
    .with { q in
      q.rateLimits = QuotaClass.allCases.compactMap { cls in
        settings.rateLimits[cls].map { limit in
          Tollgate_V1_RateLimit.with {
            $0.quotaClass = quotaClass(cls)
            $0.ratePerSecond = limit.ratePerSecond
            $0.burst = limit.burst
          }
        }
      }
      q.maxConcurrentCalls = settings.maxConcurrentCalls
      q.monthlyUsageEvents = settings.monthlyUsageEvents
      q.workflowTypeConcurrency = settings.workflowTypeConcurrency
    }
  }

  static func quotaClass(_ cls: QuotaClass) -> Tollgate_V1_QuotaClass {
    switch cls {
    case .ingest: return .ingest
    case .query: return .query
    case .admin: return .admin
    case .workflow: return .workflow
    case .audit: return .audit
    }
  }

  static func quotaClass(_ cls: Tollgate_V1_QuotaClass) -> QuotaClass? {
    switch cls {
    case .ingest: return .ingest
    case .query: return .query
    case .admin: return .admin
    case .workflow: return .workflow
    case .audit: return .audit
    case .unspecified, .UNRECOGNIZED: return nil
    }
  }

  /// The quota a request asks for, laid over the defaults: listed classes replace the default
  /// limits, unlisted ones keep them, zero max_concurrent_calls keeps the default. Every problem
  /// is reported, not just the first.
  static func quotaSettings(from wire: Tollgate_V1_Quota, field: String) throws(TollgateError) -> QuotaSettings {
    var settings = QuotaSettings.defaults
    var violations: [TollgateError.FieldViolation] = []
    var seen: Set<QuotaClass> = []
    for (i, limit) in wire.rateLimits.enumerated() {
      let path = "\(field).rate_limits[\(i)]"
      guard let cls = quotaClass(limit.quotaClass) else {
        violations.append(.init(field: "\(path).quota_class", description: "must be one of INGEST, QUERY, ADMIN, WORKFLOW, AUDIT"))
        continue
      }
      guard seen.insert(cls).inserted else {
        violations.append(.init(field: "\(path).quota_class", description: "class \(cls.rawValue) is listed more than once"))
        continue
      }
      settings.rateLimits[cls] = RateLimit(ratePerSecond: limit.ratePerSecond, burst: limit.burst)
    }
    if wire.maxConcurrentCalls != 0 { settings.maxConcurrentCalls = wire.maxConcurrentCalls }
    settings.monthlyUsageEvents = wire.monthlyUsageEvents
    settings.workflowTypeConcurrency = wire.workflowTypeConcurrency
    violations += settings.violations(fieldPrefix: field).map { .init(field: $0.field, description: $0.description) }
    guard violations.isEmpty else {
      throw .invalidArgument("invalid \(field): \(violations.map { "\($0.field) \($0.description)" }.joined(separator: "; "))", violations)
    }
    return settings
  }

  static func revocation(_ record: RevocationRecord) -> Tollgate_V1_Revocation {
    .with {
      $0.revocationID = String(record.id)
      switch record.target {
      case .serial(let s): $0.serialHex = s
      case .fingerprint(let f): $0.sha256Fingerprint = f
      }
      $0.reason = record.reason
      $0.tenantID = record.tenant?.rawValue ?? ""
      $0.revokedBy = record.revokedBy
      $0.createTime = Google_Protobuf_Timestamp(date: record.createTime)
    }
  }
}
