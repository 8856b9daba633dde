import Crypto
public import Foundation
import NIOCore
public import SwiftProtobuf
public import TollgateCore
public import TollgateModel
import TollgateProtos
public import TollgateStore

/// Builds audit-log leaves: the one place an ``Tollgate_V1_AuditEvent`` is put together and
/// serialized, for calls (``AuditedCall``) and for what happens inside a long-lived call (a
/// worker's lease, completion or failure) or without one (a lease expiring).
public enum AuditEventBuilder {
  /// An event. `scope` nil is the gateway acting on its own (no principal); `log` is then the
  /// tenant's log.
  public static func entry(
    scope: CallScope?,
    tenant: TenantID?,
    method: String,
    resource: String,
    code: Int32,
    message: String,
    requestSHA256: [UInt8] = [],
    traceID: String = "",
    time: Date = Date(),
    latency: Duration = .zero
  ) -> AuditEntry {
    var event = Tollgate_V1_AuditEvent()
    event.time = Google_Protobuf_Timestamp(date: time)
    if let scope {
      event.principal = .with {
        $0.spiffeID = scope.principal.spiffeID.description
        $0.role = Tollgate_V1_Role(scope.principal.role)
        $0.tenantID = scope.principal.tenant?.rawValue ?? ""
        $0.name = scope.principal.spiffeID.name
        $0.certificateSha256 = scope.principal.certificateSHA256
      }
      event.impersonated = scope.impersonated
    }
    event.tenantID = tenant?.rawValue ?? ""
    event.method = method
    event.resource = resource
    event.outcomeCode = code
    event.outcomeMessage = message
    event.latency = Google_Protobuf_Duration(rounding: latency, rule: .towardZero)
    event.requestSha256 = Data(requestSHA256)
    event.traceID = traceID
    // Serialized once; these bytes are the leaf, stored and served as they are.
    let bytes: [UInt8] = (try? event.serializedBytes()) ?? []
    return AuditEntry(
      log: AuditLogID(tenant: tenant),
      leaf: ByteBuffer(bytes: bytes),
      time: time,
      method: method,
      principal: event.principal.spiffeID,
      outcome: code
    )
  }

  /// The SHA-256 of a request message's deterministic serialization, which is what an event's
  /// `request_sha256` commits to (the wire bytes are not available to interceptors).
  public static func requestDigest(_ message: any SwiftProtobuf.Message) -> [UInt8] {
    var options = BinaryEncodingOptions()
    options.useDeterministicOrdering = true
    guard let bytes: [UInt8] = try? message.serializedBytes(options: options) else { return [] }
    // Copied at once; the digest's iterator hands its 32 bytes over one by one.
    return SHA256.hash(data: bytes).withUnsafeBytes { Array($0) }
  }
}
