import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import TollgateClient
import TollgateModel
import TollgateProtos

@main
struct Tollctl: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "tollctl",
    abstract: "Tollgate's admin and client CLI.",
    subcommands: [Certs.self, Tenants.self, Meters.self, Usage.self, Audit.self, Runs.self, Worker.self, Health.self, StatusCommand.self]
  )
}

/// How tollctl reaches the gateway and whom it presents as.
struct ConnectionOptions: ParsableArguments {
  @Option(help: "Gateway address HOST:PORT. Env: TOLLCTL_GATEWAY (default 127.0.0.1:8443)")
  var gateway: String?
  @Option(help: "Folder with cert.pem, key.pem and ca.pem (as written by 'certs issue'). Env: TOLLCTL_IDENTITY")
  var identity: String?
  @Option(help: "Tenant to act on, for operators (sent as the tollgate-tenant metadata)")
  var tenant: String?
  @Option(help: "Milliseconds between pings of a connection with calls open; 0: no pings. Env: TOLLCTL_KEEPALIVE_TIME_MS (default 30000)")
  var keepaliveTimeMs: String?
  @Option(help: "Milliseconds a ping may go unanswered before the connection is given up and its streams reconnect; below --keepalive-time-ms. Env: TOLLCTL_KEEPALIVE_TIMEOUT_MS (default 10000)")
  var keepaliveTimeoutMs: String?

  func connection() throws -> GatewayConnection {
    let env = ProcessInfo.processInfo.environment
    let address = gateway ?? env["TOLLCTL_GATEWAY"] ?? "127.0.0.1:8443"
    guard let target = HostPort(parsing: address) else {
      throw ValidationError("--gateway is '\(address)'; expected HOST:PORT such as 127.0.0.1:8443 or [::1]:8443")
    }
    guard let dir = identity ?? env["TOLLCTL_IDENTITY"] else {
      throw ValidationError("--identity (or TOLLCTL_IDENTITY) is required: a folder with cert.pem, key.pem and ca.pem")
    }
    func read(_ name: String) throws -> [UInt8] {
      let path = URL(fileURLWithPath: dir).appendingPathComponent(name).path
      guard let data = FileManager.default.contents(atPath: path) else {
        throw ValidationError("--identity: cannot read \(path)")
      }
      return Array(data)
    }
    func milliseconds(_ flag: String, _ value: String?, env name: String, default fallback: Int, minimum: Int) throws -> Int {
      guard let text = value ?? env[name] else { return fallback }
      guard let number = Int(text), number >= minimum, number <= 86_400_000 else {
        throw ValidationError("--\(flag) (or \(name)) is '\(text)'; expected milliseconds from \(minimum) to 86400000")
      }
      return number
    }
    let keepaliveTime = try milliseconds("keepalive-time-ms", keepaliveTimeMs, env: "TOLLCTL_KEEPALIVE_TIME_MS", default: 30_000, minimum: 0)
    let keepaliveTimeout = try milliseconds(
      "keepalive-timeout-ms", keepaliveTimeoutMs, env: "TOLLCTL_KEEPALIVE_TIMEOUT_MS", default: 10_000, minimum: 1
    )
    guard keepaliveTime == 0 || keepaliveTimeout < keepaliveTime else {
      throw ValidationError(
        "--keepalive-timeout-ms (\(keepaliveTimeout)) must be below --keepalive-time-ms (\(keepaliveTime)): a ping is sent every keepalive time, answered or not, and each one restarts the wait for an answer, so a timeout that long never expires"
      )
    }
    return GatewayConnection(
      host: target.host,
      port: target.port,
      certificatePEM: try read("cert.pem"),
      privateKeyPEM: try read("key.pem"),
      serverCAPEM: try read("ca.pem"),
      keepalive: keepaliveTime == 0
        ? nil : .init(time: .milliseconds(keepaliveTime), timeout: .milliseconds(keepaliveTimeout))
    )
  }

  var metadata: Metadata {
    var m: Metadata = [:]
    if let tenant { m.addString(tenant, forKey: "tollgate-tenant") }
    return m
  }

  /// Runs `body` with a client; a gRPC failure prints its status and exits non-zero.
  /// Unary calls get the default deadline of 30 s; streams (followers, workers, exports) none.
  func withClient<T: Sendable>(
    _ body: (GRPCClient<HTTP2ClientTransport.Posix>, Metadata) async throws -> T
  ) async throws -> T {
    do {
      return try await withClientOrRPCError(body)
    } catch let error as RPCError {
      printError(error)
      throw ExitCode(2)
    }
  }

  /// ``withClient(_:)`` for commands that handle gRPC failures themselves.
  func withClientOrRPCError<T: Sendable>(
    _ body: (GRPCClient<HTTP2ClientTransport.Posix>, Metadata) async throws -> T
  ) async throws -> T {
    try await connection().withClient { client in try await body(client, metadata) }
  }

  /// Runs `body` with a TenantService client; a gRPC failure prints its status and exits non-zero.
  func withTenantService<T: Sendable>(
    _ body: (Tollgate_V1_TenantService.Client<HTTP2ClientTransport.Posix>, Metadata) async throws -> T
  ) async throws -> T {
    try await withClient { client, metadata in
      try await body(Tollgate_V1_TenantService.Client(wrapping: client), metadata)
    }
  }
}

/// The pause before a long-lived command reconnects: 0.2 s, doubling to 5 s while attempts
/// fail, back to 0.2 s once one made progress.
struct ReconnectPause {
  static let first = Duration.milliseconds(200)
  static let longest = Duration.seconds(5)
  private(set) var next = first

  mutating func reset() { next = Self.first }

  /// Sleeps `duration` (the pause due, unless the gateway named one), then lengthens the pause.
  mutating func wait(_ duration: Duration? = nil) async throws {
    try await Task.sleep(for: duration ?? next)
    next = min(next * 2, Self.longest)
  }

  /// Endings a stream outlives by reconnecting: the gateway or the path to it went away, or asked
  /// the client to come back later, or the certificate expired mid-stream (the identity files are
  /// read again on reconnecting and may hold a renewed one; if not, the TLS handshake fails, and
  /// that is retried like any lost connection until one appears). Anything else (a refusal, a
  /// bad request) would only repeat.
  static func resumable(_ error: RPCError) -> Bool {
    if error.code == .unauthenticated { return error.message.hasSuffix(CertificateExpiry.reconnectAdvice) }
    return [.unavailable, .resourceExhausted, .aborted, .deadlineExceeded].contains(error.code)
  }
}

func printError(_ error: RPCError) {
  FileHandle.standardError.write(Data("tollctl: \(error.code): \(error.message)\n".utf8))
}

/// Prints a message as indented JSON (proto field names), the output of every client command.
func printJSON(_ message: some SwiftProtobuf.Message) throws {
  var options = JSONEncodingOptions()
  options.preserveProtoFieldNames = true
  let compact = try message.jsonString(options: options)
  let object = try JSONSerialization.jsonObject(with: Data(compact.utf8))
  let pretty = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
  print(String(decoding: pretty, as: UTF8.self))
}

struct Health: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Ask the gateway's health service.")
  @OptionGroup var connection: ConnectionOptions
  @Option(help: "Service name; empty for the whole server")
  var service: String = ""

  func run() async throws {
    let response = try await connection.withClient { client, _ in
      try await Grpc_Health_V1_Health.Client(wrapping: client).check(.with { $0.service = service })
    }
    try printJSON(response)
    if response.status != .serving { throw ExitCode(3) }
  }
}
