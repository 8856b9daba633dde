public import GRPCCore
public import GRPCNIOTransportHTTP2
public import Logging
import NIOCore
public import ServiceLifecycle
public import UnixSignals
public import TollgateCore
public import TollgateModel
import TollgateProtos
public import TollgateStore
public import TollgateAudit
import TollgateMerkle
import TollgateTenancy
import TollgateMetering
import TollgateWorkflow
import Foundation

/// The assembled gateway: its database, identity directory, the gRPC server with its
/// interceptors in order, and the services that run them under one `ServiceGroup`.
///
/// Start-up order is the order of ``services``: the Postgres pool first (it starts first and
/// stops last), then the identity change listener, then the gRPC server, which migrates and loads
/// the identity directory before it binds, so it never serves with an empty directory.
public final class Gateway: Sendable {
  public let config: GatewayConfig
  public let database: Database
  public let directory: IdentityDirectory
  public let server: GRPCServer<HTTP2ServerTransport.Posix>
  let transport: HTTP2ServerTransport.Posix
  /// Set when graceful shutdown begins, so health turns NOT_SERVING before the listener closes.
  let draining = AtomicFlag()
  let ready: ReadinessGate
  let logger: Logger
  public let metrics: GatewayMetrics
  let metricsServer: MetricsServer?
  public let auditBuffer: AuditBuffer
  public let auditSequencer: AuditSequencer
  public let checkpointer: Checkpointer
  let auditNotifier: AuditNotifier
  let workflowHub: WorkflowHub
  let leaseReaper: LeaseReaper
  public let quotaLimiter: QuotaLimiter
  public let quotaCoordinator: QuotaCoordinator
  let connectionLimit: ConnectionLimit
  /// The server's certificate, key and client CA, replaced on SIGHUP or when the files change.
  let tls: ReloadableTLS

  /// Services of the API that work in this build; only these are registered (an unregistered
  /// method gets UNIMPLEMENTED from the server).
  public static let registeredServiceNames = [
    Tollgate_V1_TenantService.descriptor.fullyQualifiedService,
    Tollgate_V1_AuditService.descriptor.fullyQualifiedService,
    Tollgate_V1_MeteringService.descriptor.fullyQualifiedService,
    Tollgate_V1_WorkflowService.descriptor.fullyQualifiedService,
    Grpc_Health_V1_Health.descriptor.fullyQualifiedService,
    Grpc_Reflection_V1_ServerReflection.descriptor.fullyQualifiedService,
    Grpc_Reflection_V1alpha_ServerReflection.descriptor.fullyQualifiedService,
  ]

