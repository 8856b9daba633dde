public import GRPCCore
import TollgateModel

/// Second in the chain: allows the call only if the policy lists the method for the caller's
/// role (deny by default) and the caller's own tenant is registered and active. A streaming call
/// is ended as soon as its certificate is revoked or its tenant suspended
/// (``IdentityDirectory/whileInStanding(_:_:)``).
public struct AuthorizationInterceptor: ServerInterceptor {
  private let policy: AuthorizationPolicy
  private let directory: IdentityDirectory

  public init(policy: AuthorizationPolicy, directory: IdentityDirectory) {
    self.policy = policy
    self.directory = directory
  }

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let scope = try CallScope.required()
    try authorize(method: context.descriptor, scope: scope)
    let response = try await next(request, context)
    // A unary call's work is short, and was admitted just now; a stream's may go on for days.
    guard let shape = MethodCatalog.shape(of: context.descriptor), shape.clientStreaming || shape.serverStreaming,
      case .success(var contents) = response.accepted
    else { return response }
    let producer = contents.producer
    let directory = self.directory
    contents.producer = { writer in try await directory.whileInStanding(scope) { try await producer(writer) } }
    var ended = response
    ended.accepted = .success(contents)
    return ended
  }

  /// Throws PERMISSION_DENIED with the reason unless `scope` may call `method`.
  public func authorize(method: MethodDescriptor, scope: CallScope) throws(TollgateError) {
    guard let rule = policy.rule(for: method) else {
      throw .permissionDenied("\(method.fullyQualifiedMethod) is not open to any role")
    }
    let role = scope.principal.role
    guard rule.roles.contains(role) else {
      let allowed = rule.roles.map(\.rawValue).sorted().joined(separator: ", ")
      throw .permissionDenied("role '\(role.rawValue)' may not call \(method.fullyQualifiedMethod); allowed: \(allowed)")
    }
    if let own = scope.principal.tenant, let refused = directory.snapshot.tenantStandingError(own) { throw refused }
  }
}
