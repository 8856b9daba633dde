public import GRPCCore
import GRPCNIOTransportHTTP2
import TollgateModel

/// First in the chain: establishes who is calling and on which tenant's behalf.
///
/// Reads the peer certificate the mTLS handshake verified, turns it into a ``Principal``, refuses
/// revoked certificates, resolves `tollgate-tenant` for operators, and binds the resulting
/// ``CallScope`` for everything after it (later interceptors, the handler, and the producer of a
/// streaming response, which runs after this interceptor has returned).
public struct IdentityInterceptor: ServerInterceptor {
  private let identity: CertificateIdentity
  private let directory: IdentityDirectory

  public init(identity: CertificateIdentity, directory: IdentityDirectory) {
    self.identity = identity
    self.directory = directory
  }

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let scope = try self.scope(request: request, context: context)
    CallRecord.current?.scope = scope
    let response = try await CallScope.$current.withValue(scope) {
      try await next(request, context)
    }
    return response.producerRunning { produce in try await CallScope.$current.withValue(scope) { try await produce() } }
  }

  func scope<Input>(request: StreamingServerRequest<Input>, context: ServerContext) throws(TollgateError) -> CallScope {
    guard let transport = context.transportSpecific as? HTTP2ServerTransport.Posix.Context,
      let certificate = transport.peerCertificate
    else {
      throw .unauthenticated("no client certificate; Tollgate requires mutual TLS")
    }
    let principal = try identity.principal(from: certificate)
    if let revoked = principal.revocation(in: directory.snapshot) { throw revoked }

    let named = Array(request.metadata[stringValues: CallScope.tenantMetadataKey])
    guard named.count <= 1 else {
      throw .invalidField("metadata \(CallScope.tenantMetadataKey)", "given \(named.count) times; give it once")
    }
    let namedTenant: TenantID?
    if let text = named.first {
      do throws(TenantID.Invalid) {
        namedTenant = try TenantID(validating: text)
      } catch {
        throw .invalidField("metadata \(CallScope.tenantMetadataKey)", error.description)
      }
    } else {
      namedTenant = nil
    }

    if let own = principal.tenant {
      if let namedTenant, namedTenant != own {
        throw .permissionDenied(
          "principal \(principal.spiffeID) of tenant '\(own)' may not act on tenant '\(namedTenant)'"
        )
      }
      return CallScope(principal: principal, tenant: own, impersonated: false)
    }
    return CallScope(principal: principal, tenant: namedTenant, impersonated: namedTenant != nil)
  }
}