  /// `withoutAudit` and `withoutQuota` assemble the chain without the audit or the quota
  /// interceptor. They exist only so the benchmarks can measure what each costs; no flag or
  /// setting reaches them.
  public init(
    config: GatewayConfig,
    logger: Logger,
    withoutAudit: Bool = false,
    withoutQuota: Bool = false
  ) throws(ConfigError) {
    self.config = config
    self.logger = logger
    let metrics = GatewayMetrics()
    self.metrics = metrics
    let telemetry = metrics.telemetry(maxTenantLabels: config.metricsMaxTenants)
    self.metricsServer = config.metricsListen.map { MetricsServer(address: $0, metrics: metrics, logger: logger) }
    let tls = try ReloadableTLS(config: config, material: try TLSMaterial.load(config), logger: logger)
    self.tls = tls
    Self.warnIfReadableByOthers(config.tlsKeyPath, .tlsKey, logger: logger)
    Self.warnIfReadableByOthers(config.auditSigningKeyPath, .auditSigningKey, logger: logger)
    let database = Database(
      url: config.database,
      maximumConnections: config.databaseMaxConnections,
      operationTimeout: config.databaseTimeout,
      logger: logger,
      telemetry: telemetry
    )
    self.database = database
    let repository = TenantRepository(database: database)
    let auditRepository = AuditLogRepository(database: database)
    let signingKey = try Self.loadSigningKey(config.auditSigningKeyPath)
    self.auditBuffer = AuditBuffer(
      capacity: config.auditBufferCapacity,
      repository: auditRepository,
      logger: logger,
      linger: config.auditFlushLinger
    )
    let ready = ReadinessGate()
    self.ready = ready
    self.checkpointer = Checkpointer(
      repository: auditRepository,
      key: signingKey,
      trustDomain: config.trustDomain,
      logger: logger,
      waitUntilReady: { await ready.wait() }
    )
    self.auditSequencer = AuditSequencer(
      repository: auditRepository,
      signal: database.auditQueued,
      logger: logger,
      waitUntilReady: { await ready.wait() }
    )
    let auditNotifier = AuditNotifier()
    self.auditNotifier = auditNotifier
    let workflowHub = WorkflowHub()
    self.workflowHub = workflowHub
    let workflowRepository = WorkflowRepository(database: database)
    self.leaseReaper = LeaseReaper(
      repository: workflowRepository,
      leaseTimeout: config.workflowLeaseTimeout,
      logger: logger,
      telemetry: telemetry,
      waitUntilReady: { await ready.wait() }
    )
    let quotaLimiter = QuotaLimiter()
    self.quotaLimiter = quotaLimiter
    self.quotaCoordinator = QuotaCoordinator(
      limiter: quotaLimiter,
      repository: QuotaLeaseRepository(database: database),
      interval: config.quotaSyncInterval,
      logger: logger,
      waitUntilReady: { await ready.wait() }
    )
    let connectionLimit = ConnectionLimit(maximum: config.maxConnections, telemetry: telemetry)
    self.connectionLimit = connectionLimit
    let directoryLogger = logger
    let directory = IdentityDirectory { try await repository.identitySnapshot(logger: directoryLogger) }
    self.directory = directory

    let transport = HTTP2ServerTransport.Posix(
      address: config.listen.host.contains(":")
        ? .ipv6(host: config.listen.host, port: config.listen.port)
        : .ipv4(host: config.listen.host, port: config.listen.port),
      transportSecurity: tls.transportSecurity,
      config: .defaults {
        $0.rpc.maxRequestPayloadSize = config.maxRequestMessageBytes
        // The default 64 KiB stream window holds about one ingest batch, so an agent would stall
        // for a window update between batches; 1 MiB lets a few batches queue behind the one in
        // its transaction.
        $0.http2.targetWindowSize = 1 << 20
        $0.http2.maxConcurrentStreams = config.maxConcurrentStreamsPerConnection
        $0.connection.keepalive.time = config.keepaliveTime
        $0.connection.keepalive.timeout = config.keepaliveTimeout
        // Despite its name, grpc-swift applies this interval while calls are open (with none, it
        // allows a ping per two hours). Its default of 5 minutes sends GOAWAY to a client whose
        // keepalive pings sooner, and a follower of a quiet log has no other way to notice that
        // its connection died without a reset.
        $0.connection.keepalive.clientBehavior.minPingIntervalWithoutCalls = config.minClientPingInterval
        $0.connection.maxIdleTime = config.idleTimeout
        let keepaliveTimeout = config.keepaliveTimeout
        $0.channelDebuggingCallbacks.onAcceptTCPConnection = { channel in
          connectionLimit.admit(channel).flatMap { TCPUserTimeout.apply(keepaliveTimeout, to: channel) }
        }
        // Answer an over-limit message with RESOURCE_EXHAUSTED instead of the transport's stream reset.
        let limit = config.maxRequestMessageBytes
        $0.channelDebuggingCallbacks.onAcceptHTTP2Stream = { channel in
          channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(MessageSizeLimitHandler(limit: limit), position: .first)
          }
        }
      }
    )
    self.transport = transport

