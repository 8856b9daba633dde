/// What identity and quota checks need from the store, loaded whole: every tenant's state and
/// quota, and every revocation. These sets are small next to the call rate (tenants and revoked certificates,
/// not events), so each replica keeps one copy in memory and reloads it when told of a change.
public struct IdentitySnapshot: Sendable {
  /// State of every registered tenant.
  public var tenantStates: [TenantID: TenantState]
  /// Quota of every registered tenant.
  public var quotas: [TenantID: QuotaSettings]
  /// For each revoked serial or fingerprint, the tenants it applies to (nil = every tenant).
  public var revocations: [RevocationTarget: [TenantID?]]

  public init(
    tenantStates: [TenantID: TenantState] = [:],
    quotas: [TenantID: QuotaSettings] = [:],
    revocations: [RevocationTarget: [TenantID?]] = [:]
  ) {
    self.tenantStates = tenantStates
    self.quotas = quotas
    self.revocations = revocations
  }

  /// The revocation entry that applies to a certificate held by a principal of `tenant`
  /// (nil for operators), if any.
  public func revocation(serialHex: String, sha256: String, tenant: TenantID?) -> RevocationTarget? {
    for target in [RevocationTarget.serial(RevocationTarget.canonicalSerial(serialHex)), .fingerprint(sha256)] {
      guard let scopes = revocations[target] else { continue }
      if scopes.contains(where: { $0 == nil || $0 == tenant }) { return target }
    }
    return nil
  }
}
