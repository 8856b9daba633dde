/// Which append-only audit log an event belongs to: a tenant's own, or the platform log for
/// calls that act on no tenant (an operator's platform-wide administration).
public enum AuditLogID: Hashable, Sendable, Comparable, CustomStringConvertible {
  case tenant(TenantID)
  case platform

  /// The stored key. `_platform` can never be a tenant id (those start with a letter or digit).
  public var rawValue: String {
    switch self {
    case .tenant(let id): return id.rawValue
    case .platform: return "_platform"
    }
  }

  /// A tenant's log, or the platform log for a call on no tenant.
  public init(tenant: TenantID?) {
    self = tenant.map { .tenant($0) } ?? .platform
  }

  public init?(rawValue: String) {
    if rawValue == "_platform" {
      self = .platform
    } else if let id = try? TenantID(validating: rawValue) {
      self = .tenant(id)
    } else {
      return nil
    }
  }

  public static func < (lhs: AuditLogID, rhs: AuditLogID) -> Bool { lhs.rawValue < rhs.rawValue }

  public var description: String {
    switch self {
    case .tenant(let id): return "tenant '\(id)'"
    case .platform: return "the platform log"
    }
  }

}