    let reflection = ReflectionService(registeredServices: Self.registeredServiceNames)
    let services: [any RegistrableRPCService] = [
      TenantService(repository: repository, directory: directory, logger: logger),
      AuditService(repository: auditRepository, checkpointer: checkpointer, notifier: auditNotifier, logger: logger),
      MeteringService(
        repository: UsageRepository(database: database),
        maxBatch: config.ingestMaxBatch,
        lateArrival: config.usageLateArrival,
        logger: logger,
        telemetry: telemetry
      ),
      WorkflowService(
        repository: workflowRepository,
        hub: workflowHub,
        leaseTimeout: config.workflowLeaseTimeout,
        retryBase: config.workflowRetryBase,
        logger: logger,
        telemetry: telemetry
      ),
      HealthService(
        services: Set(Self.registeredServiceNames),
        database: database,
        draining: draining,
        logger: logger
      ),
      reflection,
      ReflectionServiceV1Alpha(v1: reflection),
    ]
    self.server = GRPCServer(
      transport: transport,
      services: services,
      interceptors: Self.interceptors(
        metrics: metrics,
        logger: logger,
        identity: CertificateIdentity(trustDomain: config.trustDomain),
        directory: directory,
        limits: ServerLimitsInterceptor(
          maxConcurrentCalls: config.maxConcurrentCalls,
          defaultDeadline: config.defaultDeadline,
          telemetry: telemetry
        ),
        audit: withoutAudit
          ? nil
          : AuditInterceptor(
            policy: .standard,
            buffer: auditBuffer,
            repository: auditRepository,
            tenantExists: { [directory] in directory.snapshot.tenantStates[$0] != nil },
            logger: logger
          ),
        quota: withoutQuota ? nil : QuotaInterceptor(policy: .standard, directory: directory, limiter: quotaLimiter, telemetry: telemetry)
      )
    )
    registerCollectors()
  }

  /// Gauges read at scrape time from the parts that own them.
  func registerCollectors() {
    metrics.gauge("tollgate_tenants", help: "Tenants registered (all states), as this replica's directory holds them") {
      [directory] in Double(directory.snapshot.tenantStates.count)
    }
    metrics.gauge("tollgate_audit_buffer_events", help: "Read-only calls' audit events not committed yet") {
      [auditBuffer] in Double(auditBuffer.outstanding)
    }
    metrics.gauge("tollgate_audit_append_lag_seconds", help: "Age of the oldest audit event not committed yet (0 when none waits)") {
      [auditBuffer] in auditBuffer.lag()
    }
    metrics.gauge(
      "tollgate_audit_checkpoint_age_seconds",
      help: "Time since this replica's checkpoint signer last brought every grown log's checkpoint up to date"
    ) { [checkpointer] in checkpointer.checkpointAge?.seconds ?? -1 }
  }

  /// A private key that other users of the host can read is theirs too: the TLS key lets them
  /// pose as the gateway, the signing key lets them sign a rewritten audit log. The gateway still
  /// starts (orchestrators mount secrets 0644 unless told otherwise) but says so at start.
  static func warnIfReadableByOthers(_ path: String, _ setting: ConfigSetting, logger: Logger) {
    guard let mode = (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? NSNumber,
      mode.intValue & 0o077 != 0
    else { return }
    logger.warning(
      "a private key file is readable by other users of this host; make it readable by the gateway's user only (chmod 600, or a secret volume's defaultMode 0400)",
      metadata: ["setting": "\(setting.flag)", "path": "\(path)", "mode": "\(String(mode.intValue & 0o777, radix: 8))"]
    )
  }

  static func loadSigningKey(_ path: String) throws(ConfigError) -> AuditSigningKey {
    let text: String
    do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
      throw ConfigError(.auditSigningKey, "cannot be read: \(error.localizedDescription)")
    }
    do {
      return try AuditSigningKey(signerText: text)
    } catch {
      throw ConfigError(.auditSigningKey, "\(path): \(error.description)")
    }
  }

  /// The interceptor chain, outermost first. Metrics and the access log are outermost so refused
  /// calls are counted, timed and logged too; the call's server span opens next, so everything
  /// after it, database work included, is in the caller's trace. The process-wide limits come next, so a call shed for overload costs nothing
  /// more. Identity follows: everything after it reads the caller's ``CallScope``. Audit follows,
  /// ahead of authorization, so every call with a known caller is recorded, denied and
  /// over-quota ones included. Authorization comes before quota, so a caller who may not make a
  /// call never spends its tenant's quota; quota comes last, right before the handler.
  static func interceptors(
    metrics: GatewayMetrics,
    logger: Logger,
    identity: CertificateIdentity,
    directory: IdentityDirectory,
    limits: ServerLimitsInterceptor,
    audit: AuditInterceptor?,
    quota: QuotaInterceptor?
  ) -> [any ServerInterceptor] {
    [
      MetricsInterceptor(metrics: metrics),
      AccessLogInterceptor(logger: logger),
      TracingInterceptor(),
      limits,
      IdentityInterceptor(identity: identity, directory: directory),
    ] + (audit.map { [$0] } ?? []) + [
      AuthorizationInterceptor(policy: .standard, directory: directory),
    ] + (quota.map { [$0] } ?? [])
  }

  /// The address the server is bound to, once it is listening (port 0 resolves to the real port).
  public var listeningAddress: GRPCNIOTransportHTTP2.SocketAddress {
    get async throws { try await transport.listeningAddress }
  }

  /// Everything to run, in start order.
  public var services: [any Service] {
    [
      database,
      // Waits for the schema: listening and loading before migrations would fail on a new database.
      ChannelListener(
        channel: TenantRepository.identityChannel,
        database: database,
        logger: logger,
        waitUntilReady: { [ready] in await ready.wait() }
      ) { [directory, logger] _ in
        // The pool is going away with the process; a reload now would only log a failure.
        guard !Task.isShuttingDownGracefully else { return }
        await directory.refreshLogging(logger)
      },
      ChannelListener(
        channel: AuditLogRepository.channel,
        database: database,
        logger: logger,
        waitUntilReady: { [ready] in await ready.wait() }
      ) { [auditNotifier] payload in
        auditNotifier.notify(payload: payload)
      },
      ChannelListener(
        channel: WorkflowRepository.channel,
        database: database,
        logger: logger,
        waitUntilReady: { [ready] in await ready.wait() }
      ) { [workflowHub] payload in
        workflowHub.notify(payload: payload)
      },
      leaseReaper,
      // Stops after the server, so it gives its leases back only once no call can use them.
      quotaCoordinator,
      // Stops after the server (services stop in reverse order), so it commits the events of
      // calls that finished during the drain.
      auditBuffer,
      // Likewise indexes the events of mutations that finished during the drain.
      auditSequencer,
      checkpointer,
      GRPCServerService(gateway: self),
      TLSReloadService(tls: tls, interval: config.tlsWatchInterval),
    ] + (metricsServer.map { [$0] } ?? [])
  }

  /// Reads the TLS files again now, as SIGHUP does; false (and the old material kept) if they are bad.
  @discardableResult
  public func reloadTLS() -> Bool { tls.reload(reason: "requested") }

  /// The metrics endpoint's bound port, once listening; nil without `--metrics-listen`.
  public func metricsPort() async -> Int? { await metricsServer?.listeningPort() }

  /// Runs the gateway until a signal in `signals` (or the task's cancellation) shuts it down.
  public func run(gracefulShutdownSignals signals: [UnixSignal] = [.sigterm, .sigint]) async throws {
    let group = ServiceGroup(
      configuration: .init(services: services, gracefulShutdownSignals: signals, logger: logger)
    )
    try await group.run()
  }

  func prepareAndServe() async throws {
    if config.migrateOnStart {
      let applied = try await Migrator.migrate(database, logger: logger)
      if !applied.isEmpty { logger.info("migrations applied", metadata: ["versions": "\(applied)"]) }
    }
    try await directory.refresh()
    ready.open()
    try await withGracefulShutdownHandler {
      try await withThrowingTaskGroup(of: Bool.self) { drain in
        drain.addTask {
          try await self.serveUntilDrained()
          return true
        }
        // Bounds the drain: calls still running `drainTimeout` after shutdown began are cancelled
        // (their clients see the call fail), so a stuck call cannot hold the process up.
        drain.addTask {
          try await gracefulShutdown()
          try await Task.sleep(for: self.config.drainTimeout)
          return false
        }
        let drained = try await drain.next() ?? true
        drain.cancelAll()
        if !drained {
          self.logger.warning(
            "drain timeout reached; cancelling the calls still running",
            metadata: ["drain_timeout_ms": "\(self.config.drainTimeout.wholeMilliseconds)"]
          )
        }
      }
    } onGracefulShutdown: { [server, draining] in
      draining.set()
      server.beginGracefulShutdown()
    }
  }

  /// Serves until the server has stopped accepting and every call has ended.
  private func serveUntilDrained() async throws {
    let bound = AtomicFlag()
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask {
        do {
          try await self.server.serve()
        } catch where !bound.isSet {
          throw ListenFailure(address: self.config.listen, cause: error)
        }
      }
      group.addTask {
        // Port 0 binds a free port; say which, so scripts and tests can connect.
        let address: GRPCNIOTransportHTTP2.SocketAddress
        do {
          address = try await self.listeningAddress
        } catch {
          throw ListenFailure(address: self.config.listen, cause: error)
        }
        bound.set()
        let port = address.ipv4?.port ?? address.ipv6?.port ?? self.config.listen.port
        self.logger.info(
          "gateway listening",
          metadata: [
            "host": "\(self.config.listen.host)", "port": "\(port)", "trust_domain": "\(self.config.trustDomain)",
          ]
        )
      }
      try await group.waitForAll()
    }
  }
}

/// The listener could not be opened (address in use, not local, no permission).
public struct ListenFailure: Error, CustomStringConvertible {
  public let address: GatewayConfig.Address
  public let cause: any Error
  public let setting: ConfigSetting

  init(address: GatewayConfig.Address, cause: any Error, setting: ConfigSetting = .listen) {
    self.address = address
    self.cause = cause
    self.setting = setting
  }

  public var description: String {
    "cannot listen on \(address) (\(setting)): \((cause as? RPCError)?.cause.map { "\($0)" } ?? "\(cause)")"
  }
}

/// The gRPC server as a lifecycle service.
struct GRPCServerService: Service {
  let gateway: Gateway
  func run() async throws {
    try await gateway.prepareAndServe()
  }
}
