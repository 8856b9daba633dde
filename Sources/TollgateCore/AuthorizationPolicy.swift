public import GRPCCore
public import TollgateModel
import TollgateProtos

/// What one method allows: which roles may call it, the quota class it counts against, and
/// whether it mutates state (mutations are audited synchronously).
public struct MethodRule: Sendable, Hashable {
  public var roles: Set<Role>
  public var quotaClass: QuotaClass
  public var mutating: Bool

  public init(roles: Set<Role>, quotaClass: QuotaClass, mutating: Bool) {
    self.roles = roles
    self.quotaClass = quotaClass
    self.mutating = mutating
  }
}

/// The one method → rule table. A method without a rule is denied to everyone; a test fails
/// when any method of any service is missing here.
public struct AuthorizationPolicy: Sendable {
  public let rules: [MethodDescriptor: MethodRule]

  public init(rules: [MethodDescriptor: MethodRule]) {
    self.rules = rules
  }

  public func rule(for method: MethodDescriptor) -> MethodRule? {
    rules[method]
  }

  /// Every service the gateway's API defines, for completeness checks.
  public static let allMethods: [MethodDescriptor] =
    Tollgate_V1_TenantService.Method.descriptors
    + Tollgate_V1_MeteringService.Method.descriptors
    + Tollgate_V1_AuditService.Method.descriptors
    + Tollgate_V1_WorkflowService.Method.descriptors
    + Grpc_Health_V1_Health.Method.descriptors
    + Grpc_Reflection_V1_ServerReflection.Method.descriptors
    + Grpc_Reflection_V1alpha_ServerReflection.Method.descriptors

  /// The gateway's policy.
  public static let standard: AuthorizationPolicy = {
    typealias T = Tollgate_V1_TenantService.Method
    typealias M = Tollgate_V1_MeteringService.Method
    typealias A = Tollgate_V1_AuditService.Method
    typealias W = Tollgate_V1_WorkflowService.Method
    let everyone = Set(Role.allCases)
    let op: Set<Role> = [.operator]
    let opPartner: Set<Role> = [.operator, .partner]
    let opAuditor: Set<Role> = [.operator, .auditor]

    var rules: [MethodDescriptor: MethodRule] = [
      // Tenant administration. Agents and workers have no business here; auditors may read their
      // tenant and its revocations, which they need to interpret audit records.
      T.CreateTenant.descriptor: MethodRule(roles: op, quotaClass: .admin, mutating: true),
      T.GetTenant.descriptor: MethodRule(roles: [.operator, .partner, .auditor], quotaClass: .query, mutating: false),
      T.ListTenants.descriptor: MethodRule(roles: op, quotaClass: .admin, mutating: false),
      T.UpdateQuota.descriptor: MethodRule(roles: op, quotaClass: .admin, mutating: true),
      T.SuspendTenant.descriptor: MethodRule(roles: op, quotaClass: .admin, mutating: true),
      T.ResumeTenant.descriptor: MethodRule(roles: op, quotaClass: .admin, mutating: true),
      T.RevokeCertificate.descriptor: MethodRule(roles: opPartner, quotaClass: .admin, mutating: true),
      T.ListRevocations.descriptor: MethodRule(roles: [.operator, .partner, .auditor], quotaClass: .admin, mutating: false),

      // Metering.
      M.Ingest.descriptor: MethodRule(roles: [.agent, .partner], quotaClass: .ingest, mutating: true),
      M.IngestStream.descriptor: MethodRule(roles: [.agent, .partner], quotaClass: .ingest, mutating: true),
      M.DefineMeter.descriptor: MethodRule(roles: opPartner, quotaClass: .admin, mutating: true),
      M.ListMeters.descriptor: MethodRule(roles: [.operator, .partner, .agent], quotaClass: .query, mutating: false),
      M.QueryUsage.descriptor: MethodRule(roles: opPartner, quotaClass: .query, mutating: false),

      // Audit.
      A.StreamEvents.descriptor: MethodRule(roles: opAuditor, quotaClass: .audit, mutating: false),
      A.GetCheckpoint.descriptor: MethodRule(roles: opAuditor, quotaClass: .audit, mutating: false),
      A.GetInclusionProof.descriptor: MethodRule(roles: opAuditor, quotaClass: .audit, mutating: false),
      A.GetConsistencyProof.descriptor: MethodRule(roles: opAuditor, quotaClass: .audit, mutating: false),

      // Workflow.
      W.Dispatch.descriptor: MethodRule(roles: opPartner, quotaClass: .workflow, mutating: true),
      W.GetRun.descriptor: MethodRule(roles: opPartner, quotaClass: .query, mutating: false),
      W.ListRuns.descriptor: MethodRule(roles: opPartner, quotaClass: .query, mutating: false),
      W.CancelRun.descriptor: MethodRule(roles: opPartner, quotaClass: .workflow, mutating: true),
      W.Approve.descriptor: MethodRule(roles: [.partner], quotaClass: .workflow, mutating: true),
      W.Reject.descriptor: MethodRule(roles: [.partner], quotaClass: .workflow, mutating: true),
      W.WatchRun.descriptor: MethodRule(roles: opPartner, quotaClass: .query, mutating: false),
      W.Connect.descriptor: MethodRule(roles: [.worker], quotaClass: .workflow, mutating: true),
    ]
    // Health and reflection: any authenticated principal, so probes and generic tools work with
    // whatever certificate they hold.
    for method in Grpc_Health_V1_Health.Method.descriptors
      + Grpc_Reflection_V1_ServerReflection.Method.descriptors
      + Grpc_Reflection_V1alpha_ServerReflection.Method.descriptors
    {
      rules[method] = MethodRule(roles: everyone, quotaClass: .query, mutating: false)
    }
    return AuthorizationPolicy(rules: rules)
  }()
}
