import Foundation
public import GRPCCore
public import Logging
import ServiceLifecycle
import Synchronization
import SwiftProtobuf
import TollgateCore
public import TollgateModel
public import TollgateProtos
public import TollgateStore
import TollgateServiceSupport
import TollgateAudit

/// WorkflowService: partners dispatch and steer runs; workers hold one Connect stream each and
/// are pushed leased tasks up to the capacity they announced.
///
/// Nothing here polls: a worker with free capacity claims when a notification says its tenant's
/// runs changed, when its own capacity frees up, or when a scheduled or backing-off run it could
/// take falls due. Leases belong to the run's attempt, not to the stream, so a worker that
/// reconnects may still heartbeat and complete what it holds; a lease nobody heartbeats expires
/// (``LeaseReaper``) and the run is offered again.
public struct WorkflowService: Sendable {
  let repository: WorkflowRepository
  let hub: WorkflowHub
  let leaseTimeout: Duration
  let retryBase: Duration
  let logger: Logger
  let telemetry: Telemetry

  public init(
    repository: WorkflowRepository,
    hub: WorkflowHub,
    leaseTimeout: Duration,
    retryBase: Duration,
    logger: Logger,
    telemetry: Telemetry = .disabled
  ) {
    self.repository = repository
    self.hub = hub
    self.leaseTimeout = leaseTimeout
    self.retryBase = retryBase
    self.logger = logger
    self.telemetry = telemetry
  }

  func handling<T: Sendable>(_ method: String, _ body: () async throws -> T) async throws -> T {
    try await handlingStoreFailures(method, logger: logger, body)
  }
}

extension WorkflowService: Tollgate_V1_WorkflowService.SimpleServiceProtocol {
  public func dispatch(request: Tollgate_V1_DispatchRequest, context: ServerContext) async throws -> Tollgate_V1_DispatchResponse {
    try await handling("Dispatch") {
      let tenant = try actingTenant()
      let (run, created) = try await repository.dispatch(tenant, try WorkflowMapping.newRun(request), logger: logger)
      return .with {
        $0.run = WorkflowMapping.run(run)
        $0.created = created
      }
    }
  }

  public func getRun(request: Tollgate_V1_GetRunRequest, context: ServerContext) async throws -> Tollgate_V1_GetRunResponse {
    try await handling("GetRun") {
      let tenant = try actingTenant()
      let run = try await repository.run(tenant, id: try WorkflowMapping.runID(request.runID), logger: logger)
      return .with { $0.run = WorkflowMapping.run(run) }
    }
  }

  public func listRuns(request: Tollgate_V1_ListRunsRequest, context: ServerContext) async throws -> Tollgate_V1_ListRunsResponse {
    try await handling("ListRuns") {
      let tenant = try actingTenant()
      var states: [RunState] = []
      for (i, wire) in request.states.enumerated() {
        guard let state = WorkflowMapping.state(wire) else {
          throw TollgateError.invalidField("states[\(i)]", "is not a run state")
        }
        states.append(state)
      }
      if !request.type.isEmpty && !WorkflowTaskType.isValid(request.type) {
        throw TollgateError.invalidField("type", "must be \(WorkflowTaskType.rule)")
      }
      let size = try RequestFields.pageSize(request.pageSize)
      let before = try RequestFields.decodeToken(request.pageToken, kind: "runs").map { text throws(TollgateError) in
        guard let seq = Int64(text) else {
          throw TollgateError.invalidField("page_token", "is not a token this list returned; pass next_page_token unchanged")
        }
        return seq
      }
      let page = try await repository.list(tenant, states: states, type: request.type, before: before, limit: size, logger: logger)
      return .with {
        $0.runs = page.items.map(WorkflowMapping.run)
        $0.nextPageToken = page.nextKey.map { RequestFields.encodeToken(kind: "runs", key: $0) } ?? ""
      }
    }
  }

