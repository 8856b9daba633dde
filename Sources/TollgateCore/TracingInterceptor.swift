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
    var response: StreamingServerResponse<Output>
    do {
      response = try await ServiceContext.withValue(spanContext) { try await next(request, context) }
    } catch {
      Self.finish(span, error: error)
      throw error
    }
    switch response.accepted {
    case .failure(let error):
      Self.finish(span, error: error)
    case .success(var contents):
      let producer = contents.producer
      contents.producer = { writer in
        do {
          let trailers = try await ServiceContext.withValue(spanContext) { try await producer(writer) }
          span.attributes["rpc.grpc.status_code"] = 0
          span.end()
          return trailers
        } catch {
          Self.finish(span, error: error)
          throw error
        }
      }
      response.accepted = .success(contents)
    }
    return response
  }

  static func finish(_ span: any Span, error: any Error) {
    let code = rpcStatus(of: error)?.code
    span.attributes["rpc.grpc.status_code"] = code.map { Int($0.rawValue) } ?? 2
    span.recordError(error)
    span.setStatus(SpanStatus(code: .error, message: rpcStatus(of: error)?.message))
    span.end()
  }
}

/// Reads propagation headers (e.g. `traceparent`) from gRPC request metadata.
public struct MetadataExtractor: Extractor {
  public init() {}
  public func extract(key: String, from carrier: Metadata) -> String? {
    carrier[stringValues: key].first(where: { _ in true })
  }
}
