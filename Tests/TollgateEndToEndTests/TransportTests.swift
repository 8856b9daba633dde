import Foundation
import GRPCCore
import GRPCProtobuf
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Testing
import TollgateCertificates
import TollgateClient
import TollgateCore
import TollgateGateway
import TollgateMerkle
import TollgateModel
import TollgateProtos
@testable import TollgateStore

/// Transport security, limits, health, reflection and database outages, end to end.
@Suite(.timeLimit(.minutes(2))) struct TransportTests {
  @Test func clientWithoutCertificateFailsTheHandshake() async throws {
    try await TestGateway.run { gw in
      let transport = try HTTP2ClientTransport.Posix(
        target: .ipv4(address: "127.0.0.1", port: gw.port),
        transportSecurity: .tls {
          $0.trustRoots = .certificates([.bytes(Array(try! PEMFiles.certificatePEM(gw.pki.ca.certificate).utf8), format: .pem)])
        },
        config: .defaults { $0.backoff.initial = .milliseconds(50) }
      )
      let code = await statusCode {
        try await withGRPCClient(transport: transport) { client in
          try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(
            .init(),
            options: threeSeconds
          )
        }
      }
      // No request reaches the server: the handshake is refused and the call never connects.
      #expect(code == .unavailable || code == .deadlineExceeded)
      try await expectServing(gw)
    }
  }

  @Test func certificateFromAnotherCAFailsTheHandshake() async throws {
    try await TestGateway.run { gw in
      let other = try CertificateAuthority.create(trustDomain: gw.pki.ca.trustDomain)
      let impostor = try other.issue(.principal(SPIFFEID(operatorNamed: "alice", trustDomain: other.trustDomain)))
      let code = await statusCode {
        try await gw.connection(impostor).withClient { client in
          try await Tollgate_V1_TenantService.Client(wrapping: client).listTenants(.init(), options: threeSeconds)
        }
      }
      #expect(code == .unavailable || code == .deadlineExceeded)
      try await expectServing(gw)
    }
  }

  /// The control for the handshake tests: the same server answers a valid client.
  func expectServing(_ gw: TestGateway) async throws {
    let status = try await gw.withClient(try gw.pki.issueOperator()) { client in
      try await Grpc_Health_V1_Health.Client(wrapping: client).check(.init()).status
    }
    #expect(status == .serving)
  }

  @Test func foreignDomainAndServerCertificatesAreRefused() async throws {
    try await TestGateway.run { gw in
      // Same CA, wrong trust domain in the SPIFFE ID: TLS accepts it, identity does not.
      let foreign = try gw.pki.issue(.principal(SPIFFEID(operatorNamed: "alice", trustDomain: "elsewhere.org")))
      let code = await statusCode {
        try await gw.withClient(foreign) { client in
          try await Tollgate_V1_TenantService.Client(wrapping: client).listTenants(.init())
        }
      }
      #expect(code == .unauthenticated)
      // A server certificate (no SPIFFE ID) used as a client certificate.
      let serverCert = try gw.pki.issue(.server(dnsNames: ["x"], ipAddresses: []))
      let code2 = await statusCode {
        try await gw.withClient(serverCert) { client in
          try await Grpc_Health_V1_Health.Client(wrapping: client).check(.init())
        }
      }
      #expect(code2 == .unauthenticated || code2 == .unavailable)
    }
  }

  @Test func healthAndReflection() async throws {
    try await TestGateway.run { gw in
      let agent = try gw.pki.issueOperator()
      try await gw.withClient(agent) { client async throws in
        let health = Grpc_Health_V1_Health.Client(wrapping: client)
        #expect(try await health.check(.init()).status == .serving)
        #expect(try await health.check(.with { $0.service = "tollgate.v1.TenantService" }).status == .serving)
        #expect(await statusCode { try await health.check(.with { $0.service = "no.Such" }) } == .notFound)

        let reflection = Grpc_Reflection_V1_ServerReflection.Client(wrapping: client)
        let answers = try await reflection.serverReflectionInfo { writer in
          try await writer.write(.with { $0.listServices = "" })
          try await writer.write(.with { $0.fileContainingSymbol = "tollgate.v1.TenantService" })
          try await writer.write(.with { $0.fileContainingSymbol = "tollgate.v1.Nope" })
        } onResponse: { response in
          var all: [Grpc_Reflection_V1_ServerReflectionResponse] = []
          for try await message in response.messages { all.append(message) }
          return all
        }
        #expect(answers.count == 3)
        let services = answers[0].listServicesResponse.service.map(\.name)
        #expect(Set(services) == Set(Gateway.registeredServiceNames))
        let files = try answers[1].fileDescriptorResponse.fileDescriptorProto.map {
          try Google_Protobuf_FileDescriptorProto(serializedBytes: $0)
        }
        #expect(files.first?.name == "tollgate/v1/tenant_service.proto")
        #expect(Set(files.map(\.name)).isSuperset(of: ["tollgate/v1/common.proto", "google/protobuf/timestamp.proto"]))
        #expect(answers[2].errorResponse.errorCode == Int32(RPCError.Code.notFound.rawValue))
      }
    }
  }

  @Test func unknownMethodsAreUnimplemented() async throws {
    try await TestGateway.run { gw in
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      let code = await statusCode {
        try await gw.withClient(partner) { client in
          try await client.unary(
            request: ClientRequest(message: Tollgate_V1_GetRunRequest()),
            descriptor: MethodDescriptor(fullyQualifiedService: "tollgate.v1.NoSuchService", method: "GetRun"),
            serializer: ProtobufSerializer<Tollgate_V1_GetRunRequest>(),
            deserializer: ProtobufDeserializer<Tollgate_V1_GetRunResponse>(),
            options: .defaults
          ) { try $0.message }
        }
      }
      #expect(code == .unimplemented)
    }
  }

  @Test func oversizedMessageIsRefused() async throws {
    try await TestGateway.run(configure: { $0.maxRequestMessageBytes = 16 * 1024 }) { gw in
      try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        do {
          _ = try await tenants.createTenant(.with {
            $0.tenantID = "acme"
            $0.displayName = String(repeating: "x", count: 64 * 1024)
          })
          Issue.record("an over-limit message was accepted")
        } catch let error as RPCError {
          #expect(error.code == .resourceExhausted)
          #expect(error.message.contains("at most 16384"), "\(error.message)")
        }
        // The connection and server are still fine, and nothing was written.
        #expect(try await tenants.listTenants(.init()).tenants.isEmpty)

        // On a stream whose response has already started, the refusal comes as trailers.
        let reflection = Grpc_Reflection_V1_ServerReflection.Client(wrapping: client)
        do {
          let answered = try await reflection.serverReflectionInfo { writer in
            try await writer.write(.with { $0.listServices = "" })
            try await writer.write(.with { $0.fileByFilename = String(repeating: "y", count: 64 * 1024) })
          } onResponse: { response in
            var count = 0
            for try await _ in response.messages { count += 1 }
            return count
          }
          Issue.record("an over-limit stream message was accepted (\(answered) answers)")
        } catch let error as RPCError {
          #expect(error.code == .resourceExhausted, "\(error)")
        }
      }
    }
  }

  @Test func databaseOutageIsUnavailableAndRecovers() async throws {
    // A short timeout, so calls during the outage fail fast; on a machine loaded by the rest of
    // the suite a call may also miss it while the database is up, so those calls get a few tries.
    try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(2) }) { gw in
      let op = try gw.pki.issueOperator()
      try await gw.withClient(op) { client async throws in
        let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
        let health = Grpc_Health_V1_Health.Client(wrapping: client)
        func whileUp<T: Sendable>(_ call: () async throws -> T) async throws -> T {
          for _ in 0..<4 {
            do { return try await call() } catch let error as RPCError where error.code == .unavailable {}
          }
          return try await call()
        }
        // A create whose commit went unconfirmed (DEADLINE_EXCEEDED) may have been applied: the
        // retry then finds the tenant, as a client reading back would.
        var unconfirmed = false
        for attempt in 0..<5 {
          do {
            _ = try await tenants.createTenant(.with { $0.tenantID = "acme" })
            break
          } catch let error as RPCError where error.code == .alreadyExists && unconfirmed {
            break
          } catch let error as RPCError where attempt < 4 && [.unavailable, .deadlineExceeded].contains(error.code) {
            unconfirmed = unconfirmed || error.code == .deadlineExceeded
          }
        }

        // Take the database away: refuse new connections and cut the open ones.
        try await gw.takeDatabaseAway()
        let down = await statusCode { try await tenants.getTenant(.with { $0.tenantID = "acme" }) }
        #expect(down == .unavailable)
        // The store then finds the database down, and answers without it until it is back.
        await gw.gateway.database.health.waitUntil(.down)
        #expect(try await health.check(.init()).status == .notServing)
        let failedWrite = await statusCode { try await tenants.createTenant(.with { $0.tenantID = "globex" }) }
        #expect(failedWrite == .unavailable)

        try await gw.bringDatabaseBack()
        // The store has seen the database back; a call may still meet a connection cut by the
        // outage, so a few tries.
        var recovered = false
        for _ in 0..<50 where !recovered {
          recovered = (try? await tenants.getTenant(.with { $0.tenantID = "acme" })) != nil
        }
        #expect(recovered)
        var serving = false
        for _ in 0..<5 where !serving {
          serving = (try? await health.check(.init()).status) == .serving
        }
        #expect(serving)
        #expect(try await whileUp { try await tenants.listTenants(.init()).tenants.map(\.tenantID) } == ["acme"])
      }
    }
  }

  @Test func aGatewayCancelledWhileItsDatabaseIsDownStillStops() async throws {
    // Cancelled, not drained: what a test's time limit does, and what a service group does to the
    // other services when one fails. The audit buffer and sequencer retried with sleeps that a
    // cancelled task no longer waits for, against a store that fails at once while the database
    // is down: they spun on every thread, and the gateway never stopped.
    let gateway = Task {
      try await TestGateway.run(configure: { $0.databaseTimeout = .seconds(2) }) { gw in
        try await gw.withClient(try gw.pki.issueOperator()) { client async throws in
          let tenants = Tollgate_V1_TenantService.Client(wrapping: client)
          _ = try await tenants.createTenant(.with { $0.tenantID = "acme" })
          try await gw.takeDatabaseAway()
          #expect(await statusCode { try await tenants.getTenant(.with { $0.tenantID = "acme" }) } == .unavailable)
          await gw.gateway.database.health.waitUntil(.down)
          // Audit events now wait in the buffer, and the calls' pending events in the sequencer.
          withUnsafeCurrentTask { $0?.cancel() }
        }
      }
    }
    // Bounded here, so that a gateway slow to stop fails this test. One that spins as before hangs
    // the whole process, timer included; tools/test's time limit ends that.
    let (ended, end) = AsyncStream.makeStream(of: Bool.self)
    Task { _ = await gateway.result; end.yield(true) }
    Task { try? await Task.sleep(for: .seconds(30)); end.yield(false) }
    var stopped = false
    for await outcome in ended { stopped = outcome; break }
    #expect(stopped, "the cancelled gateway had not stopped 30 s later")
  }

  @Test func damagedAuditKeyStopsStartUpNamingTheSetting() async throws {
    let pki = try TestPKI()
    let keyPath = pki.directory.appendingPathComponent("damaged.key")
    // A verifier (public) key where the signer belongs: a likely operator mistake.
    try PEMFiles.write(pki.auditKey.verifierText + "\n", to: keyPath.path)
    let config = GatewayConfig(
      listen: .init(host: "127.0.0.1", port: 0),
      tlsCertificatePath: pki.serverCert.path,
      tlsKeyPath: pki.serverKey.path,
      clientCAPath: pki.caFile.path,
      trustDomain: "example.org",
      database: try DatabaseURL(parsing: "postgres://u@127.0.0.1/db"),
      auditSigningKeyPath: keyPath.path
    )
    #expect {
      _ = try Gateway(config: config, logger: testLogger)
    } throws: { error in
      let text = (error as? ConfigError)?.description ?? ""
      return text.contains("--audit-signing-key") && text.contains("not a signing key")
    }
  }

  @Test func mismatchedKeyStopsStartUpNamingTheSetting() async throws {
    let pki = try TestPKI()
    let other = try pki.issueOperator()
    let keyPath = pki.directory.appendingPathComponent("other-key.pem")
    try PEMFiles.write(try PEMFiles.privateKeyPEM(other.privateKey), to: keyPath.path)
    let config = GatewayConfig(
      listen: .init(host: "127.0.0.1", port: 0),
      tlsCertificatePath: pki.serverCert.path,
      tlsKeyPath: keyPath.path,
      clientCAPath: pki.caFile.path,
      trustDomain: "example.org",
      database: try DatabaseURL(parsing: "postgres://u@127.0.0.1/db"),
      auditSigningKeyPath: pki.auditKeyFile.path
    )
    #expect {
      _ = try Gateway(config: config, logger: testLogger)
    } throws: { error in
      (error as? ConfigError)?.description.contains("--tls-key") == true
    }
  }
}

let threeSeconds: CallOptions = {
  var options = CallOptions.defaults
  options.timeout = .seconds(3)
  return options
}()
