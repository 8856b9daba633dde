public import Foundation

/// Task type names, shared by dispatch, worker announcements and per-type limits.
public enum WorkflowTaskType {
  public static let rule = "1 to 64 characters of letters, digits, '-', '_', '.' and ':'"

  public static func isValid(_ type: String) -> Bool {
    guard (1...64).contains(type.utf8.count) else { return false }
    return type.utf8.allSatisfy { b in
      (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
        || b == 0x2d || b == 0x5f || b == 0x2e || b == 0x3a
    }
  }
}

/// Lifecycle of a run. Stored as the raw value.
public enum RunState: String, Sendable, CaseIterable {
  case pendingApproval = "pending_approval"
  case queued
  case running
  case succeeded
  case failed
  case dead
  case cancelled
  case rejected

  /// No transition leaves a final state.
  public var isFinal: Bool {
    switch self {
    case .succeeded, .dead, .cancelled, .rejected: return true
    case .pendingApproval, .queued, .running, .failed: return false
    }
  }
}

/// A run as stored.
public struct RunRecord: Sendable, Equatable {
  public var id: UUID
  public var type: String
  public var payload: [UInt8]
  public var idempotencyKey: String
  public var priority: Int
  public var runAfter: Date
  public var maxAttempts: Int
  public var attempt: Int
  public var state: RunState
  public var requiredApprover: String
  public var approvalReason: String
  public var result: [UInt8]
  public var lastError: String
  public var createTime: Date
  public var updateTime: Date

  public init(
    id: UUID, type: String, payload: [UInt8], idempotencyKey: String, priority: Int, runAfter: Date,
    maxAttempts: Int, attempt: Int, state: RunState, requiredApprover: String, approvalReason: String,
    result: [UInt8], lastError: String, createTime: Date, updateTime: Date
  ) {
    self.id = id
    self.type = type
    self.payload = payload
    self.idempotencyKey = idempotencyKey
    self.priority = priority
    self.runAfter = runAfter
    self.maxAttempts = maxAttempts
    self.attempt = attempt
    self.state = state
    self.requiredApprover = requiredApprover
    self.approvalReason = approvalReason
    self.result = result
    self.lastError = lastError
    self.createTime = createTime
    self.updateTime = updateTime
  }
}

/// What Dispatch asks for, validated.
public struct NewRun: Sendable {
  public var type: String
  public var payload: [UInt8]
  public var idempotencyKey: String
  public var priority: Int
  public var runAfter: Date?
  public var maxAttempts: Int
  public var requiredApprover: String
  public var approvalReason: String

  public init(
    type: String, payload: [UInt8], idempotencyKey: String, priority: Int, runAfter: Date?, maxAttempts: Int,
    requiredApprover: String, approvalReason: String
  ) {
    self.type = type
    self.payload = payload
    self.idempotencyKey = idempotencyKey
    self.priority = priority
    self.runAfter = runAfter
    self.maxAttempts = maxAttempts
    self.requiredApprover = requiredApprover
    self.approvalReason = approvalReason
  }
}

/// One recorded state change of a run (its history, which WatchRun streams).
public struct RunTransition: Sendable {
  public var sequence: Int64
  public var previous: RunState?
  public var time: Date
  public var run: RunRecord

  public init(sequence: Int64, previous: RunState?, time: Date, run: RunRecord) {
    self.sequence = sequence
    self.previous = previous
    self.time = time
    self.run = run
  }
}

/// A run leased to a worker.
public struct Lease: Sendable {
  public var leaseID: UUID
  public var run: RunRecord

  public init(leaseID: UUID, run: RunRecord) {
    self.leaseID = leaseID
    self.run = run
  }
}
