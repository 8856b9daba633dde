public import Logging
import PostgresNIO
import Synchronization
public import ServiceLifecycle

/// Listens on the `tollgate_identity` channel and calls `onChange` for every notification, and
/// once after each (re)connect, since changes made while disconnected were not heard.
///
/// Holds one pooled connection while listening. Reconnects with capped exponential backoff when
/// the connection drops; stops on graceful shutdown.
public struct IdentityChangeListener: Service {
  let database: Database
  let logger: Logger
  let waitUntilReady: @Sendable () async -> Void
  let onChange: @Sendable () async -> Void

  public init(
    database: Database,
    logger: Logger,
    waitUntilReady: @escaping @Sendable () async -> Void = {},
    onChange: @escaping @Sendable () async -> Void
  ) {
    self.database = database
    self.logger = logger
    self.waitUntilReady = waitUntilReady
    self.onChange = onChange
  }

  public func run() async throws {
    await cancelWhenGracefulShutdown { await waitUntilReady() }
    var backoff: Duration = .milliseconds(100)
    while !Task.isCancelled && !Task.isShuttingDownGracefully {
      let connected = Atomic<Bool>(false)
      do {
        try await cancelWhenGracefulShutdown {
          try await database.client.withConnection { connection in
            try await connection.listen(on: TenantRepository.identityChannel) { notifications in
              connected.store(true, ordering: .relaxed)
              await onChange()
              for try await _ in notifications {
                await onChange()
              }
            }
          }
        }
      } catch {
        if Task.isCancelled || Task.isShuttingDownGracefully { return }
        logger.warning(
          "identity change listener lost its connection; reconnecting",
          metadata: ["error": "\(error)", "backoff": "\(backoff)"]
        )
      }
      if connected.load(ordering: .relaxed) { backoff = .milliseconds(100) }
      // Backoff between reconnect attempts to a database that is down (not a poll for changes).
      try? await Task.sleep(for: backoff)
      backoff = min(backoff * 2, .seconds(5))
    }
  }
}
