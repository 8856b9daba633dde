public import Foundation
public import TollgateModel

/// Everything `tollgate serve` needs, validated. Built once at the edge by ``ConfigResolver``
/// from flags, `TOLLGATE_*` environment variables and an optional JSON config file.
public struct GatewayConfig: Sendable {
  /// A `HOST:PORT` address.
  public typealias Address = HostPort

  public var listen: Address
  public var tlsCertificatePath: String
  public var tlsKeyPath: String
  public var clientCAPath: String
  public var trustDomain: String
  public var database: DatabaseURL
  public var metricsListen: Address?
  /// Apply pending migrations at start (under the advisory lock). On by default.
  public var migrateOnStart: Bool
  /// Largest request message accepted, in bytes.
  public var maxRequestMessageBytes: Int
  /// Postgres connections this replica may hold.
  public var databaseMaxConnections: Int
  /// How long one database operation may take before the call fails with UNAVAILABLE.
  public var databaseTimeout: Duration
  /// The note signer file whose Ed25519 key signs audit checkpoints.
  public var auditSigningKeyPath: String
  /// Read-only calls' audit events that may wait for their batch commit before calls are refused.
  public var auditBufferCapacity: Int
  /// How long read-only calls' audit events gather before one batch commits them: longer means
  /// fewer, larger append transactions, and a read's record committed that much later.
  public var auditFlushLinger: Duration
  /// Most usage events one Ingest request (or stream message) may carry.
  public var ingestMaxBatch: Int
  /// How old a usage event's time may be and still be accepted.
  public var usageLateArrival: Duration
  /// How long a worker's lease lives without a heartbeat.
  public var workflowLeaseTimeout: Duration
  /// The first retry delay of a failed run; each further attempt doubles it.
  public var workflowRetryBase: Duration
  /// How often this replica renews its quota leases and learns the others' demand.
  public var quotaSyncInterval: Duration
  /// Open client connections this replica accepts; more are closed on accept.
  public var maxConnections: Int
  /// Concurrent streams (calls) one HTTP/2 connection may open.
  public var maxConcurrentStreamsPerConnection: Int
  /// Calls in flight on this replica before new calls are shed with UNAVAILABLE.
  public var maxConcurrentCalls: Int
  /// Idle time on a connection before the server pings it, and how long the ping may go unanswered.
  public var keepaliveTime: Duration
  public var keepaliveTimeout: Duration
  /// The shortest interval between a client's keepalive pings the server accepts while the client
  /// has calls open; a client pinging more often is sent GOAWAY after two strikes.
  public var minClientPingInterval: Duration
  /// A connection with no open streams for this long is closed with GOAWAY.
  public var idleTimeout: Duration
  /// The deadline of a unary call whose client sent none.
  public var defaultDeadline: Duration
  /// Tenants that get their own `tenant` label value in metrics; later ones share `other`.
  public var metricsMaxTenants: Int
  /// How long a graceful shutdown lets calls in flight finish before cancelling them.
  public var drainTimeout: Duration
  /// How often the TLS files are checked for changes; nil: only SIGHUP reloads them.
  public var tlsWatchInterval: Duration?

