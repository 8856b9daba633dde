/// The role a client certificate grants, as named in its SPIFFE ID.
public enum Role: String, CaseIterable, Hashable, Sendable {
  /// Runs the gateway; administers every tenant.
  case `operator`
  /// A partner backend acting on its own tenant.
  case partner
  /// An edge agent sending usage events for its own tenant.
  case agent
  /// A compliance reader of its own tenant's audit log.
  case auditor
  /// A worker leasing its own tenant's workflow tasks.
  case worker

  /// Roles that belong to a tenant (everything but `operator`).
  public static let tenantRoles: [Role] = [.partner, .agent, .auditor, .worker]
}
