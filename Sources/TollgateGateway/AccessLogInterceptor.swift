import GRPCCore
import Logging
import TollgateCore
import TollgateModel

/// Second in the chain, after metrics: one `info` line per call when it ends, with its request
/// id, method, caller, tenant, status and latency, and the caller's trace id when it sent a W3C
/// `traceparent`. Nothing from the request body, no certificate, no key.
///
/// It runs outside identity, so calls refused for want of a valid certificate are logged too;
/// the caller is read from the ``CallRecord`` identity fills in.
struct AccessLogInterceptor: ServerInterceptor {
  let logger: Logger
  let clock = ContinuousClock()

  func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    // Quiet logs cost the call nothing.
    guard logger.logLevel <= .info else { return try await next(request, context) }
    let record = CallRecord(
      requestID: Self.requestID(),
      traceID: CallRecord.traceID(fromTraceparent: request.metadata[stringValues: "traceparent"].first(where: { _ in true }))
    )
    let logger = self.logger
    let method = context.descriptor.fullyQualifiedMethod
    let start = clock.now
    let clock = self.clock
    return try await observingEnd(of: {
      try await CallRecord.$current.withValue(record) { try await next(request, context) }
    }) { code, message, _ in
      var metadata: Logger.Metadata = [
        "request_id": .string(record.requestID),
        "method": .string(method),
        "status": .string(code.map(MetricsInterceptor.name) ?? "OK"),
        "latency_ms": .stringConvertible((clock.now - start).seconds * 1000),
      ]
      if let scope = record.scope {
        metadata["principal"] = .string(scope.principal.spiffeID.description)
        metadata["role"] = .string(scope.principal.role.rawValue)
        if let tenant = scope.tenant { metadata["tenant"] = .string(tenant.rawValue) }
        if scope.impersonated { metadata["impersonated"] = .stringConvertible(true) }
      }
      if let trace = record.traceID { metadata["trace_id"] = .string(trace) }
      if code != nil { metadata["error"] = .string(message) }
      logger.info("call", metadata: metadata)
    }
  }

  static func requestID() -> String {
    let n = UInt64.random(in: 0...UInt64.max)
    let hex = String(n, radix: 16)
    return String(repeating: "0", count: 16 - hex.count) + hex
  }
}
