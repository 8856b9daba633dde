import Foundation
public import Logging
import Synchronization
public import TollgateModel

/// This replica's copy of tenant states and revocations, read on every call without I/O.
///
/// The copy is replaced whole by ``refresh()``, which the gateway calls at start, after its own
/// changes commit (so a revocation is in force before RevokeCertificate answers), when Postgres
/// notifies a change made by any replica, and after the notification connection reconnects.
/// Refreshes may race; a slower, older load never replaces a newer one.
public final class IdentityDirectory: Sendable {
  private struct State {
    var snapshot: IdentitySnapshot
    var requested: UInt64 = 0
    var applied: UInt64 = 0
    /// Calls in progress that must hear of every new snapshot (``whileInStanding(_:_:)``).
    var watchers: [UInt64: AsyncStream<Void>.Continuation] = [:]
    var nextWatcher: UInt64 = 0
  }

  private let state: Mutex<State>
  private let load: @Sendable () async throws -> IdentitySnapshot

  public init(initial: IdentitySnapshot = IdentitySnapshot(), load: @escaping @Sendable () async throws -> IdentitySnapshot) {
    self.state = Mutex(State(snapshot: initial))
    self.load = load
  }

  /// The latest loaded snapshot.
  public var snapshot: IdentitySnapshot {
    state.withLock { $0.snapshot }
  }

  /// Loads a new snapshot and installs it unless a refresh that started later already has.
  public func refresh() async throws {
    let ticket = state.withLock {
      $0.requested += 1
      return $0.requested
    }
    let loaded = try await load()
    let watchers = state.withLock { state -> [AsyncStream<Void>.Continuation] in
      guard ticket > state.applied else { return [] }
      state.snapshot = loaded
      state.applied = ticket
      return Array(state.watchers.values)
    }
    for watcher in watchers { watcher.yield() }
  }

  /// Runs `body`, a call's work, for as long as `scope` keeps the standing it was admitted with:
  /// if a new snapshot revokes its certificate or suspends its tenant, or the certificate expires,
  /// `body` is cancelled and this throws why. Standing is checked when a call is admitted, so
  /// without this a stream (a worker's Connect, a follower, an ingest stream) went on for as long
  /// as its client kept it open, past the revocation, suspension or expiry that refuses its next
  /// call.
  public func whileInStanding<T: Sendable>(
    _ scope: CallScope,
    _ body: @escaping @Sendable () async throws -> T
  ) async throws -> T {
    let (changes, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    let id = state.withLock { state in
      defer { state.nextWatcher += 1 }
      state.watchers[state.nextWatcher] = continuation
      return state.nextWatcher
    }
    defer { _ = state.withLock { $0.watchers.removeValue(forKey: id) } }
    // A snapshot installed between the call's admission and the line above was not announced.
    if let lost = scope.lostStanding(in: snapshot) { throw lost }
    return try await withThrowingTaskGroup(of: T?.self) { group in
      group.addTask { try await body() }
      group.addTask {
        for await _ in changes {
          if let lost = scope.lostStanding(in: self.snapshot) { throw lost }
        }
        return nil
      }
      let expiry = scope.principal.validUntil
      group.addTask {
        // No snapshot announces this one. A call is admitted up to and including the last second
        // of the certificate's validity, so the stream ends just after it.
        let remaining = expiry.timeIntervalSinceNow + 1
        guard remaining < 100 * 365 * 86_400 else { return nil }
        try? await Task.sleep(for: .seconds(max(remaining, 0)))
        if Task.isCancelled { return nil }
        throw TollgateError.unauthenticated(
          "client certificate expired at \(expiry.formatted(.iso8601)); \(CertificateExpiry.reconnectAdvice)"
        )
      }
      defer { group.cancelAll() }
      while let result = try await group.next() {
        if let result { return result }
      }
      // Both ended without a result: only cancellation of the call does that.
      throw CancellationError()
    }
  }

  /// ``refresh()``, logging instead of throwing: the previous snapshot stays in force.
  public func refreshLogging(_ logger: Logger) async {
    do {
      try await refresh()
    } catch {
      logger.error("identity directory refresh failed; keeping the previous copy", metadata: ["error": "\(error)"])
    }
  }
}

extension CallScope {
  /// Why this call's principal may no longer call at all, under `snapshot`: its certificate was
  /// revoked, or its own tenant is suspended or not registered. Nil while it may.
  public func lostStanding(in snapshot: IdentitySnapshot) -> TollgateError? {
    principal.revocation(in: snapshot) ?? principal.tenant.flatMap { snapshot.tenantStandingError($0) }
  }
}

extension Principal {
  /// UNAUTHENTICATED naming the revocation that applies to this certificate, if one does.
  public func revocation(in snapshot: IdentitySnapshot) -> TollgateError? {
    guard let revoked = snapshot.revocation(serialHex: serialHex, sha256: certificateSHA256, tenant: tenant) else { return nil }
    let what: String
    switch revoked {
    case .serial(let s): what = "serial \(s)"
    case .fingerprint(let f): what = "SHA-256 \(f)"
    }
    return .unauthenticated("client certificate (\(what)) has been revoked; obtain a new certificate")
  }
}

extension IdentitySnapshot {
  /// PERMISSION_DENIED unless `tenant` is registered and active.
  public func tenantStandingError(_ tenant: TenantID) -> TollgateError? {
    switch tenantStates[tenant] {
    case .none: return .permissionDenied("tenant '\(tenant)' is not registered with this gateway")
    case .suspended: return .permissionDenied("tenant '\(tenant)' is suspended; an operator must resume it")
    case .active: return nil
    }
  }
}