  public func cancelRun(request: Tollgate_V1_CancelRunRequest, context: ServerContext) async throws -> Tollgate_V1_CancelRunResponse {
    try await handling("CancelRun") {
      let tenant = try actingTenant()
      let id = try WorkflowMapping.runID(request.runID)
      let reason = try RequestFields.text(request.reason, field: "reason", max: 1_024)
      let run = try await repository.cancel(tenant, id: id, reason: reason, logger: logger)
      return .with { $0.run = WorkflowMapping.run(run) }
    }
  }

  public func approve(request: Tollgate_V1_ApproveRequest, context: ServerContext) async throws -> Tollgate_V1_ApproveResponse {
    try await handling("Approve") {
      let run = try await decide(approve: true, runID: request.runID, approver: request.approverID, comment: request.comment)
      return .with { $0.run = WorkflowMapping.run(run) }
    }
  }

  public func reject(request: Tollgate_V1_RejectRequest, context: ServerContext) async throws -> Tollgate_V1_RejectResponse {
    try await handling("Reject") {
      let run = try await decide(approve: false, runID: request.runID, approver: request.approverID, comment: request.comment)
      return .with { $0.run = WorkflowMapping.run(run) }
    }
  }

  func decide(approve: Bool, runID: String, approver: String, comment: String) async throws -> RunRecord {
    let tenant = try actingTenant()
    let id = try WorkflowMapping.runID(runID)
    let approver = try RequestFields.text(approver, field: "approver_id", max: 256, required: true)
    let comment = try RequestFields.text(comment, field: "comment", max: 2_048)
    return try await repository.decide(tenant, id: id, approve: approve, approver: approver, comment: comment, logger: logger)
  }

  public func watchRun(
    request: Tollgate_V1_WatchRunRequest,
    response: RPCWriter<Tollgate_V1_RunEvent>,
    context: ServerContext
  ) async throws {
    try await handling("WatchRun") {
      let tenant = try actingTenant()
      let id = try WorkflowMapping.runID(request.runID)
      // Subscribed before the first read, so a change between a read and the wait still wakes us.
      let subscription = hub.subscribe(tenant, as: .watcher)
      defer { subscription.cancel() }
      let watch = try await repository.watch(tenant, id: id, logger: logger)
      defer {
        Task { [repository, logger] in try? await repository.unwatch(tenant, id: id, watch: watch, logger: logger) }
      }
      var wakes = subscription.wakes.makeAsyncIterator()
      var after: Int64 = 0
      while true {
        let transitions = try await repository.history(tenant, id: id, after: after, logger: logger)
        for transition in transitions {
          try await response.write(WorkflowMapping.event(transition))
          after = transition.sequence
          if transition.run.state.isFinal { return }
        }
        // Ends when the client cancels (the iterator returns nil on cancellation).
        guard
          try await nextWakeUp(
            &wakes,
            stop: { subscription.cancel() },
            drainMessage: "the gateway is shutting down; call WatchRun again to keep watching"
          )
        else { return }
      }
    }
  }

