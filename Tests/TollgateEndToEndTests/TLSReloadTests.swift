import Foundation
import GRPCCore
import Testing
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

/// Certificate, key and client CA replaced while the gateway runs.
@Suite(.timeLimit(.minutes(2))) struct TLSReloadTests {
  @Test func newMaterialServesNewConnectionsWhileOpenOnesStay() async throws {
    try await TestGateway.run { gw in
      let op = try gw.pki.issueOperator()
      // A second CA, as after a CA rotation: it signs the new server certificate and the clients
      // the gateway is to accept from now on.
      let next = try CertificateAuthority.create(trustDomain: gw.pki.ca.trustDomain)
      let nextOperator = try next.issue(.principal(SPIFFEID(operatorNamed: "bob", trustDomain: next.trustDomain)))
      let nextCA = Array(try PEMFiles.certificatePEM(next.certificate).utf8)
      let once: CallOptions = {
        var o = CallOptions.defaults
        o.waitForReady = false
        return o
      }()
      func list(_ connection: GatewayConnection) async -> RPCError.Code? {
        await statusCode {
          try await connection.withClient {
            try await Tollgate_V1_TenantService.Client(wrapping: $0).listTenants(.init(), options: once)
          }
        }
      }

      try await gw.withClient(op) { open in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: open)
        _ = try await tenants.listTenants(.init())

        // A bad file is refused and changes nothing.
        try "not a certificate".write(to: gw.pki.serverCert, atomically: true, encoding: .utf8)
        #expect(!gw.gateway.reloadTLS())
        #expect(await list(try gw.connection(op)) == nil)

        let server = try next.issue(.server(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
        try PEMFiles.saveIssued(server, ca: next, to: gw.pki.serverCert.deletingLastPathComponent().path)
        try PEMFiles.saveAuthority(next, to: gw.pki.caFile.deletingLastPathComponent().path)
        // Picked up from the files changing, without being asked.
        #expect(try await QuotaTests.eventually { await list(try gw.connection(nextOperator, serverCA: nextCA)) == nil })
        // New connections from the old CA's clients are refused now...
        #expect(await list(try gw.connection(op)) == .unavailable)
        // ...while the connection opened before the swap still works.
        _ = try await tenants.listTenants(.init())
      }
    }
  }
}
