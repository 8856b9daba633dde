import Foundation
import Synchronization
import Testing
import TollgateCertificates
import TollgateCore
import TollgateModel
import X509

@Suite struct TenantIDTests {
  @Test(arguments: ["abc", "acme", "a-1", "0rg", String(repeating: "a", count: 63)])
  func accepts(_ text: String) throws {
    #expect(try TenantID(validating: text).rawValue == text)
  }

  @Test(arguments: [
    ("", TenantID.Invalid.empty),
    ("ab", .length(2)),
    (String(repeating: "a", count: 64), .length(64)),
    ("Acme", .character("A")),
    ("ac_me", .character("_")),
    ("ac me", .character(" ")),
    ("-acme", .edgeHyphen),
    ("acme-", .edgeHyphen),
    ("acmé", .character("é")),
  ])
  func rejects(_ text: String, _ expected: TenantID.Invalid) {
    #expect(throws: expected) { try TenantID(validating: text) }
  }
}

@Suite struct SPIFFEIDTests {
  @Test func parsesTenantPrincipal() throws {
    let id = try SPIFFEID(parsing: "spiffe://example.org/tenant/acme/partner/billing", expectedTrustDomain: "example.org")
    #expect(id.tenant?.rawValue == "acme")
    #expect(id.role == .partner)
    #expect(id.name == "billing")
    #expect(id.description == "spiffe://example.org/tenant/acme/partner/billing")
  }

  @Test func parsesOperator() throws {
    let id = try SPIFFEID(parsing: "spiffe://example.org/operator/alice", expectedTrustDomain: "example.org")
    #expect(id.tenant == nil)
    #expect(id.role == .operator)
  }

  @Test(arguments: [
    "https://example.org/tenant/acme/partner/x",
    "spiffe://other.org/tenant/acme/partner/x",
    "spiffe://example.org/tenant/acme/operator/x",
    "spiffe://example.org/tenant/acme/admin/x",
    "spiffe://example.org/tenant/ACME/partner/x",
    "spiffe://example.org/tenant/acme/partner",
    "spiffe://example.org/tenant/acme/partner/x/y",
    "spiffe://example.org/operator",
    "spiffe://example.org/operator/a/b",
    "spiffe://example.org//tenant/acme/partner/x",
    "spiffe://example.org/tenant/acme/partner/..",
    "spiffe://example.org/tenant/acme/partner/x?y=1",
    "spiffe://example.org/tenant/acme/partner/x%20y",
    "spiffe://example.org/team/acme/partner/x",
    "spiffe:///tenant/acme/partner/x",
  ])
  func rejects(_ uri: String) {
    #expect(throws: SPIFFEID.Invalid.self) { try SPIFFEID(parsing: uri, expectedTrustDomain: "example.org") }
  }
}

@Suite struct CertificateIdentityTests {
  let ca = try! CertificateAuthority.create(trustDomain: "example.org")
  let identity = CertificateIdentity(trustDomain: "example.org")

  @Test func principalFromIssuedCertificate() throws {
    let spiffe = SPIFFEID(tenant: try TenantID(validating: "acme"), role: .agent, name: "edge-1", trustDomain: "example.org")
    let issued = try ca.issue(.principal(spiffe))
    let principal = try identity.principal(from: issued.certificate)
    #expect(principal.spiffeID == spiffe)
    #expect(principal.certificateSHA256.count == 64)
    #expect(principal.serialHex == RevocationTarget.canonicalSerial(HexText.encode(issued.certificate.serialNumber.bytes)))
  }

