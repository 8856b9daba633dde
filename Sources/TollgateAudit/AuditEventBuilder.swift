import Crypto
public import Foundation
import NIOCore
public import SwiftProtobuf
public import TollgateCore
public import TollgateModel
import TollgateProtos
public import TollgateStore

/// Builds audit-log leaves: the one place an ``Tollgate_V1_AuditEvent`` is put together (and
/// written, by ``AuditLeafEncoder``), for calls (``AuditedCall``) and for what happens inside a
/// long-lived call (a worker's lease, completion or failure) or without one (a lease expiring).
public enum AuditEventBuilder {
  /// An event. `scope` nil is the gateway acting on its own (no principal); `log` is then the
  /// tenant's log. A flush passes one `encoder` for its whole batch, which reuses what it can.
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
    latency: Duration = .zero,
    encoder: AuditLeafEncoder = AuditLeafEncoder()
  ) -> AuditEntry {
    // Written once; these bytes are the leaf, stored and served as they are.
    let (leaf, spiffeID) = encoder.leaf(
      time: time, scope: scope, tenant: tenant?.rawValue ?? "", method: method, resource: resource, code: code,
      message: message, latency: latency, requestSHA256: requestSHA256, traceID: traceID
    )
    return AuditEntry(
      log: AuditLogID(tenant: tenant),
      leaf: leaf,
      time: time,
      method: method,
      principal: spiffeID,
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
