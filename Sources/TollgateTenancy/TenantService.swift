public import GRPCCore
import SwiftProtobuf
public import Logging
public import TollgateCore
import TollgateModel
public import TollgateProtos
public import TollgateStore
import TollgateServiceSupport

/// TenantService: tenant administration, quotas, suspension and certificate revocation.
///
/// Who may call what is decided before a method runs (``AuthorizationPolicy``); these methods
/// validate their request, resolve which tenant it acts on through the caller's ``CallScope``,
/// call one repository method, and map the result.
public struct TenantService: Sendable {
  let repository: TenantRepository
  let directory: IdentityDirectory
  let logger: Logger

  public init(repository: TenantRepository, directory: IdentityDirectory, logger: Logger) {
    self.repository = repository
    self.directory = directory
    self.logger = logger
  }

  func handling<T: Sendable>(_ method: String, _ body: () async throws -> T) async throws -> T {
    try await handlingStoreFailures(method, logger: logger, body)
  }

  /// After a committed change to who may call: reload this replica's directory before replying,
  /// so the caller's next call already sees it. Other replicas reload on the notification.
  func refreshDirectory() async {
    await directory.refreshLogging(logger)
  }
}

extension TenantService: Tollgate_V1_TenantService.SimpleServiceProtocol {
  public func createTenant(
    request: Tollgate_V1_CreateTenantRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_CreateTenantResponse {
    try await handling("CreateTenant") {
      let id: TenantID
      do throws(TenantID.Invalid) {
        id = try TenantID(validating: request.tenantID)
      } catch {
        throw TollgateError.invalidField("tenant_id", error.description)
      }
      let name = try RequestFields.text(request.displayName, field: "display_name", max: 200)
      let quota = try TenantMapping.quotaSettings(from: request.quota, field: "quota")
      let record = try await repository.create(
        id: id,
        displayName: name.isEmpty ? id.rawValue : name,
        quota: quota,
        logger: logger
      )
      await refreshDirectory()
      return .with { $0.tenant = TenantMapping.tenant(record) }
    }
  }

  public func getTenant(
    request: Tollgate_V1_GetTenantRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_GetTenantResponse {
    try await handling("GetTenant") {
      let tenant = try CallScope.required().resolveTenant(requested: request.tenantID)
      let record = try await repository.get(tenant, logger: logger)
      return .with { $0.tenant = TenantMapping.tenant(record) }
    }
  }

  public func listTenants(
    request: Tollgate_V1_ListTenantsRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_ListTenantsResponse {
    try await handling("ListTenants") {
      let size = try RequestFields.pageSize(request.pageSize)
      let after = try RequestFields.decodeToken(request.pageToken, kind: "tenants")
      let state: TenantState?
      switch request.state {
      case .unspecified: state = nil
      case .active: state = .active
      case .suspended: state = .suspended
      case .UNRECOGNIZED(let n): throw TollgateError.invalidField("state", "unknown value \(n)")
      }
      let page = try await repository.list(after: after, limit: size, state: state, logger: logger)
      return .with {
        $0.tenants = page.items.map(TenantMapping.tenant)
        $0.nextPageToken = page.nextKey.map { RequestFields.encodeToken(kind: "tenants", key: $0) } ?? ""
      }
    }
  }

  public func updateQuota(
    request: Tollgate_V1_UpdateQuotaRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_UpdateQuotaResponse {
    try await handling("UpdateQuota") {
      let tenant = try CallScope.required().resolveTenant(requested: request.tenantID)
      guard request.hasQuota else { throw TollgateError.invalidField("quota", "is required") }
      // The stored quota replaces the tenant's as a whole (unlisted classes get defaults), and a
      // bad request fails before touching the database.
      let quota = try TenantMapping.quotaSettings(from: request.quota, field: "quota")
      let record = try await repository.updateQuota(tenant, quota: quota, logger: logger)
      // In force on this replica when the call answers; the others hear of it by NOTIFY.
      await refreshDirectory()
      return .with { $0.tenant = TenantMapping.tenant(record) }
    }
  }

  public func suspendTenant(
    request: Tollgate_V1_SuspendTenantRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_SuspendTenantResponse {
    try await handling("SuspendTenant") {
      let tenant = try CallScope.required().resolveTenant(requested: request.tenantID)
      let reason = try RequestFields.text(request.reason, field: "reason", max: 500)
      let record = try await repository.setState(tenant, state: .suspended, reason: reason, logger: logger)
      await refreshDirectory()
      return .with { $0.tenant = TenantMapping.tenant(record) }
    }
  }

  public func resumeTenant(
    request: Tollgate_V1_ResumeTenantRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_ResumeTenantResponse {
    try await handling("ResumeTenant") {
      let tenant = try CallScope.required().resolveTenant(requested: request.tenantID)
      let record = try await repository.setState(tenant, state: .active, reason: "", logger: logger)
      await refreshDirectory()
      return .with { $0.tenant = TenantMapping.tenant(record) }
    }
  }

  public func revokeCertificate(
    request: Tollgate_V1_RevokeCertificateRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_RevokeCertificateResponse {
    try await handling("RevokeCertificate") {
      let scope = try CallScope.required()
      let target: RevocationTarget
      switch (request.serialHex.isEmpty, request.sha256Fingerprint.isEmpty) {
      case (false, true):
        guard let hex = HexText.normalize(request.serialHex), hex.count <= 40 else {
          throw TollgateError.invalidField("serial_hex", "must be a hex serial number of at most 20 bytes")
        }
        target = .serial(RevocationTarget.canonicalSerial(hex))
      case (true, false):
        guard let hex = HexText.normalize(request.sha256Fingerprint), hex.count == 64 else {
          throw TollgateError.invalidField("sha256_fingerprint", "must be 64 hex digits (SHA-256 of the certificate's DER)")
        }
        target = .fingerprint(hex)
      case (true, true):
        throw TollgateError.invalidArgument(
          "give serial_hex or sha256_fingerprint",
          [.init(field: "serial_hex", description: "one of serial_hex or sha256_fingerprint is required")]
        )
      case (false, false):
        throw TollgateError.invalidArgument(
          "give serial_hex or sha256_fingerprint, not both",
          [.init(field: "sha256_fingerprint", description: "must be empty when serial_hex is given")]
        )
      }
      let reason = try RequestFields.text(request.reason, field: "reason", max: 500, required: true)
      // A tenant principal's revocation applies to its own tenant only (it cannot lock out other
      // tenants' certificates); an operator's is global unless it names a tenant.
      let record = try await repository.revoke(
        target,
        tenant: scope.tenant,
        reason: reason,
        revokedBy: scope.principal.spiffeID.description,
        logger: logger
      )
      await refreshDirectory()
      return .with { $0.revocation = TenantMapping.revocation(record) }
    }
  }

  public func listRevocations(
    request: Tollgate_V1_ListRevocationsRequest,
    context: ServerContext
  ) async throws -> Tollgate_V1_ListRevocationsResponse {
    try await handling("ListRevocations") {
      let scope = try CallScope.required()
      let size = try RequestFields.pageSize(request.pageSize)
      let before: Int64?
      if let key = try RequestFields.decodeToken(request.pageToken, kind: "revocations") {
        guard let id = Int64(key) else {
          throw TollgateError.invalidField("page_token", "is not a token this list returned; pass next_page_token unchanged")
        }
        before = id
      } else {
        before = nil
      }
      let page = try await repository.listRevocations(tenant: scope.tenant, before: before, limit: size, logger: logger)
      return .with {
        $0.revocations = page.items.map(TenantMapping.revocation)
        $0.nextPageToken = page.nextKey.map { RequestFields.encodeToken(kind: "revocations", key: $0) } ?? ""
      }
    }
  }
}
