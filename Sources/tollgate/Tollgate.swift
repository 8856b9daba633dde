import ArgumentParser
import Foundation
import Logging
import Tracing
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateStore

@main
struct Tollgate: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "tollgate",
    abstract: "Multi-tenant gRPC gateway with mutual TLS, per-tenant isolation and audit.",
    subcommands: [Serve.self, Migrate.self],
    defaultSubcommand: Serve.self
  )
}

/// Settings shared by the subcommands. Every flag also reads `TOLLGATE_<FLAG>` from the
/// environment and the key `<flag>` from `--config FILE` (JSON); a flag wins over the
/// environment, the environment over the file.
struct SettingOptions: ParsableArguments {
  @Option(help: "JSON file of settings (keys are the flag names without dashes). Env: TOLLGATE_CONFIG")
  var config: String?
  @Option(help: ArgumentHelp(ConfigSetting.listen.help))
  var listen: String?
  @Option(name: .customLong("tls-cert"), help: ArgumentHelp(ConfigSetting.tlsCert.help))
  var tlsCert: String?
  @Option(name: .customLong("tls-key"), help: ArgumentHelp(ConfigSetting.tlsKey.help))
  var tlsKey: String?
  @Option(name: .customLong("client-ca"), help: ArgumentHelp(ConfigSetting.clientCA.help))
  var clientCA: String?
  @Option(name: .customLong("trust-domain"), help: ArgumentHelp(ConfigSetting.trustDomain.help))
  var trustDomain: String?
  @Option(name: .customLong("database-url"), help: ArgumentHelp(ConfigSetting.databaseURL.help))
  var databaseURL: String?
  @Option(name: .customLong("metrics-listen"), help: ArgumentHelp(ConfigSetting.metricsListen.help))
  var metricsListen: String?
  @Option(help: ArgumentHelp(ConfigSetting.migrate.help))
  var migrate: String?
  @Option(name: .customLong("max-message-bytes"), help: ArgumentHelp(ConfigSetting.maxMessageBytes.help))
  var maxMessageBytes: String?
  @Option(name: .customLong("database-max-connections"), help: ArgumentHelp(ConfigSetting.databaseMaxConnections.help))
  var databaseMaxConnections: String?
  @Option(name: .customLong("database-timeout-ms"), help: ArgumentHelp(ConfigSetting.databaseTimeoutMS.help))
  var databaseTimeoutMS: String?
  @Option(name: .customLong("audit-signing-key"), help: ArgumentHelp(ConfigSetting.auditSigningKey.help))
  var auditSigningKey: String?
  @Option(name: .customLong("audit-buffer-capacity"), help: ArgumentHelp(ConfigSetting.auditBufferCapacity.help))
  var auditBufferCapacity: String?
  @Option(name: .customLong("audit-flush-linger-ms"), help: ArgumentHelp(ConfigSetting.auditFlushLingerMS.help))
  var auditFlushLingerMS: String?
  @Option(name: .customLong("ingest-max-batch"), help: ArgumentHelp(ConfigSetting.ingestMaxBatch.help))
  var ingestMaxBatch: String?
  @Option(name: .customLong("usage-late-arrival-hours"), help: ArgumentHelp(ConfigSetting.usageLateArrivalHours.help))
  var usageLateArrivalHours: String?
  @Option(name: .customLong("workflow-lease-timeout-ms"), help: ArgumentHelp(ConfigSetting.workflowLeaseTimeoutMS.help))
  var workflowLeaseTimeoutMS: String?
  @Option(name: .customLong("workflow-retry-base-ms"), help: ArgumentHelp(ConfigSetting.workflowRetryBaseMS.help))
  var workflowRetryBaseMS: String?
  @Option(name: .customLong("quota-sync-interval-ms"), help: ArgumentHelp(ConfigSetting.quotaSyncIntervalMS.help))
  var quotaSyncIntervalMS: String?
  @Option(name: .customLong("max-connections"), help: ArgumentHelp(ConfigSetting.maxConnections.help))
  var maxConnections: String?
  @Option(name: .customLong("max-concurrent-streams"), help: ArgumentHelp(ConfigSetting.maxConcurrentStreams.help))
  var maxConcurrentStreams: String?
  @Option(name: .customLong("max-concurrent-calls"), help: ArgumentHelp(ConfigSetting.maxConcurrentCalls.help))
  var maxConcurrentCalls: String?
  @Option(name: .customLong("keepalive-time-ms"), help: ArgumentHelp(ConfigSetting.keepaliveTimeMS.help))
  var keepaliveTimeMS: String?
  @Option(name: .customLong("keepalive-timeout-ms"), help: ArgumentHelp(ConfigSetting.keepaliveTimeoutMS.help))
  var keepaliveTimeoutMS: String?
  @Option(name: .customLong("min-client-ping-interval-ms"), help: ArgumentHelp(ConfigSetting.minClientPingIntervalMS.help))
  var minClientPingIntervalMS: String?
  @Option(name: .customLong("idle-timeout-ms"), help: ArgumentHelp(ConfigSetting.idleTimeoutMS.help))
  var idleTimeoutMS: String?
  @Option(name: .customLong("default-deadline-ms"), help: ArgumentHelp(ConfigSetting.defaultDeadlineMS.help))
  var defaultDeadlineMS: String?
  @Option(name: .customLong("metrics-max-tenants"), help: ArgumentHelp(ConfigSetting.metricsMaxTenants.help))
  var metricsMaxTenants: String?
  @Option(name: .customLong("drain-timeout-ms"), help: ArgumentHelp(ConfigSetting.drainTimeoutMS.help))
  var drainTimeoutMS: String?
  @Option(name: .customLong("tls-watch-interval-ms"), help: ArgumentHelp(ConfigSetting.tlsWatchIntervalMS.help))
  var tlsWatchIntervalMS: String?
  @Option(name: .customLong("log-level"), help: "trace, debug, info (default), notice, warning, error, critical")
  var logLevel: String?

