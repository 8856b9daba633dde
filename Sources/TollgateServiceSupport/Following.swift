import ServiceLifecycle
public import TollgateCore

/// Waits for a following stream's next wake-up. False when the wait ended because the client
/// went away (cancellation ends the iterator). When the gateway starts draining, `stop` ends the
/// wait and the stream ends with UNAVAILABLE and `drainMessage`, which tells the client how to
/// resume.
public func nextWakeUp(
  _ wakeUps: inout AsyncStream<Void>.Iterator,
  stop: @escaping @Sendable () -> Void,
  drainMessage: @autoclosure () -> String
) async throws(TollgateError) -> Bool {
  let woken: Void? = await withGracefulShutdownHandler {
    await wakeUps.next()
  } onGracefulShutdown: {
    stop()
  }
  if Task.isShuttingDownGracefully { throw .unavailable(drainMessage()) }
  return woken != nil
}
