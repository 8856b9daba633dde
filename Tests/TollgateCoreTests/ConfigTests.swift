import Foundation
import Testing
import TollgateCore
import TollgateModel

@Suite struct ConfigTests {
  let dir: URL = {
    let d = FileManager.default.temporaryDirectory.appendingPathComponent("tollgate-config-\(UUID().uuidString)")
    try! FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
    for name in ["cert.pem", "key.pem", "ca.pem", "audit.key"] {
      try! Data("x".utf8).write(to: d.appendingPathComponent(name))
    }
    return d
  }()

  var complete: [String: String] {
    [
      "tls-cert": dir.appendingPathComponent("cert.pem").path,
      "tls-key": dir.appendingPathComponent("key.pem").path,
      "client-ca": dir.appendingPathComponent("ca.pem").path,
      "trust-domain": "example.org",
      "database-url": "postgres://tollgate:secret@127.0.0.1:5432/tollgate",
      "audit-signing-key": dir.appendingPathComponent("audit.key").path,
    ]
  }

  func message(_ flags: [String: String], env: [String: String] = [:]) -> String? {
    do {
      _ = try ConfigResolver(flags: flags, environment: env).gatewayConfig()
      return nil
    } catch {
      return error.description
    }
  }

  @Test func completeConfigResolves() throws {
    let config = try ConfigResolver(flags: complete, environment: [:]).gatewayConfig()
    #expect(config.listen.description == "127.0.0.1:8443")
    #expect(config.database.port == 5432)
    #expect(config.database.password == "secret")
    #expect(config.ingestMaxBatch == 1_000)
    #expect(config.usageLateArrival == .seconds(7 * 86_400))
    #expect(config.workflowLeaseTimeout == .seconds(30))
    #expect(config.workflowRetryBase == .seconds(1))
  }

  @Test func workflowSettingsAreReadAndChecked() throws {
    var flags = complete
    flags["workflow-lease-timeout-ms"] = "2500"
    let config = try ConfigResolver(flags: flags, environment: ["TOLLGATE_WORKFLOW_RETRY_BASE_MS": "40"]).gatewayConfig()
    #expect(config.workflowLeaseTimeout == .milliseconds(2_500))
    #expect(config.workflowRetryBase == .milliseconds(40))
    flags["workflow-lease-timeout-ms"] = "10"
    #expect(message(flags)?.contains("--workflow-lease-timeout-ms") == true)
    flags["workflow-lease-timeout-ms"] = nil
    flags["workflow-retry-base-ms"] = "soon"
    #expect(message(flags)?.contains("--workflow-retry-base-ms") == true)
  }

  @Test func meteringSettingsAreReadAndChecked() throws {
    var flags = complete
    flags["ingest-max-batch"] = "500"
    let config = try ConfigResolver(flags: flags, environment: ["TOLLGATE_USAGE_LATE_ARRIVAL_HOURS": "48"]).gatewayConfig()
    #expect(config.ingestMaxBatch == 500)
    #expect(config.usageLateArrival == .seconds(48 * 3_600))
    flags["ingest-max-batch"] = "0"
    #expect(message(flags)?.contains("--ingest-max-batch") == true)
    flags["ingest-max-batch"] = nil
    flags["usage-late-arrival-hours"] = "forever"
    #expect(message(flags)?.contains("--usage-late-arrival-hours") == true)
  }

  @Test func clientPingIntervalIsReadAndChecked() throws {
    #expect(try ConfigResolver(flags: complete, environment: [:]).gatewayConfig().minClientPingInterval == .seconds(10))
    var flags = complete
    let config = try ConfigResolver(flags: flags, environment: ["TOLLGATE_MIN_CLIENT_PING_INTERVAL_MS": "500"]).gatewayConfig()
    #expect(config.minClientPingInterval == .milliseconds(500))
    flags["min-client-ping-interval-ms"] = "50"
    #expect(message(flags)?.contains("--min-client-ping-interval-ms") == true)
  }

  @Test(arguments: ["tls-cert", "tls-key", "client-ca", "trust-domain", "database-url", "audit-signing-key"])
  func missingSettingIsNamed(_ name: String) {
    var flags = complete
    flags[name] = nil
    let text = message(flags) ?? ""
    let env = "TOLLGATE_" + name.uppercased().replacingOccurrences(of: "-", with: "_")
    #expect(text.contains("--\(name)") && text.contains(env) && text.contains("required"), "\(text)")
  }

  @Test(arguments: [
    ("listen", "8443", "--listen"),
    ("listen", "example.com:8443", "--listen"),
    ("listen", "127.0.0.1:99999", "--listen"),
    ("metrics-listen", "example.com:9090", "--metrics-listen"),
    ("tls-cert", "/nonexistent/cert.pem", "--tls-cert"),
    ("trust-domain", "Example.ORG", "--trust-domain"),
    ("database-url", "mysql://x@y/z", "--database-url"),
    ("database-url", "postgres://127.0.0.1/db", "--database-url"),
    ("database-url", "postgres://u@h/db?sslmode=maybe", "--database-url"),
    ("migrate", "perhaps", "--migrate"),
    ("max-message-bytes", "12", "--max-message-bytes"),
  ])
  func wrongSettingIsNamed(_ name: String, _ value: String, _ flag: String) {
    var flags = complete
    flags[name] = value
    let text = message(flags) ?? ""
    #expect(text.contains(flag), "\(text)")
  }

  @Test func flagBeatsEnvironmentBeatsFile() throws {
    var flags = complete
    flags["listen"] = nil
    let file = ["listen": "127.0.0.1:1", "trust-domain": "file.org"]
    let env = ["TOLLGATE_LISTEN": "127.0.0.1:2"]
    var resolver = ConfigResolver(flags: flags, environment: env, file: file)
    #expect(try resolver.gatewayConfig().listen.port == 2)
    resolver.flags["listen"] = "[::1]:3"
    #expect(try resolver.gatewayConfig().listen.description == "[::1]:3")
    resolver.flags["trust-domain"] = nil
    #expect(try resolver.gatewayConfig().trustDomain == "file.org")
  }

  @Test func localhostListenersBindLoopback() throws {
    var flags = complete
    flags["listen"] = "localhost:8443"
    flags["metrics-listen"] = "localhost:9090"
    let config = try ConfigResolver(flags: flags, environment: [:]).gatewayConfig()
    #expect(config.listen.description == "127.0.0.1:8443")
    #expect(config.metricsListen?.description == "127.0.0.1:9090")
  }

  @Test func configFileRejectsUnknownKeys() throws {
    let path = dir.appendingPathComponent("bad.json")
    try Data(#"{"listen": "127.0.0.1:1", "tls_cert": "x"}"#.utf8).write(to: path)
    #expect(throws: ConfigError.self) { try ConfigResolver.loadFile(path.path) }
    let good = dir.appendingPathComponent("good.json")
    try Data(#"{"listen": "127.0.0.1:1", "max-message-bytes": 65536, "migrate": false}"#.utf8).write(to: good)
    let values = try ConfigResolver.loadFile(good.path)
    #expect(values["max-message-bytes"] == "65536")
    #expect(values["migrate"] == "0" || values["migrate"] == "false")
  }
}