  public init(
    listen: Address,
    tlsCertificatePath: String,
    tlsKeyPath: String,
    clientCAPath: String,
    trustDomain: String,
    database: DatabaseURL,
    metricsListen: Address? = nil,
    migrateOnStart: Bool = true,
    maxRequestMessageBytes: Int = 4 * 1024 * 1024,
    databaseMaxConnections: Int = 20,
    databaseTimeout: Duration = .seconds(5),
    auditSigningKeyPath: String,
    auditBufferCapacity: Int = 10_000,
    auditFlushLinger: Duration = .milliseconds(100),
    ingestMaxBatch: Int = 1_000,
    usageLateArrival: Duration = .seconds(7 * 86_400),
    workflowLeaseTimeout: Duration = .seconds(30),
    workflowRetryBase: Duration = .seconds(1),
    quotaSyncInterval: Duration = .milliseconds(250),
    maxConnections: Int = 1_000,
    maxConcurrentStreamsPerConnection: Int = 100,
    maxConcurrentCalls: Int = 5_000,
    keepaliveTime: Duration = .seconds(120),
    keepaliveTimeout: Duration = .seconds(20),
    minClientPingInterval: Duration = .seconds(10),
    idleTimeout: Duration = .seconds(900),
    defaultDeadline: Duration = .seconds(30),
    metricsMaxTenants: Int = 100,
    drainTimeout: Duration = .seconds(30),
    tlsWatchInterval: Duration? = .seconds(1)
  ) {
    self.listen = listen
    self.tlsCertificatePath = tlsCertificatePath
    self.tlsKeyPath = tlsKeyPath
    self.clientCAPath = clientCAPath
    self.trustDomain = trustDomain
    self.database = database
    self.metricsListen = metricsListen
    self.migrateOnStart = migrateOnStart
    self.maxRequestMessageBytes = maxRequestMessageBytes
    self.databaseMaxConnections = databaseMaxConnections
    self.databaseTimeout = databaseTimeout
    self.auditSigningKeyPath = auditSigningKeyPath
    self.auditBufferCapacity = auditBufferCapacity
    self.auditFlushLinger = auditFlushLinger
    self.ingestMaxBatch = ingestMaxBatch
    self.usageLateArrival = usageLateArrival
    self.workflowLeaseTimeout = workflowLeaseTimeout
    self.workflowRetryBase = workflowRetryBase
    self.quotaSyncInterval = quotaSyncInterval
    self.maxConnections = maxConnections
    self.maxConcurrentStreamsPerConnection = maxConcurrentStreamsPerConnection
    self.maxConcurrentCalls = maxConcurrentCalls
    self.keepaliveTime = keepaliveTime
    self.keepaliveTimeout = keepaliveTimeout
    self.minClientPingInterval = minClientPingInterval
    self.idleTimeout = idleTimeout
    self.defaultDeadline = defaultDeadline
    self.metricsMaxTenants = metricsMaxTenants
    self.drainTimeout = drainTimeout
    self.tlsWatchInterval = tlsWatchInterval
  }
}

/// One configuration setting: its flag, environment variable and config-file key.
public struct ConfigSetting: Sendable, Hashable, CustomStringConvertible {
  /// Name without dashes, e.g. `tls-cert`; also the config file's key.
  public let name: String
  public let help: String

  public var flag: String { "--\(name)" }
  public var environmentVariable: String {
    "TOLLGATE_" + name.uppercased().replacingOccurrences(of: "-", with: "_")
  }
  public var description: String { "\(flag) (\(environmentVariable))" }

  public static let listen = ConfigSetting(name: "listen", help: "gRPC listen address HOST:PORT (default 127.0.0.1:8443)")
  public static let tlsCert = ConfigSetting(name: "tls-cert", help: "PEM file with the server certificate chain")
  public static let tlsKey = ConfigSetting(name: "tls-key", help: "PEM file with the server private key")
  public static let clientCA = ConfigSetting(name: "client-ca", help: "PEM bundle of CAs that sign client certificates")
  public static let trustDomain = ConfigSetting(name: "trust-domain", help: "SPIFFE trust domain of client certificates")
  public static let databaseURL = ConfigSetting(name: "database-url", help: "postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=…]")
  public static let metricsListen = ConfigSetting(name: "metrics-listen", help: "Prometheus /metrics over plain HTTP on HOST:PORT (off when unset)")
  public static let migrate = ConfigSetting(name: "migrate", help: "apply migrations at start: true (default) or false")
  public static let maxMessageBytes = ConfigSetting(name: "max-message-bytes", help: "largest request message in bytes (default 4194304)")
  public static let databaseMaxConnections = ConfigSetting(
    name: "database-max-connections",
    help: "Postgres connections per replica (default 20)"
  )

  public static let databaseTimeoutMS = ConfigSetting(
    name: "database-timeout-ms",
    help: "milliseconds one database operation may take before the call fails UNAVAILABLE (default 5000)"
  )

  public static let auditSigningKey = ConfigSetting(
    name: "audit-signing-key",
    help: "file with the Ed25519 note signer that signs audit checkpoints (tollctl certs audit-key)"
  )

  public static let auditBufferCapacity = ConfigSetting(
    name: "audit-buffer-capacity",
    help: "read-only calls' audit events awaiting their batch commit before calls are refused UNAVAILABLE (default 10000)"
  )

  public static let auditFlushLingerMS = ConfigSetting(
    name: "audit-flush-linger-ms",
    help: "milliseconds read-only calls' audit events gather before one transaction commits them; at most 900, within the 1 s promise (default 100)"
  )

