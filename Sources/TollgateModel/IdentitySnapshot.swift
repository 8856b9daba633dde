/// What identity checks need from the store, loaded whole: every tenant's state and every
/// revocation. Both sets are small next to the call rate (tenants and revoked certificates,
/// not events), so each replica keeps one copy in memory and reloads it when told of a change.
public struct IdentitySnapshot: Sendable {
  /// State of every registered tenant.
  public var tenantStates: [TenantID: TenantState]
  /// For each revoked serial or fingerprint, the tenants it applies to (nil = every tenant).
  public var revocations: [RevocationTarget: [TenantID?]]

  public init(tenantStates: [TenantID: TenantState] = [:], revocations: [RevocationTarget: [TenantID?]] = [:]) {
    self.tenantStates = tenantStates
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
