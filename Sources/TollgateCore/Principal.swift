public import Foundation
public import TollgateModel

/// An authenticated caller: who the client certificate says it is.
public struct Principal: Sendable, Hashable {
  /// The certificate's SPIFFE ID.
  public let spiffeID: SPIFFEID
  /// Lowercase hex SHA-256 of the certificate's DER bytes.
  public let certificateSHA256: String
  /// Lowercase hex serial number of the certificate, leading zeros stripped.
  public let serialHex: String
  /// The certificate's `notValidAfter`: a stream still open then is ended.
  public let validUntil: Date

  public init(spiffeID: SPIFFEID, certificateSHA256: String, serialHex: String, validUntil: Date = .distantFuture) {
    self.spiffeID = spiffeID
    self.certificateSHA256 = certificateSHA256
    self.serialHex = serialHex
    self.validUntil = validUntil
  }

  public var role: Role { spiffeID.role }
  /// The principal's own tenant; nil for operators.
  public var tenant: TenantID? { spiffeID.tenant }
}

/// What a call acts as and on, established by the identity interceptor before anything else runs.
///
/// Reaches later interceptors and handlers through the `current` task-local. A tenant principal's
/// `tenant` is always its own; an operator's is the tenant named in `tollgate-tenant`, or nil for
/// platform-wide calls.
public struct CallScope: Sendable {
  /// Request metadata key an operator uses to name the tenant it acts on.
  public static let tenantMetadataKey = "tollgate-tenant"

  public let principal: Principal
  public let tenant: TenantID?
  /// True when an operator acts on a tenant through `tollgate-tenant`.
  public let impersonated: Bool

  public init(principal: Principal, tenant: TenantID?, impersonated: Bool) {
    self.principal = principal
    self.tenant = tenant
    self.impersonated = impersonated
  }

  /// The scope of the call running on this task.
  @TaskLocal public static var current: CallScope?

  /// The current scope; a missing one means the interceptors were not installed, which is a bug,
  /// so it fails closed.
  public static func required() throws(TollgateError) -> CallScope {
    guard let scope = current else { throw .unauthenticated("no authenticated identity for this call") }
    return scope
  }

  /// The tenant a request acts on, given the request's own tenant id field (`requested`, which
  /// may be empty). Tenant principals may only name their own tenant; operators name one in the
  /// field or in `tollgate-tenant`, consistently.
  public func resolveTenant(requested: String, field: String = "tenant_id") throws(TollgateError) -> TenantID {
    if requested.isEmpty {
      if let tenant { return tenant }
      throw .invalidField(
        field,
        "no tenant given; set \(field) or the '\(CallScope.tenantMetadataKey)' request metadata"
      )
    }
    let named: TenantID
    do {
      named = try TenantID(validating: requested)
    } catch {
      throw .invalidField(field, error.description)
    }
    if let own = principal.tenant {
      guard named == own else {
        throw .permissionDenied("principal \(principal.spiffeID) of tenant '\(own)' may not act on tenant '\(named)'")
      }
      return named
    }
    if let tenant, tenant != named {
      throw .invalidField(
        field,
        "names tenant '\(named)' but '\(CallScope.tenantMetadataKey)' names '\(tenant)'; give one or make them agree"
      )
    }
    return named
  }
}
