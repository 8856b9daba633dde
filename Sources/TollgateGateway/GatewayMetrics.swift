import Foundation
import GRPCCore
public import Prometheus
import Synchronization
import TollgateCore
public import TollgateModel

/// The gateway's Prometheus metrics: per-method call counts and latencies under the names the
/// gRPC ecosystem uses (go-grpc-prometheus): `grpc_server_started_total`,
/// `grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled by `grpc_type`,
/// `grpc_service`, `grpc_method` (and `grpc_code` when handled).
///
/// Label values come from the method table and status codes only, never from requests, so the
/// number of series is bounded by the API.
public final class GatewayMetrics: Sendable {
  public let registry: PrometheusCollectorRegistry
  /// Gauges read from their owners at scrape time (queue lengths, ages), not pushed.
  private let collectors = Mutex<[@Sendable () -> Void]>([])

  static let buckets: [Duration] = [
    .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
    .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5),
    .seconds(5), .seconds(10),
  ]

  public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
    self.registry = registry
    registry.makeGauge(name: "tollgate_up", help: "1 while this gateway process runs").set(Double(1))
    registry.makeGauge(
      name: "tollgate_build_info",
      labels: [("version", TollgateVersion.current)],
      help: "1, labelled with the gateway's version"
    ).set(Double(1))
    registry.makeGauge(name: "tollgate_start_time_seconds", help: "Unix time this process started")
      .set(Date().timeIntervalSince1970)
  }

  /// The swift-metrics face of this registry, for the layers that record through ``Telemetry``.
  public func telemetry(maxTenantLabels: Int) -> Telemetry {
    Telemetry(factory: PrometheusMetricsFactory(registry: registry), maxTenantLabels: maxTenantLabels)
  }

  /// Sets gauge `name` from `read` at every scrape.
  public func gauge(_ name: String, help: String, _ read: @escaping @Sendable () -> Double) {
    let gauge = registry.makeGauge(name: name, help: help)
    collectors.withLock { $0.append { gauge.set(read()) } }
  }

  func callType(_ method: MethodDescriptor) -> String {
    MethodCatalog.shape(of: method)?.callType ?? "unknown"
  }

  static func labels(_ method: MethodDescriptor, type: String) -> [(String, String)] {
    [("grpc_type", type), ("grpc_service", method.service.fullyQualifiedService), ("grpc_method", method.method)]
  }

  func started(_ method: MethodDescriptor, type: String) {
    registry.makeCounter(
      name: "grpc_server_started_total",
      labels: Self.labels(method, type: type),
      help: "RPCs started on the server"
    ).increment()
  }

  func handled(_ method: MethodDescriptor, type: String, code: String, duration: Duration) {
    registry.makeCounter(
      name: "grpc_server_handled_total",
      labels: Self.labels(method, type: type) + [("grpc_code", code)],
      help: "RPCs completed on the server, by status code"
    ).increment()
    registry.makeDurationHistogram(
      name: "grpc_server_handling_seconds",
      labels: Self.labels(method, type: type),
      buckets: Self.buckets,
      help: "Time from the start of an RPC to its status, in seconds"
    ).record(duration)
  }

  /// The text exposition format (version 0.0.4).
  public func exposition() -> [UInt8] {
    for collect in collectors.withLock({ $0 }) { collect() }
    return registry.emitToBuffer()
  }
}

/// Outermost interceptor: counts every call, including those refused by identity or
/// authorization, and times it until its status is sent (for streams, until the response
/// producer finishes, which runs after the interceptors have returned).
struct MetricsInterceptor: ServerInterceptor {
  let metrics: GatewayMetrics
  let clock = ContinuousClock()

  func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let method = context.descriptor
    let type = metrics.callType(method)
    let start = clock.now
    metrics.started(method, type: type)
    let metrics = self.metrics
    let clock = self.clock
    return try await observingEnd(of: { try await next(request, context) }) { code, _, _ in
      metrics.handled(method, type: type, code: code.map(Self.name) ?? "OK", duration: clock.now - start)
    }
  }

  /// Status code names as grpc-go spells them (`OK`, `PermissionDenied`, …).
  static func name(_ code: RPCError.Code) -> String {
    let text = String(describing: code)
    return text.prefix(1).uppercased() + text.dropFirst()
  }
}