  @Test func expiredCertificateIsRefused() throws {
    let spiffe = SPIFFEID(operatorNamed: "alice", trustDomain: "example.org")
    let issued = try ca.issue(.principal(spiffe), validity: 60, notBefore: Date().addingTimeInterval(-3600))
    #expect(throws: TollgateError.unauthenticated("client certificate is outside its validity period")) {
      try identity.principal(from: issued.certificate)
    }
  }

  @Test func rememberedCertificateIsStillCheckedForValidityOnEveryCall() throws {
    let spiffe = SPIFFEID(tenant: try TenantID(validating: "acme"), role: .partner, name: "p", trustDomain: "example.org")
    let issued = try ca.issue(.principal(spiffe), validity: 3600)
    let other = try ca.issue(.principal(SPIFFEID(operatorNamed: "bob", trustDomain: "example.org")))
    let clock = Mutex(Date())
    let identity = CertificateIdentity(trustDomain: "example.org") { clock.withLock { $0 } }
    let first = try identity.principal(from: issued.certificate)
    #expect(try identity.principal(from: issued.certificate) == first)
    // Another certificate is read for itself, not answered from the first one's entry.
    #expect(try identity.principal(from: other.certificate).spiffeID == SPIFFEID(operatorNamed: "bob", trustDomain: "example.org"))
    clock.withLock { $0 = $0.addingTimeInterval(3600) }
    #expect(throws: TollgateError.unauthenticated("client certificate is outside its validity period")) {
      try identity.principal(from: issued.certificate)
    }
  }

  @Test func otherTrustDomainIsRefused() throws {
    let foreign = try CertificateAuthority.create(trustDomain: "evil.org")
    let issued = try foreign.issue(.principal(SPIFFEID(operatorNamed: "mallory", trustDomain: "evil.org")))
    #expect(throws: TollgateError.self) { try identity.principal(from: issued.certificate) }
  }

  @Test func serverCertificateWithoutSPIFFEIDIsRefused() throws {
    let issued = try ca.issue(.server(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
    #expect(
      throws: TollgateError.unauthenticated("client certificate must carry exactly one SPIFFE ID URI SAN, found 0")
    ) { try identity.principal(from: issued.certificate) }
  }
}

@Suite struct CallScopeTests {
  func scope(_ uri: String, tenant: String? = nil) throws -> CallScope {
    let id = try SPIFFEID(parsing: uri, expectedTrustDomain: "example.org")
    let principal = Principal(spiffeID: id, certificateSHA256: String(repeating: "a", count: 64), serialHex: "1")
    let named = try tenant.map { try TenantID(validating: $0) }
    return CallScope(principal: principal, tenant: named ?? id.tenant, impersonated: named != nil)
  }

  @Test func tenantPrincipalDefaultsToOwnTenant() throws {
    let s = try scope("spiffe://example.org/tenant/acme/partner/p")
    #expect(try s.resolveTenant(requested: "").rawValue == "acme")
    #expect(try s.resolveTenant(requested: "acme").rawValue == "acme")
  }

  @Test func tenantPrincipalCannotNameAnotherTenant() throws {
    let s = try scope("spiffe://example.org/tenant/acme/partner/p")
    #expect {
      try s.resolveTenant(requested: "globex")
    } throws: { error in
      guard case .permissionDenied = error as? TollgateError else { return false }
      return true
    }
  }

  @Test func malformedTenantIsInvalidArgumentWithField() throws {
    let s = try scope("spiffe://example.org/operator/alice")
    #expect {
      try s.resolveTenant(requested: "Not Valid")
    } throws: { error in
      guard case .invalidArgument(_, let violations) = error as? TollgateError else { return false }
      return violations.map(\.field) == ["tenant_id"]
    }
  }

  @Test func operatorNeedsATenantFromFieldOrMetadata() throws {
    let plain = try scope("spiffe://example.org/operator/alice")
    #expect(throws: TollgateError.self) { try plain.resolveTenant(requested: "") }
    #expect(try plain.resolveTenant(requested: "globex").rawValue == "globex")
    let impersonating = try scope("spiffe://example.org/operator/alice", tenant: "acme")
    #expect(try impersonating.resolveTenant(requested: "").rawValue == "acme")
    #expect(throws: TollgateError.self) { try impersonating.resolveTenant(requested: "globex") }
  }
}

@Suite struct RevocationScopeTests {
  let acme = try! TenantID(validating: "acme")
  let globex = try! TenantID(validating: "globex")

  @Test func globalRevocationAppliesToEveryone() {
    let snapshot = IdentitySnapshot(revocations: [.serial("ab"): [nil]])
    #expect(snapshot.revocation(serialHex: "00ab", sha256: "f", tenant: acme) == .serial("ab"))
    #expect(snapshot.revocation(serialHex: "ab", sha256: "f", tenant: nil) == .serial("ab"))
  }

  @Test func tenantRevocationAppliesToThatTenantOnly() {
    let snapshot = IdentitySnapshot(revocations: [.fingerprint("ff"): [acme]])
    #expect(snapshot.revocation(serialHex: "1", sha256: "ff", tenant: acme) == .fingerprint("ff"))
    #expect(snapshot.revocation(serialHex: "1", sha256: "ff", tenant: globex) == nil)
    #expect(snapshot.revocation(serialHex: "1", sha256: "ff", tenant: nil) == nil)
  }
}
