import Foundation
public import GRPCCore
public import Logging
import Synchronization
import SwiftProtobuf
public import TollgateCore
public import TollgateModel
import TollgateProtos
public import TollgateStore

/// Records one ``Tollgate_V1_AuditEvent`` for every call that reaches authorization, refused ones
/// included. It sits after identity (it needs the principal) and before authorization (so a
/// denial is recorded).
///
/// Durability follows the method table's `mutating` flag:
/// - a mutating call is not answered before its event is committed. The handler's `mutation`
///   transaction carries the event (``PendingAudit``), so the change and its record commit
///   together; a call that fails, or changes nothing, has its event committed here, before the
///   first response message or the status is sent. One that fails UNAVAILABLE (not applied,
///   usually because the database is out of reach) queues its event like a read-only call.
/// - a read-only call may start only while the ``AuditBuffer`` has room (otherwise it is refused
///   with UNAVAILABLE, never run unaudited) and queues its event when it ends; the buffer commits
///   it within a second.
public struct AuditInterceptor: ServerInterceptor {
  let policy: AuthorizationPolicy
  let buffer: AuditBuffer
  let repository: AuditLogRepository
  let tenantExists: @Sendable (TenantID) -> Bool
  let logger: Logger

  /// `tenantExists` says whether a tenant is registered; see ``AuditedCall/logTenant(code:request:)``.
  public init(
    policy: AuthorizationPolicy,
    buffer: AuditBuffer,
    repository: AuditLogRepository,
    tenantExists: @escaping @Sendable (TenantID) -> Bool,
    logger: Logger
  ) {
    self.policy = policy
    self.buffer = buffer
    self.repository = repository
    self.tenantExists = tenantExists
    self.logger = logger
  }

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let scope = try CallScope.required()
    let method = context.descriptor
    // A method missing from the table is refused by authorization; auditing it as a mutation
    // costs little and cannot lose it.
    let mutating = policy.rule(for: method)?.mutating ?? true
    if !mutating && !buffer.admitsCalls {
      logger.warning("audit buffer full; refusing a call", metadata: ["method": "\(method)"])
      throw RPCError(
        code: .unavailable,
        message: "the audit log is not keeping up, and calls are refused rather than run unaudited; retry shortly"
      )
    }
    let call = AuditedCall(
      scope: scope,
      method: method,
      traceID: Self.traceID(request.metadata),
      mutating: mutating,
      buffer: buffer,
      repository: repository,
      tenantExists: tenantExists,
      logger: logger
    )
    var request = request
    let messages = request.messages
    request.messages = RPCAsyncSequence(
      wrapping: messages.map { message in
        call.observe(message)
        return message
      }
    )

    // Weak: the call holds its PendingAudit, and the call is alive whenever a transaction of it runs.
    let pending = mutating ? PendingAudit { [weak call] in call?.entry(code: 0, message: "") } : nil
    call.pending = pending
    let response: StreamingServerResponse<Output>
    do {
      response = try await PendingAudit.$current.withValue(pending) { try await next(request, context) }
    } catch {
      try await call.finish(error)
      throw error
    }
    switch response.accepted {
    case .failure(let error):
      try await call.finish(error)
      return response
    case .success(var contents):
      let producer = contents.producer
      // A single response message is the answer: commit the event before it goes out.
      let gateFirstWrite = mutating && MethodCatalog.shape(of: method)?.serverStreaming == false
      contents.producer = { writer in
        let writer = gateFirstWrite ? RPCWriter(wrapping: GatedWriter(base: writer) { try await call.finish(nil) }) : writer
        do {
          let trailers = try await PendingAudit.$current.withValue(pending) { try await producer(writer) }
          try await call.finish(nil)
          return trailers
        } catch {
          try await call.finish(error)
          throw error
        }
      }
      var wrapped = response
      wrapped.accepted = .success(contents)
      return wrapped
    }
  }

  /// The trace id of a valid W3C `traceparent`, if sent; empty otherwise.
  static func traceID(_ metadata: Metadata) -> String {
    CallRecord.traceID(fromTraceparent: metadata[stringValues: "traceparent"].first(where: { _ in true })) ?? ""
  }
}

/// Runs `before` ahead of every write; `before` is idempotent (``AuditedCall/finish(_:)``), so it
/// acts once, ahead of the first message.
struct GatedWriter<Element: Sendable>: RPCWriterProtocol {
  let base: RPCWriter<Element>
  let before: @Sendable () async throws -> Void

  func write(_ element: Element) async throws {
    try await before()
    try await base.write(element)
  }

  func write(contentsOf elements: some Sequence<Element>) async throws {
    try await before()
    try await base.write(contentsOf: elements)
  }
}

/// One call's audit record in the making; recorded exactly once.
final class AuditedCall: Sendable {
  let scope: CallScope
  let method: MethodDescriptor
  let traceID: String
  let mutating: Bool
  let buffer: AuditBuffer
  let repository: AuditLogRepository
  let tenantExists: @Sendable (TenantID) -> Bool
  let logger: Logger
  let time = Date()
  let start = ContinuousClock.now

  private struct State {
    /// The first request message; its digest and resource are taken when the event is built.
    var request: (any SwiftProtobuf.Message)?
    var sawMessage = false
    var finished = false
    var pending: PendingAudit?
  }
  private let state = Mutex(State())