  public func connect(
    request: RPCAsyncSequence<Tollgate_V1_WorkerMessage, any Error>,
    response: RPCWriter<Tollgate_V1_ServerMessage>,
    context: ServerContext
  ) async throws {
    try await handling("Connect") {
      let tenant = try actingTenant()
      let session = WorkerSession(scope: try CallScope.required())
      let connected = [("tenant", telemetry.tenantLabel(tenant))]
      telemetry.adjust("tollgate_workflow_workers_connected", connected, by: 1)
      defer { telemetry.adjust("tollgate_workflow_workers_connected", connected, by: -1) }
      let subscription = hub.subscribe(
        tenant,
        as: .worker(
          wantsWork: { session.wants($0) },
          heldBackByLimit: { session.heldBackByLimit },
          claiming: { session.isClaiming }
        )
      )
      defer {
        subscription.cancel()
        // A wake-up this stream took but can no longer act on goes to the next worker.
        hub.wakeNextWorker(tenant, type: nil)
      }
      let (outbound, answers) = AsyncStream.makeStream(of: Tollgate_V1_ServerMessage.self)
      // The worker's messages, in order, until the worker closes its side.
      let inbox = WorkerInbox()
      let out = WorkerOutbox(continuation: answers, inbox: inbox)
      let (hello, helloSent) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
      do {
        try await withThrowingTaskGroup(of: Part.self) { group in
          group.addTask {
            do {
              // A worker that does not read its answers is read no further (its stream's flow
              // control then holds it back), so neither side's queue grows without bound.
              for try await message in request {
                try await inbox.waitForRoom()
                inbox.put(message)
              }
              inbox.close(nil)
            } catch {
              inbox.close(error)
            }
            return .other
          }
          // The worker's messages in order, a batch at a time: completions that arrived together
          // are committed together, each answered with its own ack.
          group.addTask {
            var first = true
            while let batch = try await inbox.take() {
              var i = 0
              while i < batch.count {
                if !first, case .completed = batch[i].kind {
                  var completions: [Tollgate_V1_TaskCompleted] = []
                  while i < batch.count, case .completed(let completed) = batch[i].kind {
                    completions.append(completed)
                    i += 1
                  }
                  try await complete(completions, tenant: tenant, session: session, out: out, subscription: subscription)
                  continue
                }
                try await handle(batch[i], first: first, tenant: tenant, session: session, out: out, subscription: subscription)
                if first { helloSent.yield() }
                first = false
                i += 1
              }
            }
            return .reader
          }
          // One writer: the claimer, the reader and revocations all send through `out`.
          group.addTask {
            for await message in outbound {
              try await response.write(message)
              inbox.answerWritten()
              if case .task(let task) = message.kind, let lease = UUID(uuidString: task.leaseID) { session.markSent(lease) }
            }
            return .writer
          }
          group.addTask {
            var started = hello.makeAsyncIterator()
            if await started.next() != nil {
              try await claimLoop(tenant: tenant, session: session, out: out, subscription: subscription)
            }
            return .other
          }
          group.addTask {
            for await revocation in subscription.revocations where session.release(revocation.lease) {
              out.yield(revoked(revocation.lease, revocation.reason))
              subscription.wake()
            }
            return .other
          }
          group.addTask {
            let (shutdown, trigger) = AsyncStream.makeStream(of: Void.self)
            await withGracefulShutdownHandler {
              for await _ in shutdown { return }
            } onGracefulShutdown: {
              trigger.yield()
            }
            if Task.isShuttingDownGracefully {
              throw TollgateError.unavailable(
                "the gateway is shutting down; reconnect. Leases stay valid until they expire: heartbeat or complete them on the new stream"
              )
            }
            return .other
          }
          // The worker closing its side ends the call once the answers already queued are written;
          // a failure or the drain ends it at once (the error leaves this closure).
          while let part = try await group.next() {
            switch part {
            case .reader:
              session.close()
              helloSent.finish()
              out.finish()
            case .writer:
              group.cancelAll()
              return
            case .other:
              continue
            }
          }
        }
      } catch {
        await giveBackUnsent(session, tenant: tenant)
        throw error
      }
      await giveBackUnsent(session, tenant: tenant)
    }
  }

  /// Renews `leases` and returns those still live. Each one that ended while the worker was not
  /// told (expired during a reconnect, say) is revoked on the stream now.
  func renew(_ leases: [UUID], tenant: TenantID, session: WorkerSession, out: WorkerOutbox) async throws -> Set<UUID> {
    let live = try await repository.heartbeat(tenant, leases: leases, leaseTimeout: leaseTimeout, logger: logger)
    for lease in leases where !live.contains(lease) {
      _ = session.release(lease)
      out.yield(revoked(lease, "LEASE_EXPIRED"))
    }
    return live
  }

