import NIOCore
import Synchronization
import TollgateModel

/// Caps the client connections this replica holds: an accepted connection past the cap is closed
/// before its TLS handshake, so a flood of connections cannot exhaust file descriptors or the
/// memory their buffers take. The client sees the connection close and retries (UNAVAILABLE).
final class ConnectionLimit: Sendable {
  let maximum: Int
  let telemetry: Telemetry
  private let open = Atomic<Int>(0)

  init(maximum: Int, telemetry: Telemetry) {
    self.maximum = maximum
    self.telemetry = telemetry
  }

  var current: Int { open.load(ordering: .relaxed) }

  func admit(_ channel: any Channel) -> EventLoopFuture<Void> {
    let now = open.wrappingAdd(1, ordering: .relaxed).newValue
    telemetry.adjust("tollgate_connections_open", by: 1)
    channel.closeFuture.whenComplete { [self] _ in
      open.wrappingSubtract(1, ordering: .relaxed)
      telemetry.adjust("tollgate_connections_open", by: -1)
    }
    guard now <= maximum else {
      telemetry.count("tollgate_connections_refused_total")
      // Failing the initializer alone leaves the socket open and the client waiting.
      channel.close(promise: nil)
      return channel.eventLoop.makeFailedFuture(TooManyConnections(maximum: maximum))
    }
    return channel.eventLoop.makeSucceededVoidFuture()
  }

  struct TooManyConnections: Error, CustomStringConvertible {
    let maximum: Int
    var description: String { "connection refused: this replica already holds its maximum of \(maximum) (--max-connections)" }
  }
}
