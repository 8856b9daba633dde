public import GRPCCore
import GRPCProtobuf
import TollgateModel

/// An error a client can act on. Every layer's failures are mapped to one of these before they
/// leave a handler or interceptor; the mapping to gRPC status and google.rpc details lives here
/// and nowhere else.
public enum TollgateError: Error, Sendable, Equatable {
  /// One violation per bad request field, sent as google.rpc.BadRequest.
  public struct FieldViolation: Sendable, Hashable {
    public var field: String
    public var description: String
    public init(field: String, description: String) {
      self.field = field
      self.description = description
    }
  }

  case invalidArgument(String, [FieldViolation])
  case unauthenticated(String)
  case permissionDenied(String)
  case notFound(String)
  case alreadyExists(String)
  case failedPrecondition(String)
  /// A value or result is past the range the operation can handle; unlike INVALID_ARGUMENT it may
  /// depend on stored data (an aggregate that overflowed).
  case outOfRange(String)
  /// A quota has no room: google.rpc.QuotaFailure naming `subject` (e.g. `tenant:acme`) and what
  /// ran out, and, when known, RetryInfo and `grpc-retry-pushback-ms` saying when room returns.
  case resourceExhausted(String, subject: String, description: String, retryAfter: Duration?)
  case unavailable(String)
  /// A change was sent to the database but its commit was never confirmed: DEADLINE_EXCEEDED,
  /// which gRPC defines as "may have completed", so the client reads back before retrying.
  case outcomeUnknown(String)
  /// Stored data the call needs is missing or corrupt: DATA_LOSS, which a retry cannot fix.
  case dataLoss(String)
  /// Something went wrong that the client cannot fix. The message sent is generic; the cause is
  /// logged where it happened.
  case internalError

  /// INVALID_ARGUMENT for several bad fields of `what`. The message lists them too, so a client
  /// that shows only the status message (most do) still says what to fix.
  public static func invalidFields(_ what: String, _ violations: [FieldViolation]) -> TollgateError {
    .invalidArgument("invalid \(what): " + violations.map { "\($0.field) \($0.description)" }.joined(separator: "; "), violations)
  }

  /// A single-field INVALID_ARGUMENT, the common case.
  public static func invalidField(_ field: String, _ description: String) -> TollgateError {
    .invalidArgument("invalid \(field): \(description)", [FieldViolation(field: field, description: description)])
  }
}

extension TollgateError: RPCErrorConvertible {
  public var rpcErrorCode: RPCError.Code {
    switch self {
    case .invalidArgument: return .invalidArgument
    case .unauthenticated: return .unauthenticated
    case .permissionDenied: return .permissionDenied
    case .notFound: return .notFound
    case .alreadyExists: return .alreadyExists
    case .failedPrecondition: return .failedPrecondition
    case .outOfRange: return .outOfRange
    case .resourceExhausted: return .resourceExhausted
    case .unavailable: return .unavailable
    case .outcomeUnknown: return .deadlineExceeded
    case .dataLoss: return .dataLoss
    case .internalError: return .internalError
    }
  }

  public var rpcErrorMessage: String {
    switch self {
    case .invalidArgument(let m, _), .unauthenticated(let m), .permissionDenied(let m), .notFound(let m),
      .alreadyExists(let m), .failedPrecondition(let m), .outOfRange(let m), .unavailable(let m), .outcomeUnknown(let m), .dataLoss(let m), .resourceExhausted(let m, _, _, _):
      return Self.clipped(m, maxBytes: Self.maxMessageBytes)
    case .internalError:
      return "internal error; the gateway logged the details"
    }
  }

  /// The status and its details travel in HTTP/2 trailers, and gRPC clients refuse a header list
  /// over 16 KiB: a message echoing a huge request field would reach the client as its own
  /// RESOURCE_EXHAUSTED instead of the real status. So what a status repeats of a request is
  /// capped here, for every error, whatever built the message: the message at 512 bytes of UTF-8
  /// (at most about 1.5 KiB once percent-encoded), at most 10 field violations of 100 + 200 bytes.
  static let maxMessageBytes = 512
  static let maxViolations = 10
  static let maxFieldBytes = 100
  static let maxDescriptionBytes = 200

  /// `text` cut to at most `maxBytes` of UTF-8 on a character boundary, marked with "…".
  public static func clipped(_ text: String, maxBytes: Int) -> String {
    guard text.utf8.count > maxBytes else { return text }
    var out = ""
    var used = 0
    let budget = maxBytes - "…".utf8.count
    for character in text {
      let size = character.utf8.count
      if used + size > budget { break }
      out.append(character)
      used += size
    }
    return out + "…"
  }

  public var rpcErrorMetadata: Metadata {
    if case .resourceExhausted(let message, let subject, let description, let retryAfter) = self {
      var details: [ErrorDetails] = [.quotaFailure(violations: [.init(subject: subject, description: description)])]
      if let retryAfter { details.append(.retryInfo(delay: retryAfter)) }
      var metadata = GoogleRPCStatus(code: .resourceExhausted, message: Self.clipped(message, maxBytes: Self.maxMessageBytes), details: details).rpcErrorMetadata
      if let retryAfter {
        metadata.addString(String(max(0, retryAfter.wholeMilliseconds)), forKey: "grpc-retry-pushback-ms")
      }
      return metadata
    }
    guard case .invalidArgument(_, let violations) = self, !violations.isEmpty else { return [:] }
    var shown = violations.prefix(Self.maxViolations).map {
      ErrorDetails.BadRequest.FieldViolation(
        field: Self.clipped($0.field, maxBytes: Self.maxFieldBytes),
        description: Self.clipped($0.description, maxBytes: Self.maxDescriptionBytes)
      )
    }
    if violations.count > Self.maxViolations {
      shown.append(.init(field: "", description: "and \(violations.count - Self.maxViolations) more field violations"))
    }
    let status = GoogleRPCStatus(code: .invalidArgument, message: rpcErrorMessage, details: [.badRequest(violations: shown)])
    return status.rpcErrorMetadata
  }

  public var rpcErrorCause: (any Error)? { nil }

  /// This error as an `RPCError`, for places that must return one (e.g. a rejected response).
  public var rpcError: RPCError {
    RPCError(code: rpcErrorCode, message: rpcErrorMessage, metadata: rpcErrorMetadata)
  }
}

/// The gRPC status `error` carries, if it carries one (an `RPCError`, or anything convertible to
/// one, such as ``TollgateError``): what an interceptor sees a call end with.
public func rpcStatus(of error: any Error) -> (code: RPCError.Code, message: String)? {
  if let rpc = error as? RPCError { return (rpc.code, rpc.message) }
  if let convertible = error as? any RPCErrorConvertible { return (convertible.rpcErrorCode, convertible.rpcErrorMessage) }
  return nil
}
