public import GRPCCore

extension StreamingServerResponse {
  /// This response, its producer run inside `scope` (which must call its argument once): a
  /// streaming response's producer runs after every interceptor has returned, so what an
  /// interceptor binds around `next` (a task-local, a span's context) must be bound again here.
  public func producerRunning(
    within scope: @escaping @Sendable (_ produce: () async throws -> Metadata) async throws -> Metadata
  ) -> Self {
    guard case .success(var contents) = accepted else { return self }
    let producer = contents.producer
    contents.producer = { writer in try await scope { try await producer(writer) } }
    var response = self
    response.accepted = .success(contents)
    return response
  }

  /// This response, keeping `object` alive until the response's producer has run and been let go
  /// (for a stream, until it ends); a deinit of `object` then releases what it holds. Dropping
  /// the producer unrun releases it too.
  public func holding(_ object: some AnyObject & Sendable) -> Self {
    producerRunning { produce in
      defer { withExtendedLifetime(object) {} }
      return try await produce()
    }
  }
}

/// Runs `call` (an interceptor's `next`) and reports how the call ended, once: when it throws,
/// when it is refused (`accepted` failure: an inner interceptor's or handler's error arrives this
/// way, not as a throw), or when a streaming response's producer finishes, which happens after
/// every interceptor has returned. `code` is nil for OK; `error` is what ended the call, if
/// anything did.
public func observingEnd<Output: Sendable>(
  of call: () async throws -> StreamingServerResponse<Output>,
  _ report: @escaping @Sendable (_ code: RPCError.Code?, _ message: String, _ error: (any Error)?) -> Void
) async throws -> StreamingServerResponse<Output> {
  let failed: @Sendable (any Error) -> Void = { error in
    let status = rpcStatus(of: error)
    report(status?.code ?? .unknown, status?.message ?? "\(type(of: error))", error)
  }
  let response: StreamingServerResponse<Output>
  do {
    response = try await call()
  } catch {
    failed(error)
    throw error
  }
  if case .failure(let error) = response.accepted {
    report(error.code, error.message, error)
    return response
  }
  return response.producerRunning { produce in
    do {
      let trailers = try await produce()
      report(nil, "", nil)
      return trailers
    } catch {
      failed(error)
      throw error
    }
  }
}
