import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import PostgresNIO
import ServiceLifecycle
import Testing
import TollgateCertificates
import TollgateMerkle
import TollgateClient
import TollgateAudit
import TollgateCore
import TollgateGateway
import TollgateModel
@testable import TollgateStore

/// A throwaway database on the test cluster (`TOLLGATE_TEST_DATABASE_URL`, a superuser URL that
/// `tools/test` exports), owned by the non-superuser `tollgate` role the gateway connects as,
/// dropped when the test ends.
struct TestDatabase {
  let name: String
  let admin: DatabaseURL
  let app: DatabaseURL

  static var adminURL: DatabaseURL {
    get throws {
      guard let text = ProcessInfo.processInfo.environment["TOLLGATE_TEST_DATABASE_URL"] else {
        Issue.record("TOLLGATE_TEST_DATABASE_URL is not set; run the suite with tools/test, which starts Postgres")
        throw CancellationError()
      }
      return try DatabaseURL(parsing: text)
    }
  }

  static func withDatabase<T: Sendable>(_ body: (TestDatabase) async throws -> T) async throws -> T {
    let admin = try adminURL
    let name = "t_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(20)
    try await adminSQL(admin, "CREATE DATABASE \(name) OWNER tollgate")
    var app = admin
    app.database = String(name)
    app.username = "tollgate"
    app.password = ProcessInfo.processInfo.environment["TOLLGATE_TEST_APP_PASSWORD"] ?? "tollgate"
    let db = TestDatabase(name: String(name), admin: admin, app: app)
    do {
      let result = try await body(db)
      try await adminSQL(admin, "DROP DATABASE \(name) WITH (FORCE)")
      return result
    } catch {
      try? await adminSQL(admin, "DROP DATABASE \(name) WITH (FORCE)")
      throw error
    }
  }

  /// Runs statements on the maintenance database as the superuser, on a connection of its own.
  static func adminSQL(_ url: DatabaseURL, _ statements: String..., database: String = "postgres") async throws {
    let connection = try await connect(url, database: database)
    defer { Task { try? await connection.close() } }
    for statement in statements {
      do {
        try await connection.query(PostgresQuery(unsafeSQL: statement), logger: testLogger)
      } catch {
        // PSQLError's description hides the server's message; a failing test needs it.
        throw AdminSQLFailed(statement: statement, detail: String(reflecting: error))
      }
    }
  }

  struct AdminSQLFailed: Error, CustomStringConvertible {
    let statement: String
    let detail: String
    var description: String { "\(statement): \(detail)" }
  }
}

extension TestDatabase {
  /// A connection of its own to `database` with `url`'s credentials.
  static func connect(_ url: DatabaseURL, database: String) async throws -> PostgresConnection {
    let config = PostgresConnection.Configuration(
      host: url.host,
      port: url.port,
      username: url.username,
      password: url.password,
      database: database,
      tls: .disable
    )
    do {
      return try await PostgresConnection.connect(configuration: config, id: 1, logger: testLogger)
    } catch {
      throw AdminSQLFailed(statement: "connect to \(database)", detail: String(reflecting: error))
    }
  }

  /// The single integer `sql` returns, read as the superuser on `database`.
  static func adminCount(_ url: DatabaseURL, _ sql: String, database: String) async throws -> Int64 {
    let connection = try await connect(url, database: database)
    defer { Task { try? await connection.close() } }
    for try await n in try await connection.query(PostgresQuery(unsafeSQL: sql), logger: testLogger).decode(Int64.self) {
      return n
    }
    throw CancellationError()
  }

  /// The text column of every row `sql` returns, read as the superuser on `database`.
  static func adminStrings(_ url: DatabaseURL, _ sql: String, database: String) async throws -> [String] {
    let connection = try await connect(url, database: database)
    defer { Task { try? await connection.close() } }
    var out: [String] = []
    for try await text in try await connection.query(PostgresQuery(unsafeSQL: sql), logger: testLogger).decode(String.self) {
      out.append(text)
    }
    return out
  }
}

extension TestDatabase {
  /// Refuses new connections to this database and cuts the open ones: an outage, as the gateway
  /// sees it.
  func refuseConnections() async throws {
    try await Self.adminSQL(
      admin,
      "ALTER DATABASE \(name) ALLOW_CONNECTIONS false",
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '\(name)'"
    )
  }