  public static let ingestMaxBatch = ConfigSetting(
    name: "ingest-max-batch",
    help: "most usage events in one Ingest request or IngestStream message (default 1000)"
  )

  public static let usageLateArrivalHours = ConfigSetting(
    name: "usage-late-arrival-hours",
    help: "hours a usage event's time may lie in the past and still be accepted (default 168, 7 days)"
  )

  public static let workflowLeaseTimeoutMS = ConfigSetting(
    name: "workflow-lease-timeout-ms",
    help: "milliseconds a worker's task lease lives without a heartbeat before the run is offered again (default 30000)"
  )

  public static let workflowRetryBaseMS = ConfigSetting(
    name: "workflow-retry-base-ms",
    help: "first retry delay of a failed run in milliseconds, doubled per attempt with 20% jitter, capped at an hour (default 1000)"
  )

  public static let quotaSyncIntervalMS = ConfigSetting(
    name: "quota-sync-interval-ms",
    help: "milliseconds between renewals of this replica's quota leases in Postgres; leases live 4 intervals, at least 1 s (default 250)"
  )

  public static let maxConnections = ConfigSetting(
    name: "max-connections",
    help: "client connections this replica keeps open; more are closed on accept (default 1000)"
  )

  public static let maxConcurrentStreams = ConfigSetting(
    name: "max-concurrent-streams",
    help: "concurrent calls one HTTP/2 connection may open, advertised in SETTINGS (default 100)"
  )

  public static let maxConcurrentCalls = ConfigSetting(
    name: "max-concurrent-calls",
    help: "calls in flight on this replica before new ones are shed with UNAVAILABLE (default 5000)"
  )

  public static let keepaliveTimeMS = ConfigSetting(
    name: "keepalive-time-ms",
    help: "milliseconds without reads before the server pings a connection (default 120000)"
  )

  public static let keepaliveTimeoutMS = ConfigSetting(
    name: "keepalive-timeout-ms",
    help: "milliseconds a keepalive ping may go unanswered before the connection is closed (default 20000)"
  )

  public static let minClientPingIntervalMS = ConfigSetting(
    name: "min-client-ping-interval-ms",
    help: "milliseconds a client must leave between keepalive pings while it has calls open; one pinging more often is closed with GOAWAY after two strikes (default 10000)"
  )

  public static let idleTimeoutMS = ConfigSetting(
    name: "idle-timeout-ms",
    help: "milliseconds a connection may have no open calls before it is closed with GOAWAY (default 900000)"
  )

  public static let defaultDeadlineMS = ConfigSetting(
    name: "default-deadline-ms",
    help: "deadline in milliseconds of a unary call that arrives without grpc-timeout (default 30000)"
  )

  public static let metricsMaxTenants = ConfigSetting(
    name: "metrics-max-tenants",
    help: "tenants that get their own tenant label in metrics; the rest share tenant=\"other\" (default 100)"
  )

  public static let drainTimeoutMS = ConfigSetting(
    name: "drain-timeout-ms",
    help: "milliseconds a graceful shutdown (SIGTERM, SIGINT) lets calls in flight finish before cancelling them (default 30000)"
  )

  public static let tlsWatchIntervalMS = ConfigSetting(
    name: "tls-watch-interval-ms",
    help: "milliseconds between checks of the TLS files for changes, which reload them; 0 reloads on SIGHUP only (default 1000)"
  )

  public static let all: [ConfigSetting] = [
    .listen, .tlsCert, .tlsKey, .clientCA, .trustDomain, .databaseURL, .metricsListen, .migrate, .maxMessageBytes,
    .databaseMaxConnections, .databaseTimeoutMS, .auditSigningKey, .auditBufferCapacity, .auditFlushLingerMS, .ingestMaxBatch,
    .usageLateArrivalHours, .workflowLeaseTimeoutMS, .workflowRetryBaseMS, .quotaSyncIntervalMS, .maxConnections,
    .maxConcurrentStreams, .maxConcurrentCalls, .keepaliveTimeMS, .keepaliveTimeoutMS, .minClientPingIntervalMS, .idleTimeoutMS, .defaultDeadlineMS,
    .metricsMaxTenants, .drainTimeoutMS, .tlsWatchIntervalMS,
  ]
}