  /// A claim that committed as the stream ended leased tasks the worker never got: they go back
  /// at once, rather than waiting out the lease timeout with an attempt counted. Runs even when
  /// the call was cancelled (the client went away), and before a drain lets the gateway stop.
  func giveBackUnsent(_ session: WorkerSession, tenant: TenantID) async {
    let unsent = session.unsent
    guard !unsent.isEmpty else { return }
    let audit = workerAudit(session, tenant: tenant) { _ in
      "lease given back unseen: the stream ended before the task was sent; the attempt is not counted"
    }
    let release = Task { [repository, logger] in
      try await repository.release(tenant, leases: unsent, audit: audit, logger: logger)
    }
    do {
      let changes = try await release.value
      telemetry.count("tollgate_workflow_leases_given_back_total", by: changes.count)
      logger.debug("gave back leases the worker never saw", metadata: ["tenant": "\(tenant)", "runs": "\(changes.count)"])
    } catch {
      logger.warning(
        "could not give back leases the worker never saw; they expire after the lease timeout",
        metadata: ["tenant": "\(tenant)", "leases": "\(unsent.count)", "error": "\(error)"]
      )
    }
  }

  enum Part: Sendable {
    case reader, writer, other
  }

  func handle(
    _ message: Tollgate_V1_WorkerMessage,
    first: Bool,
    tenant: TenantID,
    session: WorkerSession,
    out: WorkerOutbox,
    subscription: WorkflowHub.Subscription
  ) async throws {
    switch message.kind {
    case .hello(let hello):
      guard first else { throw TollgateError.invalidField("hello", "is sent once, as the first message of the stream") }
      let hello = try WorkflowMapping.hello(hello)
      session.configure(types: hello.types, capacity: hello.capacity, name: hello.name)
      if hello.draining { session.drain() }
      // Before the first claim, so a reconnected worker is not pushed more than its capacity
      // while it still runs what it took on its earlier stream.
      let live = try await renew(hello.held, tenant: tenant, session: session, out: out)
      session.adopt(live)
      logger.debug(
        "worker connected",
        metadata: ["tenant": "\(tenant)", "worker": "\(hello.name)", "types": "\(hello.types)", "held": "\(live.count)"]
      )
    case _ where first:
      throw TollgateError.invalidField("kind", "the first message of a worker stream must be hello")
    case .heartbeat(let heartbeat):
      var (ids, bad) = WorkflowMapping.leaseIDs(heartbeat.leaseIds, field: "heartbeat.lease_ids")
      if let first = bad.first { throw TollgateError.invalidField(first.field, first.description) }
      if ids.isEmpty { ids = session.heldLeases }
      _ = try await renew(ids, tenant: tenant, session: session, out: out)
    case .completed(let completed):
      try await complete([completed], tenant: tenant, session: session, out: out, subscription: subscription)
    case .failed(let failed):
      let lease = try WorkflowMapping.leaseID(failed.leaseID, field: "failed.lease_id")
      let error = String(failed.error.prefix(WorkflowMapping.maxErrorCharacters))
      let state = try await repository.fail(
        tenant,
        lease: lease,
        error: error,
        retryable: failed.retryable,
        retryBase: retryBase,
        audit: workerAudit(session, tenant: tenant, digests: [lease: AuditEventBuilder.requestDigest(failed)]) { change in
          change.state == .dead ? "failed; DEAD (\(failed.retryable ? "attempts used up" : "not retryable"))" : "failed; to be retried"
        },
        logger: logger
      )
      finish(lease, recorded: state != nil, session: session, out: out, subscription: subscription)
    case .drain:
      session.drain()
      logger.debug("worker draining", metadata: ["tenant": "\(tenant)", "held": "\(session.heldLeases.count)"])
    case nil:
      throw TollgateError.invalidField("kind", "a worker message needs one of hello, heartbeat, completed, failed, drain")
    }
  }

  static let connectMethod = "/" + Tollgate_V1_WorkflowService.Method.Connect.descriptor.fullyQualifiedMethod

