import ServiceLifecycle

/// The wait between retries of a failing background write (an audit flush, a worker's claim):
/// 50 ms, doubling up to 2 s, started over by a success. Gives up once shutdown has begun, or,
/// with a `patience`, once failures have lasted that long in a row (a final flush that must end),
/// and always once the task is cancelled: its sleeps would no longer wait, and a database that
/// fails at once (known down) would have it retry in a tight loop that nothing ends.
public struct RetryBackoff: Sendable {
  public private(set) var delay: Duration = .milliseconds(50)
  private var failingSince: ContinuousClock.Instant?

  public init() {}

  /// True from a failure until the next success.
  public var isFailing: Bool { failingSince != nil }

  public mutating func succeeded() {
    delay = .milliseconds(50)
    failingSince = nil
  }

  /// Call after a failure: waits and returns true to retry, or returns false to give up.
  public mutating func failed(patience: Duration?) async -> Bool {
    let since = failingSince ?? .now
    failingSince = since
    if let patience {
      if ContinuousClock.now - since > patience { return false }
    } else if Task.isShuttingDownGracefully {
      return false
    }
    // Throws at once in a cancelled task, and when cancelled while it waits.
    guard (try? await Task.sleep(for: delay)) != nil else { return false }
    delay = min(delay * 2, .seconds(2))
    return true
  }
}
