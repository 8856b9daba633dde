public import struct Foundation.Date

/// Lowercase hex without separators, for serial numbers and fingerprints as users paste them
/// (`AB:CD:…`, `abcd…`, with or without colons or spaces).
public enum HexText {
  /// Normalises `text` to lowercase hex digits, or returns nil if anything else remains.
  public static func normalize(_ text: String) -> String? {
    let kept = text.lowercased().filter { $0 != ":" && $0 != " " }
    guard !kept.isEmpty, kept.allSatisfy({ $0.isHexDigit && $0.isASCII }) else { return nil }
    return kept
  }

  /// Hex of `bytes`, lowercase.
  public static func encode<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for b in bytes {
      out.append(digits[Int(b >> 4)])
      out.append(digits[Int(b & 0x0f)])
    }
    return String(decoding: out, as: UTF8.self)
  }
}

/// What a revocation matches: a certificate serial number or the SHA-256 of its DER bytes.
public enum RevocationTarget: Hashable, Sendable {
  /// Normalised lowercase hex serial, leading zero bytes stripped so `00ab` and `ab` match.
  case serial(String)
  /// Normalised lowercase hex SHA-256 fingerprint, 64 digits.
  case fingerprint(String)

  /// Canonical form of a serial: lowercase hex with leading zeros removed (at least one digit).
  public static func canonicalSerial(_ hex: String) -> String {
    let trimmed = hex.drop(while: { $0 == "0" })
    return trimmed.isEmpty ? "0" : String(trimmed)
  }
}

/// A stored revocation.
public struct RevocationRecord: Sendable, Hashable {
  public var id: Int64
  public var target: RevocationTarget
  /// The tenant whose principals it applies to; nil for every tenant (and operators).
  public var tenant: TenantID?
  public var reason: String
  public var revokedBy: String
  public var createTime: Date

  public init(
    id: Int64,
    target: RevocationTarget,
    tenant: TenantID?,
    reason: String,
    revokedBy: String,
    createTime: Date
  ) {
    self.id = id
    self.target = target
    self.tenant = tenant
    self.reason = reason
    self.revokedBy = revokedBy
    self.createTime = createTime
  }
}
