public import GRPCCore
import Synchronization
public import TollgateModel

/// Second in the chain, before identity: the process-wide limits that protect every tenant.
///
/// - Load shedding: past `maxConcurrentCalls` calls in flight on this replica, a new call is
///   refused UNAVAILABLE at once, before any work or memory is spent on it; clients retry
///   UNAVAILABLE with backoff, possibly on another replica. With the per-connection stream limit,
///   the connection limit and the message size limit this bounds what callers can make the
///   process hold.
/// - A default deadline: a unary call that arrives without `grpc-timeout` gets
///   `defaultDeadline`, so a stuck dependency cannot pin its resources forever. Streams are
///   long-lived by design (follow feeds, worker streams) and are not given one.
public struct ServerLimitsInterceptor: ServerInterceptor {
  private let maxConcurrentCalls: Int
  private let defaultDeadline: Duration
  private let inFlight: InFlightCounter
  private let telemetry: Telemetry

  public init(maxConcurrentCalls: Int, defaultDeadline: Duration, telemetry: Telemetry = .disabled) {
    self.maxConcurrentCalls = maxConcurrentCalls
    self.defaultDeadline = defaultDeadline
    self.inFlight = InFlightCounter()
    self.telemetry = telemetry
  }

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    guard inFlight.enter(limit: maxConcurrentCalls) else {
      telemetry.count("tollgate_calls_shed_total")
      throw RPCError(
        code: .unavailable,
        message: "gateway replica is at its limit of \(maxConcurrentCalls) concurrent calls; retry with backoff"
      )
    }
    let callType = MethodCatalog.shape(of: context.descriptor)?.callType ?? "unknown"
    let slot = InFlightSlot(counter: inFlight, telemetry: telemetry, callType: callType)
    let response: StreamingServerResponse<Output>
    if request.metadata[stringValues: "grpc-timeout"].first(where: { _ in true }) == nil, callType == "unary" {
      response = try await withoutActuallyEscaping(next) { next in
        try await Self.withDeadline(defaultDeadline, method: context.descriptor) {
          try await next(request, context)
        }
      }
    } else {
      response = try await next(request, context)
    }
    return response.holding(slot)
  }

  /// Runs `body`, cancelling it and failing DEADLINE_EXCEEDED once `deadline` has passed.
  static func withDeadline<T: Sendable>(
    _ deadline: Duration,
    method: MethodDescriptor,
    _ body: @escaping @Sendable () async throws -> T
  ) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
      group.addTask { try await body() }
      group.addTask {
        try await Task.sleep(for: deadline)
        throw RPCError(
          code: .deadlineExceeded,
          message: "\(method.fullyQualifiedMethod) did not finish within the gateway's default deadline of "
            + "\(deadline.components.seconds) s; send a grpc-timeout to choose your own"
        )
      }
      defer { group.cancelAll() }
      return try await group.next()!
    }
  }
}

final class InFlightCounter: Sendable {
  private let count = Atomic<Int>(0)

  func enter(limit: Int) -> Bool {
    let now = count.wrappingAdd(1, ordering: .relaxed).newValue
    if now > limit {
      count.wrappingSubtract(1, ordering: .relaxed)
      return false
    }
    return true
  }

  func leave() { count.wrappingSubtract(1, ordering: .relaxed) }
}

/// A call counted in flight (and in `tollgate_calls_in_flight` by call type, so open streams
/// show) until it ends.
final class InFlightSlot: Sendable {
  let counter: InFlightCounter
  let telemetry: Telemetry
  let callType: String

  init(counter: InFlightCounter, telemetry: Telemetry, callType: String) {
    self.counter = counter
    self.telemetry = telemetry
    self.callType = callType
    telemetry.adjust("tollgate_calls_in_flight", [("grpc_type", callType)], by: 1)
  }

  deinit {
    counter.leave()
    telemetry.adjust("tollgate_calls_in_flight", [("grpc_type", callType)], by: -1)
  }
}