  /// Audit events for what a worker's stream changed: one per run, by the worker's principal,
  /// with the digest of the worker's message where one caused it.
  func workerAudit(
    _ session: WorkerSession,
    tenant: TenantID,
    digests: [UUID: [UInt8]] = [:],
    outcome: @escaping @Sendable (WorkflowRepository.RunChange) -> String
  ) -> WorkflowRepository.AuditRecords {
    let scope = session.scope
    return { changes in
      changes.map { change in
        AuditEventBuilder.entry(
          scope: scope,
          tenant: tenant,
          method: Self.connectMethod,
          resource: "runs/\(change.runID.uuidString.lowercased())/attempts/\(change.attempt)",
          code: 0,
          message: outcome(change),
          requestSHA256: digests[change.lease] ?? []
        )
      }
    }
  }

  /// Records completions in one transaction and acks each, in order.
  func complete(
    _ completions: [Tollgate_V1_TaskCompleted],
    tenant: TenantID,
    session: WorkerSession,
    out: WorkerOutbox,
    subscription: WorkflowHub.Subscription
  ) async throws {
    let leases = try completions.map { try WorkflowMapping.leaseID($0.leaseID, field: "completed.lease_id") }
    var results: [(UUID, [UInt8])] = []
    var seen = Set<UUID>()
    for (lease, completed) in zip(leases, completions)
    where completed.result.count <= WorkflowMapping.maxResultBytes && seen.insert(lease).inserted {
      results.append((lease, Array(completed.result)))
    }
    var digests: [UUID: [UInt8]] = [:]
    for (lease, completed) in zip(leases, completions) { digests[lease] = AuditEventBuilder.requestDigest(completed) }
    var recorded = try await repository.complete(
      tenant,
      results: results,
      audit: workerAudit(session, tenant: tenant, digests: digests) { _ in "completed" },
      logger: logger
    )
    for (lease, completed) in zip(leases, completions) {
      if completed.result.count > WorkflowMapping.maxResultBytes {
        out.yield(ack(lease, accepted: false, "the result is \(completed.result.count) bytes; at most \(WorkflowMapping.maxResultBytes) are stored. Report a failure or a smaller result"))
        continue
      }
      // A lease completed twice in one batch: only the first counts.
      finish(lease, recorded: recorded.remove(lease) != nil, session: session, out: out, subscription: subscription)
    }
  }

  func finish(
    _ lease: UUID,
    recorded: Bool,
    session: WorkerSession,
    out: WorkerOutbox,
    subscription: WorkflowHub.Subscription
  ) {
    _ = session.release(lease)
    out.yield(
      ack(lease, accepted: recorded, recorded ? "" : "the lease is no longer held (it expired or the run was cancelled); the result was not recorded")
    )
    subscription.wake()
  }

  func revoked(_ lease: UUID, _ reason: String) -> Tollgate_V1_ServerMessage {
    .with {
      $0.revoked = .with {
        $0.leaseID = lease.uuidString.lowercased()
        $0.reason = reason
      }
    }
  }

  func ack(_ lease: UUID, accepted: Bool, _ message: String) -> Tollgate_V1_ServerMessage {
    .with {
      $0.ack = .with {
        $0.leaseID = lease.uuidString.lowercased()
        $0.accepted = accepted
        $0.message = message
      }
    }
  }

