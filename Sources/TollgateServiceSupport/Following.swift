import GRPCCore
import ServiceLifecycle
public import TollgateCore

/// Waits for a following stream's next wake-up. False when the wait ended because the client
/// went away. When the gateway starts draining, `stop` ends the wait and the stream ends with
/// UNAVAILABLE and `drainMessage`, which tells the client how to resume.
///
/// gRPC reports a client that went away (a reset stream, a lost connection, its deadline) through
/// the RPC's cancellation handle, not by cancelling the handler's task, so `stop` is also the
/// RPC's cancellation handler. Before, a follower of a quiet log noticed only at its next write:
/// it held its call slot and the tenant's concurrent-call quota until the log next grew.
public func nextWakeUp(
  _ wakeUps: inout AsyncStream<Void>.Iterator,
  stop: @escaping @Sendable () -> Void,
  drainMessage: @autoclosure () -> String
) async throws(TollgateError) -> Bool {
  let woken: Void? = await withRPCCancellationHandler {
    await withGracefulShutdownHandler {
      await wakeUps.next()
    } onGracefulShutdown: {
      stop()
    }
  } onCancelRPC: {
    stop()
  }
  if Task.isShuttingDownGracefully { throw .unavailable(drainMessage()) }
  return woken != nil
}
