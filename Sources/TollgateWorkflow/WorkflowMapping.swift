import Foundation
import SwiftProtobuf
import TollgateCore
import TollgateModel
import TollgateProtos
import TollgateServiceSupport

/// Requests to domain values (validated, every violation reported at once) and back.
enum WorkflowMapping {
  static let maxPayloadBytes = 1 << 20
  static let maxResultBytes = 1 << 20
  static let maxErrorCharacters = 4_096
  static let maxTaskTypesPerWorker = 64
  static let maxCapacity = 256

  static func newRun(_ request: Tollgate_V1_DispatchRequest) throws(TollgateError) -> NewRun {
    var violations: [TollgateError.FieldViolation] = []
    if !WorkflowTaskType.isValid(request.type) {
      violations.append(.init(field: "type", description: "must be \(WorkflowTaskType.rule), got '\(request.type.prefix(80))'"))
    }
    if request.payload.count > maxPayloadBytes {
      violations.append(.init(field: "payload", description: "is \(request.payload.count) bytes; at most \(maxPayloadBytes) allowed"))
    }
    var key = ""
    do { key = try RequestFields.text(request.idempotencyKey, field: "idempotency_key", max: 200) } catch {
      violations += Self.violations(error)
    }
    if key != request.idempotencyKey {
      violations.append(.init(field: "idempotency_key", description: "must not start or end with whitespace"))
    }
    if !(-100...100).contains(request.priority) {
      violations.append(.init(field: "priority", description: "must be between -100 and 100, got \(request.priority)"))
    }
    if request.maxAttempts > 100 {
      violations.append(.init(field: "max_attempts", description: "must be between 1 and 100 (0 for 3), got \(request.maxAttempts)"))
    }
    var runAfter: Date?
    if request.hasRunAfter {
      runAfter = RequestFields.date(seconds: request.runAfter.seconds, nanos: request.runAfter.nanos)
      if runAfter == nil { violations.append(.init(field: "run_after", description: RequestFields.timestampRange)) }
    }
    var approver = ""
    var reason = ""
    if request.hasApproval {
      do {
        approver = try RequestFields.text(request.approval.requiredApprover, field: "approval.required_approver", max: 128, required: true)
      } catch { violations += Self.violations(error) }
      do { reason = try RequestFields.text(request.approval.reason, field: "approval.reason", max: 1_024) } catch {
        violations += Self.violations(error)
      }
    }
    if !violations.isEmpty { throw .invalidFields("dispatch request", violations) }
    return NewRun(
      type: request.type,
      payload: Array(request.payload),
      idempotencyKey: key,
      priority: Int(request.priority),
      runAfter: runAfter,
      maxAttempts: request.maxAttempts == 0 ? 3 : Int(request.maxAttempts),
      requiredApprover: approver,
      approvalReason: reason
    )
  }

  static func violations(_ error: TollgateError) -> [TollgateError.FieldViolation] {
    if case .invalidArgument(_, let violations) = error { return violations }
    return []
  }

  static func runID(_ text: String, field: String = "run_id") throws(TollgateError) -> UUID {
    guard let id = UUID(uuidString: text) else {
      throw .invalidField(field, "must be a run id as returned by Dispatch (a UUID), got '\(text.prefix(80))'")
    }
    return id
  }

  static func leaseID(_ text: String, field: String) throws(TollgateError) -> UUID {
    guard let id = UUID(uuidString: text) else {
      throw .invalidField(field, "must be a lease id from a TaskAssignment, got '\(text.prefix(80))'")
    }
    return id
  }

  static func state(_ state: RunState) -> Tollgate_V1_RunState {
    switch state {
    case .pendingApproval: return .pendingApproval
    case .queued: return .queued
    case .running: return .running
    case .succeeded: return .succeeded
    case .failed: return .failed
    case .dead: return .dead
    case .cancelled: return .cancelled
    case .rejected: return .rejected
    }
  }

