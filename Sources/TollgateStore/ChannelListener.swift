public import Logging
import PostgresNIO
import Synchronization
public import ServiceLifecycle

/// Listens on one Postgres notification channel and calls `onNotification` with each payload,
/// and with nil once after each (re)connect, since notifications sent while disconnected were
/// not heard and anything may have changed.
///
/// Holds one pooled connection while listening. Reconnects with capped exponential backoff when
/// the connection drops; stops on graceful shutdown.
public struct ChannelListener: Service {
  let channel: String
  let database: Database
  let logger: Logger
  let waitUntilReady: @Sendable () async -> Void
  let onNotification: @Sendable (String?) async -> Void

  public init(
    channel: String,
    database: Database,
    logger: Logger,
    waitUntilReady: @escaping @Sendable () async -> Void = {},
    onNotification: @escaping @Sendable (String?) async -> Void
  ) {
    self.channel = channel
    self.database = database
    self.logger = logger
    self.waitUntilReady = waitUntilReady
    self.onNotification = onNotification
  }

  public func run() async throws {
    await cancelWhenGracefulShutdown { await waitUntilReady() }
    var backoff: Duration = .milliseconds(100)
    while !Task.isCancelled && !Task.isShuttingDownGracefully {
      let connected = Atomic<Bool>(false)
      do {
        try await cancelWhenGracefulShutdown {
          try await database.client.withConnection { connection in
            try await connection.listen(on: channel) { notifications in
              connected.store(true, ordering: .relaxed)
              await onNotification(nil)
              for try await notification in notifications {
                await onNotification(notification.payload)
              }
            }
          }
        }
      } catch {
        if Task.isCancelled || Task.isShuttingDownGracefully { return }
        logger.warning(
          "notification listener lost its connection; reconnecting",
          metadata: ["channel": "\(channel)", "error": "\(error)", "backoff": "\(backoff)"]
        )
      }
      if connected.load(ordering: .relaxed) { backoff = .milliseconds(100) }
      // Backoff between reconnect attempts to a database that is down (not a poll for changes).
      try? await Task.sleep(for: backoff)
      backoff = min(backoff * 2, .seconds(5))
    }
  }
}
