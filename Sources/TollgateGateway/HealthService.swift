import GRPCCore
import Logging
import ServiceLifecycle
import SwiftProtobuf
import TollgateCore
import TollgateProtos
import TollgateStore

/// `grpc.health.v1.Health`: SERVING only while the database answers and the gateway is not
/// draining, for the server as a whole ("") and for each registered service by name.
struct HealthService: Grpc_Health_V1_Health.SimpleServiceProtocol {
  let services: Set<String>
  let database: Database
  let draining: AtomicFlag
  let logger: Logger

  func status() async -> Grpc_Health_V1_HealthCheckResponse.ServingStatus {
    if draining.isSet { return .notServing }
    return await database.isReachable(logger: logger) ? .serving : .notServing
  }

  func check(
    request: Grpc_Health_V1_HealthCheckRequest,
    context: ServerContext
  ) async throws -> Grpc_Health_V1_HealthCheckResponse {
    guard request.service.isEmpty || services.contains(request.service) else {
      throw RPCError(code: .notFound, message: "unknown service '\(TollgateError.clipped(request.service, maxBytes: 200))'")
    }
    let status = await status()
    return .with { $0.status = status }
  }

  func watch(
    request: Grpc_Health_V1_HealthCheckRequest,
    response: RPCWriter<Grpc_Health_V1_HealthCheckResponse>,
    context: ServerContext
  ) async throws {
    guard request.service.isEmpty || services.contains(request.service) else {
      try await response.write(.with { $0.status = .serviceUnknown })
      return
    }
    var last: Grpc_Health_V1_HealthCheckResponse.ServingStatus?
    // Database reachability has no change notification; re-probe once a second while watched.
    while !Task.isCancelled && !Task.isShuttingDownGracefully {
      let now = await status()
      if now != last {
        try await response.write(.with { $0.status = now })
        last = now
      }
      try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .seconds(1)) }
    }
    // A drain: the watcher (a load balancer, a probe) learns NOT_SERVING at once, and the stream
    // ends rather than hold the drain open, so it reconnects to a replica that serves.
    if Task.isShuttingDownGracefully {
      try await response.write(.with { $0.status = .notServing })
      throw RPCError(code: .unavailable, message: "the gateway is shutting down; watch another replica")
    }
  }
}