/// A setting that stops start-up, named so the operator knows what to fix.
public struct ConfigError: Error, CustomStringConvertible, Sendable {
  public let setting: ConfigSetting?
  public let problem: String

  public init(_ setting: ConfigSetting?, _ problem: String) {
    self.setting = setting
    self.problem = problem
  }

  public var description: String {
    if let setting { return "configuration: \(setting) \(problem)" }
    return "configuration: \(problem)"
  }
}

/// Resolves settings: a flag wins over the environment, the environment over the config file.
public struct ConfigResolver: Sendable {
  public var flags: [String: String]
  public var environment: [String: String]
  public var file: [String: String]

  public init(flags: [String: String], environment: [String: String], file: [String: String] = [:]) {
    self.flags = flags
    self.environment = environment
    self.file = file
  }

  /// Reads a JSON object of setting names to values (strings, numbers or booleans).
  public static func loadFile(_ path: String) throws(ConfigError) -> [String: String] {
    let data: Data
    do {
      data = try Data(contentsOf: URL(fileURLWithPath: path))
    } catch {
      throw ConfigError(nil, "config file \(path) cannot be read: \(error.localizedDescription)")
    }
    guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
      throw ConfigError(nil, "config file \(path) is not a JSON object of setting names to values")
    }
    var out: [String: String] = [:]
    let known = Set(ConfigSetting.all.map(\.name))
    for (key, value) in object {
      guard known.contains(key) else {
        throw ConfigError(
          nil,
          "config file \(path) has unknown setting '\(key)'; known: \(known.sorted().joined(separator: ", "))"
        )
      }
      switch value {
      case let s as String: out[key] = s
      case let n as NSNumber: out[key] = n.stringValue
      default: throw ConfigError(nil, "config file \(path): '\(key)' must be a string, number or boolean")
      }
    }
    return out
  }

  public func value(_ setting: ConfigSetting) -> String? {
    if let v = flags[setting.name], !v.isEmpty { return v }
    if let v = environment[setting.environmentVariable], !v.isEmpty { return v }
    if let v = file[setting.name], !v.isEmpty { return v }
    return nil
  }

  func required(_ setting: ConfigSetting) throws(ConfigError) -> String {
    guard let v = value(setting) else {
      throw ConfigError(setting, "is required (flag, environment variable, or config file key '\(setting.name)')")
    }
    return v
  }

  func readableFile(_ setting: ConfigSetting) throws(ConfigError) -> String {
    let path = try required(setting)
    var isDirectory: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), !isDirectory.boolValue else {
      throw ConfigError(setting, "names \(path), which does not exist or is not a file")
    }
    guard FileManager.default.isReadableFile(atPath: path) else {
      throw ConfigError(setting, "names \(path), which this process cannot read")
    }
    return path
  }

  /// A listen address: HOST:PORT whose host is an IP literal, or `localhost` (taken as 127.0.0.1),
  /// since listeners bind addresses, not names.
  func address(_ setting: ConfigSetting, default fallback: String?) throws(ConfigError) -> GatewayConfig.Address? {
    guard let text = value(setting) ?? fallback else { return nil }
    guard var address = GatewayConfig.Address(parsing: text) else {
      throw ConfigError(setting, "is '\(text)'; expected HOST:PORT such as 127.0.0.1:8443 or [::1]:8443")
    }
    if address.host == "localhost" { address.host = "127.0.0.1" }
    guard Self.isIPLiteral(address.host) else {
      throw ConfigError(setting, "host '\(address.host)' must be an IP address (e.g. 0.0.0.0, 127.0.0.1, [::]) or localhost")
    }
    return address
  }

  func integer(_ setting: ConfigSetting, default fallback: Int, range: ClosedRange<Int>) throws(ConfigError) -> Int {
    guard let text = value(setting) else { return fallback }
    guard let n = Int(text), range.contains(n) else {
      throw ConfigError(setting, "is '\(text)'; expected a whole number from \(range.lowerBound) to \(range.upperBound)")
    }
    return n
  }

  static func isIPLiteral(_ host: String) -> Bool {
    var v4 = in_addr()
    var v6 = in6_addr()
    return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
  }

  /// nil for zero: a setting whose 0 turns something off.
  static func positive(_ duration: Duration) -> Duration? { duration > .zero ? duration : nil }

  /// Only what `tollgate migrate` needs.
  public func databaseURL() throws(ConfigError) -> DatabaseURL {
    let text = try required(.databaseURL)
    do {
      return try DatabaseURL(parsing: text)
    } catch {
      throw ConfigError(.databaseURL, error.description)
    }
  }

  /// The full, validated configuration of `tollgate serve`.
  public func gatewayConfig() throws(ConfigError) -> GatewayConfig {
    let listen = try address(.listen, default: "127.0.0.1:8443")!
    let cert = try readableFile(.tlsCert)
    let key = try readableFile(.tlsKey)
    let ca = try readableFile(.clientCA)
    let domain = try required(.trustDomain)
    guard SPIFFEID.isValidTrustDomain(domain) else {
      throw ConfigError(.trustDomain, "is '\(domain)'; use lowercase letters, digits, '.', '-' and '_' (e.g. example.org)")
    }
    let database = try databaseURL()
    let metrics = try address(.metricsListen, default: nil)
    let migrate: Bool
    switch value(.migrate)?.lowercased() {
    case nil, "true", "1", "yes": migrate = true
    case "false", "0", "no": migrate = false
    case let other?: throw ConfigError(.migrate, "is '\(other)'; expected true or false")
    }
    return GatewayConfig(
      listen: listen,
      tlsCertificatePath: cert,
      tlsKeyPath: key,
      clientCAPath: ca,
      trustDomain: domain,
      database: database,
      metricsListen: metrics,
      migrateOnStart: migrate,
      maxRequestMessageBytes: try integer(.maxMessageBytes, default: 4 * 1024 * 1024, range: 1024...(64 * 1024 * 1024)),
      databaseMaxConnections: try integer(.databaseMaxConnections, default: 20, range: 2...500),
      databaseTimeout: .milliseconds(try integer(.databaseTimeoutMS, default: 5000, range: 100...600_000)),
      auditSigningKeyPath: try readableFile(.auditSigningKey),
      auditBufferCapacity: try integer(.auditBufferCapacity, default: 10_000, range: 1...10_000_000),
      auditFlushLinger: .milliseconds(try integer(.auditFlushLingerMS, default: 100, range: 0...900)),
      ingestMaxBatch: try integer(.ingestMaxBatch, default: 1_000, range: 1...100_000),
      usageLateArrival: .seconds(3_600 * (try integer(.usageLateArrivalHours, default: 168, range: 1...(24 * 366)))),
      workflowLeaseTimeout: .milliseconds(try integer(.workflowLeaseTimeoutMS, default: 30_000, range: 200...86_400_000)),
      workflowRetryBase: .milliseconds(try integer(.workflowRetryBaseMS, default: 1_000, range: 1...3_600_000)),
      quotaSyncInterval: .milliseconds(try integer(.quotaSyncIntervalMS, default: 250, range: 20...10_000)),
      maxConnections: try integer(.maxConnections, default: 1_000, range: 1...1_000_000),
      maxConcurrentStreamsPerConnection: try integer(.maxConcurrentStreams, default: 100, range: 1...100_000),
      maxConcurrentCalls: try integer(.maxConcurrentCalls, default: 5_000, range: 1...1_000_000),
      keepaliveTime: .milliseconds(try integer(.keepaliveTimeMS, default: 120_000, range: 1_000...86_400_000)),
      keepaliveTimeout: .milliseconds(try integer(.keepaliveTimeoutMS, default: 20_000, range: 100...3_600_000)),
      minClientPingInterval: .milliseconds(try integer(.minClientPingIntervalMS, default: 10_000, range: 100...86_400_000)),
      idleTimeout: .milliseconds(try integer(.idleTimeoutMS, default: 900_000, range: 1_000...86_400_000)),
      defaultDeadline: .milliseconds(try integer(.defaultDeadlineMS, default: 30_000, range: 10...3_600_000)),
      metricsMaxTenants: try integer(.metricsMaxTenants, default: 100, range: 0...100_000),
      drainTimeout: .milliseconds(try integer(.drainTimeoutMS, default: 30_000, range: 0...3_600_000)),
      tlsWatchInterval: Self.positive(.milliseconds(try integer(.tlsWatchIntervalMS, default: 1_000, range: 0...3_600_000)))
    )
  }
}
