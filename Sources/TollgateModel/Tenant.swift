public import struct Foundation.Date

/// Whether a tenant's principals are served.
public enum TenantState: String, Sendable, Hashable {
  case active
  case suspended
}

/// A tenant as stored.
public struct TenantRecord: Sendable, Hashable {
  public var id: TenantID
  public var displayName: String
  public var state: TenantState
  public var suspendReason: String
  public var quota: QuotaSettings
  public var createTime: Date
  public var updateTime: Date

  public init(
    id: TenantID,
    displayName: String,
    state: TenantState,
    suspendReason: String,
    quota: QuotaSettings,
    createTime: Date,
    updateTime: Date
  ) {
    self.id = id
    self.displayName = displayName
    self.state = state
    self.suspendReason = suspendReason
    self.quota = quota
    self.createTime = createTime
    self.updateTime = updateTime
  }
}
