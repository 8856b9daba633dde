public import GRPCCore
public import Tracing

/// Third in the chain, right inside the access log: a server span per call, a child of the
/// caller's span when it sent a W3C `traceparent` (the bootstrapped tracer reads it through
/// ``MetadataExtractor``). The span's context is the task's `ServiceContext` for everything after
/// it, including a streaming response's producer, so the database spans of the handler join the
/// caller's trace. With no tracer bootstrapped this is swift-distributed-tracing's no-op tracer.
public struct TracingInterceptor: ServerInterceptor {
  public init() {}

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    var parent = ServiceContext.current ?? .topLevel
    InstrumentationSystem.instrument.extract(request.metadata, into: &parent, using: MetadataExtractor())
    let method = context.descriptor
    let span = InstrumentationSystem.tracer.startAnySpan(method.fullyQualifiedMethod, context: parent, ofKind: .server)
    span.attributes["rpc.system"] = "grpc"
    span.attributes["rpc.service"] = method.service.fullyQualifiedService
    span.attributes["rpc.method"] = method.method
    let spanContext = span.context
    let response = try await observingEnd(of: {
      try await ServiceContext.withValue(spanContext) { try await next(request, context) }
    }) { code, _, error in
      span.attributes["rpc.grpc.status_code"] = Int(code?.rawValue ?? 0)
      if let error {
        span.recordError(error)
        span.setStatus(SpanStatus(code: .error, message: rpcStatus(of: error)?.message))
      }
      span.end()
    }
    return response.producerRunning { produce in try await ServiceContext.withValue(spanContext) { try await produce() } }
  }
}

/// Reads propagation headers (e.g. `traceparent`) from gRPC request metadata.
public struct MetadataExtractor: Extractor {
  public init() {}
  public func extract(key: String, from carrier: Metadata) -> String? {
    carrier[stringValues: key].first(where: { _ in true })
  }
}
