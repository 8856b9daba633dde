import GRPCCore
public import Logging
import NIOCore
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
  } catch {
    logger.error("unexpected failure", metadata: ["method": "\(method)", "error": "\(error)"])
    throw TollgateError.internalError
  }
}
