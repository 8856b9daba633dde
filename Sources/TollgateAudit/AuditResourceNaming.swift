public import TollgateProtos

/// A request that names the resource it acts on, for the audit record's `resource`.
public protocol AuditResourceNaming {
  var auditResource: String { get }
  /// The tenant the request acts on, if it names one (empty if not). An operator's call that
  /// names no tenant in `tollgate-tenant` is recorded in this tenant's log, not the platform log,
  /// so that the tenant's auditors see what was done to it.
  var auditTenant: String { get }
}

extension AuditResourceNaming {
  public var auditTenant: String { "" }
}

extension Tollgate_V1_CreateTenantRequest: AuditResourceNaming {
  public var auditResource: String { "tenants/\(tenantID)" }
  public var auditTenant: String { tenantID }
}
extension Tollgate_V1_GetTenantRequest: AuditResourceNaming {
  public var auditResource: String { tenantID.isEmpty ? "" : "tenants/\(tenantID)" }
  public var auditTenant: String { tenantID }
}
extension Tollgate_V1_UpdateQuotaRequest: AuditResourceNaming {
  public var auditResource: String { tenantID.isEmpty ? "" : "tenants/\(tenantID)" }
  public var auditTenant: String { tenantID }
}
extension Tollgate_V1_SuspendTenantRequest: AuditResourceNaming {
  public var auditResource: String { "tenants/\(tenantID)" }
  public var auditTenant: String { tenantID }
}
extension Tollgate_V1_ResumeTenantRequest: AuditResourceNaming {
  public var auditResource: String { "tenants/\(tenantID)" }
  public var auditTenant: String { tenantID }
}
extension Tollgate_V1_RevokeCertificateRequest: AuditResourceNaming {
  public var auditResource: String {
    !serialHex.isEmpty ? "certificates/serial/\(serialHex)" : "certificates/sha256/\(sha256Fingerprint)"
  }
}
extension Tollgate_V1_GetInclusionProofRequest: AuditResourceNaming {
  public var auditResource: String { "audit/leaves/\(index)" }
}
extension Tollgate_V1_DefineMeterRequest: AuditResourceNaming {
  public var auditResource: String { "meters/\(meter.name)" }
}
extension Tollgate_V1_QueryUsageRequest: AuditResourceNaming {
  public var auditResource: String { "meters/\(meter)" }
}
extension Tollgate_V1_IngestRequest: AuditResourceNaming {
  /// The batch, by its sequence number; the events are many and named in the batch itself.
  public var auditResource: String { "usage/batches/\(sequence)" }
}
extension Tollgate_V1_DispatchRequest: AuditResourceNaming {
  /// The run id is not known before the call; the type and idempotency key identify the request.
  public var auditResource: String {
    idempotencyKey.isEmpty ? "runs/types/\(type)" : "runs/types/\(type)/keys/\(idempotencyKey)"
  }
}
extension Tollgate_V1_GetRunRequest: AuditResourceNaming {
  public var auditResource: String { "runs/\(runID)" }
}
extension Tollgate_V1_CancelRunRequest: AuditResourceNaming {
  public var auditResource: String { "runs/\(runID)" }
}
extension Tollgate_V1_ApproveRequest: AuditResourceNaming {
  public var auditResource: String { "runs/\(runID)" }
}
extension Tollgate_V1_RejectRequest: AuditResourceNaming {
  public var auditResource: String { "runs/\(runID)" }
}
extension Tollgate_V1_WatchRunRequest: AuditResourceNaming {
  public var auditResource: String { "runs/\(runID)" }
}
extension Tollgate_V1_WorkerMessage: AuditResourceNaming {
  /// A worker stream, by the task types it announced.
  public var auditResource: String {
    guard case .hello(let hello) = kind else { return "" }
    return "workers/\(hello.workerName)"
  }
}
