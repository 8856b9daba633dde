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

  public init(
    host: String,
    port: Int,
    certificatePEM: [UInt8],
    privateKeyPEM: [UInt8],
    serverCAPEM: [UInt8],
    defaultTimeout: Duration? = .seconds(30)
  ) {
    self.host = host
    self.port = port
    self.certificatePEM = certificatePEM
    self.privateKeyPEM = privateKeyPEM
    self.serverCAPEM = serverCAPEM
    self.defaultTimeout = defaultTimeout
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
