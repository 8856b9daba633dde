import GRPCCore
import Testing
import TollgateCore
import TollgateModel
import TollgateProtos

@Suite struct AuthorizationPolicyTests {
  /// Fails when a method is added to any service without a decision in the table.
  @Test func everyMethodOfEveryServiceHasARule() {
    let missing = AuthorizationPolicy.allMethods.filter { AuthorizationPolicy.standard.rule(for: $0) == nil }
    #expect(missing.isEmpty, "methods without an authorization rule: \(missing.map(\.fullyQualifiedMethod))")
  }

  @Test func noRuleIsOpenToNobody() {
    for (method, rule) in AuthorizationPolicy.standard.rules {
      #expect(!rule.roles.isEmpty, "\(method.fullyQualifiedMethod) allows no role")
    }
  }

  @Test func allMethodsCoversEveryService() {
    let services = Set(AuthorizationPolicy.allMethods.map(\.service.fullyQualifiedService))
    #expect(
      services == [
        "tollgate.v1.TenantService", "tollgate.v1.MeteringService", "tollgate.v1.AuditService",
        "tollgate.v1.WorkflowService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
      ]
    )
  }

  @Test func agentsAndWorkersCannotCallTenantService() {
    for method in Tollgate_V1_TenantService.Method.descriptors {
      let roles = AuthorizationPolicy.standard.rule(for: method)!.roles
      #expect(!roles.contains(.agent) && !roles.contains(.worker), "\(method.fullyQualifiedMethod)")
    }
  }

  @Test(arguments: [
    (Tollgate_V1_TenantService.Method.CreateTenant.descriptor, Set<Role>([.operator])),
    (Tollgate_V1_TenantService.Method.ListTenants.descriptor, Set<Role>([.operator])),
    (Tollgate_V1_TenantService.Method.SuspendTenant.descriptor, Set<Role>([.operator])),
    (Tollgate_V1_TenantService.Method.GetTenant.descriptor, Set<Role>([.operator, .partner, .auditor])),
    (Tollgate_V1_MeteringService.Method.IngestStream.descriptor, Set<Role>([.agent, .partner])),
    (Tollgate_V1_AuditService.Method.StreamEvents.descriptor, Set<Role>([.operator, .auditor])),
    (Tollgate_V1_WorkflowService.Method.Connect.descriptor, Set<Role>([.worker])),
  ])
  func roleMatrix(_ method: MethodDescriptor, _ roles: Set<Role>) {
    #expect(AuthorizationPolicy.standard.rule(for: method)?.roles == roles)
  }

  @Test func unknownMethodIsDenied() {
    let unknown = MethodDescriptor(fullyQualifiedService: "tollgate.v1.TenantService", method: "DropEverything")
    #expect(AuthorizationPolicy.standard.rule(for: unknown) == nil)
  }
}
