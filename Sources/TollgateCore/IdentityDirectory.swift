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
    state.withLock {
      if ticket > $0.applied {
        $0.snapshot = loaded
        $0.applied = ticket
      }
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
