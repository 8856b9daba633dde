public import GRPCCore
public import GRPCNIOTransportHTTP2
import TollgateProtos

/// Where and as whom a client connects: the gateway address and the PEM files of a client
/// certificate, its key, and the CA that signed the gateway's server certificate.
public struct GatewayConnection: Sendable {
  public var host: String
  public var port: Int
  public var certificatePEM: [UInt8]
  public var privateKeyPEM: [UInt8]
  public var serverCAPEM: [UInt8]
  /// Deadline of every unary call that does not set its own; nil for none. Streams get none
  /// unless they set their own: they last as long as their work (an export of a whole log, a
  /// follower, a worker, an agent's usage feed), which no one deadline fits.
  public var defaultTimeout: Duration?
  /// Pings every `time` while calls are open (grpc-swift's client does not wait for a quiet
  /// spell); a ping unanswered for `timeout` closes the connection, and its calls fail with
  /// UNAVAILABLE. Without it a stream that waits (a follower of a quiet log, an idle worker) on a
  /// connection that died without a reset (a NAT or firewall dropping its state, a host gone)
  /// waits for ever. nil: no pings. The gateway must accept pings this often
  /// (`--min-client-ping-interval-ms`, 10 s by default).
  public var keepalive: Keepalive?

  public struct Keepalive: Sendable, Hashable {
    public var time: Duration
    /// Shorter than `time`, or it never expires: grpc-swift's client pings every `time` whether
    /// or not the last ping was answered, and each ping restarts the wait for an answer
    /// (grpc-swift-nio-transport 2.9.2, `ClientConnectionHandler`; tollctl refuses such a pair).
    public var timeout: Duration

    public init(time: Duration, timeout: Duration) {
      self.time = time
      self.timeout = timeout
    }

    public static let defaults = Keepalive(time: .seconds(30), timeout: .seconds(10))
  }

  public init(
    host: String,
    port: Int,
    certificatePEM: [UInt8],
    privateKeyPEM: [UInt8],
    serverCAPEM: [UInt8],
    defaultTimeout: Duration? = .seconds(30),
    keepalive: Keepalive? = .defaults
  ) {
    self.host = host
    self.port = port
    self.certificatePEM = certificatePEM
    self.privateKeyPEM = privateKeyPEM
    self.serverCAPEM = serverCAPEM
    self.defaultTimeout = defaultTimeout
    self.keepalive = keepalive
  }

  /// An HTTP/2 transport with mutual TLS that verifies the gateway's certificate against
  /// `serverCAPEM`, including its name: the DNS name or IP address connected to must be in the
  /// server certificate's subject alternative names.
  public func makeTransport() throws -> HTTP2ClientTransport.Posix {
    let target: any ResolvableTarget =
      host.contains(":") ? .ipv6(address: host, port: port) : (host.first?.isNumber == true
        ? .ipv4(address: host, port: port) : .dns(host: host, port: port))
    return try HTTP2ClientTransport.Posix(
      target: target,
      transportSecurity: .mTLS(
        certificateChain: [.bytes(certificatePEM, format: .pem)],
        privateKey: .bytes(privateKeyPEM, format: .pem)
      ) {
        $0.trustRoots = .certificates([.bytes(serverCAPEM, format: .pem)])
      },
      config: .defaults {
        $0.backoff.initial = .milliseconds(100)
        $0.connection.maxIdleTime = .seconds(30)
        // Not without calls: an idle connection closes after 30 s anyway, and the gateway allows
        // a ping without calls only once per two hours.
        $0.connection.keepalive = keepalive.map { .init(time: $0.time, timeout: $0.timeout, allowWithoutCalls: false) }
      },
      // A method config naming only the empty service applies to every method; one naming a
      // method overrides it. A call's own nil timeout would not: gRPC fills it in from the config.
      serviceConfig: ServiceConfig(methodConfig: [
        MethodConfig(names: [.init(service: "")], timeout: defaultTimeout),
        MethodConfig(names: Self.streamingMethods, timeout: nil),
      ])
    )
  }

  /// The gateway's methods that stream in either direction.
  static let streamingMethods: [MethodConfig.Name] = [
    Tollgate_V1_AuditService.Method.descriptors,
    Tollgate_V1_MeteringService.Method.descriptors,
    Tollgate_V1_TenantService.Method.descriptors,
    Tollgate_V1_WorkflowService.Method.descriptors,
    Grpc_Health_V1_Health.Method.descriptors,
    Grpc_Reflection_V1_ServerReflection.Method.descriptors,
    Grpc_Reflection_V1alpha_ServerReflection.Method.descriptors,
  ].joined().filter { $0.type != .unary }.map { .init(service: $0.service.fullyQualifiedService, method: $0.method) }

  /// Runs `body` with a connected client; the connection closes when `body` returns.
  public func withClient<Result: Sendable>(
    _ body: (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> Result
  ) async throws -> Result {
    try await withGRPCClient(transport: try makeTransport()) { client in
      try await body(client)
    }
  }
}