  /// Claims whenever the worker has room and something may be ready; otherwise waits for a
  /// wake-up (a notification, freed capacity) or the next scheduled run's due time.
  func claimLoop(
    tenant: TenantID,
    session: WorkerSession,
    out: WorkerOutbox,
    subscription: WorkflowHub.Subscription
  ) async throws {
    var wakes = subscription.wakes.makeAsyncIterator()
    var timer: Task<Void, Never>?
    defer { timer?.cancel() }
    let timeout = Google_Protobuf_Duration(rounding: leaseTimeout, rule: .towardZero)
    var backoff = RetryBackoff()
    while !Task.isCancelled && !session.isClosed {
      let (types, free, name) = session.claimable
      if free > 0 {
        session.setClaiming(true)
        defer { session.setClaiming(false) }
        let claim: WorkflowRepository.Claim
        do {
          claim = try await repository.claim(
            tenant,
            types: types,
            limit: free,
            worker: name,
            leaseTimeout: leaseTimeout,
            audit: workerAudit(session, tenant: tenant) { _ in "leased to worker '\(name)'" },
            logger: logger
          )
          backoff.succeeded()
        } catch {
          // A database blip must not end every worker's stream at once, to have them all
          // reconnect together: the claim is tried again. (One whose COMMIT went unanswered may
          // have leased runs this stream never hears of; they are offered again when their lease
          // expires, as they would be if the stream ended.) A heartbeat or result the worker sends
          // meanwhile is owed an answer, and still ends the stream if it cannot be recorded.
          // A claim cut short because the stream ended is no outage.
          if Task.isCancelled || session.isClosed { throw error }
          switch error {
          case .unavailable, .outcomeUnknown:
            // Once per outage and stream at warning: a fleet of idle workers retries together.
            logger.log(
              level: backoff.isFailing ? .debug : .warning,
              "a claim could not reach the database; retrying",
              metadata: ["tenant": "\(tenant)", "error": "\(error)"]
            )
            guard await backoff.failed(patience: nil) else { throw error }
            continue
          default:
            throw error
          }
        }
        session.hold(claim.leases.map(\.leaseID), heldBackByLimit: claim.heldBackByLimit)
        // A full claim may have left more ready runs: let the next worker with room look.
        if claim.leases.count == free { hub.wakeNextWorker(tenant, type: nil, except: subscription) }
        for lease in claim.leases {
          out.yield(.with {
            $0.task = .with {
              $0.leaseID = lease.leaseID.uuidString.lowercased()
              $0.runID = lease.run.id.uuidString.lowercased()
              $0.type = lease.run.type
              $0.payload = Data(lease.run.payload)
              $0.attempt = UInt32(lease.run.attempt)
              $0.leaseTimeout = timeout
            }
          })
        }
        timer?.cancel()
        timer = nil
        if let due = claim.nextDue {
          // Not before 20 ms: the database's clock decides what is due, and a local clock running
          // ahead of it must not spin.
          let delay = max(due.timeIntervalSinceNow, 0.02)
          timer = Task { [subscription] in
            try? await Task.sleep(for: .milliseconds(Int64(delay * 1000) + 5))
            if !Task.isCancelled { subscription.wake() }
          }
        }
      }
      guard await wakes.next() != nil else { return }
    }
  }
}

/// A worker's messages as they arrive, taken by the processor a batch at a time (all that came
/// while it was busy), so completions that arrive together can commit together.
///
/// It also counts the answers queued for the writer and not yet written: messages waiting here
/// and answers waiting there together are kept under `limit`, by ``waitForRoom()``.
final class WorkerInbox: Sendable {
  private struct State {
    var messages: [Tollgate_V1_WorkerMessage] = []
    var answersQueued = 0
    var ended = false
    var failure: (any Error)?
  }
  private let state = Mutex(State())
  private let signal: AsyncStream<Void>
  private let signaller: AsyncStream<Void>.Continuation
  private let room: AsyncStream<Void>
  private let roomSignaller: AsyncStream<Void>.Continuation
  let limit: Int

  init(limit: Int = 1_024) {
    self.limit = limit
    (signal, signaller) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    (room, roomSignaller) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
  }

  /// Whether fewer than `limit` messages and answers are waiting.
  var hasRoom: Bool { state.withLock { $0.messages.count + $0.answersQueued < limit } }

  /// Returns once ``hasRoom``. One caller only.
  func waitForRoom() async throws {
    var wakes = room.makeAsyncIterator()
    while !hasRoom {
      guard await wakes.next() != nil else { throw CancellationError() }
    }
  }

  func answerQueued() { state.withLock { $0.answersQueued += 1 } }

  func answerWritten() {
    state.withLock { $0.answersQueued -= 1 }
    roomSignaller.yield()
  }

  func put(_ message: Tollgate_V1_WorkerMessage) {
    state.withLock { $0.messages.append(message) }
    signaller.yield()
  }

  /// The worker's side ended, normally (nil) or with `error`.
  func close(_ error: (any Error)?) {
    state.withLock {
      $0.ended = true
      $0.failure = error
    }
    signaller.yield()
  }

