public import GRPCCore

extension StreamingServerResponse {
  /// This response, keeping `object` alive until the response's producer has run and been let go
  /// (for a stream, until it ends); a deinit of `object` then releases what it holds. Dropping
  /// the producer unrun releases it too.
  public func holding(_ object: some AnyObject & Sendable) -> Self {
    guard case .success(var contents) = accepted else { return self }
    let producer = contents.producer
    contents.producer = { writer in
      defer { withExtendedLifetime(object) {} }
      return try await producer(writer)
    }
    var response = self
    response.accepted = .success(contents)
    return response
  }
}

/// Runs `call` (an interceptor's `next`) and reports how the call ended, once: when it throws,
/// when it is refused (`accepted` failure: an inner interceptor's or handler's error arrives this
/// way, not as a throw), or when a streaming response's producer finishes, which happens after
/// every interceptor has returned. `code` is nil for OK.
public func observingEnd<Output: Sendable>(
  of call: () async throws -> StreamingServerResponse<Output>,
  _ report: @escaping @Sendable (_ code: RPCError.Code?, _ message: String) -> Void
) async throws -> StreamingServerResponse<Output> {
  var response: StreamingServerResponse<Output>
  do {
    response = try await call()
  } catch {
    let status = rpcStatus(of: error)
    report(status?.code ?? .unknown, status?.message ?? "\(type(of: error))")
    throw error
  }
  switch response.accepted {
  case .failure(let error):
    report(error.code, error.message)
  case .success(var contents):
    let producer = contents.producer
    contents.producer = { writer in
      do {
        let trailers = try await producer(writer)
        report(nil, "")
        return trailers
      } catch {
        let status = rpcStatus(of: error)
        report(status?.code ?? .unknown, status?.message ?? "\(type(of: error))")
        throw error
      }
    }
    response.accepted = .success(contents)
  }
  return response
}