  func resolver() throws(ConfigError) -> ConfigResolver {
    let environment = ProcessInfo.processInfo.environment
    let flags: [String: String?] = [
      ConfigSetting.listen.name: listen,
      ConfigSetting.tlsCert.name: tlsCert,
      ConfigSetting.tlsKey.name: tlsKey,
      ConfigSetting.clientCA.name: clientCA,
      ConfigSetting.trustDomain.name: trustDomain,
      ConfigSetting.databaseURL.name: databaseURL,
      ConfigSetting.metricsListen.name: metricsListen,
      ConfigSetting.migrate.name: migrate,
      ConfigSetting.maxMessageBytes.name: maxMessageBytes,
      ConfigSetting.databaseMaxConnections.name: databaseMaxConnections,
      ConfigSetting.databaseTimeoutMS.name: databaseTimeoutMS,
      ConfigSetting.auditSigningKey.name: auditSigningKey,
      ConfigSetting.auditBufferCapacity.name: auditBufferCapacity,
      ConfigSetting.auditFlushLingerMS.name: auditFlushLingerMS,
      ConfigSetting.ingestMaxBatch.name: ingestMaxBatch,
      ConfigSetting.usageLateArrivalHours.name: usageLateArrivalHours,
      ConfigSetting.workflowLeaseTimeoutMS.name: workflowLeaseTimeoutMS,
      ConfigSetting.workflowRetryBaseMS.name: workflowRetryBaseMS,
      ConfigSetting.quotaSyncIntervalMS.name: quotaSyncIntervalMS,
      ConfigSetting.maxConnections.name: maxConnections,
      ConfigSetting.maxConcurrentStreams.name: maxConcurrentStreams,
      ConfigSetting.maxConcurrentCalls.name: maxConcurrentCalls,
      ConfigSetting.keepaliveTimeMS.name: keepaliveTimeMS,
      ConfigSetting.keepaliveTimeoutMS.name: keepaliveTimeoutMS,
      ConfigSetting.minClientPingIntervalMS.name: minClientPingIntervalMS,
      ConfigSetting.idleTimeoutMS.name: idleTimeoutMS,
      ConfigSetting.defaultDeadlineMS.name: defaultDeadlineMS,
      ConfigSetting.metricsMaxTenants.name: metricsMaxTenants,
      ConfigSetting.drainTimeoutMS.name: drainTimeoutMS,
      ConfigSetting.tlsWatchIntervalMS.name: tlsWatchIntervalMS,
    ]
    let file = try (config ?? environment["TOLLGATE_CONFIG"]).map { path throws(ConfigError) in
      try ConfigResolver.loadFile(path)
    } ?? [:]
    return ConfigResolver(flags: flags.compactMapValues { $0 }, environment: environment, file: file)
  }

  func makeLogger() throws -> Logger {
    let text = logLevel ?? ProcessInfo.processInfo.environment["TOLLGATE_LOG_LEVEL"] ?? "info"
    guard let level = Logger.Level(rawValue: text) else {
      throw ValidationError("--log-level (TOLLGATE_LOG_LEVEL) is '\(text)'; use trace, debug, info, notice, warning, error or critical")
    }
    // One JSON object per line on stdout, for log shippers; configuration errors before this
    // point go to stderr as plain text.
    LoggingSystem.bootstrap { JSONLogHandler(label: $0) }
    var logger = Logger(label: "tollgate")
    logger.logLevel = level
    // Spans (W3C trace context from callers, a server span per call, a span per database
    // transaction) are logged at debug level.
    InstrumentationSystem.bootstrap(LogTracer(logger: logger))
    return logger
  }
}

/// Stops with exit code 78 (EX_CONFIG) and the message naming the setting.
func fail(_ error: ConfigError) -> Never {
  FileHandle.standardError.write(Data("tollgate: \(error)\n".utf8))
  exit(78)
}

struct Serve: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Run the gateway until SIGTERM or SIGINT.")

  @OptionGroup var settings: SettingOptions

  func run() async throws {
    let logger = try settings.makeLogger()
    let gateway: Gateway
    do {
      let config = try settings.resolver().gatewayConfig()
      gateway = try Gateway(config: config, logger: logger)
    } catch {
      fail(error)
    }
    do {
      try await gateway.run()
    } catch let error as ListenFailure {
      logger.critical("gateway stopped: \(error)")
      throw ExitCode(78)
    } catch let error as StoreError {
      logger.critical("gateway stopped: database", metadata: ["error": "\(error)"])
      throw ExitCode(69)
    } catch {
      logger.critical("gateway stopped", metadata: ["error": "\(error)"])
      throw ExitCode.failure
    }
  }
}

struct Migrate: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Apply pending database migrations and exit (serve also does this at start)."
  )

  @OptionGroup var settings: SettingOptions

  func run() async throws {
    let logger = try settings.makeLogger()
    let url: DatabaseURL
    do {
      url = try settings.resolver().databaseURL()
    } catch {
      fail(error)
    }
    let database = Database(url: url, maximumConnections: 2, operationTimeout: .seconds(60), logger: logger)
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask { try await database.run() }
      defer { group.cancelAll() }
      do {
        let applied = try await Migrator.migrate(database, logger: logger)
        print(applied.isEmpty ? "schema is up to date" : "applied migrations \(applied.map(String.init).joined(separator: ", "))")
      } catch {
        logger.critical("migration failed", metadata: ["database": "\(url.redacted)", "error": "\(error)"])
        throw ExitCode(69)
      }
    }
  }
}
