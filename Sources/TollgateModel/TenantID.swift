/// A validated tenant identifier: lowercase ASCII letters, digits and `-`, 3 to 63 characters,
/// starting and ending with a letter or digit (a DNS label, so it fits hostnames, SPIFFE paths
/// and Postgres settings without escaping).
///
/// Parse once at the edge with ``init(validating:)``; everything after takes a `TenantID`.
public struct TenantID: Hashable, Sendable, Comparable, CustomStringConvertible {
  /// The identifier's text.
  public let rawValue: String

  /// Why a string is not a tenant id, in words a caller can act on.
  public enum Invalid: Error, Equatable, Sendable, CustomStringConvertible {
    case empty
    case length(Int)
    case character(Character)
    case edgeHyphen

    public var description: String {
      switch self {
      case .empty:
        return "tenant id is empty; use 3 to 63 lowercase letters, digits or '-'"
      case .length(let n):
        return "tenant id has \(n) characters; use 3 to 63"
      case .character(let c):
        return "tenant id contains '\(c)'; only lowercase letters a-z, digits 0-9 and '-' are allowed"
      case .edgeHyphen:
        return "tenant id must start and end with a letter or digit, not '-'"
      }
    }
  }

  /// Validates `text` as a tenant id.
  public init(validating text: String) throws(Invalid) {
    if text.isEmpty { throw .empty }
    for c in text where !(("a"..."z").contains(c) || ("0"..."9").contains(c) || c == "-") {
      throw .character(c)
    }
    // Every character is ASCII from here, so count is the byte length.
    guard (3...63).contains(text.count) else { throw .length(text.count) }
    if text.first == "-" || text.last == "-" { throw .edgeHyphen }
    self.rawValue = text
  }

  public var description: String { rawValue }

  public static func < (lhs: TenantID, rhs: TenantID) -> Bool { lhs.rawValue < rhs.rawValue }
}