  /// Ends ``refuseConnections()``.
  func allowConnections() async throws {
    try await Self.adminSQL(admin, "ALTER DATABASE \(name) ALLOW_CONNECTIONS true")
  }
}

extension Database {
  /// Runs this store (migrated unless `migrate` is false) until `body` returns.
  func running<T: Sendable>(migrate: Bool = true, _ body: () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask { try await self.run() }
      defer { group.cancelAll() }
      if migrate { try await Migrator.migrate(self, logger: testLogger) }
      return try await body()
    }
  }
}

let testLogger: Logger = {
  var logger = Logger(label: "tollgate-test")
  logger.logLevel = ProcessInfo.processInfo.environment["TOLLGATE_TEST_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .critical
  return logger
}()

/// A CA with a server certificate and a helper to issue principals, all in a temporary folder.
final class TestPKI: Sendable {
  let ca: CertificateAuthority
  let directory: URL
  let serverCert: URL
  let serverKey: URL
  let caFile: URL
  let auditKeyFile: URL
  let auditKey: AuditSigningKey

  init(trustDomain: String = "example.org") throws {
    ca = try CertificateAuthority.create(trustDomain: trustDomain)
    directory = FileManager.default.temporaryDirectory.appendingPathComponent("tollgate-pki-\(UUID().uuidString)")
    try PEMFiles.saveAuthority(ca, to: directory.appendingPathComponent("ca").path)
    let server = try ca.issue(.server(dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"]))
    try PEMFiles.saveIssued(server, ca: ca, to: directory.appendingPathComponent("server").path)
    serverCert = directory.appendingPathComponent("server/cert.pem")
    serverKey = directory.appendingPathComponent("server/key.pem")
    caFile = directory.appendingPathComponent("ca/ca.pem")
    auditKey = try AuditSigningKey(name: "test-audit")
    auditKeyFile = directory.appendingPathComponent("audit.key")
    try PEMFiles.write(auditKey.signerText + "\n", to: auditKeyFile.path, secret: true)
  }

  deinit { try? FileManager.default.removeItem(at: directory) }

  func issue(_ subject: CertificateAuthority.Subject, validity: TimeInterval = 3600) throws -> CertificateAuthority.Issued {
    try ca.issue(subject, validity: validity)
  }

  func issue(tenant: String, role: Role, name: String = "p") throws -> CertificateAuthority.Issued {
    let id = try TenantID(validating: tenant)
    return try issue(.principal(SPIFFEID(tenant: id, role: role, name: name, trustDomain: ca.trustDomain)))
  }

  func issueOperator(_ name: String = "alice") throws -> CertificateAuthority.Issued {
    try issue(.principal(SPIFFEID(operatorNamed: name, trustDomain: ca.trustDomain)))
  }
}

/// A running gateway on a free loopback port with a fresh database.
struct TestGateway: Sendable {
  let gateway: Gateway
  let port: Int
  let pki: TestPKI
  let database: TestDatabase
  /// Begins this gateway's graceful shutdown (drain), as SIGTERM would.
  let beginShutdown: @Sendable () async -> Void
  /// Shuts this gateway down and returns once every one of its services has stopped.
  let stop: @Sendable () async -> Void

  func connection(_ issued: CertificateAuthority.Issued, serverCA: [UInt8]? = nil) throws -> GatewayConnection {
    GatewayConnection(
      host: "127.0.0.1",
      port: port,
      certificatePEM: Array(try PEMFiles.certificatePEM(issued.certificate).utf8),
      privateKeyPEM: Array(try PEMFiles.privateKeyPEM(issued.privateKey).utf8),
      serverCAPEM: try serverCA ?? Array(PEMFiles.certificatePEM(pki.ca.certificate).utf8),
      defaultTimeout: .seconds(15)
    )
  }

  /// Runs `body` with a client authenticated by `issued`, sending `metadata` on every call.
  func withClient<T: Sendable>(
    _ issued: CertificateAuthority.Issued,
    _ body: (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> T
  ) async throws -> T {
    try await connection(issued).withClient(body)
  }

  /// Starts a second gateway process-equivalent (own pool, own listener) on the same database,
  /// runs `body` with it, and shuts it down.
  func withReplica<T: Sendable>(
    configure: (inout GatewayConfig) -> Void = { _ in },
    _ body: (TestGateway) async throws -> T
  ) async throws -> T {
    var config = gateway.config
    config.listen = .init(host: "127.0.0.1", port: 0)
    configure(&config)
    return try await Self.serve(try Gateway(config: config, logger: testLogger), pki: pki, database: database, body)
  }

  /// Runs SQL on this test's database as the superuser (to tamper with it, as an attacker would).
  func adminSQL(_ statements: String...) async throws {
    for statement in statements {
      try await TestDatabase.adminSQL(database.admin, statement, database: database.name)
    }
  }

  /// Takes this test's database away, as an outage would: new connections are refused and the
  /// open ones (the gateway's pool and listeners) cut.
  func takeDatabaseAway() async throws {
    try await database.refuseConnections()
  }

  /// Ends ``takeDatabaseAway()``: connections are accepted again. Returns once the gateway's
  /// store has seen it (until then a store that found the database down fails at once, and a
  /// test's few retries would all fail).
  func bringDatabaseBack() async throws {
    try await database.allowConnections()
    await gateway.database.health.waitUntil(.up)
  }

  /// Starts a gateway, runs `body`, then shuts the gateway down and drops its database.
  static func run<T: Sendable>(
    configure: (inout GatewayConfig) -> Void = { _ in },
    _ body: (TestGateway) async throws -> T
  ) async throws -> T {
    let pki = try TestPKI()
    return try await TestDatabase.withDatabase { database in
      var config = GatewayConfig(
        listen: .init(host: "127.0.0.1", port: 0),
        tlsCertificatePath: pki.serverCert.path,
        tlsKeyPath: pki.serverKey.path,
        clientCAPath: pki.caFile.path,
        trustDomain: pki.ca.trustDomain,
        database: database.app,
        databaseMaxConnections: 8,
        // Generous: the whole suite (a hundred gateways and their databases) runs at once on two
        // cores, and a database operation can wait behind others' migrations. Outage tests set
        // their own.
        databaseTimeout: .seconds(10),
        auditSigningKeyPath: pki.auditKeyFile.path,
        // Quota tests that measure across replicas set a short interval; the rest need not load
        // the shared cluster with renewals.
        quotaSyncInterval: .seconds(1)
      )
      configure(&config)
      return try await serve(try Gateway(config: config, logger: testLogger), pki: pki, database: database, body)
    }
  }

  /// Runs `gateway`'s services while `body` runs, then drains it; a failing `body` still shuts the
  /// gateway down the orderly way before the caller drops the database.
  static func serve<T: Sendable>(
    _ gateway: Gateway,
    pki: TestPKI,
    database: TestDatabase,
    _ body: (TestGateway) async throws -> T
  ) async throws -> T {
    let group = ServiceGroup(configuration: .init(services: gateway.services, gracefulShutdownSignals: [], logger: testLogger))
    let (stopped, stoppedContinuation) = AsyncStream.makeStream(of: Void.self)
    return try await withThrowingTaskGroup(of: Void.self) { tasks in
      tasks.addTask {
        defer { stoppedContinuation.finish() }
        try await group.run()
      }
      defer { tasks.cancelAll() }
      guard let port = try await gateway.listeningAddress.ipv4?.port else { throw CancellationError() }
      let result: T
      do {
        result = try await body(
          TestGateway(
            gateway: gateway, port: port, pki: pki, database: database,
            beginShutdown: { await group.triggerGracefulShutdown() },
            stop: {
              await group.triggerGracefulShutdown()
              for await _ in stopped {}
            }
          )
        )
      } catch {
        await group.triggerGracefulShutdown()
        _ = try? await tasks.next()
        throw error
      }
      await group.triggerGracefulShutdown()
      try await tasks.next()
      return result
    }
  }
}

/// The gRPC status code a call failed with, or nil if it succeeded.
func statusCode<T>(_ call: () async throws -> T) async -> RPCError.Code? {
  do {
    _ = try await call()
    return nil
  } catch let error as RPCError {
    return error.code
  } catch {
    return .unknown
  }
}

/// Metadata naming the tenant an operator acts on.
func actingOn(_ tenant: String) -> Metadata {
  var m: Metadata = [:]
  m.addString(tenant, forKey: "tollgate-tenant")
  return m
}