  static func state(_ state: Tollgate_V1_RunState) -> RunState? {
    switch state {
    case .pendingApproval: return .pendingApproval
    case .queued: return .queued
    case .running: return .running
    case .succeeded: return .succeeded
    case .failed: return .failed
    case .dead: return .dead
    case .cancelled: return .cancelled
    case .rejected: return .rejected
    case .unspecified, .UNRECOGNIZED: return nil
    }
  }

  static func run(_ record: RunRecord) -> Tollgate_V1_Run {
    .with {
      $0.runID = record.id.uuidString.lowercased()
      $0.type = record.type
      $0.payload = Data(record.payload)
      $0.idempotencyKey = record.idempotencyKey
      $0.priority = Int32(record.priority)
      $0.runAfter = Google_Protobuf_Timestamp(date: record.runAfter)
      $0.maxAttempts = UInt32(record.maxAttempts)
      $0.attempt = UInt32(record.attempt)
      $0.state = state(record.state)
      if !record.requiredApprover.isEmpty {
        $0.approval = .with {
          $0.requiredApprover = record.requiredApprover
          $0.reason = record.approvalReason
        }
      }
      $0.result = Data(record.result)
      $0.lastError = record.lastError
      $0.createTime = Google_Protobuf_Timestamp(date: record.createTime)
      $0.updateTime = Google_Protobuf_Timestamp(date: record.updateTime)
    }
  }

  static func event(_ transition: RunTransition) -> Tollgate_V1_RunEvent {
    .with {
      $0.run = run(transition.run)
      $0.previousState = transition.previous.map(state) ?? .unspecified
      $0.time = Google_Protobuf_Timestamp(date: transition.time)
    }
  }

  /// Lease ids a worker names, parsed, with a violation for each bad one (`field[i]`). A worker
  /// holds at most `maxCapacity` leases, so more than that is one violation of `field`, and none
  /// is parsed: more would only make answers for leases it never had.
  static func leaseIDs(_ texts: [String], field: String) -> (ids: [UUID], violations: [TollgateError.FieldViolation]) {
    guard texts.count <= maxCapacity else {
      return ([], [.init(field: field, description: "at most \(maxCapacity) leases, got \(texts.count)")])
    }
    var ids: [UUID] = []
    var violations: [TollgateError.FieldViolation] = []
    for (i, text) in texts.enumerated() {
      do { ids.append(try leaseID(text, field: "\(field)[\(i)]")) } catch {
        violations += Self.violations(error)
      }
    }
    return (ids, violations)
  }

  /// The worker's announcement, validated.
  static func hello(
    _ hello: Tollgate_V1_WorkerHello
  ) throws(TollgateError) -> (types: [String], capacity: Int, name: String, held: [UUID], draining: Bool) {
    var violations: [TollgateError.FieldViolation] = []
    if hello.taskTypes.isEmpty || hello.taskTypes.count > maxTaskTypesPerWorker {
      violations.append(
        .init(field: "hello.task_types", description: "name 1 to \(maxTaskTypesPerWorker) task types, got \(hello.taskTypes.count)")
      )
    }
    for (i, type) in hello.taskTypes.enumerated() where !WorkflowTaskType.isValid(type) {
      violations.append(.init(field: "hello.task_types[\(i)]", description: "must be \(WorkflowTaskType.rule)"))
    }
    if hello.capacity < 1 || hello.capacity > maxCapacity {
      violations.append(.init(field: "hello.capacity", description: "must be between 1 and \(maxCapacity), got \(hello.capacity)"))
    }
    var name = ""
    do { name = try RequestFields.text(hello.workerName, field: "hello.worker_name", max: 128) } catch {
      violations += Self.violations(error)
    }
    let (held, badLeases) = leaseIDs(hello.heldLeaseIds, field: "hello.held_lease_ids")
    violations += badLeases
    if !violations.isEmpty { throw .invalidFields("worker hello", violations) }
    return (Array(Set(hello.taskTypes)).sorted(), Int(hello.capacity), name, Array(Set(held)), hello.draining)
  }
}
