import Foundation
public import Logging
import Synchronization
import TollgateCore
public import Tracing

/// A swift-distributed-tracing tracer that speaks W3C Trace Context and reports each finished span
/// as one `debug` log line (`"message":"span"` with `trace_id`, `span_id`, `parent_span_id`,
/// `name`, `kind`, `duration_ms`, `status` and the span's attributes), so a call's server span and
/// the database spans under it can be followed with nothing but the logs. `tollgate serve`
/// bootstraps it; an exporter such as swift-otel can take its place without touching the code
/// that makes the spans.
public final class LogTracer: Tracer, Sendable {
  let logger: Logger

  public init(logger: Logger) {
    self.logger = logger
  }

  /// A W3C trace parent: the caller's trace and span ids.
  struct SpanIDs: Sendable {
    var traceID: String
    var spanID: String
  }

  enum SpanIDsKey: ServiceContextKey {
    typealias Value = SpanIDs
  }

  public func extract<Carrier, Extract: Extractor>(
    _ carrier: Carrier,
    into context: inout ServiceContext,
    using extractor: Extract
  ) where Extract.Carrier == Carrier {
    guard let parent = CallRecord.traceParent(extractor.extract(key: "traceparent", from: carrier)) else { return }
    context[SpanIDsKey.self] = SpanIDs(traceID: parent.traceID, spanID: parent.spanID)
  }

  public func inject<Carrier, Inject: Injector>(
    _ context: ServiceContext,
    into carrier: inout Carrier,
    using injector: Inject
  ) where Inject.Carrier == Carrier {
    guard let ids = context[SpanIDsKey.self] else { return }
    injector.inject("00-\(ids.traceID)-\(ids.spanID)-01", forKey: "traceparent", into: &carrier)
  }

  public func forceFlush() {}

  public func startSpan<Instant: TracerInstant>(
    _ operationName: String,
    context: @autoclosure () -> ServiceContext,
    ofKind kind: SpanKind,
    at instant: @autoclosure () -> Instant,
    function: String,
    file fileID: String,
    line: UInt
  ) -> LogSpan {
    var context = context()
    let parent = context[SpanIDsKey.self]
    let ids = SpanIDs(traceID: parent?.traceID ?? Self.randomHex(bytes: 16), spanID: Self.randomHex(bytes: 8))
    context[SpanIDsKey.self] = ids
    return LogSpan(
      name: operationName,
      kind: kind,
      context: context,
      ids: ids,
      parentSpanID: parent?.spanID,
      start: instant().nanosecondsSinceEpoch,
      logger: logger
    )
  }

  static func randomHex(bytes: Int) -> String {
    var out = ""
    for _ in 0..<bytes {
      let byte = UInt8.random(in: 0...255)
      out += String(byte >> 4, radix: 16) + String(byte & 0xf, radix: 16)
    }
    return out
  }
}

/// One span of ``LogTracer``; logged when it ends.
public final class LogSpan: Span, Sendable {
  struct State {
    var name: String
    var attributes = SpanAttributes()
    var status: SpanStatus?
    var recording = true
  }

  public let context: ServiceContext
  let kind: SpanKind
  let ids: LogTracer.SpanIDs
  let parentSpanID: String?
  let start: UInt64
  let logger: Logger
  private let state: Mutex<State>

  init(
    name: String,
    kind: SpanKind,
    context: ServiceContext,
    ids: LogTracer.SpanIDs,
    parentSpanID: String?,
    start: UInt64,
    logger: Logger
  ) {
    self.kind = kind
    self.context = context
    self.ids = ids
    self.parentSpanID = parentSpanID
    self.start = start
    self.logger = logger
    self.state = Mutex(State(name: name))
  }

  public var operationName: String {
    get { state.withLock { $0.name } }
    set { state.withLock { if $0.recording { $0.name = newValue } } }
  }

  public var attributes: SpanAttributes {
    get { state.withLock { $0.attributes } }
    set { state.withLock { if $0.recording { $0.attributes = newValue } } }
  }

  public var isRecording: Bool { state.withLock { $0.recording } }

  public func setStatus(_ status: SpanStatus) { state.withLock { if $0.recording { $0.status = status } } }
  public func addEvent(_ event: SpanEvent) {}
  public func addLink(_ link: SpanLink) {}
  public func recordError(_ error: any Error, attributes: SpanAttributes, at instant: @autoclosure () -> some TracerInstant) {}

  public func end(at instant: @autoclosure () -> some TracerInstant) {
    guard let finished = state.withLock({ s -> State? in
      guard s.recording else { return nil }
      s.recording = false
      return s
    }) else { return }
    guard logger.logLevel <= .debug else { return }
    let end = instant().nanosecondsSinceEpoch
    var metadata: Logger.Metadata = [
      "trace_id": .string(ids.traceID),
      "span_id": .string(ids.spanID),
      "name": .string(finished.name),
      "kind": .string("\(kind)"),
      "duration_ms": .stringConvertible(Double(end >= start ? end - start : 0) / 1e6),
      "status": .string(finished.status.map { "\($0.code)" } ?? "ok"),
    ]
    if let parentSpanID { metadata["parent_span_id"] = .string(parentSpanID) }
    var attributes: Logger.Metadata = [:]
    finished.attributes.forEach { key, value in attributes[key] = .string("\(value)") }
    if !attributes.isEmpty { metadata["attributes"] = .dictionary(attributes) }
    logger.debug("span", metadata: metadata)
  }
}
