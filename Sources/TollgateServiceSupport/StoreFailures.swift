import GRPCCore
public import Logging
import NIOCore
import NIOHTTP2
import TollgateCore
import TollgateStore

/// Runs a handler's `body`, turning store failures into client-actionable errors and logging the
/// rest: shared by every service so a database outage reads the same everywhere and no SQL text
/// or internal detail reaches a client.
public func handlingStoreFailures<T: Sendable>(
  _ method: String,
  logger: Logger,
  _ body: () async throws -> T
) async throws -> T {
  do {
    return try await body()
  } catch let error as TollgateError {
    throw error
  } catch let error as StoreError {
    switch error {
    case .notFound(let m): throw TollgateError.notFound(m)
    case .alreadyExists(let m): throw TollgateError.alreadyExists(m)
    case .failedPrecondition(let m): throw TollgateError.failedPrecondition(m)
    case .unavailable(let m):
      logger.warning("database unavailable", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.unavailable("the database is unavailable; retry later")
    case .outcomeUnknown(let m):
      logger.warning("database commit unconfirmed", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.outcomeUnknown(
        "the database did not confirm the change in time; it may have been applied, so read it back before retrying")
    case .quotaExhausted(let m):
      throw TollgateError.resourceExhausted(m, subject: "", description: m, retryAfter: nil)
    case .invalidInput(let m):
      logger.warning("request value the store cannot hold", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.invalidArgument(m, [])
    case .outOfRange(let m):
      logger.warning("store computation out of range", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.outOfRange(m)
    case .damaged(let m):
      logger.error("stored data missing or corrupt", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.dataLoss(m)
    case .unexpected(let m):
      logger.error("store failure", metadata: ["method": "\(method)", "error": "\(m)"])
      throw TollgateError.internalError
    }
  } catch let error as RPCError {
    throw error
  } catch let error as ChannelError where error == .ioOnClosedChannel || error == .alreadyClosed {
    // The client went away mid-stream: an ordinary end, not a failure to log.
    throw RPCError(code: .cancelled, message: "the client closed the stream")
  } catch is NIOHTTP2Errors.StreamClosed {
    // The stream closed under a handler still writing to it: the client reset it, or the
    // transport already ended the call (a later message of the stream could not be decoded, and
    // its status went out). The client has its answer; there is nothing to report.
    throw RPCError(code: .cancelled, message: "the stream was closed")
  } catch where Task.isCancelled {
    // The handler's task was cancelled (the server stopping it; a client's reset or deadline
    // reaches handlers through the RPC's cancellation handle instead) and the handler failed on
    // its way out: an ordinary end, not a failure to report.
    throw RPCError(code: .cancelled, message: "the call was cancelled")
  } catch {
    logger.error("unexpected failure", metadata: ["method": "\(method)", "error": "\(error)"])
    throw TollgateError.internalError
  }
}
