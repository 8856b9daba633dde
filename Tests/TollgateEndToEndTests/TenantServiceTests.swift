import GRPCCore
import GRPCProtobuf
import SwiftProtobuf
import TollgateCertificates
import X509
import Testing
import TollgateCore
import TollgateModel
import TollgateProtos

/// TenantService over real mTLS against real Postgres.
@Suite(.timeLimit(.minutes(2))) struct TenantServiceTests {
  @Test func operatorCreatesAndPartnerReadsOwnTenant() async throws {
    try await TestGateway.run { gw in
      let op = try gw.pki.issueOperator()
      let created = try await gw.withClient(op) { client async throws in
        try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(.with {
          $0.tenantID = "acme"
          $0.displayName = "Acme Corp"
        })
      }
      #expect(created.tenant.tenantID == "acme")
      #expect(created.tenant.state == .active)
      #expect(created.tenant.quota.rateLimits.count == QuotaClass.allCases.count)

      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      let own = try await gw.withClient(partner) { client async throws in
        try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
      }
      #expect(own.tenant.tenantID == "acme")
      #expect(own.tenant.displayName == "Acme Corp")
      #expect(own.tenant.createTime == created.tenant.createTime)

      let again = await statusCode {
        try await gw.withClient(op) { client async throws in
          try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(.with { $0.tenantID = "acme" })
        }
      }
      #expect(again == .alreadyExists)
    }
  }

  @Test func tenantIsolationAndRoles() async throws {
    try await TestGateway.run { gw in
      let op = try gw.pki.issueOperator()
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        for id in ["acme", "globex"] { _ = try await tenants.createTenant(.with { $0.tenantID = id }) }
      }
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      try await gw.withClient(partner) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        #expect(await statusCode { try await tenants.getTenant(.with { $0.tenantID = "globex" }) } == .permissionDenied)
        #expect(await statusCode { try await tenants.getTenant(.init(), metadata: actingOn("globex")) } == .permissionDenied)
        #expect(await statusCode { try await tenants.listTenants(.init()) } == .permissionDenied)
        #expect(await statusCode { try await tenants.suspendTenant(.with { $0.tenantID = "acme" }) } == .permissionDenied)
      }
      for role in [Role.agent, .worker] {
        let cert = try gw.pki.issue(tenant: "acme", role: role)
        try await gw.withClient(cert) { client async throws in
          let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
          #expect(await statusCode { try await tenants.getTenant(.init()) } == .permissionDenied, "\(role)")
        }
      }
      // A principal of a tenant that was never registered is refused everywhere.
      let stranger = try gw.pki.issue(tenant: "initech", role: .partner)
      try await gw.withClient(stranger) { client async throws in
        #expect(
          await statusCode { try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init()) }
            == .permissionDenied
        )
      }
      // An operator reaches a tenant by naming it in the request or in tollgate-tenant.
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        #expect(try await tenants.getTenant(.init(), metadata: actingOn("globex")).tenant.tenantID == "globex")
        #expect(try await tenants.getTenant(.with { $0.tenantID = "acme" }).tenant.tenantID == "acme")
        #expect(await statusCode { try await tenants.getTenant(.init()) } == .invalidArgument)
        #expect(await statusCode { try await tenants.getTenant(.with { $0.tenantID = "nobody" }) } == .notFound)
        #expect(
          await statusCode { try await tenants.getTenant(.with { $0.tenantID = "acme" }, metadata: actingOn("globex")) }
            == .invalidArgument
        )
      }
    }
  }

  @Test func malformedTenantIDGetsBadRequestDetails() async throws {
    try await TestGateway.run { gw in
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        do {
          _ = try await tenants.createTenant(.with { $0.tenantID = "Bad_Tenant" })
          Issue.record("a malformed tenant id was accepted")
        } catch let error as RPCError {
          #expect(error.code == .invalidArgument)
          let status = try #require(try error.unpackGoogleRPCStatus())
          let violations = status.details.compactMap(\.badRequest).flatMap(\.violations)
          #expect(violations.map(\.field) == ["tenant_id"])
          #expect(violations.first?.violationDescription.contains("lowercase") == true)
        }
        // Nothing was written.
        #expect(try await tenants.listTenants(.init()).tenants.isEmpty)
      }
    }
  }

  @Test func suspendedTenantIsRefusedUntilResumed() async throws {
    try await TestGateway.run { gw in
      let op = try gw.pki.issueOperator()
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        _ = try await tenants.createTenant(.with { $0.tenantID = "acme" })
        let suspended = try await tenants.suspendTenant(.with {
          $0.tenantID = "acme"
          $0.reason = "unpaid invoices"
        })
        #expect(suspended.tenant.state == .suspended)
        #expect(suspended.tenant.suspendReason == "unpaid invoices")
      }
      try await gw.withClient(partner) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        do {
          _ = try await tenants.getTenant(.init())
          Issue.record("suspended tenant was served")
        } catch let error as RPCError {
          #expect(error.code == .permissionDenied)
          #expect(error.message.contains("suspended"))
        }
      }
      try await gw.withClient(op) { client async throws in
        let resumed = try await Tollgate_V1_TenantService.Client(wrapping: client).resumeTenant(.with { $0.tenantID = "acme" })
        #expect(resumed.tenant.state == .active)
        #expect(resumed.tenant.suspendReason.isEmpty)
      }
      try await gw.withClient(partner) { client async throws in
        #expect(try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init()).tenant.state == .active)
      }
    }
  }

  @Test func revokedCertificatesAreRefused() async throws {
    try await TestGateway.run { gw in
      let op = try gw.pki.issueOperator()
      let bySerial = try gw.pki.issue(tenant: "acme", role: .partner, name: "a")
      let byFingerprint = try gw.pki.issue(tenant: "acme", role: .partner, name: "b")
      let globexPartner = try gw.pki.issue(tenant: "globex", role: .partner, name: "c")
      let survivor = try gw.pki.issue(tenant: "acme", role: .partner, name: "d")
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        for id in ["acme", "globex"] { _ = try await tenants.createTenant(.with { $0.tenantID = id }) }
        // Serial as people paste it: upper case with colons.
        let serial = HexText.encode(bySerial.certificate.serialNumber.bytes).uppercased()
        let pasted = stride(from: 0, to: serial.count, by: 2).map {
          String(serial.dropFirst($0).prefix(2))
        }.joined(separator: ":")
        let r = try await tenants.revokeCertificate(.with {
          $0.serialHex = pasted
          $0.reason = "key leaked"
        })
        #expect(r.revocation.tenantID.isEmpty)
        _ = try await tenants.revokeCertificate(.with {
          $0.sha256Fingerprint = try! CertificateIdentity.sha256Fingerprint(byFingerprint.certificate)
          $0.reason = "device lost"
        })
        #expect(await statusCode { try await tenants.revokeCertificate(.with { $0.reason = "x" }) } == .invalidArgument)
        #expect(
          await statusCode { try await tenants.revokeCertificate(.with { $0.serialHex = "zz"; $0.reason = "x" }) }
            == .invalidArgument
        )
        #expect(
          await statusCode { try await tenants.revokeCertificate(.with { $0.serialHex = "ab" }) } == .invalidArgument
        )
        #expect(try await tenants.listRevocations(.init()).revocations.count == 2)
      }
      for cert in [bySerial, byFingerprint] {
        let code = await statusCode {
          try await gw.withClient(cert) { client async throws in
            try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
          }
        }
        #expect(code == .unauthenticated)
      }
      try await gw.withClient(survivor) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        #expect(try await tenants.getTenant(.init()).tenant.tenantID == "acme")
        // A partner's revocation is scoped to its own tenant: it cannot lock out globex's certificate.
        _ = try await tenants.revokeCertificate(.with {
          $0.serialHex = HexText.encode(globexPartner.certificate.serialNumber.bytes)
          $0.reason = "trying to lock out another tenant"
        })
        let listed = try await tenants.listRevocations(.init())
        #expect(listed.revocations.map(\.tenantID) == ["acme"])
      }
      try await gw.withClient(globexPartner) { client async throws in
        #expect(try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init()).tenant.tenantID == "globex")
      }
    }
  }

  @Test func listTenantsPaginates() async throws {
    try await TestGateway.run { gw in
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        let ids = (1...5).map { "tenant-\($0)" }
        for id in ids.reversed() { _ = try await tenants.createTenant(.with { $0.tenantID = id }) }
        _ = try await tenants.suspendTenant(.with { $0.tenantID = "tenant-2" })
        var seen: [String] = []
        var token = ""
        var pages = 0
        repeat {
          let page = try await tenants.listTenants(.with {
            $0.pageSize = 2
            $0.pageToken = token
          })
          seen += page.tenants.map(\.tenantID)
          token = page.nextPageToken
          pages += 1
        } while !token.isEmpty
        #expect(seen == ids)
        #expect(pages == 3)
        let suspended = try await tenants.listTenants(.with { $0.state = .suspended })
        #expect(suspended.tenants.map(\.tenantID) == ["tenant-2"])
        #expect(await statusCode { try await tenants.listTenants(.with { $0.pageToken = "garbage!" }) } == .invalidArgument)
        #expect(await statusCode { try await tenants.listTenants(.with { $0.pageSize = -1 }) } == .invalidArgument)
        #expect(await statusCode { try await tenants.listTenants(.with { $0.pageSize = 5000 }) } == .invalidArgument)
      }
    }
  }

  @Test func updateQuotaValidatesAndStores() async throws {
    try await TestGateway.run { gw in
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        _ = try await tenants.createTenant(.with { $0.tenantID = "acme" })
        let updated = try await tenants.updateQuota(.with {
          $0.tenantID = "acme"
          $0.quota = .with {
            $0.rateLimits = [.with { $0.quotaClass = .ingest; $0.ratePerSecond = 10; $0.burst = 20 }]
            $0.monthlyUsageEvents = 1_000_000
          }
        })
        let ingest = updated.tenant.quota.rateLimits.first { $0.quotaClass == .ingest }
        #expect(ingest?.ratePerSecond == 10)
        #expect(ingest?.burst == 20)
        #expect(updated.tenant.quota.monthlyUsageEvents == 1_000_000)
        #expect(try await tenants.getTenant(.with { $0.tenantID = "acme" }).tenant.quota == updated.tenant.quota)

        do {
          _ = try await tenants.updateQuota(.with {
            $0.tenantID = "acme"
            $0.quota = .with {
              $0.rateLimits = [
                .with { $0.quotaClass = .query; $0.ratePerSecond = -1; $0.burst = 0 },
                .with { $0.quotaClass = .unspecified; $0.ratePerSecond = 1; $0.burst = 1 },
                // Positive, but so small a bucket interval would overflow: below the 0.001 floor.
                .with { $0.quotaClass = .admin; $0.ratePerSecond = 5e-324; $0.burst = 1 },
              ]
            }
          })
          Issue.record("invalid quota accepted")
        } catch let error as RPCError {
          #expect(error.code == .invalidArgument)
          let fields = try #require(try error.unpackGoogleRPCStatus()).details.compactMap(\.badRequest)
            .flatMap(\.violations).map(\.field)
          #expect(Set(fields) == [
            "quota.rate_limits[1].quota_class", "quota.rate_limits[query].rate_per_second",
            "quota.rate_limits[query].burst", "quota.rate_limits[admin].rate_per_second",
          ])
        }
        // The failed update changed nothing.
        #expect(try await tenants.getTenant(.with { $0.tenantID = "acme" }).tenant.quota == updated.tenant.quota)
      }
    }
  }
}
