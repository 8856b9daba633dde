public import Foundation
public import TollgateCore
public import TollgateModel

/// Request fields every service validates the same way: page sizes, opaque page tokens and
/// free text.
public enum RequestFields {
  /// Page size: 0 means `defaultSize`; otherwise 1...max.
  public static func pageSize(_ requested: Int32, default defaultSize: Int = 100, max: Int = 1000) throws(TollgateError) -> Int {
    if requested == 0 { return defaultSize }
    guard requested > 0, Int(requested) <= max else {
      throw .invalidField("page_size", "must be between 1 and \(max) (or 0 for \(defaultSize)), got \(requested)")
    }
    return Int(requested)
  }

  /// Page tokens are opaque to clients: base64url of "<kind>:<key>", so a token from one list is
  /// refused by another instead of silently returning the wrong page.
  public static func encodeToken(kind: String, key: String) -> String {
    Data("\(kind):\(key)".utf8).base64EncodedString()
      .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
      .replacingOccurrences(of: "=", with: "")
  }

  public static func decodeToken(_ token: String, kind: String) throws(TollgateError) -> String? {
    if token.isEmpty { return nil }
    var b64 = token.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
    while b64.count % 4 != 0 { b64 += "=" }
    guard let data = Data(base64Encoded: b64), let text = String(data: data, encoding: .utf8),
      text.hasPrefix("\(kind):")
    else {
      throw .invalidField("page_token", "is not a token this list returned; pass next_page_token unchanged")
    }
    return String(text.dropFirst(kind.count + 1))
  }

  /// A google.protobuf.Timestamp's `seconds` and `nanos` as a date, or nil outside what the type
  /// defines: years 0001 to 9999 of RFC 3339, nanos 0 to 999,999,999. SwiftProtobuf's `.date` traps
  /// on overflow for extreme seconds, so a request's timestamp must pass here before it is used.
  public static func date(seconds: Int64, nanos: Int32) -> Date? {
    guard (-62_135_596_800...253_402_300_799).contains(seconds), (0...999_999_999).contains(nanos) else { return nil }
    return Date(timeIntervalSince1970: TimeInterval(seconds) + TimeInterval(nanos) / 1e9)
  }

  /// Whether `date` is one a google.protobuf.Timestamp can hold, and so one PostgreSQL and its
  /// driver can take (postgres-nio converts a date to Int64 microseconds, which traps far outside).
  public static func isTimestamp(_ date: Date) -> Bool {
    let t = date.timeIntervalSince1970
    return t.isFinite && (-62_135_596_800...253_402_300_800).contains(t)
  }

  public static let timestampRange = "is not a valid timestamp (years 0001 to 9999 UTC, nanos 0 to 999999999)"

  /// Whether `text` holds a control or format character (NUL among them, which no PostgreSQL text
  /// can hold): refused in every field a person reads or a query compares.
  public static func hasControlCharacters(_ text: String) -> Bool {
    text.unicodeScalars.contains { CharacterSet.controlCharacters.contains($0) }
  }

  /// A free-text field: trimmed, at most `max` characters, no control characters.
  public static func text(_ value: String, field: String, max: Int, required: Bool = false) throws(TollgateError) -> String {
    let trimmed = value.trimmingCharacters(in: .whitespacesAndNewlines)
    if required && trimmed.isEmpty { throw .invalidField(field, "is required") }
    guard trimmed.count <= max else { throw .invalidField(field, "is \(trimmed.count) characters; at most \(max) allowed") }
    guard !hasControlCharacters(trimmed) else {
      throw .invalidField(field, "must not contain control characters")
    }
    return trimmed
  }
}

/// The tenant a call acts on: a tenant principal's own, or the one an operator names in the
/// tenant metadata.
public func actingTenant() throws(TollgateError) -> TenantID {
  let scope = try CallScope.required()
  guard let tenant = scope.tenant else {
    throw .invalidArgument(
      "name the tenant to act on in the '\(CallScope.tenantMetadataKey)' request metadata",
      [.init(field: CallScope.tenantMetadataKey, description: "is required for operators")]
    )
  }
  return tenant
}
