import Synchronization

/// A flag that is set once and read from any task (e.g. "draining", "bound").
final class AtomicFlag: Sendable {
  private let value = Atomic<Bool>(false)
  var isSet: Bool { value.load(ordering: .relaxed) }
  func set() { value.store(true, ordering: .relaxed) }
}

/// Opens once, when the schema is migrated and the identity directory loaded; the service that
/// needs the schema (one waiter) waits on it instead of racing the migration. The wait also ends
/// when the waiting task is cancelled, so a failed start-up cannot hang shutdown.
final class ReadinessGate: Sendable {
  private let stream: AsyncStream<Void>
  private let continuation: AsyncStream<Void>.Continuation

  init() {
    (stream, continuation) = AsyncStream.makeStream(of: Void.self)
  }

  func open() {
    continuation.finish()
  }

  func wait() async {
    for await _ in stream {}
  }
}
