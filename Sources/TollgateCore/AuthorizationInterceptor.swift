public import GRPCCore
import TollgateModel

/// Second in the chain: allows the call only if the policy lists the method for the caller's
/// role (deny by default) and the caller's own tenant is registered and active.
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
    try authorize(method: context.descriptor, scope: try CallScope.required())
    return try await next(request, context)
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
    if let own = scope.principal.tenant {
      switch directory.snapshot.tenantStates[own] {
      case .none:
        throw .permissionDenied("tenant '\(own)' is not registered with this gateway")
      case .suspended:
        throw .permissionDenied("tenant '\(own)' is suspended; an operator must resume it")
      case .active:
        break
      }
    }
  }
}
