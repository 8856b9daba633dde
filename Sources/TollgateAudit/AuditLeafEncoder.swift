import Foundation
import NIOCore
import SwiftProtobuf
import TollgateCore
import TollgateModel
import TollgateProtos

/// Writes the leaf bytes of an audit event: the binary encoding of a ``Tollgate_V1_AuditEvent``,
/// byte for byte what SwiftProtobuf's `serializedBytes()` gives for the same message (fields in
/// number order, proto3 defaults left out, set messages always written). The tests hold it to
/// that for every field.
///
/// The flusher writes thousands of events a second. Through a message value, each event copied
/// the message's storage, built the principal's message and its SPIFFE ID string, was serialized
/// in two passes (sizes, then bytes) and was copied once more into a buffer. Here the principal's
/// encoding is made once per principal and reused for the rest of the batch, and the event is
/// written straight into its buffer: the flush's CPU time per event fell by about 0.9 µs, 13%
/// (`tools/bench audit-cost`, docs/benchmarks.md). One encoder serves one batch: it keeps every
/// principal it has seen.
public final class AuditLeafEncoder {
  /// A principal's encoded `PrincipalInfo` and SPIFFE ID, by principal.
  private var principals: [Principal: (info: [UInt8], spiffeID: String)] = [:]

  public init() {}

  /// The `PrincipalInfo` encoding and SPIFFE ID of `principal`, made on first use.
  func principal(_ principal: Principal) -> (info: [UInt8], spiffeID: String) {
    if let known = principals[principal] { return known }
    let info = Tollgate_V1_PrincipalInfo.with {
      $0.spiffeID = principal.spiffeID.description
      $0.role = Tollgate_V1_Role(principal.role)
      $0.tenantID = principal.tenant?.rawValue ?? ""
      $0.name = principal.spiffeID.name
      $0.certificateSha256 = principal.certificateSHA256
    }
    let encoded = (info: (try? info.serializedBytes()) ?? [], spiffeID: info.spiffeID)
    principals[principal] = encoded
    return encoded
  }

  /// The event's bytes, and the principal's SPIFFE ID (empty without a principal).
  func leaf(
    time: Date,
    scope: CallScope?,
    tenant: String,
    method: String,
    resource: String,
    code: Int32,
    message: String,
    latency: Duration,
    requestSHA256: [UInt8],
    traceID: String
  ) -> (bytes: ByteBuffer, spiffeID: String) {
    // The same conversions as the message's fields, so the same seconds and nanos.
    let timestamp = Google_Protobuf_Timestamp(date: time)
    let duration = Google_Protobuf_Duration(rounding: latency, rule: .towardZero)
    let principal = scope.map { self.principal($0.principal) }
    var out = ByteBuffer()
    out.reserveCapacity(
      128 + (principal?.info.count ?? 0) + tenant.utf8.count + method.utf8.count + resource.utf8.count
        + message.utf8.count + requestSHA256.count + traceID.utf8.count
    )
    Self.writeTimeLike(field: 1, seconds: timestamp.seconds, nanos: timestamp.nanos, into: &out)
    if let principal {
      Self.writeTag(field: 2, wireType: 2, into: &out)
      Self.writeVarint(UInt64(principal.info.count), into: &out)
      out.writeBytes(principal.info)
    }
    Self.writeString(field: 3, tenant, into: &out)
    Self.writeString(field: 4, method, into: &out)
    Self.writeString(field: 5, resource, into: &out)
    if code != 0 {
      Self.writeTag(field: 6, wireType: 0, into: &out)
      // int32 is sign-extended to 64 bits on the wire.
      Self.writeVarint(UInt64(bitPattern: Int64(code)), into: &out)
    }
    Self.writeString(field: 7, message, into: &out)
    Self.writeTimeLike(field: 8, seconds: duration.seconds, nanos: duration.nanos, into: &out)
    if !requestSHA256.isEmpty {
      Self.writeTag(field: 9, wireType: 2, into: &out)
      Self.writeVarint(UInt64(requestSHA256.count), into: &out)
      out.writeBytes(requestSHA256)
    }
    if scope?.impersonated == true {
      Self.writeTag(field: 10, wireType: 0, into: &out)
      out.writeInteger(UInt8(1))
    }
    Self.writeString(field: 12, traceID, into: &out)
    return (out, principal?.spiffeID ?? "")
  }

  /// A set `Timestamp` or `Duration` field: both are `int64 seconds = 1; int32 nanos = 2`.
  static func writeTimeLike(field: Int, seconds: Int64, nanos: Int32, into out: inout ByteBuffer) {
    let secondsWire = UInt64(bitPattern: seconds)
    let nanosWire = UInt64(bitPattern: Int64(nanos))
    let length = (seconds != 0 ? 1 + varintSize(secondsWire) : 0) + (nanos != 0 ? 1 + varintSize(nanosWire) : 0)
    writeTag(field: field, wireType: 2, into: &out)
    writeVarint(UInt64(length), into: &out)
    if seconds != 0 {
      writeTag(field: 1, wireType: 0, into: &out)
      writeVarint(secondsWire, into: &out)
    }
    if nanos != 0 {
      writeTag(field: 2, wireType: 0, into: &out)
      writeVarint(nanosWire, into: &out)
    }
  }

  /// A proto3 string field, left out when empty.
  static func writeString(field: Int, _ value: String, into out: inout ByteBuffer) {
    guard !value.isEmpty else { return }
    writeTag(field: field, wireType: 2, into: &out)
    writeVarint(UInt64(value.utf8.count), into: &out)
    out.writeString(value)
  }

  static func writeTag(field: Int, wireType: UInt64, into out: inout ByteBuffer) {
    writeVarint(UInt64(field) << 3 | wireType, into: &out)
  }

  static func writeVarint(_ value: UInt64, into out: inout ByteBuffer) {
    var value = value
    while value >= 0x80 {
      out.writeInteger(UInt8(truncatingIfNeeded: value) | 0x80)
      value >>= 7
    }
    out.writeInteger(UInt8(value))
  }

  static func varintSize(_ value: UInt64) -> Int {
    value == 0 ? 1 : (64 - value.leadingZeroBitCount + 6) / 7
  }
}
