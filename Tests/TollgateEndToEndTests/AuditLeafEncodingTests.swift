import Foundation
import NIOCore
import SwiftProtobuf
import Testing
@testable import TollgateAudit
import TollgateCore
import TollgateModel
import TollgateProtos
import TollgateStore

/// The leaf bytes written by hand must be exactly SwiftProtobuf's serialization of the same
/// event: verifiers and auditors decode leaves with any protobuf library, and the gateway's own
/// earlier leaves were written by SwiftProtobuf.
@Suite struct AuditLeafEncodingTests {
  static let acme = try! TenantID(validating: "acme")
  static let partner = Principal(
    spiffeID: SPIFFEID(tenant: acme, role: .partner, name: "billing", trustDomain: "tollgate.test"),
    certificateSHA256: String(repeating: "0f", count: 32),
    serialHex: "1a"
  )
  static let auditor = Principal(
    spiffeID: SPIFFEID(tenant: acme, role: .auditor, name: "compliance-ü", trustDomain: "tollgate.test"),
    certificateSHA256: String(repeating: "e1", count: 32),
    serialHex: "2b"
  )
  static let operatorPrincipal = Principal(
    spiffeID: SPIFFEID(operatorNamed: "alice", trustDomain: "tollgate.test"),
    certificateSHA256: String(repeating: "9c", count: 32),
    serialHex: "3c"
  )
  static let scopes: [CallScope?] = [
    CallScope(principal: partner, tenant: acme, impersonated: false),
    nil,
    CallScope(principal: operatorPrincipal, tenant: acme, impersonated: true),
    CallScope(principal: auditor, tenant: acme, impersonated: false),
    CallScope(principal: operatorPrincipal, tenant: nil, impersonated: false),
  ]
  static let times: [Date] = [
    Date(timeIntervalSince1970: 1_796_000_000.123456),
    Date(timeIntervalSince1970: 0),
    Date(timeIntervalSince1970: -1.25),
    Date(timeIntervalSince1970: 253_402_300_799),
    Date(timeIntervalSince1970: 1.5),
    Date(timeIntervalSince1970: 7),
  ]
  static let latencies: [Duration] = [
    .milliseconds(3),
    .zero,
    Duration(secondsComponent: 0, attosecondsComponent: 1_999_999_999),
    .seconds(100_000),
    .nanoseconds(999_999_999),
    .seconds(2),
    .microseconds(1_500_001),
  ]
  static let codes: [Int32] = [0, 7, -1, .max, .min, 14, 3, 0, 128]
  static let texts = ["", "/tollgate.v1.TenantService/GetTenant", "café ☕ run-7", String(repeating: "x", count: 300)]
  static let digests: [[UInt8]] = [[], Array(0..<32), [0]]

  /// The event as the gateway used to build and serialize it, through the generated message.
  static func reference(
    time: Date, scope: CallScope?, tenant: TenantID?, method: String, resource: String, code: Int32,
    message: String, latency: Duration, digest: [UInt8], traceID: String
  ) throws -> [UInt8] {
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
    event.requestSha256 = Data(digest)
    event.traceID = traceID
    return try event.serializedBytes()
  }

  @Test func handWrittenLeavesAreSwiftProtobufsBytes() throws {
    // One encoder for all, as in a flush: its principal cache must not mix principals up.
    let encoder = AuditLeafEncoder()
    for i in 0..<420 {
      let scope = Self.scopes[i % Self.scopes.count]
      let tenant = i % 4 == 1 ? nil : scope?.tenant ?? Self.acme
      let time = Self.times[i % Self.times.count]
      let latency = Self.latencies[i % Self.latencies.count]
      let code = Self.codes[i % Self.codes.count]
      let method = Self.texts[(i / 2) % Self.texts.count]
      let resource = Self.texts[(i / 3) % Self.texts.count]
      let message = Self.texts[(i / 5) % Self.texts.count]
      let traceID = i % 2 == 0 ? "" : String(format: "%032x", i)
      let digest = Self.digests[i % Self.digests.count]
      let entry = AuditEventBuilder.entry(
        scope: scope, tenant: tenant, method: method, resource: resource, code: code, message: message,
        requestSHA256: digest, traceID: traceID, time: time, latency: latency, encoder: encoder
      )
      let expected = try Self.reference(
        time: time, scope: scope, tenant: tenant, method: method, resource: resource, code: code, message: message,
        latency: latency, digest: digest, traceID: traceID
      )
      #expect(Array(entry.leaf.readableBytesView) == expected, "event \(i)")
      #expect(entry.principal == (scope?.principal.spiffeID.description ?? ""), "event \(i)")
      #expect(entry.method == method && entry.outcome == code && entry.time == time)
    }
  }

  @Test func lengthsAndVarintsAtTheirBoundaries() throws {
    // Lengths of 127 and 128 bytes take one and two varint bytes.
    for count in [0, 1, 127, 128, 16_383, 16_384] {
      let text = String(repeating: "a", count: count)
      let entry = AuditEventBuilder.entry(
        scope: Self.scopes[0], tenant: Self.acme, method: text, resource: "", code: 0, message: text,
        time: Self.times[0], latency: .zero
      )
      let expected = try Self.reference(
        time: Self.times[0], scope: Self.scopes[0], tenant: Self.acme, method: text, resource: "", code: 0,
        message: text, latency: .zero, digest: [], traceID: ""
      )
      #expect(Array(entry.leaf.readableBytesView) == expected, "length \(count)")
    }
  }
}