  /// Every message not yet taken; nil once the worker's side has ended and all were taken.
  /// One consumer only.
  func take() async throws -> [Tollgate_V1_WorkerMessage]? {
    var wakes = signal.makeAsyncIterator()
    while true {
      let (batch, ended, failure) = state.withLock { s -> ([Tollgate_V1_WorkerMessage], Bool, (any Error)?) in
        defer { s.messages = [] }
        return (s.messages, s.ended, s.failure)
      }
      if !batch.isEmpty {
        roomSignaller.yield()
        return batch
      }
      if let failure { throw failure }
      if ended { return nil }
      guard await wakes.next() != nil else { throw CancellationError() }
    }
  }
}

/// Where a worker stream's answers go: to its one writer, counted in the inbox until written.
struct WorkerOutbox: Sendable {
  let continuation: AsyncStream<Tollgate_V1_ServerMessage>.Continuation
  let inbox: WorkerInbox

  func yield(_ message: Tollgate_V1_ServerMessage) {
    inbox.answerQueued()
    if case .terminated = continuation.yield(message) { inbox.answerWritten() }
  }

  func finish() { continuation.finish() }
}

/// One worker stream's state: what it announced and the leases it was handed.
final class WorkerSession: Sendable {
  /// The worker's identity, for the audit events of what it does on the stream.
  let scope: CallScope

  init(scope: CallScope) {
    self.scope = scope
  }

  private struct State {
    var types: [String] = []
    var capacity = 0
    var name = ""
    var held: Set<UUID> = []
    /// Held leases whose task was written to the stream (or taken over from an earlier one).
    var sent: Set<UUID> = []
    var closed = false
    /// The worker is stopping: claim nothing more for it, but keep its stream for its results.
    var draining = false
    var heldBackByLimit = false
    var claiming = false
  }
  private let state = Mutex(State())

  /// The worker closed its side: claim nothing more for it.
  func close() { state.withLock { $0.closed = true } }

  var isClosed: Bool { state.withLock { $0.closed } }

  func configure(types: [String], capacity: Int, name: String) {
    state.withLock {
      $0.types = types
      $0.capacity = capacity
      $0.name = name
    }
  }

  func drain() { state.withLock { $0.draining = true } }

  var claimable: (types: [String], free: Int, name: String) {
    state.withLock { ($0.types, $0.draining ? 0 : max(0, $0.capacity - $0.held.count), $0.name) }
  }

  var heldLeases: [UUID] { state.withLock { Array($0.held) } }

  func hold(_ leases: [UUID], heldBackByLimit: Bool) {
    state.withLock {
      $0.held.formUnion(leases)
      $0.heldBackByLimit = heldBackByLimit
    }
  }

  /// Leases taken on an earlier stream of this worker, now held by this one.
  func adopt(_ leases: Set<UUID>) {
    state.withLock {
      $0.held.formUnion(leases)
      $0.sent.formUnion(leases)
    }
  }

  func markSent(_ lease: UUID) {
    _ = state.withLock { $0.sent.insert(lease) }
  }

  /// Leases claimed for this stream whose task was never written to it.
  var unsent: [UUID] { state.withLock { Array($0.held.subtracting($0.sent)) } }

  var heldBackByLimit: Bool { state.withLock { $0.heldBackByLimit } }

  /// Whether a claim for this worker is in flight: wake-ups for it then join its next claim.
  var isClaiming: Bool { state.withLock { $0.claiming } }

  func setClaiming(_ claiming: Bool) { state.withLock { $0.claiming = claiming } }

  /// Whether a ready run of `type` (nil: of any type) is worth a claim by this worker.
  func wants(_ type: String?) -> Bool {
    state.withLock { s in
      !s.closed && !s.draining && s.capacity > s.held.count && (type.map { s.types.contains($0) } ?? true)
    }
  }

  /// True if this stream held `lease`.
  func release(_ lease: UUID) -> Bool {
    state.withLock {
      $0.sent.remove(lease)
      return $0.held.remove(lease) != nil
    }
  }
}