  init(
    scope: CallScope,
    method: MethodDescriptor,
    traceID: String,
    mutating: Bool,
    buffer: AuditBuffer,
    repository: AuditLogRepository,
    tenantExists: @escaping @Sendable (TenantID) -> Bool,
    logger: Logger
  ) {
    self.scope = scope
    self.method = method
    self.traceID = traceID
    self.mutating = mutating
    self.buffer = buffer
    self.repository = repository
    self.tenantExists = tenantExists
    self.logger = logger
  }

  var pending: PendingAudit? {
    get { state.withLock { $0.pending } }
    set { state.withLock { $0.pending = newValue } }
  }

  /// Keeps the first request message (the only one of a unary call) for the event. Messages are
  /// values, so later ones cannot change it.
  func observe<Input>(_ message: Input) {
    state.withLock { state in
      guard !state.sawMessage else { return }
      state.sawMessage = true
      state.request = message as? any SwiftProtobuf.Message
    }
  }

  /// The call's event, with `latency` measured when the call ended.
  func entry(code: Int32, message: String, latency: Duration, encoder: AuditLeafEncoder) -> AuditEntry {
    let request = state.withLock { $0.request }
    let named = request as? any AuditResourceNaming
    return AuditEventBuilder.entry(
      scope: scope,
      tenant: scope.tenant ?? logTenant(code: code, request: named),
      method: "/" + method.fullyQualifiedMethod,
      resource: named?.auditResource ?? "",
      code: code,
      message: message,
      requestSHA256: request.map(AuditEventBuilder.requestDigest) ?? [],
      traceID: traceID,
      time: time,
      latency: latency,
      encoder: encoder
    )
  }

  /// The tenant a call without one of its own (an operator's, without `tollgate-tenant`) acted
  /// on: the tenant its request names, if that tenant is registered or the call succeeded (and so
  /// found it, or created it). Its event goes to that tenant's log, where the tenant's auditors
  /// see it; a call on no tenant, or on one that does not exist, goes to the platform log.
  func logTenant(code: Int32, request: (any AuditResourceNaming)?) -> TenantID? {
    guard let text = request?.auditTenant, !text.isEmpty, let tenant = try? TenantID(validating: text) else { return nil }
    return code == 0 || tenantExists(tenant) ? tenant : nil
  }

  func entry(code: Int32, message: String) -> AuditEntry {
    entry(code: code, message: message, latency: ContinuousClock.now - start, encoder: AuditLeafEncoder())
  }

  /// Records the call's outcome (`error` nil = OK) unless already recorded. A mutating call's
  /// event is committed before this returns, unless the call failed UNAVAILABLE; if that fails
  /// the call fails with UNAVAILABLE rather than answer without its record.
  func finish(_ error: (any Error)?) async throws {
    let first = state.withLock { state -> Bool in
      guard !state.finished else { return false }
      state.finished = true
      return true
    }
    guard first else { return }
    if pending?.isCommitted == true { return }
    let (code, message) = Self.outcome(error)
    // A mutating call that ends UNAVAILABLE changed nothing (its event would have committed with
    // the change), and most often the database could not be reached. Appending its event here
    // would keep the caller waiting out a second database timeout, only to drop the event when
    // that append failed too; the buffer keeps it and retries until the database is back.
    if !mutating || code == Int32(RPCError.Code.unavailable.rawValue) {
      // Put together and serialized by the flusher with the rest of its batch, not on the
      // call's path: done one call at a time amid the serving work, the same steps cost the
      // machine about 18 µs more per call (docs/benchmarks.md, "Events built by the flusher").
      let latency = ContinuousClock.now - start
      buffer.submit(time: time) { self.entry(code: code, message: message, latency: latency, encoder: $0) }
      return
    }
    let entry = entry(code: code, message: message)
    do {
      try await repository.append([entry], logger: logger)
    } catch {
      logger.error("could not commit the audit event of a call; failing the call", metadata: ["method": "\(method)", "error": "\(error)"])
      throw RPCError(code: .unavailable, message: "the call could not be audited; retry later")
    }
  }

  static func outcome(_ error: (any Error)?) -> (Int32, String) {
    guard let error else { return (0, "") }
    if let status = rpcStatus(of: error) { return (Int32(status.code.rawValue), status.message) }
    if error is CancellationError { return (Int32(RPCError.Code.cancelled.rawValue), "cancelled") }
    return (Int32(RPCError.Code.unknown.rawValue), "")
  }

  deinit {
    // A call the transport dropped before its response ran (the client went away) still owes
    // its record.
    let unfinished = state.withLock { state -> Bool in
      defer { state.finished = true }
      return !state.finished
    }
    guard unfinished, pending?.isCommitted != true else { return }
    // Through the buffer, mutating or not: nobody waits for this record, and the buffer retries
    // it until it commits and flushes it at shutdown, where a task of its own dropped it unlogged
    // on the first failure.
    buffer.submit(entry(code: Int32(RPCError.Code.cancelled.rawValue), message: "the client went away"))
  }
}

extension Tollgate_V1_Role {
  init(_ role: Role) {
    switch role {
    case .operator: self = .operator
    case .partner: self = .partner
    case .agent: self = .agent
    case .auditor: self = .auditor
    case .worker: self = .worker
    }
  }
}
