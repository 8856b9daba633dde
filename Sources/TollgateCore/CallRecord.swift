import Synchronization

/// What the outermost interceptors learn of a call from the ones inside them: who made it, once
/// identity has resolved the caller. The access log and metrics run outside identity (so refused
/// calls are logged and counted too) and read it when the call ends.
public final class CallRecord: Sendable {
  @TaskLocal public static var current: CallRecord?

  /// Random, per call: ties a call's log line to the lines logged while it ran.
  public let requestID: String
  /// The W3C trace id from the caller's `traceparent`, if it sent a valid one.
  public let traceID: String?
  private let resolved = Mutex<CallScope?>(nil)

  public init(requestID: String, traceID: String?) {
    self.requestID = requestID
    self.traceID = traceID
  }

  public var scope: CallScope? {
    get { resolved.withLock { $0 } }
    set { resolved.withLock { $0 = newValue } }
  }

  /// The trace and parent span ids of a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`),
  /// nil when absent, malformed, or all zeros (which W3C Trace Context says to ignore). The one
  /// reader of the header: the access log, the audit event and the tracer agree on what is valid.
  public static func traceParent(_ header: String?) -> (traceID: String, spanID: String)? {
    guard let header else { return nil }
    let parts = header.split(separator: "-", omittingEmptySubsequences: false)
    guard parts.count >= 4, parts[0].count == 2, parts[0] != "ff", parts[1].count == 32, parts[2].count == 16,
      parts[3].count == 2,
      parts.prefix(4).allSatisfy({ $0.allSatisfy { $0.isHexDigit && !$0.isUppercase } }),
      parts[1].contains(where: { $0 != "0" }), parts[2].contains(where: { $0 != "0" })
    else { return nil }
    return (String(parts[1]), String(parts[2]))
  }

  /// The trace id of a `traceparent` header, as ``traceParent(_:)`` reads it.
  public static func traceID(fromTraceparent header: String?) -> String? {
    traceParent(header)?.traceID
  }
}
